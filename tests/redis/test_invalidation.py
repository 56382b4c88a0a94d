"""Every invalidation revokes the lease of a computation in flight.

A computation holds its entry's lease while it runs, and its write is fenced
by that lease. Each test here starts a 0.6 s computation of a key in another
thread (a refresh of a stale value, or the compute of a missing one), issues
one invalidation while it runs, lets it finish, and then asserts what Redis
holds: never the computation's result, which was computed from the data as
it was before the invalidation.
"""

from __future__ import annotations

import datetime
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from django_apee import get_or_set_stampede_safe
from django_apee.cache import ApeeCache
from django_apee.core import keys
from tests.support import target

COMPUTE_S = 0.6
SOFT_S = 0.05
KEY = "inv:key"


class InFlight:
    """A ``get_or_set_stampede_safe`` of KEY whose compute takes COMPUTE_S."""

    def __init__(self, alias: str, version: int | None = None) -> None:
        self.alias, self.version = alias, version
        self.started = threading.Event()
        self.got: list[Any] = []
        self.thread = threading.Thread(target=self._run)

    def _compute(self) -> str:
        self.started.set()
        time.sleep(COMPUTE_S)
        return "pre-invalidation"

    def _run(self) -> None:
        self.got.append(
            get_or_set_stampede_safe(
                KEY,
                self._compute,
                60,
                soft_timeout=SOFT_S,
                version=self.version,
                cache=self.alias,
            )
        )

    def __enter__(self) -> InFlight:
        self.thread.start()
        assert self.started.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def inline(
    make_cache: Callable[..., tuple[str, ApeeCache]], redis_url: str
) -> tuple[str, ApeeCache]:
    """An alias that refreshes in the caller's thread, so the test sees it.

    On a connection pool of this module's own (django-redis keeps one per
    LOCATION string): every alias's wake-up subscriber keeps a connection
    of its pool for the rest of the session, and redis-py 8 caps a pool at
    100 connections, which this module's 25 aliases would eat into for
    every test after it.
    """
    if target.on_cluster():  # one RedisCluster per alias: no pool to share
        return make_cache(REFRESH="inline")
    return make_cache(f"{redis_url}?client_name=apee-invalidation", REFRESH="inline")


def lease_of(cache: ApeeCache, version: int | None = None) -> str:
    return keys.companion(cache.client.make_key(KEY, version=version), keys.LEASE)


def stale(alias: str, version: int | None = None) -> None:
    """KEY holds "old", past its soft timeout: the next call refreshes it."""
    value = get_or_set_stampede_safe(
        KEY, lambda: "old", 60, soft_timeout=SOFT_S, version=version, cache=alias
    )
    assert value == "old"
    time.sleep(SOFT_S * 2)


#: name -> what to do to KEY; each leaves no value behind.
REMOVING: dict[str, Callable[[ApeeCache], Any]] = {
    "delete": lambda cache: cache.delete(KEY),
    "delete_many": lambda cache: cache.delete_many([KEY, "inv:other"]),
    "delete_pattern": lambda cache: cache.delete_pattern("inv:*"),
    "touch_0": lambda cache: cache.touch(KEY, 0),
    "expire_0": lambda cache: cache.expire(KEY, 0),
    "pexpire_0": lambda cache: cache.pexpire(KEY, 0),
    "expire_at_past": lambda cache: cache.expire_at(
        KEY, datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(1)
    ),
    "set_0": lambda cache: cache.set(KEY, "x", 0),
    "clear": lambda cache: cache.clear(),
}


@pytest.mark.parametrize("name", sorted(REMOVING))
def test_removed_during_a_refresh_stays_removed(
    name: str, inline: tuple[str, ApeeCache], raw_redis: redis.Redis
) -> None:
    alias, cache = inline
    stale(alias)
    with InFlight(alias) as flight:
        assert raw_redis.exists(lease_of(cache)) == 1  # the refresh holds it
        REMOVING[name](cache)
        assert raw_redis.exists(lease_of(cache)) == 0  # revoked at once
    assert flight.got == ["pre-invalidation"]  # its own caller still gets it
    assert cache.get(KEY, "absent") == "absent"  # but it is not stored
    assert raw_redis.exists(cache.client.make_key(KEY)) == 0


