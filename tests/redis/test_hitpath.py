"""The lean hit path: a fresh hit is one plain GET; everything else the PTTL's.

Watched with MONITOR on a private server (the session's server also gets
other aliases' stats flushes from a background thread).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.test import override_settings

from django_apee.cache import ApeeCache
from django_apee.core.envelope import Meta
from tests.redis.test_stampede import age_entry, metric, stored, write_entry
from tests.support.monitor import client_commands, monitored, script_runs
from tests.support.redis_server import RedisServer

_aliases = itertools.count()


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    started = RedisServer().start()
    yield started
    started.close()


@pytest.fixture
def raw(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=server.port, socket_timeout=10)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def cache(server: RedisServer) -> Iterator[ApeeCache]:
    alias = f"hitpath-{next(_aliases)}"
    config = {
        **settings.CACHES,
        alias: {"BACKEND": "django_apee.cache.ApeeCache", "LOCATION": server.url},
    }
    with override_settings(CACHES=config):
        backend = caches[alias]
        backend.set("warm", "w", 60)  # the clock's first sample, set.lua loaded
        backend.get("absent")  # get.lua loaded
        yield backend


def never() -> str:
    raise AssertionError("a hit must not compute")


def test_a_fresh_hit_is_one_get(server, cache):
    cache.set("plain", {"a": 1}, 60)
    cache.get_or_set_stampede_safe("safe", lambda: [1, 2], 60)
    cache.set("forever", "v", None)
    with monitored(server) as seen:
        assert cache.get("plain") == {"a": 1}
        assert cache.get("safe") == [1, 2]
        assert cache.get("forever") == "v"
        assert cache.get_or_set_stampede_safe("safe", never, 60) == [1, 2]
        assert cache.get_or_set_stampede_safe("plain", never, 60) == {"a": 1}
    assert client_commands(seen) == {"GET"}


@pytest.mark.parametrize(
    "meta",
    [
        Meta(50_000, 60_000, 0, 5, 7),  # written before written_ms existed
        Meta(50_000, 60_000, 30_000, 5, 7, 1),  # a grace period: Redis keeps it
    ],
    ids=["no-write-time", "grace"],
)
def test_entries_the_envelope_cannot_judge_take_the_pttl(server, raw, cache, meta):
    write_entry(cache, raw, "k", "v", meta, px=55_000)
    with monitored(server) as seen:
        assert cache.get("k") == "v"
        assert cache.get_or_set_stampede_safe("k", never, 60) == "v"
    assert {"GET", "EVALSHA"} <= client_commands(seen) <= {"GET", "EVALSHA", "SCRIPT"}
    assert len(script_runs(seen, "get")) == 1
    assert len(script_runs(seen, "read")) >= 1  # twice if it met NOSCRIPT


def test_past_hard_inside_its_grace_is_a_miss(raw, cache):
    write_entry(cache, raw, "g", "old", Meta(800, 1000, 30_000, 5, 7), px=29_500)
    assert cache.get("g", "miss") == "miss"


def test_a_stale_entry_is_judged_by_its_pttl(server, raw, cache):
    """Past its soft timeout by its write time: the PTTL path, where herd
    mode gives one reader the miss."""
    cache.set("page", "old", 100)
    age_entry(cache, raw, "page", left_ms=2_000)
    with monitored(server) as seen:
        assert cache.get("page") is None  # this reader won the lease
        assert cache.get("page") == "old"  # the others, meanwhile
    assert client_commands(seen) >= {"GET", "EVALSHA"}
    assert cache.set("page", "new", 100) is True
    assert cache.get("page") == "new"


def test_a_touch_that_extends_is_honoured_through_the_pttl(raw, cache):
    """touch() moves Redis's deadline, not the write time: past the original
    soft timeout the PTTL says the entry is young again, and it is served."""
    cache.set("t", "v", 100)
    assert cache.touch("t", 1000)
    age_entry(cache, raw, "t", left_ms=950_000)  # written 50 s before its 100
    _, meta = stored(cache, raw, "t")
    assert meta.hard_ms == 100_000
    for _ in range(3):
        assert cache.get("t") == "v"  # not a herd miss: by its PTTL it is young


def test_without_a_sample_of_redis_time_reads_take_the_pttl(server, cache):
    cache.set("k", "v", 60)
    clock = cache.runtime.clock
    clock._sample = None
    clock._retry_at = float("inf")  # as after a failed measurement
    with monitored(server) as seen:
        assert cache.get("k") == "v"
        assert cache.get_many(["k"]) == {"k": "v"}
    assert client_commands(seen) == {"GET", "MGET", "EVALSHA"}


def test_an_unreadable_value_is_one_counted_miss(server, raw, cache):
    made = str(cache.client.make_key("bad"))
    raw.set(made, b"\xc1\xa9\x02\x00" + b"\x00" * 40)  # a forged MAC
    before = metric(cache.alias, "serialization_errors", reason="signature")
    with monitored(server) as seen:
        assert cache.get("bad", "miss") == "miss"
    assert client_commands(seen) == {"GET"}
    assert metric(cache.alias, "serialization_errors", reason="signature") == before + 1
    assert cache.get_or_set_stampede_safe("bad", lambda: "new", 60) == "new"
    assert cache.get("bad") == "new"


def test_an_async_fresh_hit_is_one_get_too(server, cache):
    """``aget``, ``aget_many`` and the async stampede path take the same
    lean path as their sync twins (a loop's own connection; one loop)."""
    import asyncio

    cache.set("plain", {"a": 1}, 60)
    cache.get_or_set_stampede_safe("safe", lambda: [1, 2], 60)

    async def main() -> tuple[Any, ...]:
        await cache.aget("warm")  # the loop's connection and its handshake
        with monitored(server) as seen:
            found = (
                await cache.aget("plain"),
                await cache.aget_many(["plain", "safe"]),
                await cache.aget_or_set_stampede_safe("safe", never, 60),
            )
        return found, seen

    (plain, many, safe), seen = asyncio.run(main())

    assert plain == {"a": 1}
    assert many == {"plain": {"a": 1}, "safe": [1, 2]}
    assert safe == [1, 2]
    assert client_commands(seen) == {"GET", "MGET"}


def test_set_many_is_one_pipelined_round_of_evalsha(server, raw, cache):
    data = {f"k{i}": {"i": i} for i in range(5)}
    with monitored(server) as seen:
        assert cache.set_many(data, 60) == []
    # No SCRIPT EXISTS first, as a redis-py pipeline of Script calls sends.
    assert client_commands(seen) == {"EVALSHA"}
    assert len(script_runs(seen, "set")) == 5
    assert cache.get_many(list(data)) == data
    _, meta = stored(cache, raw, "k0")
    assert meta.hard_ms == 60_000
    assert meta.written_ms > 0


def test_set_many_gives_a_herd_winner_its_fenced_write(raw, cache):
    cache.set("page", "old", 100)
    age_entry(cache, raw, "page", left_ms=2_000)
    assert cache.get("page") is None  # this process won the lease
    assert cache.set_many({"page": "new", "other": 1}, 100) == []
    assert cache.get_many(["page", "other"]) == {"page": "new", "other": 1}
    assert raw.keys("*apee:lease*") == []
