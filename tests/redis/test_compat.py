"""ApeeCache is a drop-in for django_redis.cache.RedisCache, proved on real servers.

Every test runs against a real redis-server: the session's (``redis_url``,
emptied before each test) or one started here for a LOCATION form the session
server cannot show (unix socket, primary + replica, password and ACL user, TLS,
Sentinel), stopped in fixture teardown.

Where both backends should mean the same thing, a test is parametrized over
``ApeeCache`` and ``django_redis.cache.RedisCache`` and asserts the *same*
literal expectations for both: that is the compatibility claim.
"""

from __future__ import annotations

import itertools
import logging
import pickle
import random
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.base import CacheKeyWarning
from django.core.cache.backends.locmem import LocMemCache
from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpResponse
from django.test import override_settings
from django_redis.cache import RedisCache
from django_redis.client import DefaultClient, HerdClient, SentinelClient
from django_redis.pool import ConnectionFactory
from prometheus_client import REGISTRY
from redis.sentinel import SentinelConnectionPool

from django_apee.cache import ApeeCache
from django_apee.client import ApeeClientMixin
from django_apee.core.envelope import FORMAT_VERSION, MAGIC, UnserializableValueError
from tests.support.redis_server import RedisServer, free_port
from tests.support.tls_sentinel_servers import (
    ProbedRedisServer,
    SentinelServer,
    TLSRedisServer,
    self_signed_cert,
    tls_unsupported_reason,
)

# Parity with django-redis's DefaultClient on the same server: django-redis
# has no cluster client to compare with (Django's own cache tests run on the
# cluster: tests/conformance/cluster_settings.py).
pytestmark = pytest.mark.single_node

APEE = "django_apee.cache.ApeeCache"
ALIAS = "compat"
MISS = object()

#: Values of several kinds; each must come back exactly, type included.
VALUES: dict[str, Any] = {
    "str": "héllo wörld",
    "int": 42,
    "dict": {"a": [1, 2], "b": None, "c": {"nested": True}},
    "tuple": (1, "two", 3.0, (4,)),
}


# -- fixtures --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _private_pools(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Give each test its own django-redis pools.

    django-redis keeps one pool per URL for the whole process, whatever the
    OPTIONS: without this a test's PASSWORD or SOCKET_TIMEOUT could silently
    reuse a pool another test built for the same URL.
    """
    pools: dict[str, Any] = {}
    monkeypatch.setattr(ConnectionFactory, "_pools", pools)
    yield
    for pool in pools.values():
        pool.disconnect()


def make_apee(location: Any, **options: Any) -> ApeeCache:
    return ApeeCache(location, {"OPTIONS": options})


@contextmanager
def configured(
    location: Any, *, alias: str = ALIAS, **options: Any
) -> Iterator[ApeeCache]:
    """``caches[alias]`` for an ApeeCache configured through settings."""
    cache_settings = {
        "default": settings.CACHES["default"],
        alias: {"BACKEND": APEE, "LOCATION": location, "OPTIONS": options},
    }
    with override_settings(CACHES=cache_settings):
        yield caches[alias]


_fresh_aliases = itertools.count()


@pytest.fixture
def alias() -> str:
    """An alias of the test's own: its metric series and log limits start fresh."""
    return f"{ALIAS}-{next(_fresh_aliases)}"


@pytest.fixture
def apee(redis_url: str) -> ApeeCache:
    return make_apee(redis_url)


@pytest.fixture
def dredis(redis_url: str) -> RedisCache:
    return RedisCache(redis_url, {"OPTIONS": {}})


@pytest.fixture(params=["apee", "django_redis"])
def backend(request: pytest.FixtureRequest, redis_url: str) -> RedisCache:
    """ApeeCache, then django-redis itself, on the same server and calls."""
    if request.param == "apee":
        return make_apee(redis_url)
    return RedisCache(redis_url, {"OPTIONS": {}})


def made(cache: RedisCache, key: Any) -> str:
    return str(cache.client.make_key(key))


def errors_total(reason: str, alias: str) -> float:
    value = REGISTRY.get_sample_value(
        "apee_cache_serialization_errors_total", {"cache": alias, "reason": reason}
    )
    return value or 0.0


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# -- 1. django-redis's extra methods keep their meaning --------------------------------


@pytest.mark.parametrize("kind", VALUES)
def test_values_of_every_kind_round_trip_exactly(backend, kind):
    value = VALUES[kind]
    assert backend.set(f"k-{kind}", value) is True
    got = backend.get(f"k-{kind}")
    assert got == value
    assert type(got) is type(value)
    assert backend.get_many([f"k-{kind}", "absent"]) == {f"k-{kind}": value}


def test_set_nx_and_xx(backend):
    assert backend.set("a", VALUES["dict"], nx=True) is True
    assert backend.set("a", "other", nx=True) is False
    assert backend.get("a") == VALUES["dict"]

    assert backend.set("b", VALUES["tuple"], xx=True) is False
    assert backend.get("b", MISS) is MISS
    assert backend.set("a", VALUES["tuple"], xx=True) is True
    assert backend.get("a") == VALUES["tuple"]


def test_add_only_when_absent(backend):
    assert backend.add("k", VALUES["str"]) is True
    assert backend.add("k", VALUES["int"]) is False
    assert backend.get("k") == VALUES["str"]
    assert backend.add("n", VALUES["int"], timeout=100) is True
    assert backend.get("n") == 42
    assert 99 <= backend.ttl("n") <= 100


def test_ttl_pttl_expire_persist(backend):
    backend.set("k", VALUES["dict"], timeout=100)
    assert 99 <= backend.ttl("k") <= 100
    assert 99_000 < backend.pttl("k") <= 100_000
    backend.set("forever", VALUES["tuple"], timeout=None)
    assert backend.ttl("forever") is None
    assert backend.pttl("forever") is None
    assert backend.ttl("absent") == 0
    assert backend.pttl("absent") == 0

    assert backend.expire("k", 50) is True
    assert 49 <= backend.ttl("k") <= 50
    assert backend.pexpire("k", 5_000) is True
    assert 4_000 < backend.pttl("k") <= 5_000
    assert backend.persist("k") is True
    assert backend.ttl("k") is None
    assert backend.persist("k") is False  # nothing left to persist
    assert backend.expire("absent", 10) is False
    assert backend.get("k") == VALUES["dict"]


