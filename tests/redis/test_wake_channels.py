"""Wake-up channels: one per KEY_PREFIX, and an ACL that denies them is slow, not wrong.

Real servers throughout: the session's for the channels' reach, and a
private one with an ACL user that has every command and key but no pub/sub
channel (``resetchannels``, Redis 7's default for new users) for what a
denied channel costs. The scripts publish with ``redis.pcall``, so that user
still gets its writes and the lease's end; the subscriber warns, naming the
rule to add; ``check --deploy`` says so (``apee.W006``).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.test import override_settings

import django_apee
from django_apee.cache import ApeeCache
from django_apee.checks import check_wake_channel
from django_apee.core.envelope import Meta
from django_apee.store import fleet, lease
from django_apee.store.shardwake import sharded
from django_apee.store.wake import acl_rule, wake_channel
from tests.redis.test_stampede import (
    Background,
    Compute,
    age_entry,
    hold_lease,
    metric,
    wait_for,
)
from tests.support import target
from tests.support.redis_server import RedisServer, free_port

APEE = "django_apee.cache.ApeeCache"
_prefixes = itertools.count()


def unique(name: str) -> str:
    """A KEY_PREFIX (and so a channel) no other test in this process uses."""
    return f"{name}{next(_prefixes)}"


@contextmanager
def configured(
    location: str | None, prefixes: dict[str, str], **options: Any
) -> Iterator[dict[str, ApeeCache]]:
    """``caches[alias]`` for each alias -> KEY_PREFIX, set in one go; on
    ``location``, or (None) the suite's Redis (``target``: the cluster with
    APEE_TEST_CLUSTER=1).

    One ``override_settings`` for all: each override drops the runtimes and
    Django's backends, so aliases added one by one would not coexist.
    """
    config = dict(settings.CACHES)
    for alias, prefix in prefixes.items():
        if location is None:
            config[alias] = {**target.cache_config(options), "KEY_PREFIX": prefix}
        else:
            config[alias] = {
                "BACKEND": APEE,
                "LOCATION": location,
                "KEY_PREFIX": prefix,
                "OPTIONS": options,
            }
    with override_settings(CACHES=config):
        yield {alias: caches[alias] for alias in prefixes}


def payload(cache: ApeeCache, value: Any, key: str = "k") -> bytes:
    """What a holder stores for ``key``: its envelope is bound to the made key."""
    made = str(cache.client.make_key(key))
    encoded = cache.envelope.encode(value, Meta(54_000, 60_000, 0, 10), key=made)
    assert isinstance(encoded, bytes)
    return encoded


def record_wakes(cache: ApeeCache, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The value keys ``cache``'s hub receives from now on (it still wakes)."""
    hub = cache.runtime.hub
    received: list[str] = []
    wake = hub._wake

    def recording(value_key: str) -> None:
        received.append(value_key)
        wake(value_key)

    monkeypatch.setattr(hub, "_wake", recording)
    return received


# -- one channel per KEY_PREFIX -----------------------------------------------------


def test_the_wake_channel_is_named_after_the_key_prefix():
    prefix = unique("named")
    with configured(None, {"wake-named": prefix}) as made:
        cache = made["wake-named"]
        assert wake_channel(prefix) == f"django_apee:wake:{prefix}"
        # On a cluster, marked for the scripts to SPUBLISH in each key's slot.
        expected = sharded(wake_channel(prefix)) if target.on_cluster() else None
        assert cache.runtime.hub.channel == (expected or wake_channel(prefix))
        assert cache.client.wake_channel == (expected or wake_channel(prefix))


