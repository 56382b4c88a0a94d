"""get_or_set_stampede_safe across real processes, and under real Redis faults.

Every test runs against the session's private redis-server and asserts counts
and values: how many computes ran (counted with a raw ``INCR`` the cache
cannot see, so across processes), what each caller got, how long it took.
Child processes run ``tests/support/stampede_worker.py``; they are released together
by one line on their stdin once each has warmed up.

Fault tests restore the server (SIGCONT, restart) in ``finally`` blocks. Each
test uses its own cache alias: coordinators (single-flight, breaker) are kept
per alias and process.
"""

from __future__ import annotations

import itertools
import os
import statistics
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.test import override_settings
from prometheus_client import REGISTRY

from django_apee import get_or_set_stampede_safe
from django_apee.core import keys
from django_apee.store.wake import WakeHub, wake_channel
from tests.support.children import Child
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.faults

ROOT = Path(__file__).resolve().parents[2]


# -- helpers -------------------------------------------------------------------


def unique_alias(name: str) -> str:
    return f"faults_{name}_{uuid.uuid4().hex[:8]}"


@contextmanager
def apee_alias(name: str, location: str = "", **options: Any) -> Iterator[str]:
    """A fresh CACHES alias on the session's Redis with ``options``."""
    alias = unique_alias(name)
    config = {
        "BACKEND": "django_apee.cache.ApeeCache",
        "LOCATION": location or settings.REDIS_URL,
        "OPTIONS": options,
    }
    with override_settings(CACHES={**settings.CACHES, alias: config}):
        yield alias


def metric(alias: str, name: str, **labels: str) -> float:
    value = REGISTRY.get_sample_value(name, {"cache": alias, **labels})
    return value or 0.0


def lease_key(alias: str, key: str) -> str:
    return keys.companion(caches[alias].client.make_key(key), keys.LEASE)


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def calls_of(*outcomes: dict[str, Any]) -> list[dict[str, Any]]:
    return [call for outcome in outcomes for call in outcome["results"]]


def summed(outcomes: list[dict[str, Any]], name: str) -> float:
    return sum(outcome["metrics"][name] for outcome in outcomes)


def assert_no_errors(calls: list[dict[str, Any]]) -> None:
    failed = [call for call in calls if "error" in call]
    assert not failed, failed[0].get("trace")


# -- 1. cold key, 4 processes x 16 threads -----------------------------------------


def test_cold_key_four_processes_sixteen_threads_compute_once(
    spawn: Callable[..., Child], raw_redis: redis.Redis
) -> None:
    alias, key, counter = unique_alias("cold"), "cold:report", "test:computes:cold"
    workers = [
        spawn(
            alias=alias,
            key=key,
            counter=counter,
            threads=16,
            compute_s=0.2,
            timeout=60,
            answer="report-42",
        )
        for _ in range(4)
    ]
    for worker in workers:
        worker.wait_ready()
    for worker in workers:
        worker.go()
    outcomes = [worker.result() for worker in workers]
    calls = calls_of(*outcomes)

    assert_no_errors(calls)
    assert len(calls) == 64
    assert int(raw_redis.get(counter) or 0) == 1  # one compute, fleet-wide
    assert {(call["answer"], call["n"]) for call in calls} == {("report-42", 1)}
    assert summed(outcomes, "computes_ok") == 1
    assert summed(outcomes, "fallbacks") == 0
    # The one value is stored for everyone after.
    assert caches["default"].get(key)["answer"] == "report-42"

    # Wait beyond the compute: from the moment the compute returned (``at``,
    # taken inside it) to the moment each caller had the value.
    beyond = [call["end"] - call["at"] for call in calls]
    released = min(outcome["released"] for outcome in outcomes)
    total = [call["end"] - released for call in calls]
    print(
        f"\ncold key: computes=1 callers={len(calls)} wait beyond compute "
        f"p50={ms(statistics.median(beyond))} p99={ms(percentile(beyond, 0.99))} "
        f"max={ms(max(beyond))}; caller latency max={ms(max(total))}"
    )
    # The target is p99 <= 5 ms; the bound here is loose because two
    # CPUs run 64 threads, but far below a poll loop's or a lock timeout's.
    assert percentile(beyond, 0.99) < 0.15
    assert max(beyond) < 0.3


# -- 2. compute five times the initial lease --------------------------------------