def test_expire_at_and_pexpire_at(backend):
    backend.set("a", VALUES["str"], timeout=None)
    backend.set("b", VALUES["int"], timeout=None)
    now = datetime.now(tz=timezone.utc)

    assert backend.expire_at("a", now + timedelta(seconds=60)) is True
    assert 58 <= backend.ttl("a") <= 60
    assert backend.expire_at("a", int(now.timestamp()) + 120) is True
    assert 118 <= backend.ttl("a") <= 120

    assert backend.pexpire_at("b", now + timedelta(seconds=7)) is True
    assert 5_000 < backend.pttl("b") <= 7_000
    assert backend.pexpire_at("b", int(now.timestamp() * 1000) + 9_000) is True
    assert 7_000 < backend.pttl("b") <= 9_000

    assert backend.expire_at("c", now + timedelta(seconds=60)) is False
    assert backend.expire_at("a", now - timedelta(seconds=1)) is True  # the past
    assert backend.get("a", MISS) is MISS
    assert backend.get("b") == 42


def test_touch(backend):
    backend.set("k", VALUES["tuple"], timeout=100)
    assert backend.touch("k", 30) is True
    assert 29 <= backend.ttl("k") <= 30
    assert backend.touch("k", None) is True
    assert backend.ttl("k") is None
    assert backend.touch("k") is True  # DEFAULT_TIMEOUT: the backend's 300 s
    assert 299 <= backend.ttl("k") <= 300
    assert backend.get("k") == VALUES["tuple"]

    assert backend.touch("k", 0) is True  # 0 expires at once
    assert backend.get("k", MISS) is MISS
    assert backend.has_key("k") is False
    assert backend.touch("absent", 10) is False


def test_keys_iter_keys_delete_pattern(backend, raw_redis):
    for name, value in [("user:1", "a"), ("user:2", 2), ("user:3", (3,)), ("x", {})]:
        backend.set(name, value)
    # A django-apee companion key (lease) next to a value key: never listed.
    raw_redis.set("{:1:user:1}|apee:lease", b"1")

    assert sorted(backend.keys("*")) == ["user:1", "user:2", "user:3", "x"]
    assert sorted(backend.keys("user:*")) == ["user:1", "user:2", "user:3"]
    iterator = backend.iter_keys("user:*")
    assert not isinstance(iterator, list)
    assert sorted(iterator) == ["user:1", "user:2", "user:3"]
    assert backend.keys("nothing*") == []

    assert backend.delete_pattern("user:*") == 3
    assert backend.delete_pattern("user:*") == 0
    assert backend.keys("*") == ["x"]
    assert backend.get("user:2", MISS) is MISS
    # ApeeCache revokes the lease of each key it deletes (test_invalidation.py).
    lease_left = 0 if isinstance(backend, ApeeCache) else 1
    assert raw_redis.exists("{:1:user:1}|apee:lease") == lease_left


def test_incr_decr(backend):
    backend.set("n", 10, timeout=100)
    assert backend.incr("n") == 11
    assert backend.incr("n", 5) == 16
    assert backend.decr("n") == 15
    assert backend.decr("n", 20) == -5
    assert backend.get("n") == -5
    assert 99 <= backend.ttl("n") <= 100  # the TTL survives

    with pytest.raises(ValueError, match="not found"):
        backend.incr("absent")
    with pytest.raises(ValueError, match="not found"):
        backend.decr("absent")
    assert backend.get("absent", MISS) is MISS

    assert backend.incr("created", ignore_key_check=True) == 1
    assert backend.incr("created5", 5, ignore_key_check=True) == 5
    assert backend.get("created5") == 5


def test_incr_past_64_bits_continues_in_python(backend):
    backend.set("big", 2**63 - 1)
    assert backend.incr("big") == 2**63
    assert backend.get("big") == 2**63


@pytest.mark.parametrize("start", [1.5, Decimal("1.5")], ids=["float", "decimal"])
def test_incr_returns_what_it_stored(backend, start):
    """django-redis (and Django's LocMemCache) return the new value as stored."""
    backend.set("n", start)
    result = backend.incr("n")
    assert backend.get("n") == start + 1
    assert result == start + 1
    assert type(result) is type(start)


def test_incr_is_atomic_across_threads(backend):
    backend.set("counter", 0)
    threads, per_thread = 8, 200
    barrier = threading.Barrier(threads)
    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            barrier.wait()
            for _ in range(per_thread):
                backend.incr("counter")
        except BaseException as error:  # surfaced below
            errors.append(error)

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert errors == []
    assert backend.get("counter") == threads * per_thread == 1600


def test_lock_acquire_release(backend, raw_redis):
    lock = backend.lock("resource", timeout=5)
    assert lock.acquire(blocking=False) is True
    assert raw_redis.exists(made(backend, "resource")) == 1
    assert 0 < raw_redis.pttl(made(backend, "resource")) <= 5_000

    other: list[bool] = []

    def try_from_another_thread() -> None:
        other.append(backend.lock("resource", timeout=5).acquire(blocking=False))

    thread = threading.Thread(target=try_from_another_thread)
    thread.start()
    thread.join()
    assert other == [False]

    lock.release()
    assert raw_redis.exists(made(backend, "resource")) == 0
    thread = threading.Thread(target=try_from_another_thread)
    thread.start()
    thread.join()
    assert other == [False, True]