def test_wake_ups_do_not_cross_key_prefixes(raw_redis, monkeypatch):
    """Two apps on one Redis: neither hears the other's key names, each is
    woken by its own releases."""
    a_prefix, b_prefix = unique("app-a"), unique("app-b")
    prefixes = {"wake-a": a_prefix, "wake-b": b_prefix}
    with configured(None, prefixes) as made:
        a, b = made["wake-a"], made["wake-b"]
        assert a.runtime.hub.channel != b.runtime.hub.channel
        heard_by_a = record_wakes(a, monkeypatch)
        # Each cache's channel for "k": one per prefix, or on a cluster the
        # shard channel in each made key's slot.
        channel_a, channel_b = (
            one.runtime.hub.channel_of(str(one.client.make_key("k")))
            if target.on_cluster()
            else wake_channel(prefix)
            for one, prefix in ((a, a_prefix), (b, b_prefix))
        )
        everything, heard = overhear(raw_redis, [channel_a, channel_b])

        a_held = hold_lease(a, "k", 5000)
        waiter = Background(
            lambda: django_apee.get_or_set_stampede_safe(
                "k", Compute("computed by a"), 60, cache="wake-a"
            )
        )
        assert wait_for(lambda: a.runtime.hub.waiting() == 1, 3)
        assert a.runtime.hub.subscribed.wait(3)

        # b ends a computation (of a key with the same name, even).
        b_held = hold_lease(b, "k", 5000)
        assert lease.release(b_held, payload(b, "b's"), 60_000) is True
        time.sleep(0.3)
        assert waiter.returned_at == 0.0  # not woken by b
        assert heard_by_a == []  # did not even hear of it

        released_at = time.monotonic()
        assert lease.release(a_held, payload(a, "a's"), 60_000) is True
        assert waiter.join(5) == "a's"
        assert waiter.returned_at - released_at < 0.5  # its lease had ~4.5 s left
        assert heard_by_a == [str(a.client.make_key("k"))]

        published = []
        while (message := heard()) is not None:
            published.append((message["channel"].decode(), message["data"].decode()))
        everything.close()
        # Sorted: on a cluster the two channels may live on two nodes, read
        # in turn (the order of the releases is asserted above).
        assert sorted(published) == sorted(
            [
                (channel_b, str(b.client.make_key("k"))),
                (channel_a, str(a.client.make_key("k"))),
            ]
        )


def overhear(raw: Any, channels: list[str]) -> tuple[Any, Any]:
    """A pub/sub of ``raw`` that hears ``channels``' messages and a reader of
    the next one (None after 0.5 s): every wake channel by pattern on one
    Redis, the shard channels themselves on a cluster (a pattern does not
    hear SPUBLISH)."""
    listener = raw.pubsub()
    if not target.on_cluster():
        listener.psubscribe("django_apee:wake*")
        assert listener.get_message(timeout=2)["type"] == "psubscribe"
        return listener, lambda: listener.get_message(timeout=0.5)
    listener.ssubscribe(*channels)
    confirmed = 0
    deadline = time.monotonic() + 2
    while confirmed < len(channels) and time.monotonic() < deadline:
        message = listener.get_sharded_message(timeout=0.1)
        confirmed += message is not None and message["type"] == "ssubscribe"
    assert confirmed == len(channels)

    def heard() -> Any:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            message = listener.get_sharded_message(timeout=0.05)
            if message is not None:
                return message
        return None

    return listener, heard


def test_aliases_with_one_key_prefix_share_wake_ups():
    """Same prefix, same keys: one alias's release wakes the other's waiter."""
    prefix = unique("shared")
    with configured(None, {"wake-1": prefix, "wake-2": prefix}) as made:
        one, two = made["wake-1"], made["wake-2"]
        assert one.runtime.hub.channel == two.runtime.hub.channel
        held = hold_lease(one, "k", 5000)
        waiter = Background(
            lambda: django_apee.get_or_set_stampede_safe(
                "k", Compute("computed by two"), 60, cache="wake-2"
            )
        )
        assert wait_for(lambda: two.runtime.hub.waiting() == 1, 3)
        assert two.runtime.hub.subscribed.wait(3)
        released_at = time.monotonic()
        assert lease.release(held, payload(one, "from one"), 60_000) is True
        assert waiter.join(5) == "from one"
        assert waiter.returned_at - released_at < 0.5


# -- an ACL user without channel rights -----------------------------------------------


@pytest.fixture(scope="module")
def acl_server() -> Iterator[RedisServer]:
    """Users: ``default`` (everything), ``app`` (every command and key, no
    channel: ``resetchannels``)."""
    server = RedisServer(
        extra_args=("--user", "app", "on", ">pw", "~*", "+@all", "resetchannels")
    ).start()
    yield server
    server.close()