def test_compute_five_times_the_lease_is_renewed_and_runs_once(
    spawn: Callable[..., Child], raw_redis: redis.Redis
) -> None:
    alias, key, counter = unique_alias("long"), "long:compute", "test:computes:long"
    options = {"LEASE_TIMEOUT": 0.5}
    workers = [
        spawn(
            alias=alias,
            options=options,
            key=key,
            counter=counter,
            threads=4,
            compute_s=2.5,
            timeout=60,
            answer="slow",
        )
        for _ in range(2)
    ]
    for worker in workers:
        worker.wait_ready()
    with apee_alias("long_parent", **options) as parent:
        lease = keys.companion(caches[parent].client.make_key(key), keys.LEASE)
    for worker in workers:
        worker.go()

    # Watch the lease from outside while the compute runs past its first 0.5 s.
    deadline = time.monotonic() + 10
    while not raw_redis.get(counter):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    compute_started = time.monotonic()
    samples: list[tuple[float, int]] = []
    while time.monotonic() - compute_started < 2.3:
        samples.append((time.monotonic() - compute_started, raw_redis.pttl(lease)))
        time.sleep(0.05)
    outcomes = [worker.result() for worker in workers]
    calls = calls_of(*outcomes)

    assert_no_errors(calls)
    assert len(calls) == 8
    assert int(raw_redis.get(counter) or 0) == 1
    assert {(call["answer"], call["n"]) for call in calls} == {("slow", 1)}
    late = [pttl for elapsed, pttl in samples if elapsed > 0.6]
    assert late, samples
    assert min(late) > 0, samples  # the lease outlived its 500 ms: renewed
    assert max(pttl for _, pttl in samples) <= 500
    renewals = summed(outcomes, "lease_renewals")
    assert renewals >= 5  # ~2.5 s / 125 ms
    assert summed(outcomes, "lease_lost") == 0
    assert summed(outcomes, "fallbacks") == 0
    assert summed(outcomes, "computes_ok") == 1
    assert raw_redis.exists(lease) == 0  # released at the end
    print(
        f"\nlong compute: computes=1 renewals={renewals:.0f} "
        f"lease PTTL after 0.6 s min={min(late)} ms over {len(late)} samples"
    )


# -- 3. the holder killed mid-compute ------------------------------------------------


def test_holder_killed_mid_compute_one_takeover_within_the_lease(
    spawn: Callable[..., Child], raw_redis: redis.Redis
) -> None:
    alias, key, counter = unique_alias("kill"), "kill:me", "test:computes:kill"
    lease_s, takeover_s = 1.0, 0.1
    common = {
        "alias": alias,
        "options": {"LEASE_TIMEOUT": lease_s},
        "key": key,
        "counter": counter,
        "timeout": 60,
    }
    holder = spawn(**common, threads=1, compute_s=30, answer="never")
    waiters = [
        spawn(**common, threads=4, compute_s=takeover_s, answer="takeover")
        for _ in range(2)
    ]
    for worker in (holder, *waiters):
        worker.wait_ready()
    with apee_alias("kill_parent") as parent:
        lease = keys.companion(caches[parent].client.make_key(key), keys.LEASE)

    holder.go()
    deadline = time.monotonic() + 10
    while not raw_redis.get(counter):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    for worker in waiters:
        worker.go()
    time.sleep(0.4)  # the waiters are blocked on the holder's lease now
    pttl_at_kill = raw_redis.pttl(lease)
    holder.kill()
    killed_at = time.time()
    outcomes = [worker.result() for worker in waiters]
    calls = calls_of(*outcomes)

    assert_no_errors(calls)
    assert len(calls) == 8
    assert 0 < pttl_at_kill <= lease_s * 1000  # it was alive and renewed
    assert int(raw_redis.get(counter) or 0) == 2  # the holder's + one takeover
    assert {(call["answer"], call["n"]) for call in calls} == {("takeover", 2)}
    assert summed(outcomes, "computes_ok") == 1
    assert summed(outcomes, "fallbacks") == 0
    assert all(call["start"] < killed_at for call in calls)  # all were waiting

    after_kill = [call["end"] - killed_at for call in calls]
    lease_expired_at = killed_at + pttl_at_kill / 1000
    takeover_started = min(call["at"] for call in calls) - takeover_s
    beyond = [call["end"] - lease_expired_at - takeover_s for call in calls]
    print(
        f"\nholder killed: lease PTTL at kill={pttl_at_kill} ms, takeover compute "
        f"began {ms(takeover_started - lease_expired_at)} after the lease expired; "
        f"kill->value max={ms(max(after_kill))}; beyond lease expiry + compute "
        f"p50={ms(statistics.median(beyond))} max={ms(max(beyond))}"
    )
    assert max(after_kill) < lease_s + 1.0