def test_lock_mutual_exclusion_across_threads(backend):
    inside = 0
    most_inside = 0
    entries = 0
    guard = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        nonlocal inside, most_inside, entries
        try:
            for _ in range(5):
                with backend.lock("shared", timeout=5, blocking_timeout=10):
                    with guard:
                        inside += 1
                        entries += 1
                        most_inside = max(most_inside, inside)
                    time.sleep(0.005)
                    with guard:
                        inside -= 1
        except BaseException as error:
            errors.append(error)

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    assert errors == []
    assert entries == 10
    assert most_inside == 1


def test_set_family(backend):
    tup = (1, "t")
    assert backend.sadd("s1", "a", 1, tup, "b") == 4
    assert backend.sadd("s1", "a") == 0
    assert backend.scard("s1") == 4
    assert backend.smembers("s1") == {"a", 1, tup, "b"}
    assert backend.sismember("s1", tup) is True
    assert backend.sismember("s1", "zz") is False
    assert backend.smismember("s1", "a", "zz", 1) == [True, False, True]

    assert backend.sadd("s2", "b", 2, tup) == 3
    assert backend.sdiff("s1", "s2") == {"a", 1}
    assert backend.sinter("s1", "s2") == {"b", tup}
    assert backend.sunion("s1", "s2") == {"a", 1, 2, "b", tup}
    assert backend.sdiffstore("d", "s1", "s2") == 2
    assert backend.smembers("d") == {"a", 1}
    assert backend.sinterstore("i", "s1", "s2") == 2
    assert backend.smembers("i") == {"b", tup}
    assert backend.sunionstore("u", "s1", "s2") == 5
    assert backend.smembers("u") == {"a", 1, 2, "b", tup}

    assert backend.smove("s1", "s2", "a") is True
    assert backend.smove("s1", "s2", "missing") is False
    assert backend.smembers("s1") == {1, tup, "b"}
    assert backend.sismember("s2", "a") is True
    assert backend.srem("s1", 1, "zz") == 1
    assert backend.smembers("s1") == {tup, "b"}

    assert backend.srandmember("s1") in {tup, "b"}
    picked = backend.srandmember("s1", 2)
    assert isinstance(picked, list)
    assert sorted(map(repr, picked)) == sorted(map(repr, [tup, "b"]))
    assert backend.srandmember("nothing") is None

    assert backend.sscan("s2") == {"a", 2, "b", tup}
    assert set(backend.sscan_iter("s2")) == {"a", 2, "b", tup}

    assert backend.spop("i") in {"b", tup}
    assert backend.scard("i") == 1
    popped = backend.spop("u", 2)
    assert isinstance(popped, set)
    assert len(popped) == 2
    assert popped <= {"a", 1, 2, "b", tup}
    assert backend.scard("u") == 3
    assert backend.spop("nothing") is None


def test_hash_family(backend, raw_redis):
    assert backend.hset("h", "f1", VALUES["dict"]) == 1
    assert backend.hset("h", mapping={"f2": VALUES["tuple"], "f3": 3, "f4": "s"}) == 3
    assert backend.hset("h", "f1", VALUES["str"]) == 0  # an update, not an add
    assert backend.hlen("h") == 4
    assert sorted(backend.hkeys("h")) == ["f1", "f2", "f3", "f4"]
    assert backend.hexists("h", "f2") is True
    assert backend.hexists("h", "zz") is False

    # No hget in django-redis: read the stored fields back with the codec.
    key = made(backend, "h")
    decode = backend.client.decode
    assert decode(raw_redis.hget(key, "f1")) == VALUES["str"]
    assert decode(raw_redis.hget(key, "f2")) == VALUES["tuple"]
    assert decode(raw_redis.hget(key, "f3")) == 3

    assert backend.hdel("h", "f2") == 1
    assert backend.hdel("h", "f2") == 0
    assert backend.hlen("h") == 3
    assert backend.hlen("nothing") == 0
    assert backend.hkeys("nothing") == []


def test_sorted_set_family(backend):
    tup = (1, "t")
    assert backend.zadd("z", {"a": 1, 2: 2, tup: 3, "d": 4.5}) == 4
    assert backend.zadd("z", {"a": 1}) == 0
    assert backend.zcard("z") == 4
    assert backend.zcount("z", 2, 4) == 2
    assert backend.zscore("z", tup) == 3.0
    assert backend.zscore("z", "zz") is None
    assert backend.zrank("z", 2) == 1
    assert backend.zincrby("z", 10, "a") == 11.0

    assert backend.zrange("z", 0, -1) == [2, tup, "d", "a"]
    assert backend.zrange("z", 0, 1, withscores=True) == [(2, 2.0), (tup, 3.0)]
    assert backend.zrevrange("z", 0, 1) == ["a", "d"]
    assert backend.zrevrange("z", 0, 0, withscores=True) == [("a", 11.0)]
    assert backend.zrangebyscore("z", 2, 4.5) == [2, tup, "d"]
    assert backend.zrangebyscore("z", 3, "+inf", withscores=True) == [
        (tup, 3.0),
        ("d", 4.5),
        ("a", 11.0),
    ]
    assert backend.zrevrangebyscore("z", 100, 3) == ["a", "d", tup]

    assert backend.zpopmax("z") == ("a", 11.0)
    assert backend.zpopmin("z") == (2, 2.0)
    assert backend.zpopmin("z", 5) == [(tup, 3.0), ("d", 4.5)]
    assert backend.zpopmax("z") is None
    assert backend.zpopmin("z", 2) == []

    backend.zadd("z", {"a": 1, "b": 2, "c": 3, tup: 4})
    assert backend.zrem("z", "a", "nope") == 1
    assert backend.zremrangebyscore("z", 0, 2.5) == 1
    assert backend.zrange("z", 0, -1) == ["c", tup]