@pytest.fixture
def admin(acl_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis(port=acl_server.port, socket_timeout=5)
    client.flushall()
    client.execute_command(
        "ACL", "SETUSER", "app", "reset", "on", ">pw", "~*", "+@all", "resetchannels"
    )
    yield client
    client.close()


def app_url(server: RedisServer) -> str:
    return f"redis://app:pw@127.0.0.1:{server.port}/0"


def test_the_acl_user_really_has_no_channel(acl_server, admin):
    app = redis.Redis.from_url(app_url(acl_server), socket_timeout=5)
    try:
        assert app.acl_whoami() == "app"
        with pytest.raises(redis.exceptions.NoPermissionError):
            app.publish(wake_channel("x"), "")
        # A bare redis.call would fail the script after its write landed:
        with pytest.raises(redis.exceptions.ResponseError, match="publish"):
            app.eval(
                "redis.call('SET', KEYS[1], 'w'); "
                "return redis.call('PUBLISH', ARGV[1], KEYS[1])",
                1,
                "probe",
                wake_channel("x"),
            )
        assert app.get("probe") == b"w"
    finally:
        app.close()


def test_a_denied_channel_costs_wake_ups_not_writes(acl_server, admin):
    prefix = unique("denied")
    with configured(app_url(acl_server), {"acl-app": prefix}) as made:
        cache = made["acl-app"]
        errors = metric("acl-app", "redis_errors")
        # Stampede-safe: computed and stored (the release publishes), then a hit.
        first = Compute("computed")
        assert cache.get_or_set_stampede_safe("s", first, 60) == "computed"
        assert cache.get_or_set_stampede_safe("s", Compute("again"), 60) == "computed"
        assert first.calls == 1
        assert admin.exists(str(cache.client.make_key("s")))
        assert not admin.keys("*apee:lease*")  # the lease ended with the write
        assert metric("acl-app", "redis_errors") == errors  # no fallback either

        # set and delete while a lease is held: they revoke it and publish.
        hold_lease(cache, "p", 30_000)
        assert cache.set("p", "plain", 60) is True
        assert cache.get("p") == "plain"
        assert cache.add("p", "other", 60) is False
        assert cache.add("q", "added", 60) is True
        cache.set("d", "doomed", 60)
        hold_lease(cache, "d", 30_000)
        assert cache.delete("d") is True
        assert cache.delete("d") is False
        assert cache.get("d", "gone") == "gone"
        assert cache.set_many({"m1": 1, "m2": "two"}, 60) == []
        assert cache.get_many(["m1", "m2", "q"]) == {"m1": 1, "m2": "two", "q": "added"}
        cache.delete_many(["m1", "m2"])
        assert cache.get_many(["m1", "m2"]) == {}
        assert not admin.keys("*apee:lease*")

        # Herd mode: a stale entry misses for one reader, whose set is the
        # fenced write (lua/herd_set.lua publishes too).
        assert cache.set("page", "old", 100) is True
        age_entry(cache, admin, "page", left_ms=200)
        assert cache.get("page") is None  # the winner
        assert cache.get("page") == "old"  # everyone else, meanwhile
        assert cache.set("page", "new", 100) is True
        assert cache.get("page") == "new"
        assert not admin.keys("*apee:lease*")
        assert metric("acl-app", "redis_errors") == errors


def test_every_publishing_script_returns_normally(acl_server, admin):
    """Called directly: release, set, delete and herd_set each end a lease
    and publish; denied the channel, each still answers as it would."""
    prefix = unique("scripts")
    with configured(app_url(acl_server), {"acl-scripts": prefix}) as made:
        cache = made["acl-scripts"]
        client = cache.client
        held = hold_lease(cache, "r", 30_000)
        assert lease.release(held, payload(cache, "released", "r"), 60_000) is True
        assert cache.get("r") == "released"
        hold_lease(cache, "s", 30_000)
        assert client.set(client.make_key("s"), "set") is True
        hold_lease(cache, "s", 30_000)
        assert client.delete(client.make_key("s")) == 1
        hold_lease(cache, "s", 30_000)
        assert client.delete(client.make_key("s")) == 0
        assert not admin.keys("*apee:lease*")


def test_a_waiter_on_a_denied_channel_still_gets_the_value(acl_server, admin):
    """No wake-up comes: the wait runs to the lease's end (or the hub's
    retry), never longer, and finds the holder's value."""
    prefix = unique("denied-wait")
    with configured(app_url(acl_server), {"acl-wait": prefix}) as made:
        cache = made["acl-wait"]
        held = hold_lease(cache, "k", 1500)
        waiter = Background(
            lambda: django_apee.get_or_set_stampede_safe(
                "k", Compute("computed by the waiter"), 60, cache="acl-wait"
            )
        )
        assert wait_for(lambda: cache.runtime.hub.waiting() == 1, 3)
        time.sleep(0.2)
        assert lease.release(held, payload(cache, "from the holder"), 60_000) is True
        assert waiter.join(5) == "from the holder"
        assert waiter.elapsed < 2.5
        assert not cache.runtime.hub.subscribed.is_set()


def test_a_denied_subscription_warns_once_naming_the_rule(acl_server, admin, caplog):
    prefix = unique("denied-log")
    channel = wake_channel(prefix)
    caplog.set_level(logging.DEBUG, logger="django_apee")

    def about_it(level: int) -> list[logging.LogRecord]:
        return [
            r
            for r in caplog.records
            if r.levelno == level
            and "NOPERM" in r.getMessage()
            and channel in r.getMessage()
        ]

    with configured(app_url(acl_server), {"acl-log": prefix}) as made:
        hub = made["acl-log"].runtime.hub
        event = hub.expect("anything")  # starts the subscriber
        try:
            assert wait_for(lambda: about_it(logging.WARNING), 5)
            time.sleep(1.0)  # it retries (backoff 0.05, 0.1, 0.2, 0.4 s...)
            warnings = about_it(logging.WARNING)
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            assert len(about_it(logging.DEBUG)) >= 2  # the retries went on, quietly
            assert acl_rule(channel, "app") in warnings[0].getMessage()
            assert not hub.subscribed.is_set()

            # Granted: the next retry subscribes.
            admin.execute_command("ACL", "SETUSER", "app", f"&{channel}")
            assert hub.subscribed.wait(5)
        finally:
            hub.done("anything", event)


# -- check --deploy: apee.W006 -----------------------------------------------------


def w006(alias: str) -> list[Any]:
    return [m for m in check_wake_channel() if m.obj == alias and m.id == "apee.W006"]


def test_deploy_check_names_the_channel_rule_when_denied(acl_server, admin):
    prefix = unique("check")
    channel = wake_channel(prefix)
    with configured(app_url(acl_server), {"acl-check": prefix}):
        (warning,) = w006("acl-check")
        assert "SUBSCRIBE or PUBLISH" in warning.msg
        assert channel in warning.msg
        assert f"ACL SETUSER app &{channel} +publish +subscribe" in warning.hint
        assert "&django_apee:wake:*" in warning.hint

        admin.execute_command("ACL", "SETUSER", "app", f"&{channel}")
        assert w006("acl-check") == []
        # Nothing of the probe is left behind; nobody was woken by it.
        assert admin.dbsize() == 0


def test_deploy_check_with_username_and_password_options(acl_server, admin):
    prefix = unique("check-options")
    url = f"redis://127.0.0.1:{acl_server.port}/0"
    with configured(url, {"acl-options": prefix}, USERNAME="app", PASSWORD="pw"):
        (warning,) = w006("acl-options")
        assert f"ACL SETUSER app &{wake_channel(prefix)}" in warning.hint
        admin.execute_command("ACL", "SETUSER", "app", "&django_apee:wake:*")
        assert w006("acl-options") == []


def test_deploy_check_passes_a_user_with_every_channel():
    with configured(None, {"all-channels": unique("all")}):
        assert w006("all-channels") == []


def test_deploy_check_skips_a_redis_it_cannot_reach():
    url = f"redis://127.0.0.1:{free_port()}/0"
    with configured(url, {"unreachable": unique("away")}, SOCKET_CONNECT_TIMEOUT=0.5):
        started = time.monotonic()
        assert w006("unreachable") == []  # apee.W001's business
        assert time.monotonic() - started < 3


def test_a_denied_publish_from_another_thread_does_not_disturb_the_hub(
    acl_server, admin
):
    """Channel granted for SUBSCRIBE only: scripts' PUBLISH fails quietly,
    the subscription stays up, writes land."""
    prefix = unique("sub-only")
    channel = wake_channel(prefix)
    admin.execute_command("ACL", "SETUSER", "app", f"&{channel}", "-publish")
    with configured(app_url(acl_server), {"acl-sub": prefix}) as made:
        cache = made["acl-sub"]
        hub = cache.runtime.hub
        event = hub.expect("x")
        try:
            assert hub.subscribed.wait(5)
            results: list[Any] = []
            threads = [
                threading.Thread(
                    target=lambda i=i: results.append(
                        cache.get_or_set_stampede_safe(f"k{i}", lambda i=i: i, 60)
                    )
                )
                for i in range(8)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(10)
            assert sorted(results) == list(range(8))
            assert hub.subscribed.is_set()
        finally:
            hub.done("x", event)
        (warning,) = w006("acl-sub")
        assert "may not PUBLISH" in warning.msg


# -- the documented ACL rule (docs/howto/acl.rst) ------------------------------------


ACL_PAGE = Path(__file__).resolve().parents[2] / "docs" / "howto" / "acl.rst"


def documented_acl_lines(cluster: bool = False) -> list[list[str]]:
    """The page's ``ACL SETUSER shop`` lines: one server's rule (3 lines),
    or (``cluster``) the line a cluster adds for its shard channels."""
    lines = [
        line.split()
        for line in ACL_PAGE.read_text().splitlines()
        if line.strip().startswith("ACL SETUSER shop ")
        and ("+ssubscribe" in line) == cluster
    ]
    assert len(lines) == (1 if cluster else 3)
    return [[w.replace("<password>", "pw") for w in line[2:]] for line in lines]


def test_the_documented_cluster_acl_rule_is_the_one_w006_gives():
    """The page's cluster line is what apee.W006's hint says (that hint, run
    on every node of a cluster, clears the warning: tests/faults/test_cluster.py)."""
    (line,) = documented_acl_lines(cluster=True)
    rule = acl_rule(wake_channel("shop"), "shop", sharded=True)
    assert " ".join(["ACL", "SETUSER", *line]) == rule


def test_the_documented_acl_rule_is_enough(acl_server, admin):
    for rule in documented_acl_lines():
        admin.execute_command("ACL", "SETUSER", *rule)
    admin.execute_command("ACL", "LOG", "RESET")
    url = f"redis://shop:pw@127.0.0.1:{acl_server.port}/0"
    try:
        with configured(url, {"shop": "shop"}) as made:
            cache = made["shop"]
            assert cache.get_or_set_stampede_safe("a", lambda: 1, 60) == 1
            assert {c["user"] for c in admin.client_list()} >= {"shop"}
            assert cache.get_or_set_stampede_safe("a", lambda: 2, 60) == 1
            assert cache.set("b", "x", 60) is True
            assert cache.add("b", "y", 60) is False
            assert cache.get_many(["a", "b"]) == {"a": 1, "b": "x"}
            assert cache.delete("b") is True
            assert cache.set_many({"c": 1, "d": 2}, 60) == []
            cache.delete_many(["c"])
            assert cache.touch("d", 30) is True
            assert cache.ttl("d") == 30
            assert cache.incr("d") == 3
            assert cache.incr_version("d") == 2
            hub = cache.runtime.hub
            event = hub.expect("nothing")
            try:
                assert hub.subscribed.wait(5)
            finally:
                hub.done("nothing", event)
            assert w006("shop") == []
            fleet.flush()
            assert admin.exists(fleet.stats_key("shop", "shop")) == 1
            log = admin.execute_command("ACL", "LOG")
            assert [e for e in log if e[b"username"] == b"shop"] == []
    finally:
        admin.execute_command("ACL", "DELUSER", "shop")