# -- 4. delete() during a compute ------------------------------------------------------


def test_delete_during_compute_is_not_overwritten_by_the_old_compute(
    raw_redis: redis.Redis,
) -> None:
    with apee_alias("delete") as alias, apee_alias("delete_other") as other:
        cache = caches[alias]
        computes = {"old": 0, "new": 0}
        started, finish = threading.Event(), threading.Event()

        def old() -> str:
            computes["old"] += 1
            started.set()
            assert finish.wait(10)
            return "pre-invalidation"

        def call(key: str, got: list[Any]) -> threading.Thread:
            def run() -> None:
                got.append(get_or_set_stampede_safe(key, old, 60, cache=alias))

            thread = threading.Thread(target=run)
            thread.start()
            return thread

        # a) nobody else calls: the old compute's result is simply dropped.
        lost_before = metric(alias, "apee_cache_lease_lost_total")
        got: list[Any] = []
        thread = call("del:a", got)
        assert started.wait(5)
        assert raw_redis.exists(lease_key(alias, "del:a")) == 1
        cache.delete("del:a")
        assert raw_redis.exists(lease_key(alias, "del:a")) == 0  # revoked
        time.sleep(0.05)
        finish.set()
        thread.join(10)
        assert got == ["pre-invalidation"]  # its own caller still gets it
        assert cache.get("del:a", "absent") == "absent"  # but it is not stored
        assert metric(alias, "apee_cache_lease_lost_total") == lost_before + 1
        value = get_or_set_stampede_safe("del:a", lambda: "fresh", 60, cache=alias)
        assert value == "fresh"  # the next call computes anew
        assert cache.get("del:a") == "fresh"

        # b) another caller (another coordinator, as another process would be)
        # computes after the invalidation while the old compute still runs:
        # the old compute must not overwrite the newer value.
        started.clear()
        finish.clear()
        got = []
        thread = call("del:b", got)
        assert started.wait(5)
        cache.delete("del:b")

        def new() -> str:
            computes["new"] += 1
            return "post-invalidation"

        assert get_or_set_stampede_safe("del:b", new, 60, cache=other) == (
            "post-invalidation"
        )
        finish.set()
        thread.join(10)
        assert got == ["pre-invalidation"]
        assert cache.get("del:b") == "post-invalidation"
        assert computes == {"old": 2, "new": 1}
        assert metric(alias, "apee_cache_lease_lost_total") == lost_before + 2


# -- 5. SCRIPT FLUSH and a Redis restart ---------------------------------------------


def test_script_flush_between_and_during_calls(raw_redis: redis.Redis) -> None:
    with apee_alias("flush", LEASE_TIMEOUT=0.5) as alias:
        cache = caches[alias]
        computes: list[str] = []

        def compute(name: str, flush: bool = False, hold: float = 0.0) -> Any:
            def run() -> str:
                computes.append(name)
                if flush:
                    raw_redis.script_flush()
                time.sleep(hold)
                return f"value-{name}"

            return run

        assert get_or_set_stampede_safe("f:1", compute("1"), 60, cache=alias) == (
            "value-1"
        )
        raw_redis.script_flush()  # between calls
        assert get_or_set_stampede_safe("f:1", compute("x"), 60, cache=alias) == (
            "value-1"
        )  # a hit, through a reloaded read script
        assert get_or_set_stampede_safe("f:2", compute("2"), 60, cache=alias) == (
            "value-2"
        )
        assert cache.get("f:2") == "value-2"

        # During a call: the flush lands after acquire and before the renewals
        # and the release, which must reload their scripts and still store.
        renewals = metric(alias, "apee_cache_lease_renewals_total")
        value = get_or_set_stampede_safe(
            "f:3", compute("3", flush=True, hold=0.4), 60, cache=alias
        )
        assert value == "value-3"
        assert cache.get("f:3") == "value-3"
        assert raw_redis.exists(lease_key(alias, "f:3")) == 0
        assert metric(alias, "apee_cache_lease_renewals_total") > renewals
        assert computes == ["1", "2", "3"]
        assert metric(alias, "apee_cache_lease_lost_total") == 0
        assert metric(alias, "apee_cache_redis_errors_total") == 0