def test_every_family_writes_envelopes(apee, raw_redis):
    """The families go through django-apee's codec, not django-redis's pickle."""
    apee.sadd("s", "text", (1, 2), 7)
    apee.hset("h", mapping={"d": VALUES["dict"], "n": 5})
    apee.zadd("z", {"m": 1.0, 9: 2.0})
    members = raw_redis.smembers(":1:s")
    assert b"7" in members  # raw int, as django-redis stores it
    assert all(m.startswith(MAGIC) for m in members - {b"7"})
    assert raw_redis.hget(":1:h", "d").startswith(MAGIC)
    assert raw_redis.hget(":1:h", "n") == b"5"
    assert all(m.startswith(MAGIC) for m in raw_redis.zrange(":1:z", 0, -1))


# -- 2. LOCATION forms and OPTIONS -----------------------------------------------------


def test_redis_url_with_db_number(redis_url, raw_redis):
    location = redis_url.rsplit("/", 1)[0] + "/5"
    db5 = redis.Redis.from_url(location)
    db5.flushdb()
    try:
        cache = make_apee(location)
        assert cache.set("k", VALUES["dict"]) is True
        assert cache.get("k") == VALUES["dict"]
        assert db5.exists(":1:k") == 1
        assert raw_redis.exists(":1:k") == 0  # not in db 0
    finally:
        db5.flushdb()
        db5.close()


@pytest.fixture(scope="module")
def unix_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    path = tmp_path_factory.mktemp("sock") / "redis.sock"
    server = RedisServer(
        extra_args=("--unixsocket", str(path), "--unixsocketperm", "700")
    )
    server.start()
    server.socket_path = str(path)  # type: ignore[attr-defined]
    yield server
    server.close()


def test_unix_socket_location(unix_server):
    path = unix_server.socket_path
    cache = make_apee(f"unix://{path}?db=3")
    assert cache.set("k", VALUES["tuple"]) is True
    assert cache.get("k") == VALUES["tuple"]
    raw = redis.Redis(unix_socket_path=path, db=3)
    try:
        assert raw.exists(":1:k") == 1
        pool = cache.client.get_client().connection_pool
        assert pool.connection_kwargs["path"] == path
    finally:
        raw.close()


@pytest.fixture(scope="module")
def replica_pair() -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer(extra_args=("--repl-diskless-sync-delay", "0")).start()
    replica = RedisServer(extra_args=("--replicaof", "127.0.0.1", str(primary.port)))
    try:
        replica.start()
        yield primary, replica
    finally:
        replica.close()
        primary.close()


@pytest.mark.parametrize("form", ["comma", "list"])
def test_primary_and_replica_location(replica_pair, form):
    primary, replica = replica_pair
    urls = [primary.url, replica.url]
    location = ",".join(urls) if form == "comma" else urls
    key, value = f"k-{form}", {"form": form, "t": (1, 2)}
    with configured(location) as cache:
        # Replica reads are opt-in (client_routing.py): a replica lags.
        reader = cache.client.get_client(write=False)
        assert reader.connection_pool.connection_kwargs["port"] == primary.port
    with configured(location, REPLICA_READS=True) as cache:
        writer = cache.client.get_client(write=True)
        reader = cache.client.get_client(write=False)
        assert writer.connection_pool.connection_kwargs["port"] == primary.port
        assert reader.connection_pool.connection_kwargs["port"] == replica.port

        # The replica is read-only: a write routed there would raise.
        assert cache.set(key, value) is True
        assert cache.incr(f"n-{form}", ignore_key_check=True) == 1
        assert wait_for(lambda: cache.get(key) == value)
        assert wait_for(lambda: cache.get(f"n-{form}") == 1)
    for server in (primary, replica):
        raw = redis.Redis(port=server.port)
        assert raw.exists(f":1:{key}") == 1
        raw.close()


@pytest.fixture(scope="module")
def auth_server() -> Iterator[ProbedRedisServer]:
    server = ProbedRedisServer(
        extra_args=(
            "--requirepass",
            "s3cret",
            "--user",
            "alice",
            "on",
            ">wonderland",
            "~*",
            "&*",
            "+@all",
        ),
        password="s3cret",
    )
    server.start()
    yield server
    server.close()


def whoami(cache: ApeeCache) -> str:
    name = cache.client.get_client().acl_whoami()
    return name.decode() if isinstance(name, bytes) else str(name)


def test_password_option(auth_server):
    cache = make_apee(auth_server.url, PASSWORD="s3cret")
    assert cache.set("k", VALUES["dict"]) is True
    assert cache.get("k") == VALUES["dict"]
    assert whoami(cache) == "default"


def test_username_and_password_options(auth_server):
    url = f"redis://127.0.0.1:{auth_server.port}/1"
    cache = make_apee(url, USERNAME="alice", PASSWORD="wonderland")
    assert cache.set("k", VALUES["tuple"]) is True
    assert cache.get("k") == VALUES["tuple"]
    assert whoami(cache) == "alice"


def test_password_in_the_url(auth_server):
    cache = make_apee(f"redis://:s3cret@127.0.0.1:{auth_server.port}/2")
    assert cache.set("k", 7) is True
    assert cache.get("k") == 7


@pytest.mark.parametrize("options", [{"PASSWORD": "wrong"}, {}], ids=["wrong", "none"])
def test_bad_credentials_raise_quickly(auth_server, options):
    cache = make_apee(auth_server.url, **options)
    started = time.monotonic()
    with pytest.raises(redis.exceptions.ConnectionError) as caught:
        cache.get("k")
    assert time.monotonic() - started < 1.0
    if options:
        assert isinstance(caught.value, redis.exceptions.AuthenticationError)


def test_bad_password_with_ignore_exceptions(auth_server):
    cache = make_apee(auth_server.url, PASSWORD="wrong", IGNORE_EXCEPTIONS=True)
    started = time.monotonic()
    assert cache.get("k", "fallback") == "fallback"
    assert cache.get_many(["k", "j"]) == {}
    assert cache.set_many({"a": 1, "b": (2,), "c": {"x": 3}}) == ["a", "b", "c"]
    assert cache.set("k", 1) is None
    assert time.monotonic() - started < 2.0


class CountingRedis(redis.Redis):
    """A REDIS_CLIENT_CLASS that the backend must use for its connections."""