@pytest.mark.parametrize("name", ["delete_pattern", "touch_0", "expire_0", "clear"])
def test_removed_during_a_cold_compute_stays_removed(
    name: str, inline: tuple[str, ApeeCache], raw_redis: redis.Redis
) -> None:
    alias, cache = inline
    with InFlight(alias) as flight:
        assert raw_redis.exists(lease_of(cache)) == 1
        REMOVING[name](cache)
    assert flight.got == ["pre-invalidation"]
    assert cache.get(KEY, "absent") == "absent"


#: name -> (what to do to KEY, the longest PTTL it may have after, ms; -1: none).
RETIMING: dict[str, tuple[Callable[[ApeeCache], Any], int]] = {
    "persist": (lambda cache: cache.persist(KEY), -1),
    "touch_none": (lambda cache: cache.touch(KEY, None), -1),
    "touch_30": (lambda cache: cache.touch(KEY, 30), 30_000),
    "expire_30": (lambda cache: cache.expire(KEY, 30), 30_000),
    "expire_timedelta": (
        lambda cache: cache.expire(KEY, datetime.timedelta(seconds=30)),
        30_000,
    ),
    "pexpire_30000": (lambda cache: cache.pexpire(KEY, 30_000), 30_000),
    "expire_at_future": (lambda cache: cache.expire_at(KEY, time.time() + 30), 30_000),
    "pexpire_at_future": (
        lambda cache: cache.pexpire_at(KEY, int(time.time() * 1000) + 30_000),
        30_000,
    ),
}


@pytest.mark.parametrize("name", sorted(RETIMING))
def test_retimed_during_a_refresh_keeps_its_value_and_timeout(
    name: str, inline: tuple[str, ApeeCache], raw_redis: redis.Redis
) -> None:
    """The refresh would write its own value with its own 60 s timeout over
    the timeout just set; it is dropped instead."""
    alias, cache = inline
    stale(alias)
    retime, most = RETIMING[name]
    with InFlight(alias) as flight:
        assert raw_redis.exists(lease_of(cache)) == 1
        assert retime(cache) is True
        assert raw_redis.exists(lease_of(cache)) == 0
    assert flight.got == ["pre-invalidation"]
    assert cache.get(KEY) == "old"
    pttl = raw_redis.pttl(cache.client.make_key(KEY))
    assert pttl == -1 if most == -1 else 0 < pttl <= most


def test_retiming_an_absent_key_changes_nothing_and_revokes_nothing(
    inline: tuple[str, ApeeCache], raw_redis: redis.Redis
) -> None:
    alias, cache = inline
    with InFlight(alias) as flight:
        assert cache.expire(KEY, 30) is False
        assert cache.persist(KEY) is False
        assert raw_redis.exists(lease_of(cache)) == 1  # nothing was invalidated
    assert flight.got == ["pre-invalidation"]
    assert cache.get(KEY) == "pre-invalidation"


@pytest.mark.parametrize(("start", "delta"), [(1, 1), (2, -1)])
def test_version_moved_during_a_refresh_is_not_written_back(
    start: int, delta: int, inline: tuple[str, ApeeCache], raw_redis: redis.Redis
) -> None:
    alias, cache = inline
    stale(alias, version=start)
    with InFlight(alias, version=start) as flight:
        assert raw_redis.exists(lease_of(cache, start)) == 1
        if delta > 0:
            assert cache.incr_version(KEY, version=start) == start + delta
        else:
            assert cache.decr_version(KEY, version=start) == start + delta
        assert raw_redis.exists(lease_of(cache, start)) == 0
    assert flight.got == ["pre-invalidation"]
    assert cache.get(KEY, "absent", version=start) == "absent"
    assert cache.get(KEY, version=start + delta) == "old"


def test_a_compute_on_the_new_version_does_not_overwrite_the_moved_value(
    inline: tuple[str, ApeeCache], raw_redis: redis.Redis
) -> None:
    alias, cache = inline
    cache.set(KEY, "moved", 60, version=1)
    with InFlight(alias, version=2) as flight:  # a cold compute of version 2
        assert cache.incr_version(KEY, version=1) == 2
        assert raw_redis.exists(lease_of(cache, 2)) == 0
    assert flight.got == ["pre-invalidation"]
    assert cache.get(KEY, version=2) == "moved"
