"""Redis itself misbehaving under ``get_or_set_stampede_safe`` callers.

Each test freezes, kills connections of, slows or cuts the session's private
redis-server (or a proxy in front of it) while threads call the cache, and
asserts what ``docs/howto/faults.rst`` promises: no exception reaches a
stampede-safe caller, no caller waits longer than the bound ``retry.py``
states from the socket timeouts and the retry policy the installed redis-py
really applies, and the cache is used again once Redis is back. Every fault
is undone in a ``finally`` block. Each test prints one line of figures; the
table in the docs page comes from them.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.test import override_settings

from django_apee import get_or_set_stampede_safe
from django_apee.retry import caller_bound, connection_bound
from django_apee.store import fleet
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.faults

#: The issue's setup: 0.25 s socket timeouts, a short compute.
SOCKET_TIMEOUT = 0.25
COMPUTE_S = 0.05


@contextmanager
def apee_alias(location: str, **options: Any) -> Iterator[str]:
    """A fresh alias on ``location`` with ``options``.

    django-redis keeps one connection pool per LOCATION string per process,
    built with the options of the first alias that used it: a LOCATION of
    the alias's own (a query string naming its socket timeout) gets a pool
    with this alias's options.
    """
    alias = f"faults_{uuid.uuid4().hex[:8]}"
    config = {
        "BACKEND": "django_apee.cache.ApeeCache",
        "LOCATION": location,
        "OPTIONS": options,
    }
    with override_settings(CACHES={**settings.CACHES, alias: config}):
        yield alias


def own_location(url: str, tag: str) -> str:
    return f"{url}?socket_timeout={SOCKET_TIMEOUT}&client_name={tag}"


def command_bound_of(alias: str) -> float:
    """B for the alias's real connections, read from one (retry.py)."""
    pool = caches[alias].client.get_client(write=True).connection_pool
    connection = pool.get_connection()
    try:
        return connection_bound(connection)
    finally:
        pool.release(connection)


@dataclass
class Load:
    """Threads calling ``get_or_set_stampede_safe`` on a few keys in a loop."""

    alias: str
    threads: int = 8
    keys: tuple[str, ...] = tuple(f"load:{i}" for i in range(4))
    lock: threading.Lock = field(default_factory=threading.Lock)
    computes: list[float] = field(default_factory=list)
    #: (start, latency) of every call.
    calls: list[tuple[float, float]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    wrong: list[Any] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def compute(self, key: str) -> Callable[[], str]:
        def run() -> str:
            with self.lock:
                self.computes.append(time.monotonic())
            time.sleep(COMPUTE_S)
            return f"value-{key}"

        return run

    def loop(self, index: int) -> None:
        n = 0
        while not self.stop.is_set():
            key = self.keys[(index + n) % len(self.keys)]
            n += 1
            started = time.monotonic()
            try:
                value = get_or_set_stampede_safe(
                    key, self.compute(key), 60, cache=self.alias
                )
            except BaseException as error:  # any exception is the failure
                self.errors.append(error)
                return
            with self.lock:
                self.calls.append((started, time.monotonic() - started))
            if value != f"value-{key}":
                self.wrong.append(value)
            time.sleep(0.005)

    @contextmanager
    def running(self) -> Iterator[Load]:
        workers = [
            threading.Thread(target=self.loop, args=(i,)) for i in range(self.threads)
        ]
        for worker in workers:
            worker.start()
        try:
            yield self
        finally:
            self.stop.set()
            for worker in workers:
                worker.join(10)
        assert not any(worker.is_alive() for worker in workers)

    def between(self, start: float, end: float) -> list[tuple[float, float]]:
        return [call for call in self.calls if start <= call[0] < end]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


# -- Redis frozen: SIGSTOP 3 s -------------------------------------------------------


def test_sigstop_no_caller_waits_past_the_documented_bound(
    redis_server: RedisServer, redis_url: str, raw_redis: redis.Redis
) -> None:
    options = {
        "SOCKET_TIMEOUT": SOCKET_TIMEOUT,
        "SOCKET_CONNECT_TIMEOUT": SOCKET_TIMEOUT,
        "BREAKER_COOLDOWN": 0.5,
        "STATS_FLUSH_INTERVAL": 0.2,
    }
    with apee_alias(own_location(redis_url, "sigstop"), **options) as alias:
        command = command_bound_of(alias)
        bound = caller_bound(command, COMPUTE_S)
        # The bound in the setup, from the policy redis-py really has.
        assert bound <= 0.6, (command, bound)
        cache = caches[alias]
        stats = fleet.stats_key(cache.key_prefix, alias)
        hub = cache.runtime.hub
        with Load(alias).running() as load:
            time.sleep(0.5)
            warm = len(load.computes)
            paused_at = time.monotonic()
            redis_server.pause()
            try:
                time.sleep(3.0)
            finally:
                redis_server.resume()
            resumed_at = time.monotonic()
            time.sleep(1.5)  # the breaker's cooldown, its probe, a flush
            settled = len(load.computes)
            flushed = raw_redis.hget(stats, "stampede_hits")
            time.sleep(1.0)
            flushed_later = raw_redis.hget(stats, "stampede_hits")
            # The wake-up thread still listens: a publish reaches a waiter.
            event = hub.expect("after:sigstop")
            try:
                assert hub.subscribed.wait(5)
                raw_redis.publish(hub.channel, "after:sigstop")
                woken = event.wait(5)
            finally:
                hub.done("after:sigstop", event)
        after = len(load.computes)

    assert not load.errors, load.errors[:3]
    assert not load.wrong, load.wrong[:3]
    assert warm == len(load.keys)  # warm: one compute per key
    during = load.between(paused_at, resumed_at)
    assert len(during) > 20  # callers kept getting answers while frozen
    assert [t for t in load.computes if paused_at <= t < resumed_at]  # locally
    worst = max(latency for _, latency in load.calls)
    assert worst <= bound, (worst, bound)
    assert after == settled  # the cache serves again: no more computes
    late = load.between(resumed_at + 1.5, float("inf"))
    assert late
    # The fleet flush thread did not hang: counts keep reaching Redis.
    assert flushed is not None
    assert flushed_later is not None
    assert int(flushed_later) > int(flushed)
    assert woken
    print(
        f"\nSIGSTOP 3 s, socket timeouts {ms(SOCKET_TIMEOUT)}: {len(load.calls)} "
        f"calls, 0 exceptions, {len(during)} during the freeze; worst wait "
        f"{ms(worst)} (p50 during {ms(statistics.median(c[1] for c in during))}), "
        f"bound B + C = {ms(command)} + {ms(COMPUTE_S)} = {ms(bound)}"
    )