def test_pool_and_client_class_options(redis_url):
    cache = make_apee(
        redis_url,
        CONNECTION_POOL_CLASS="redis.BlockingConnectionPool",
        CONNECTION_POOL_KWARGS={"max_connections": 7, "timeout": 1},
        REDIS_CLIENT_CLASS="tests.redis.test_compat.CountingRedis",
    )
    client = cache.client.get_client()
    assert isinstance(client, CountingRedis)
    assert isinstance(client.connection_pool, redis.BlockingConnectionPool)
    assert client.connection_pool.max_connections == 7
    assert cache.set("k", VALUES["str"]) is True
    assert cache.get("k") == VALUES["str"]


def connection_timeouts(cache: ApeeCache) -> tuple[Any, Any]:
    pool = cache.client.get_client().connection_pool
    connection = pool.get_connection()
    try:
        return connection.socket_timeout, connection.socket_connect_timeout
    finally:
        pool.release(connection)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, (2.0, 1.0)),
        ({"SOCKET_TIMEOUT": 0.5, "SOCKET_CONNECT_TIMEOUT": 0.25}, (0.5, 0.25)),
        ({"SOCKET_TIMEOUT": 3}, (3, 1.0)),
        ({"SOCKET_TIMEOUT": None, "SOCKET_CONNECT_TIMEOUT": None}, (None, None)),
        ({"SOCKET_TIMEOUT": None}, (None, 1.0)),
    ],
    ids=["defaults", "explicit", "one-explicit", "explicit-none", "one-none"],
)
def test_socket_timeouts(redis_url, options, expected):
    cache = make_apee(redis_url, **options)
    assert connection_timeouts(cache) == expected
    assert cache.set("k", 1) is True


def test_close_connection_option(redis_url):
    closing = make_apee(redis_url, CLOSE_CONNECTION=True)
    keeping = make_apee(redis_url)
    for cache in (closing, keeping):
        assert cache.set("k", 1) is True
        assert cache.client._clients[0] is not None
        cache.close()
    assert closing.client._clients == [None]
    assert keeping.client._clients[0] is not None
    assert closing.get("k") == 1  # reconnects on next use


def test_socket_timeouts_do_not_touch_the_callers_options(redis_url):
    options = {"IGNORE_EXCEPTIONS": False}
    with configured(redis_url, **options) as cache:
        assert connection_timeouts(cache) == (2.0, 1.0)
        assert settings.CACHES[ALIAS]["OPTIONS"] == {"IGNORE_EXCEPTIONS": False}


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TLSRedisServer]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a throwaway certificate")
    cert, key = self_signed_cert(tmp_path_factory.mktemp("tls"))
    reason = tls_unsupported_reason(cert)
    if reason is not None:
        pytest.skip(reason)
    server = TLSRedisServer(cert, key)
    server.cert = cert  # type: ignore[attr-defined]
    server.start()
    yield server
    server.close()


@pytest.mark.parametrize("how", ["url-query", "pool-kwargs", "verified-ca"])
def test_rediss_location(tls_server, how):
    if how == "url-query":
        cache = make_apee(tls_server.url + "?ssl_cert_reqs=none")
    elif how == "pool-kwargs":
        cache = make_apee(
            tls_server.url, CONNECTION_POOL_KWARGS={"ssl_cert_reqs": "none"}
        )
    else:
        cache = make_apee(
            tls_server.url, CONNECTION_POOL_KWARGS={"ssl_ca_certs": tls_server.cert}
        )
    assert cache.set(f"k-{how}", VALUES["dict"]) is True
    assert cache.get(f"k-{how}") == VALUES["dict"]
    pool = cache.client.get_client().connection_pool
    assert pool.connection_class is redis.SSLConnection


def test_tls_server_refuses_plaintext_and_unknown_certs(tls_server):
    plain = make_apee(tls_server.url.replace("rediss://", "redis://"))
    with pytest.raises(redis.exceptions.ConnectionError):
        plain.get("k")
    unverified = make_apee(tls_server.url)  # default: verify against system CAs
    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY"):
        unverified.get("k")


@pytest.fixture(scope="module")
def sentinel_setup() -> Iterator[tuple[RedisServer, SentinelServer]]:
    primary = RedisServer().start()
    sentinel = SentinelServer(primary.port, name="mymaster")
    try:
        sentinel.start()
        yield primary, sentinel
    finally:
        sentinel.close()
        primary.close()


def test_sentinel_client(sentinel_setup):
    primary, sentinel = sentinel_setup
    with configured(
        "redis://mymaster/0",
        CLIENT_CLASS="django_redis.client.SentinelClient",
        CONNECTION_FACTORY="django_redis.pool.SentinelConnectionFactory",
        SENTINELS=[("127.0.0.1", sentinel.port)],
    ) as cache:
        assert isinstance(cache.client, SentinelClient)
        assert isinstance(cache.client, ApeeClientMixin)
        assert cache.set("k", VALUES["tuple"]) is True
        assert cache.get("k") == VALUES["tuple"]
        assert cache.incr("n", ignore_key_check=True) == 1
        for write in (True, False):
            pool = cache.client.get_client(write=write).connection_pool
            assert isinstance(pool, SentinelConnectionPool)
        raw = redis.Redis(port=primary.port)
        assert raw.exists(":1:k") == 1
        assert raw.get(":1:n") == b"1"
        raw.close()


class MyHerd(HerdClient):
    pass


class MyClient(DefaultClient):
    pass