def cached_again_within(
    alias: str, prefix: str, bound: float
) -> tuple[float, int, list[Any]]:
    """Call until a computed value is stored; every call must return its value."""
    started = time.monotonic()
    attempts, returned = 0, []
    while True:
        attempts += 1
        key = f"{prefix}:{attempts}"
        value = get_or_set_stampede_safe(key, lambda k=key: f"v-{k}", 60, cache=alias)
        returned.append((key, value))
        assert value == f"v-{key}"
        if caches[alias].get(key) == value:
            return time.monotonic() - started, attempts, returned
        assert time.monotonic() - started < bound, returned
        time.sleep(0.05)


def test_redis_restart_between_and_during_calls(
    redis_server: RedisServer, raw_redis: redis.Redis
) -> None:
    with apee_alias("restart", LEASE_TIMEOUT=0.5) as alias:
        assert get_or_set_stampede_safe("r:0", lambda: "before", 60, cache=alias) == (
            "before"
        )
        try:
            redis_server.restart()  # between calls: data and scripts are gone
        finally:
            if redis_server.process is None:
                redis_server.start()
        between, between_attempts, _ = cached_again_within(alias, "r:between", 3.0)
        assert get_or_set_stampede_safe("r:0", lambda: "after", 60, cache=alias) == (
            "after"
        )  # the old value went with the restart; a new one is computed

        computes = []
        lost = metric(alias, "apee_cache_lease_lost_total")

        def restarting() -> str:
            computes.append(1)
            redis_server.restart()
            return "computed-across-restart"

        try:
            value = get_or_set_stampede_safe("r:during", restarting, 60, cache=alias)
        finally:
            if redis_server.process is None:
                redis_server.start()
        assert value == "computed-across-restart"  # the caller still gets it
        assert computes == [1]
        during, during_attempts, _ = cached_again_within(alias, "r:during", 3.0)
        # The restart took the lease with it: the fenced release stored nothing.
        assert caches[alias].get("r:during", "absent") == "absent"
        assert metric(alias, "apee_cache_lease_lost_total") == lost + 1
        print(
            f"\nrestart: cached again after {ms(between)} ({between_attempts} calls) "
            f"between calls, {ms(during)} ({during_attempts} calls) after one "
            "during a call"
        )


# -- the wake-up subscription's gaps ------------------------------------------------


