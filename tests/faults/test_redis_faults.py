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
    #: The longest a 10 ms sleep overslept meanwhile: how late the machine ran
    #: threads (two shared cores), a delay no Redis timeout accounts for.
    jitter: float = 0.0

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

    def canary(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            time.sleep(0.01)
            self.jitter = max(self.jitter, time.monotonic() - started - 0.01)

    @contextmanager
    def running(self) -> Iterator[Load]:
        workers = [
            threading.Thread(target=self.loop, args=(i,)) for i in range(self.threads)
        ]
        workers.append(threading.Thread(target=self.canary))
        for worker in workers:
            worker.start()
        try:
            yield self
        finally:
            self.stop.set()
            for worker in workers:
                worker.join(10)
        assert not any(worker.is_alive() for worker in workers)

    def settle(self, since: float, deadline: float, quiet: float = 0.5) -> float:
        """Wait until no compute has run for ``quiet`` seconds; return how long
        after ``since`` the last one ran (0: none). Fails past ``deadline``
        seconds: the cache was not used again.

        After an outage the circuit breaker lets a probe through once its
        cooldown is over; each failed probe doubles the cooldown, so it may
        be open for up to about twice the outage after Redis is back.
        """
        while True:
            now = time.monotonic()
            with self.lock:
                last = max((t for t in self.computes if t >= since), default=since)
            if now - last >= quiet and now - since >= quiet:
                return last - since
            assert now - since < deadline, "still computing locally"
            time.sleep(0.05)

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
            recovered = load.settle(resumed_at, deadline=2 * 3.0 + 2.0)
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
    # The bound is what Redis can cost; a starved CPU delays any thread.
    assert worst <= bound + load.jitter, (worst, bound, load.jitter)
    assert after == settled  # the cache serves again: no more computes
    # The fleet flush thread did not hang: counts keep reaching Redis.
    assert flushed is not None
    assert flushed_later is not None
    assert int(flushed_later) > int(flushed)
    assert woken
    print(
        f"\nSIGSTOP 3 s, socket timeouts {ms(SOCKET_TIMEOUT)}: {len(load.calls)} "
        f"calls, 0 exceptions, {len(during)} during the freeze; worst wait "
        f"{ms(worst)} (p50 during {ms(statistics.median(c[1] for c in during))}), "
        f"bound B + C = {ms(command)} + {ms(COMPUTE_S)} = {ms(bound)}; last "
        f"local compute {ms(recovered)} after SIGCONT; scheduling jitter "
        f"{ms(load.jitter)}"
    )


# -- connections killed, Redis restarted -----------------------------------------------


def plain_round_trips(alias: str, n: int) -> list[BaseException]:
    """``n`` plain set/get pairs; the exceptions they raised."""
    cache, failed = caches[alias], []
    for i in range(n):
        try:
            cache.set(f"plain:{i}", i, 60)
            assert cache.get(f"plain:{i}") == i
        except Exception as error:  # counted: the test asserts there are none
            failed.append(error)
    return failed


def test_client_kill_and_restart_pooled_connections_recover(
    redis_server: RedisServer, redis_url: str, raw_redis: redis.Redis
) -> None:
    options = {
        "SOCKET_TIMEOUT": SOCKET_TIMEOUT,
        "SOCKET_CONNECT_TIMEOUT": 1.0,
        "BREAKER_COOLDOWN": 0.2,
    }
    with apee_alias(own_location(redis_url, "kill"), **options) as alias:
        hub = caches[alias].runtime.hub
        with Load(alias).running() as load:
            time.sleep(0.5)
            assert hub.subscribed.wait(5)
            killed = 0
            for kind in ("normal", "pubsub"):
                killed += raw_redis.client_kill_filter(_type=kind, skipme=True)
            killed_at = time.monotonic()
            time.sleep(0.5)
            after_kill = plain_round_trips(alias, 20)
            resubscribed = hub.subscribed.wait(5)
            try:
                redis_server.restart()
            finally:
                if redis_server.process is None:
                    redis_server.start()
            restarted_at = time.monotonic()
            after_restart = plain_round_trips(alias, 20)
            recovered = load.settle(restarted_at, deadline=3.0)
        raw_redis.connection_pool.disconnect()  # the restart closed them too

    assert killed >= 2  # pooled connections and the wake-up subscriber
    assert not load.errors, load.errors[:3]
    assert not load.wrong, load.wrong[:3]
    # Plain calls right after either fault: the pool replaced its dead
    # connections when it handed them out, no ConnectionInterrupted.
    assert after_kill == []
    assert after_restart == []
    assert resubscribed
    worst = max(latency for _, latency in load.calls)
    # Redis back, its data gone: computed locally until the breaker's probe
    # (BREAKER_COOLDOWN, doubled per failed probe), then once per key, then
    # served from the cache again (``settle``).
    restart_computes = [t for t in load.computes if t >= restarted_at]
    assert restart_computes
    print(
        f"\nCLIENT KILL ({killed} connections) and a restart under 8 threads: "
        f"0 exceptions, 0 failed plain calls after each; worst wait {ms(worst)}; "
        f"{len(load.between(killed_at, restarted_at))} calls between the two, "
        f"{len(restart_computes)} computes in the "
        f"{ms(recovered)} after the restart, none after"
    )


# -- SCRIPT FLUSH --------------------------------------------------------------------


def test_script_flush_before_and_during_a_cold_compute_still_computes_once(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    """Two coordinators (as two processes would be) x 8 threads on a cold
    key; the scripts are flushed before the calls and again mid-compute,
    when the holder still has to renew and release and every waiter to
    acquire again: one compute, one value for everyone."""
    counter = f"flush:{uuid.uuid4().hex[:8]}"
    with (
        apee_alias(redis_url, LEASE_TIMEOUT=0.5) as first,
        apee_alias(redis_url, LEASE_TIMEOUT=0.5) as second,
    ):
        got: list[Any] = []
        errors: list[BaseException] = []

        def compute() -> int:
            n = int(raw_redis.incr(counter))
            raw_redis.script_flush()
            time.sleep(0.4)  # past a renewal (every 125 ms)
            return n

        def call(alias: str) -> None:
            try:
                got.append(
                    get_or_set_stampede_safe("flush:cold", compute, 60, cache=alias)
                )
            except BaseException as error:  # any exception is the failure
                errors.append(error)

        raw_redis.script_flush()
        threads = [
            threading.Thread(target=call, args=(alias,))
            for alias in (first, second)
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        stored = caches[first].get("flush:cold")

    assert not errors, errors[:3]
    assert int(raw_redis.get(counter) or 0) == 1
    assert got == [1] * 16
    assert stored == 1


# -- a slow link, and one cut mid-command ----------------------------------------------


def test_slow_then_cut_then_timing_out_link_no_exception_waits_bounded(
    redis_server: RedisServer,
) -> None:
    from tests.support.faulty_proxy import FaultyProxy

    options = {
        "SOCKET_TIMEOUT": SOCKET_TIMEOUT,
        "SOCKET_CONNECT_TIMEOUT": SOCKET_TIMEOUT,
        "BREAKER_COOLDOWN": 0.2,
    }
    with (
        FaultyProxy(redis_server.port) as proxy,
        apee_alias(own_location(proxy.url, "proxy"), **options) as alias,
    ):
        bound = caller_bound(command_bound_of(alias), COMPUTE_S)
        with Load(alias).running() as load:
            time.sleep(0.5)
            warm = len(load.computes)
            phases = {"start": time.monotonic()}
            proxy.delay(0.025)  # a 50 ms round trip: slow, still answered
            time.sleep(1.0)
            proxy.restore()
            phases["slow"] = time.monotonic()
            computes_slow = len(load.computes)
            cut = 0
            for _ in range(5):  # mid-command: 8 threads keep commands in flight
                cut += proxy.cut()
                time.sleep(0.1)
            phases["cut"] = time.monotonic()
            proxy.delay(0.4)  # an 800 ms round trip: every command times out
            time.sleep(1.5)
            proxy.restore()
            phases["timing_out"] = time.monotonic()
            recovered = load.settle(phases["timing_out"], deadline=2 * 1.5 + 2.0)
            settled = len(load.computes)
            time.sleep(0.5)
        after = len(load.computes)

    assert not load.errors, load.errors[:3]
    assert not load.wrong, load.wrong[:3]
    assert warm == len(load.keys)
    assert computes_slow == warm  # slow but answered: served from the cache
    assert cut > 0
    assert after == settled  # back to the cache after the link recovered
    worst = {
        name: max(
            (latency for _, latency in load.between(phases[before], phases[name])),
            default=0.0,
        )
        for before, name in (("start", "slow"), ("slow", "cut"), ("cut", "timing_out"))
    }
    assert max(worst.values()) <= bound + load.jitter, (worst, bound, load.jitter)
    print(
        f"\nproxy: worst wait with 50 ms round trips {ms(worst['slow'])}, while "
        f"cut {cut} times {ms(worst['cut'])}, while timing out "
        f"{ms(worst['timing_out'])} (bound {ms(bound)}); 0 exceptions; last "
        f"local compute {ms(recovered)} after the link recovered; scheduling "
        f"jitter {ms(load.jitter)}"
    )


# -- a frozen sentinel -----------------------------------------------------------------


def test_a_frozen_sentinel_costs_one_command_bound_not_redis_pys_ten_retries() -> None:
    """Every new connection to the primary asks the sentinels where it is.

    redis-py builds its connections to the sentinels as ``Redis(host,
    port)``, which retries 10 times with up to 1 s of backoff each; ApeeCache
    gives them its own policy (REDIS_RETRIES) too, so a frozen sentinel
    costs its ``B`` and the next sentinel answers.
    """
    from tests.support.sentinel_group import SentinelGroup

    options = {
        "SOCKET_TIMEOUT": SOCKET_TIMEOUT,
        "SOCKET_CONNECT_TIMEOUT": SOCKET_TIMEOUT,
    }
    with SentinelGroup() as group:
        frozen = group.sentinel_nodes[0]
        frozen.pause()
        try:
            with apee_alias(group.location, **group.cache_options(**options)) as alias:
                started = time.monotonic()
                value = get_or_set_stampede_safe(
                    "sentinel:key", lambda: "computed", 60, cache=alias
                )
                took = time.monotonic() - started
                sentinel_kwargs = caches[alias].options.redis_options.get(
                    "SENTINEL_KWARGS", {}
                )
        finally:
            frozen.resume()

    # Only a command's bound for the frozen sentinel, then normal round trips.
    policy = sentinel_kwargs.get("retry")
    assert policy is not None
    assert policy.get_retries() == 0
    bound = (1 + policy.get_retries()) * (2 * SOCKET_TIMEOUT)
    assert value == "computed"
    assert took <= bound + 0.5, (took, bound)
    print(
        f"\nfrozen sentinel (first of 3), socket timeouts {ms(SOCKET_TIMEOUT)}: "
        f"first get_or_set_stampede_safe {ms(took)} (one command's bound: "
        f"{ms(bound)})"
    )