@pytest.mark.parametrize(
    "path",
    [
        "django_redis.client.HerdClient",
        "django_redis.client.ShardClient",
        "tests.redis.test_compat.MyHerd",
    ],
)
def test_refused_client_classes(redis_url, path):
    cache = make_apee(redis_url, CLIENT_CLASS=path)  # apee.E002 reports it
    with pytest.raises(ImproperlyConfigured) as caught:
        cache.get("k")
    message = str(caught.value)
    assert path in message
    assert "not supported by django_apee" in message
    assert "DefaultClient" in message
    assert "SentinelClient" in message
    options = {"CLIENT_CLASS": path}
    entry = {"BACKEND": APEE, "LOCATION": redis_url, "OPTIONS": options}
    everything = {"default": settings.CACHES["default"], ALIAS: entry}
    with (
        override_settings(CACHES=everything),
        pytest.raises(ImproperlyConfigured, match="not supported by django_apee"),
    ):
        caches[ALIAS].set("k", 1)


def test_custom_default_client_subclass_is_kept(redis_url):
    cache = make_apee(redis_url, CLIENT_CLASS="tests.redis.test_compat.MyClient")
    assert isinstance(cache.client, MyClient)
    assert isinstance(cache.client, ApeeClientMixin)
    cache.set("k", VALUES["tuple"])
    assert cache.get("k") == VALUES["tuple"]


# -- 3. Constructing the backend never talks to Redis ----------------------------------


def test_construction_never_connects():
    location = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens here
    with configured(location) as cache:
        assert isinstance(cache, ApeeCache)
        assert cache.envelope.encode("x", key=cache.make_key("x")) != b""
        assert cache.client._clients == [None]  # the client exists, unconnected
        started = time.monotonic()
        with pytest.raises(redis.exceptions.ConnectionError):
            cache.get("k")
        assert time.monotonic() - started < 3.0