def test_wakeup_published_before_the_subscription_is_up_still_wakes(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    """A waiter that registered while the subscriber was (re)connecting must
    not sleep to its lease's end because the holder published in the gap."""
    gate = threading.Event()

    def connect() -> redis.Redis:
        assert gate.wait(10)
        return redis.Redis.from_url(redis_url, socket_timeout=5)

    hub = WakeHub(connect, wake_channel("gap:"))
    event = hub.expect("gap:key")  # starts the subscriber, held in connect()
    try:
        assert not hub.subscribed.is_set()
        raw_redis.publish(hub.channel, "gap:key")  # our hub cannot hear it
        gate.set()
        assert hub.subscribed.wait(5)
        assert event.wait(1.0)  # told to look again
    finally:
        hub.done("gap:key", event)


def test_wakeup_subscription_reconnects_fast_after_an_old_failure_streak(
    redis_url: str, raw_redis: redis.Redis
) -> None:
    """The reconnect backoff restarts once a subscription has worked."""
    refusals = [redis.ConnectionError("refused")] * 4  # backoff grows to 0.8 s

    def connect() -> redis.Redis:
        if refusals:
            raise refusals.pop()
        return redis.Redis.from_url(redis_url, socket_timeout=5)

    hub = WakeHub(connect, wake_channel("streak:"))
    hub.done("streak", hub.expect("streak"))
    assert hub.subscribed.wait(5)
    event = hub.expect("streak")
    try:
        raw_redis.client_kill_filter(_type="pubsub")
        assert event.wait(5)  # the loss wakes waiters to look again
        lost_at = time.monotonic()
        assert hub.subscribed.wait(5)
        back = time.monotonic() - lost_at
    finally:
        hub.done("streak", event)
    assert back < 0.5, back


# -- 7. a hot key across many soft expiries --------------------------------------------


def test_hot_key_two_processes_one_compute_per_soft_window_nobody_waits(
    spawn: Callable[..., Child], raw_redis: redis.Redis
) -> None:
    alias, key, counter = unique_alias("hot"), "hot:key", "test:computes:hot"
    # A refresh must land between the soft and the hard timeout, or readers
    # miss. 1 s apart, not 0.1 s: a loaded 2-core machine once delayed one
    # refresh past a 0.1 s window. Six soft windows in the run, as before.
    timeout, soft, run_s = 2.0, 1.0, 6.0
    workers = [
        spawn(
            alias=alias,
            key=key,
            counter=counter,
            threads=8,
            compute_s=0.05,
            timeout=timeout,
            soft_timeout=soft,
            loop_s=run_s,
            pause_s=0.002,
            answer="hot",
        )
        for _ in range(2)
    ]
    for worker in workers:
        worker.wait_ready()
    with apee_alias("hot_parent") as parent:

        def warm() -> dict[str, Any]:
            number = int(raw_redis.incr(counter))
            time.sleep(0.05)
            return {"answer": "hot", "n": number, "pid": os.getpid(), "at": time.time()}

        get_or_set_stampede_safe(key, warm, timeout, soft_timeout=soft, cache=parent)
    for worker in workers:
        worker.go()
    outcomes = [worker.result(timeout=run_s + 30) for worker in workers]
    calls = calls_of(*outcomes)

    assert_no_errors(calls)
    assert {call["answer"] for call in calls} == {"hot"}
    computes = int(raw_redis.get(counter) or 0) - 1  # without the warm-up
    released = min(outcome["released"] for outcome in outcomes)
    ended = max(call["end"] for call in calls)
    windows = (ended - released) / soft
    latencies = [call["end"] - call["start"] for call in calls]
    slow = [lat for lat in latencies if lat > 0.05]
    ages = [call["end"] - call["at"] for call in calls]
    served = sorted({(call["n"], call["at"]) for call in calls})
    finished = [at for _, at in served]
    gaps = [later - earlier for earlier, later in itertools.pairwise(finished)]
    print(
        f"\nhot key: {len(calls)} reads over {ended - released:.2f} s, "
        f"{computes} computes for {windows:.2f} soft windows "
        f"({computes / windows:.2f} per window; refreshed every "
        f"{ms(statistics.median(gaps))} median, {ms(min(gaps))} min), read latency "
        f"p50={ms(statistics.median(latencies))} "
        f"p99={ms(percentile(latencies, 0.99))} max={ms(max(latencies))}, "
        f"reads > 50 ms: {len(slow)}, misses: {summed(outcomes, 'misses'):.0f}, "
        f"early refreshes: {summed(outcomes, 'early_refreshes'):.0f}, stale served: "
        f"{summed(outcomes, 'stale_served'):.0f}, oldest value served {ms(max(ages))}"
    )
    assert windows * 0.7 <= computes <= windows * 1.3 + 2
    # One compute per expiry: every compute's value was served (none was
    # thrown away by a duplicate), and no two landed for the same expiry.
    # Only the last one may be unread: a refresh started as the readers
    # stopped lands after the last read; then it is what Redis holds now (a
    # duplicate thrown away by the fence would not be).
    numbers = [n for n, _ in served]
    if numbers == list(range(1, computes + 1)):
        with apee_alias("hot_parent") as parent:
            assert (caches[parent].get(key) or {}).get("n") == computes + 1
    else:
        assert numbers == list(range(1, computes + 2))
    assert min(gaps) > 0.25  # a duplicate would land within ~one compute
    # Nobody took the miss path, the only one that waits for a compute ...
    assert summed(outcomes, "misses") == 0
    assert summed(outcomes, "lease_waits") == 0
    # ... and reads stayed fast. A read that waited for a refresh would take
    # the 50 ms compute; the few reads near 50 ms here are two CPUs
    # scheduling 16 threads and two redis clients, not waits (none missed).
    assert percentile(latencies, 0.99) < 0.025
    assert len(slow) <= len(calls) // 1000
    # Nothing older than the hard timeout was served.
    assert max(ages) < timeout + 0.1