def test_default_connect_timeout_bounds_a_silent_server():
    """A listener that never completes the handshake: give up after ~1 s."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    try:
        for _ in range(3):  # fill the accept queue so later SYNs go unanswered
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(listener.getsockname())
            fillers.append(filler)
        cache = make_apee(f"redis://127.0.0.1:{listener.getsockname()[1]}/0")
        started = time.monotonic()
        with pytest.raises(redis.exceptions.TimeoutError):
            cache.get("k")
        elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 3.0
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# -- 4. Bad input ----------------------------------------------------------------------


def recorded(action: Callable[[], Any]) -> tuple[Any, list[tuple[type, str]]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = action()
    return result, [(w.category, str(w.message)) for w in caught]


@pytest.mark.parametrize("key", [42, (1, 2), 3.5], ids=["int", "tuple", "float"])
def test_non_string_keys_are_stringified_like_django(apee, raw_redis, key):
    locmem = LocMemCache("compat-locmem", {})

    def round_trip(cache: Any) -> tuple[Any, Any, Any]:
        cache.set(key, VALUES["dict"])
        return cache.get(key), cache.get(str(key)), cache.get_many([key])

    ours, our_warnings = recorded(lambda: round_trip(apee))
    django, django_warnings = recorded(lambda: round_trip(locmem))
    assert ours == django == (VALUES["dict"], VALUES["dict"], {key: VALUES["dict"]})
    assert our_warnings == django_warnings
    assert raw_redis.exists(f":1:{key}") == 1


@pytest.mark.parametrize(
    ("key", "fragment"),
    [("k" * 300, "longer than 250"), ("with spaces", "characters")],
    ids=["long", "spaces"],
)
def test_key_warnings(apee, key, fragment):
    locmem = LocMemCache("compat-locmem", {})
    _, ours = recorded(lambda: apee.set(key, 1))
    _, django = recorded(lambda: locmem.set(key, 1))
    assert ours == django
    assert [category for category, _ in ours] == [CacheKeyWarning]
    assert fragment in ours[0][1]
    with pytest.warns(CacheKeyWarning):
        assert apee.get(key) == 1  # a warning, not a refusal


@pytest.mark.parametrize(
    "value", [lambda: 1, threading.Lock()], ids=["lambda", "thread-lock"]
)
def test_unpicklable_value_raises_and_stores_nothing(apee, raw_redis, value):
    apee.set("old", "kept")
    with pytest.raises(UnserializableValueError) as caught:
        apee.set("k", value)
    assert isinstance(caught.value, TypeError)
    assert isinstance(caught.value, pickle.PickleError)
    with pytest.raises(UnserializableValueError):
        apee.set("old", {"nested": [value]})
    with pytest.raises(UnserializableValueError):
        apee.set_many({"a": 1, "b": value})
    assert raw_redis.exists(":1:k", ":1:a", ":1:b") == 0
    assert apee.get("old") == "kept"


def test_pickle_fallback_off_refuses_http_response(redis_url, raw_redis):
    cache = make_apee(redis_url, ALLOW_PICKLE=False)
    with pytest.raises(UnserializableValueError, match="ALLOW_PICKLE") as caught:
        cache.set("page", HttpResponse(b"<p>hi</p>"))
    assert isinstance(caught.value, TypeError)
    assert isinstance(caught.value, pickle.PickleError)
    assert raw_redis.exists(":1:page") == 0
    assert cache.set("ok", VALUES["tuple"]) is True  # msgpack values still work
    assert cache.get("ok") == VALUES["tuple"]


def test_pickle_fallback_on_stores_http_response_signed(apee, raw_redis):
    apee.set("page", HttpResponse(b"<p>hi</p>", status=201))
    stored = raw_redis.get(":1:page")
    assert stored.startswith(MAGIC)
    assert stored[3] & 0x03 == 1  # the signed-pickle codec
    page = apee.get("page")
    assert (page.status_code, page.content) == (201, b"<p>hi</p>")


# -- 5. Corrupt bytes in Redis ---------------------------------------------------------


def _garbage(cache: ApeeCache) -> bytes:
    blob = b"\x00" + random.Random(7).randbytes(63)
    assert not blob.startswith(MAGIC)
    return blob


def _wrong_version(cache: ApeeCache) -> bytes:
    return MAGIC + bytes((FORMAT_VERSION + 1, 0)) + b"\x91\x01"


def _version_1(cache: ApeeCache) -> bytes:
    # What a reader before format version 2 wrote: an unsigned msgpack "x".
    return MAGIC + b"\x01\x00" + b"\xa1x"


def _encoded(cache: ApeeCache, value: Any, key: str = "bad") -> bytes:
    encoded = cache.envelope.encode(value, key=cache.make_key(key))
    assert isinstance(encoded, bytes)
    return encoded


def _truncated_header(cache: ApeeCache) -> bytes:
    return _encoded(cache, {"a": 1})[:3]


def _truncated_mac(cache: ApeeCache) -> bytes:
    return _encoded(cache, HttpResponse(b"x" * 100))[:12]


def _flipped_signed_pickle(cache: ApeeCache) -> bytes:
    data = bytearray(_encoded(cache, HttpResponse(b"x" * 100)))
    assert data[3] & 0x03 == 1  # really a pickle
    data[len(data) // 2] ^= 0x01
    return bytes(data)


def _unsigned_msgpack(cache: ApeeCache) -> bytes:
    return MAGIC + bytes((FORMAT_VERSION, 0)) + bytes(16) + b"\xa1x"


def _from_another_key(cache: ApeeCache) -> bytes:
    return _encoded(cache, {"a": 1}, key="other")


def _reserved_flags(cache: ApeeCache) -> bytes:
    return MAGIC + bytes((FORMAT_VERSION, 0xE0)) + b"\xa1x"


def _django_redis_pickle(cache: ApeeCache) -> bytes:
    writer = RedisCache(cache._server, {"OPTIONS": {}})
    writer.set("scratch", {"written": "by django-redis"})
    raw = writer.client.get_client().get(":1:scratch")
    writer.delete("scratch")
    assert raw.startswith(b"\x80")  # a bare pickle
    return raw


CORRUPT = {
    "garbage": (_garbage, "foreign"),
    "wrong-version": (_wrong_version, "version"),
    "version-1": (_version_1, "version"),
    "truncated-header": (_truncated_header, "truncated"),
    "truncated-mac": (_truncated_mac, "truncated"),
    "flipped-signed-pickle": (_flipped_signed_pickle, "signature"),
    "unsigned-msgpack": (_unsigned_msgpack, "signature"),
    "from-another-key": (_from_another_key, "signature"),
    "reserved-flags": (_reserved_flags, "corrupt"),
    "django-redis-pickle": (_django_redis_pickle, "foreign"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_unreadable_value_is_a_counted_miss(redis_url, raw_redis, caplog, alias, case):
    make_blob, reason = CORRUPT[case]
    caplog.set_level(logging.WARNING, logger="django_apee")
    with configured(redis_url, alias=alias) as cache:
        raw_redis.set(cache.make_key("bad"), make_blob(cache))
        cache.set("good", VALUES["tuple"])
        before = {r: errors_total(r, alias) for _, r in CORRUPT.values()}

        for _ in range(25):
            assert cache.get("bad", MISS) is MISS
            assert cache.get_many(["bad", "good"]) == {"good": VALUES["tuple"]}
        assert cache.has_key("bad") is True  # a miss, not a delete

        after = {r: errors_total(r, alias) for _, r in CORRUPT.values()}
        assert after[reason] - before[reason] == 50
        assert {r: after[r] - before[r] for r in after if r != reason} == {
            r: 0.0 for r in after if r != reason
        }
    records = [r for r in caplog.records if r.name == "django_apee"]
    assert len(records) == 1
    assert f"({reason})" in records[0].getMessage()


def test_each_reason_is_logged_once_per_backend(redis_url, raw_redis, caplog, alias):
    caplog.set_level(logging.WARNING, logger="django_apee")
    with configured(redis_url, alias=alias) as cache:
        raw_redis.set(cache.make_key("a"), _garbage(cache))
        raw_redis.set(cache.make_key("b"), _wrong_version(cache))
        for _ in range(50):
            assert cache.get("a") is None
            assert cache.get("b") is None
    messages = [r.getMessage() for r in caplog.records if r.name == "django_apee"]
    assert len(messages) == 2
    assert sum("(foreign)" in m for m in messages) == 1
    assert sum("(version)" in m for m in messages) == 1


def test_reason_is_logged_once_across_threads(redis_url, raw_redis, caplog, alias):
    """Django gives each thread its own backend; the log limit must hold anyway.

    docs/concepts/envelope.rst promises a warning "at most once a minute per
    reason"; a threaded server (gthread, runserver, ASGI's sync threads)
    reads through one ``caches[alias]`` instance per thread.
    """
    caplog.set_level(logging.WARNING, logger="django_apee")
    errors: list[BaseException] = []
    with configured(redis_url, alias=alias) as cache:
        raw_redis.set(cache.make_key("bad"), _garbage(cache))
        before = errors_total("foreign", alias)

        def reader() -> None:
            try:
                for _ in range(10):
                    assert caches[alias].get("bad", MISS) is MISS
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        assert errors_total("foreign", alias) - before == 40
    records = [r for r in caplog.records if r.name == "django_apee"]
    assert len(records) == 1


#: LEGACY_READS with an end date a week away.
LEGACY = {
    "LEGACY_READS": True,
    "LEGACY_READS_UNTIL": str((datetime.now(timezone.utc) + timedelta(days=7)).date()),
}


@pytest.fixture
def legacy_values(redis_url: str) -> dict[str, Any]:
    """Values written by django-redis and by Django's own RedisCache."""
    written = {
        "dr-dict": {"x": (1, 2), "when": datetime(2024, 1, 2, tzinfo=timezone.utc)},
        "dr-str": "from django-redis",
        "dr-bool": True,
        "dr-int": 7,
        "dj-dict": {"y": [1, 2, 3]},
        "dj-str": "from django",
        "dj-int": 8,
    }
    django_redis = RedisCache(redis_url, {"OPTIONS": {}})
    django_cache = DjangoRedisCache(redis_url, {})
    for key, value in written.items():
        (django_redis if key.startswith("dr-") else django_cache).set(key, value)
    return written


def test_legacy_reads_read_both_old_formats(redis_url, raw_redis, legacy_values, alias):
    assert raw_redis.get(":1:dr-int") == b"7"
    assert raw_redis.get(":1:dj-int") == b"8"
    assert raw_redis.get(":1:dj-dict").startswith(b"\x80")
    before = errors_total("foreign", alias)
    with configured(redis_url, alias=alias, **LEGACY) as cache:
        for key, value in legacy_values.items():
            assert cache.get(key) == value
            assert type(cache.get(key)) is type(value)
        assert cache.get_many(list(legacy_values)) == legacy_values
        assert cache.incr("dr-int") == 8
        assert cache.incr("dj-int") == 9
    assert errors_total("foreign", alias) == before
    # 5 pickles, each read 3 times; raw ints are not legacy reads.
    assert errors_total("legacy", alias) == 15


def test_without_legacy_reads_old_pickles_are_misses(redis_url, legacy_values, alias):
    before = errors_total("foreign", alias)
    with configured(redis_url, alias=alias) as cache:
        assert cache.get_many(list(legacy_values)) == {"dr-int": 7, "dj-int": 8}
        assert cache.get("dr-dict", MISS) is MISS
    assert errors_total("foreign", alias) - before == 6  # 5 in get_many, 1 in get


def test_legacy_reads_follow_serializer_and_compressor(redis_url, raw_redis):
    options = {
        "SERIALIZER": "django_redis.serializers.json.JSONSerializer",
        "COMPRESSOR": "django_redis.compressors.zlib.ZlibCompressor",
    }
    writer = RedisCache(redis_url, {"OPTIONS": options})
    written = {"short": "s", "long": {"text": "x" * 500}, "float": 1.5, "n": 3}
    writer.set_many(written)
    assert raw_redis.get(":1:long").startswith(b"\x78")  # zlib
    with configured(redis_url, **LEGACY, **options) as cache:
        assert cache.get_many(list(written)) == written


def test_legacy_reads_need_an_end_date_and_stop_at_it(redis_url, legacy_values, alias):
    with pytest.raises(ImproperlyConfigured, match="LEGACY_READS_UNTIL"):
        ApeeCache(redis_url, {"OPTIONS": {"LEGACY_READS": True}}).get("dr-str")
    yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).date()
    with configured(
        redis_url, alias=alias, LEGACY_READS=True, LEGACY_READS_UNTIL=yesterday
    ) as cache:
        assert cache.get("dr-str", MISS) is MISS


def test_legacy_reads_try_only_pickles_and_warn_once(
    redis_url, raw_redis, legacy_values, alias, caplog
):
    caplog.set_level(logging.WARNING, logger="django_apee")
    raw_redis.set(":1:proto1", pickle.dumps("old protocol", protocol=1))
    raw_redis.set(":1:text", b"not a pickle at all")
    raw_redis.set(":1:huge", b"\x80\x04" + b"x" * (8 * 1024 * 1024))
    with configured(redis_url, alias=alias, **LEGACY) as cache:
        for key in ("proto1", "text", "huge"):
            assert cache.get(key, MISS) is MISS
        assert cache.get("dr-str") == "from django-redis"
        assert cache.get("dj-str") == "from django"
    warned = [r for r in caplog.records if "LEGACY_READS is on" in r.getMessage()]
    assert len(warned) == 1
    assert alias in warned[0].getMessage()


def test_deploy_check_warns_while_legacy_reads_are_on_and_after(redis_url):
    from django_apee import checks

    tomorrow = (datetime.now(timezone.utc) + timedelta(days=1)).date()
    config = {
        "on": {"LEGACY_READS": True, "LEGACY_READS_UNTIL": str(tomorrow)},
        "past": {"LEGACY_READS": True, "LEGACY_READS_UNTIL": "2020-01-01"},
        "off": {},
    }
    caches_setting = {
        alias: {"BACKEND": "django_apee.cache.ApeeCache", "LOCATION": redis_url,
                "OPTIONS": options}
        for alias, options in config.items()
    }  # fmt: skip
    with override_settings(CACHES={**settings.CACHES, **caches_setting}):
        found = {(m.obj, m.id) for m in checks.check_legacy_reads()}
    assert found == {("on", "apee.W004"), ("past", "apee.W005")}


# -- 6. Storage ------------------------------------------------------------------------


def test_plain_int_is_stored_raw(apee, dredis, raw_redis):
    assert apee.set("n", 42) is True
    assert raw_redis.get(":1:n") == b"42"
    assert apee.incr("n") == 43
    assert raw_redis.get(":1:n") == b"43"
    assert dredis.get("n") == 43  # django-redis reads it as it wrote it
    assert apee.set("neg", -5) is True
    assert raw_redis.get(":1:neg") == b"-5"
    apee.set("flag", True)  # a bool is not an int here
    assert raw_redis.get(":1:flag") != b"1"
    assert apee.get("flag") is True


def json_like_document() -> dict[str, Any]:
    rng = random.Random(42)
    return {
        "count": 160,
        "next": "https://api.example.com/users/?page=2",
        "previous": None,
        "results": [
            {
                "id": i,
                "username": f"user{i}",
                "email": f"user{i}@example.com",
                "is_active": i % 3 != 0,
                "score": round(rng.random() * 100, 2),
                "tags": ["alpha", "beta", "gamma"][: i % 4],
                "profile": {"country": rng.choice(["FR", "DE", "US"]), "age": 20 + i},
            }
            for i in range(160)
        ],
    }


def test_json_like_dict_is_smaller_than_django_redis_pickle(apee, dredis, raw_redis):
    document = json_like_document()
    dredis.set("doc", document)
    apee.set("doc2", document)
    pickled, ours = raw_redis.strlen(":1:doc"), raw_redis.strlen(":1:doc2")
    assert 9_000 <= pickled <= 14_000  # about 10 KB
    assert apee.get("doc2") == document
    assert ours / pickled <= 0.5, f"{ours} bytes vs django-redis {pickled}"
