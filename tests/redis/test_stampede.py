"""get_or_set_stampede_safe on a real Redis, in one process with real threads.

Every test asserts values and counts (computes, metrics, raw Redis state) and
bounds every wait. Multi-process and fault-injection tests (a cold key across
processes, SIGKILL, SIGSTOP, restart, SCRIPT FLUSH) live in
``test_stampede_faults.py``.

Each test gets cache aliases of its own: ``stampede.coordinator`` keeps one
Coordinator (single-flight table, breaker, refresh pool) per alias and
location for the whole process, so sharing an alias would share a breaker.
"""

from __future__ import annotations

import socket
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.core.cache.backends.base import CacheKeyWarning
from django.test import override_settings
from prometheus_client import REGISTRY

import django_apee
from django_apee.cache import ApeeCache
from django_apee.core import keys
from django_apee.core.envelope import Meta
from django_apee.store import lease
from tests.support.redis_server import RedisServer, free_port

APEE = "django_apee.cache.ApeeCache"
MISSING: Any = object()


# -- helpers ---------------------------------------------------------------------------


class Compute:
    """A compute function that counts its calls, optionally slow or failing."""

    def __init__(
        self,
        value: Any = "value",
        *,
        sleep: float = 0.0,
        error: BaseException | None = None,
    ) -> None:
        self.value = value
        self.sleep = sleep
        self.error = error
        self.calls = 0
        self.threads: list[str] = []
        self.started = threading.Event()
        self.finished = threading.Event()
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            self.calls += 1
            self.threads.append(threading.current_thread().name)
        self.started.set()
        try:
            if self.sleep:
                time.sleep(self.sleep)
            if self.error is not None:
                raise self.error
            return self.value
        finally:
            self.finished.set()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def run_threads(
    count: int, target: Callable[[int], Any], timeout: float = 15.0
) -> tuple[list[Any], list[BaseException | None], list[float]]:
    """Run ``target(i)`` in ``count`` threads released together.

    Returns each thread's result, exception and latency (seconds).
    """
    barrier = threading.Barrier(count, timeout=5)
    results: list[Any] = [MISSING] * count
    errors: list[BaseException | None] = [None] * count
    latencies: list[float] = [float("nan")] * count

    def body(index: int) -> None:
        try:
            barrier.wait()
            started = time.monotonic()
            results[index] = target(index)
            latencies[index] = time.monotonic() - started
        except BaseException as error:
            errors[index] = error

    threads = [
        threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "threads hung"
    return results, errors, latencies


class Background:
    """One call in a thread, with its result, error and finishing time."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = MISSING
        self.error: BaseException | None = None
        self.started_at = 0.0
        self.returned_at = 0.0
        self._call = call
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.started_at = time.monotonic()
        try:
            self.result = self._call()
        except BaseException as error:
            self.error = error
        self.returned_at = time.monotonic()

    def join(self, timeout: float = 10.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "call hung"
        if self.error is not None:
            raise self.error
        return self.result

    @property
    def elapsed(self) -> float:
        return self.returned_at - self.started_at


Made = Callable[..., tuple[str, ApeeCache]]


def made_key(backend: ApeeCache, key: Any, version: int | None = None) -> str:
    return str(backend.client.make_key(key, version=version))


def lease_key(backend: ApeeCache, key: Any) -> str:
    return keys.companion(made_key(backend, key), keys.LEASE)


def stored(backend: ApeeCache, raw_redis: redis.Redis, key: Any) -> Any:
    """What Redis holds for ``key``: (value, meta) decoded, or MISSING."""
    made = made_key(backend, key)
    raw = raw_redis.get(made)
    if raw is None:
        return MISSING
    decoded = backend.envelope.decode(raw, key=made)
    return decoded.value, decoded.meta


def write_entry(
    backend: ApeeCache,
    raw_redis: redis.Redis,
    key: Any,
    value: Any,
    meta: Meta,
    px: int | None = None,
) -> None:
    """Write an entry by hand, with crafted meta, as the release script would."""
    made = made_key(backend, key)
    payload = backend.envelope.encode(value, meta, key=made)
    raw_redis.set(made, payload, px=px or meta.hard_ms + meta.grace_ms)


def age_entry(
    backend: ApeeCache, raw_redis: redis.Redis, key: Any, left_ms: int
) -> None:
    """Make ``key``'s entry as old as one with ``left_ms`` to live would be.

    Both clocks a reader may judge it by agree: its PTTL (``PEXPIRE``), and
    its write time, moved back by the same amount and signed again (a
    ``PEXPIRE`` alone would leave the write time saying it is young, and the
    lean hit path would serve it as fresh until Redis deletes it).
    """
    made = made_key(backend, key)
    raw = raw_redis.get(made)
    assert raw is not None, f"{key!r} is not in the cache"
    value, meta = backend.envelope.decode(raw, key=made)
    assert meta is not None, f"{key!r} has no timeout"
    assert meta.hard_ms, f"{key!r} has no timeout"
    if meta.written_ms:
        lived = meta.hard_ms + meta.grace_ms - left_ms
        meta = meta._replace(written_ms=meta.written_ms - lived)
    raw_redis.set(made, backend.envelope.encode(value, meta, key=made), px=left_ms)


def hold_lease(backend: ApeeCache, key: Any, lease_ms: int) -> lease.Lease:
    """Take ``key``'s lease by hand, as another process's holder would."""
    client = backend.client.get_client(write=True)
    attempt = lease.acquire(
        client,
        backend.client.make_key(key),
        lease_ms,
        channel=backend.client.wake_channel,
    )
    assert attempt.lease is not None
    return attempt.lease


def metric(alias: str, name: str, **labels: str) -> float:
    return sample(f"apee_cache_{name}_total", cache=alias, **labels)


# -- the API ---------------------------------------------------------------------------


def test_function_method_and_get_or_set_share_one_entry(make_cache, raw_redis):
    alias, cache = make_cache()
    compute = Compute({"n": 1})
    assert django_apee.get_or_set_stampede_safe("k", compute, 60, cache=alias) == {
        "n": 1
    }
    assert cache.get_or_set_stampede_safe("k", compute, 60) == {"n": 1}
    assert cache.get_or_set("k", compute, 60) == {"n": 1}
    assert cache.get("k") == {"n": 1}
    assert compute.calls == 1
    assert 59_000 < raw_redis.pttl(made_key(cache, "k")) <= 60_000


def test_default_alias_is_used_when_none_is_named(raw_redis):
    compute = Compute("on default")
    assert django_apee.get_or_set_stampede_safe("dflt", compute, 30) == "on default"
    assert django_apee.get_or_set_stampede_safe("dflt", compute, 30) == "on default"
    assert compute.calls == 1
    assert caches["default"].get("dflt") == "on default"


def test_get_or_set_with_plain_default_stores_it(make_cache):
    _, cache = make_cache()
    assert cache.get_or_set("plain", "a value", 60) == "a value"
    assert cache.get("plain") == "a value"
    assert cache.get_or_set("plain", "another", 60) == "a value"


def test_get_or_set_uses_the_backend_default_timeout(make_cache, raw_redis):
    _, cache = make_cache()
    assert cache.get_or_set("k", lambda: 1.5) == 1.5
    pttl = raw_redis.pttl(made_key(cache, "k"))
    assert 299_000 < pttl <= 300_000  # Django's default TIMEOUT


def test_stored_none_is_a_hit(make_cache):
    _, cache = make_cache()
    cache.set("none", None, 60)
    compute = Compute("computed")
    assert cache.get_or_set("none", compute, 60) is None
    assert (
        django_apee.get_or_set_stampede_safe("none", compute, 60, cache=cache.alias)
        is None
    )
    assert compute.calls == 0


def test_computed_none_is_stored_and_then_a_hit(make_cache):
    _, cache = make_cache()
    compute = Compute(None)
    assert cache.get_or_set("computes-none", compute, 60) is None
    assert cache.get_or_set("computes-none", compute, 60) is None
    assert compute.calls == 1
    assert cache.has_key("computes-none")


@pytest.mark.parametrize("timeout", [0, -1, -0.5])
def test_timeout_zero_or_less_computes_and_stores_nothing(
    make_cache, raw_redis, timeout
):
    alias, cache = make_cache()
    compute = Compute("x")
    assert cache.get_or_set("zero", compute, timeout) == "x"
    assert (
        django_apee.get_or_set_stampede_safe("zero", compute, timeout, cache=alias)
        == "x"
    )
    assert compute.calls == 2
    assert raw_redis.exists(made_key(cache, "zero")) == 0
    assert raw_redis.exists(lease_key(cache, "zero")) == 0


@pytest.mark.parametrize("timeout", [0, -1])
def test_timeout_zero_returns_a_value_already_cached(make_cache, raw_redis, timeout):
    # Django's get_or_set reads first: only a computed value goes unstored.
    alias, cache = make_cache()
    cache.set("there", "cached", 60)
    compute = Compute("computed")
    assert cache.get_or_set("there", compute, timeout) == "cached"
    assert (
        django_apee.get_or_set_stampede_safe("there", compute, timeout, cache=alias)
        == "cached"
    )
    assert compute.calls == 0
    assert cache.get("there") == "cached"


def test_timeout_zero_with_redis_down_computes(make_cache):
    _, cache = make_cache(f"redis://127.0.0.1:{free_port()}/0")
    assert cache.get_or_set("k", lambda: "computed", 0) == "computed"


def test_timeout_none_stores_a_persistent_entry(make_cache, raw_redis):
    _, cache = make_cache()
    assert cache.get_or_set_stampede_safe("forever", lambda: "v", None) == "v"
    assert raw_redis.pttl(made_key(cache, "forever")) == -1
    value, meta = stored(cache, raw_redis, "forever")
    assert value == "v"
    assert meta is not None
    assert (meta.soft_ms, meta.hard_ms, meta.grace_ms) == (0, 0, 0)


def test_version_is_part_of_the_key(make_cache, raw_redis):
    alias, cache = make_cache()
    assert cache.get_or_set("v", "two", 60, version=2) == "two"
    assert cache.get("v") is None
    assert cache.get("v", version=2) == "two"
    assert raw_redis.exists(made_key(cache, "v", version=2)) == 1
    compute = Compute("one")
    assert (
        django_apee.get_or_set_stampede_safe("v", compute, 60, version=1, cache=alias)
        == "one"
    )
    assert (
        django_apee.get_or_set_stampede_safe("v", compute, 60, version=2, cache=alias)
        == "two"
    )
    assert compute.calls == 1


def test_non_apee_alias_is_a_type_error():
    config = {
        **settings.CACHES,
        "locmem": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"},
    }
    with (
        override_settings(CACHES=config),
        pytest.raises(TypeError, match=r"not django_apee\.cache\.ApeeCache"),
    ):
        django_apee.get_or_set_stampede_safe("k", lambda: 1, 60, cache="locmem")


def test_soft_timeout_above_timeout_is_a_value_error(make_cache, raw_redis):
    alias, cache = make_cache()
    compute = Compute()
    with pytest.raises(ValueError, match="soft_timeout"):
        django_apee.get_or_set_stampede_safe(
            "k", compute, 10, soft_timeout=11, cache=alias
        )
    with pytest.raises(ValueError, match="soft_timeout"):
        cache.get_or_set_stampede_safe("k", compute, 10, soft_timeout=10.5)
    assert compute.calls == 0
    assert raw_redis.exists(made_key(cache, "k")) == 0
    # Equal is allowed: no stale window.
    assert cache.get_or_set_stampede_safe("k", compute, 10, soft_timeout=10) == "value"


# -- what is stored --------------------------------------------------------------------


def test_stored_entry_carries_meta_and_pttl_is_hard_plus_grace(make_cache, raw_redis):
    _, cache = make_cache()
    compute = Compute("payload", sleep=0.05)
    result = cache.get_or_set_stampede_safe(
        "meta", compute, 100, soft_timeout=80, stale_if_error=5
    )
    assert result == "payload"
    value, meta = stored(cache, raw_redis, "meta")
    assert value == "payload"
    assert meta.soft_ms == 80_000
    assert meta.hard_ms == 100_000
    assert meta.grace_ms == 5_000
    assert 50 <= meta.delta_ms < 500  # the compute's measured duration
    pttl = raw_redis.pttl(made_key(cache, "meta"))
    assert 104_000 < pttl <= 105_000  # hard + grace
    assert raw_redis.exists(lease_key(cache, "meta")) == 0  # released


def test_default_soft_timeout_is_the_ratio_of_hard(make_cache, raw_redis):
    _, cache = make_cache(SOFT_TIMEOUT_RATIO=0.75)
    cache.get_or_set_stampede_safe("ratio", lambda: 1, 40)
    _, meta = stored(cache, raw_redis, "ratio")
    assert (meta.soft_ms, meta.hard_ms, meta.grace_ms) == (30_000, 40_000, 0)
    assert meta.delta_ms >= 1
    assert 39_000 < raw_redis.pttl(made_key(cache, "ratio")) <= 40_000


# -- one compute for many threads ------------------------------------------------------


def test_cold_key_32_threads_one_compute(make_cache, raw_redis):
    alias, cache = make_cache()
    compute = Compute({"report": 42}, sleep=0.2)
    results, errors, latencies = run_threads(
        32,
        lambda _: django_apee.get_or_set_stampede_safe(
            "cold", compute, 60, cache=alias
        ),
    )
    assert errors == [None] * 32
    assert results == [{"report": 42}] * 32
    assert compute.calls == 1
    assert max(latencies) < 0.2 + 0.5
    assert stored(cache, raw_redis, "cold")[0] == {"report": 42}


# -- stale and early: served at once, refreshed once -----------------------------------


def test_stale_value_served_at_once_one_background_refresh(make_cache, raw_redis):
    alias, cache = make_cache()
    first = Compute("old")
    assert cache.get_or_set_stampede_safe("hot", first, 10, soft_timeout=0.2) == "old"
    time.sleep(0.3)  # past soft, far from hard
    stale_before = metric(alias, "stale_served")
    refresh = Compute("new", sleep=0.5)

    results, errors, latencies = run_threads(
        16,
        lambda _: cache.get_or_set_stampede_safe("hot", refresh, 10, soft_timeout=0.2),
    )
    assert errors == [None] * 16
    assert results == ["old"] * 16
    assert max(latencies) < 0.1  # nobody waited for the 0.5 s refresh
    assert metric(alias, "stale_served") - stale_before == 16

    assert wait_for(lambda: cache.get("hot") == "new", timeout=3)
    assert refresh.calls == 1
    assert all(name.startswith("django-apee-refresh") for name in refresh.threads)
    assert raw_redis.exists(lease_key(cache, "hot")) == 0
    _, meta = stored(cache, raw_redis, "hot")
    assert 500 <= meta.delta_ms < 1500
    # The refreshed entry is fresh: no further compute.
    assert cache.get_or_set_stampede_safe("hot", refresh, 10, soft_timeout=0.2) == "new"
    assert refresh.calls == 1


def test_stale_refresh_inline_winner_gets_new_others_old(make_cache):
    _, cache = make_cache(REFRESH="inline")
    cache.get_or_set_stampede_safe("inl", lambda: "old", 10, soft_timeout=0.2)
    time.sleep(0.3)
    refresh = Compute("new", sleep=0.4)

    results, errors, latencies = run_threads(
        8,
        lambda _: cache.get_or_set_stampede_safe("inl", refresh, 10, soft_timeout=0.2),
    )
    assert errors == [None] * 8
    assert refresh.calls == 1
    assert sorted(results) == ["new"] + ["old"] * 7
    winner = results.index("new")
    assert latencies[winner] >= 0.4  # the winner computed in its own request
    assert max(lat for i, lat in enumerate(latencies) if i != winner) < 0.1
    assert not refresh.threads[0].startswith("django-apee-refresh")
    assert cache.get("inl") == "new"


def test_xfetch_refreshes_early_with_a_big_delta(make_cache, raw_redis):
    alias, cache = make_cache()
    # Fresh entry, 3 s to soft, last compute took 3 s: P(early) = 1/e per read.
    written = time.monotonic()
    write_entry(cache, raw_redis, "xf", "old", Meta(3000, 10_000, 0, 3000))
    early_before = metric(alias, "early_refreshes")
    refresh = Compute("new", sleep=0.05)
    served = []
    for _ in range(60):
        served.append(cache.get_or_set_stampede_safe("xf", refresh, 10, soft_timeout=3))
        if refresh.started.is_set():
            break
        time.sleep(0.005)
    assert refresh.calls == 1, "XFetch never went early in 60 reads (P ~ 1e-12)"
    assert set(served) == {"old"}  # the reader that triggered it was not delayed
    assert wait_for(lambda: cache.get("xf") == "new", timeout=3)
    assert time.monotonic() - written < 3.0  # landed before the soft timeout
    assert metric(alias, "early_refreshes") - early_before == 1
    # The new entry's delta is ~50 ms with 3 s to soft: no second refresh.
    for _ in range(20):
        assert (
            cache.get_or_set_stampede_safe("xf", refresh, 10, soft_timeout=3) == "new"
        )
    assert refresh.calls == 1


def test_xfetch_beta_zero_never_refreshes_before_soft(make_cache, raw_redis):
    alias, cache = make_cache(XFETCH_BETA=0)
    write_entry(cache, raw_redis, "nb", "old", Meta(3000, 10_000, 0, 3000))
    refresh = Compute("new")
    deadline = time.monotonic() + 0.5
    reads = 0
    while time.monotonic() < deadline:
        assert (
            cache.get_or_set_stampede_safe("nb", refresh, 10, soft_timeout=3) == "old"
        )
        reads += 1
    assert reads > 50
    time.sleep(0.1)  # any background refresh would have run by now
    assert refresh.calls == 0
    assert metric(alias, "early_refreshes") == 0
    # Past soft, the stale window refreshes (beta only turns off *early*).
    write_entry(cache, raw_redis, "nb", "old", Meta(3000, 10_000, 0, 3000), px=6000)
    assert cache.get_or_set_stampede_safe("nb", refresh, 10, soft_timeout=3) == "old"
    assert wait_for(lambda: cache.get("nb") == "new", timeout=3)
    assert refresh.calls == 1


# -- a compute that raises -------------------------------------------------------------


class Boom(Exception):
    pass


def test_compute_error_reaches_caller_and_frees_the_lease(make_cache, raw_redis):
    alias, cache = make_cache()
    failing = Compute(error=Boom("db down"))
    errors_before = metric(alias, "computes", outcome="error")
    with pytest.raises(Boom, match="db down"):
        django_apee.get_or_set_stampede_safe("err", failing, 60, cache=alias)
    assert raw_redis.exists(lease_key(cache, "err")) == 0
    assert raw_redis.exists(made_key(cache, "err")) == 0
    assert metric(alias, "computes", outcome="error") - errors_before == 1
    # The next caller retries at once (no lease left to wait for).
    started = time.monotonic()
    assert (
        django_apee.get_or_set_stampede_safe("err", lambda: "ok", 60, cache=alias)
        == "ok"
    )
    assert time.monotonic() - started < 0.1
    assert failing.calls == 1


def test_compute_error_is_shared_by_coalesced_threads(make_cache, raw_redis):
    alias, cache = make_cache()
    failing = Compute(error=Boom("shared"), sleep=0.2)
    results, errors, _ = run_threads(
        8,
        lambda _: django_apee.get_or_set_stampede_safe("e8", failing, 60, cache=alias),
    )
    assert failing.calls == 1
    assert results == [MISSING] * 8
    assert all(isinstance(error, Boom) for error in errors)
    assert raw_redis.exists(lease_key(cache, "e8")) == 0


def test_stale_if_error_serves_the_old_value_within_grace(make_cache, raw_redis):
    alias, cache = make_cache()
    other = "other-key"
    cache.set(other, "plain", 60)
    assert (
        cache.get_or_set_stampede_safe("g", lambda: "old", 0.3, stale_if_error=30)
        == "old"
    )
    time.sleep(0.45)  # past hard (0.3 s), inside grace (30 s)
    assert raw_redis.exists(made_key(cache, "g")) == 1  # Redis keeps it for grace

    # Plain reads never serve past Django's timeout.
    assert cache.get("g") is None
    assert cache.get("g", "dflt") == "dflt"
    assert cache.get_many(["g", other]) == {other: "plain"}
    assert cache.has_key("g") is False

    before = metric(alias, "fallbacks", reason="stale_if_error")
    failing = Compute(error=Boom("still down"))
    result = django_apee.get_or_set_stampede_safe(
        "g", failing, 0.3, stale_if_error=30, cache=alias
    )
    assert result == "old"
    assert failing.calls == 1
    assert metric(alias, "fallbacks", reason="stale_if_error") - before == 1
    assert raw_redis.exists(lease_key(cache, "g")) == 0
    # A successful recompute replaces it.
    assert (
        cache.get_or_set_stampede_safe("g", lambda: "fresh", 0.3, stale_if_error=30)
        == "fresh"
    )
    assert cache.get("g") == "fresh"


def test_without_grace_an_error_past_hard_raises(make_cache, raw_redis):
    _, cache = make_cache()
    cache.get_or_set_stampede_safe("ng", lambda: "old", 0.2)
    time.sleep(0.3)
    assert raw_redis.exists(made_key(cache, "ng")) == 0
    with pytest.raises(Boom):
        cache.get_or_set_stampede_safe(
            "ng", Compute(error=Boom()), 0.2, stale_if_error=5
        )


# -- invalidation during a compute -----------------------------------------------------


@pytest.mark.parametrize("invalidate", ["delete", "set"])
def test_invalidation_mid_compute_is_not_overwritten(make_cache, raw_redis, invalidate):
    alias, cache = make_cache()
    slow = Compute("pre-invalidation", sleep=0.5)
    lost_before = metric(alias, "lease_lost")
    call = Background(
        lambda: django_apee.get_or_set_stampede_safe("inv", slow, 60, cache=alias)
    )
    assert wait_for(lambda: raw_redis.exists(lease_key(cache, "inv")) == 1, 3)
    assert slow.started.wait(3)
    if invalidate == "delete":
        cache.delete("inv")
    else:
        cache.set("inv", "newer", 60)
    assert raw_redis.exists(lease_key(cache, "inv")) == 0  # revoked
    # The holder still answers its own caller...
    assert call.join() == "pre-invalidation"
    # ...but wrote nothing over the invalidation.
    expected = None if invalidate == "delete" else "newer"
    assert cache.get("inv") == expected
    assert metric(alias, "lease_lost") - lost_before == 1
    assert slow.calls == 1


# -- waiting: notifications, not polling -----------------------------------------------


def test_waiter_wakes_on_release_not_at_lease_expiry(make_cache):
    alias, cache = make_cache()
    shared = cache.runtime
    held = hold_lease(cache, "wake", 5000)
    compute = Compute("waiter computed")
    call = Background(
        lambda: django_apee.get_or_set_stampede_safe("wake", compute, 60, cache=alias)
    )
    assert wait_for(lambda: shared.hub.waiting() >= 1, 3)
    assert shared.hub.subscribed.wait(3)
    time.sleep(0.2)  # it is really blocked
    assert call.returned_at == 0.0

    payload = cache.envelope.encode(
        "from holder", Meta(54_000, 60_000, 0, 10), key=held.value_key
    )
    released_at = time.monotonic()
    assert lease.release(held, payload, 60_000) is True
    assert call.join(5) == "from holder"
    latency = call.returned_at - released_at
    print(f"\nwake-up latency after release: {latency * 1000:.1f} ms")
    assert latency < 0.2  # the lease had ~4.8 s left
    assert compute.calls == 0


def test_many_waiters_on_many_keys_share_one_pubsub_connection(make_cache):
    server = RedisServer().start()  # its only clients are this test's
    try:
        alias, cache = make_cache(server.url)
        raw = redis.Redis.from_url(server.url, socket_timeout=5)
        shared = cache.runtime
        count = 24
        held = [hold_lease(cache, f"k{i}", 10_000) for i in range(count)]
        compute = Compute("computed")
        calls = [
            Background(
                lambda i=i: django_apee.get_or_set_stampede_safe(
                    f"k{i}", compute, 60, cache=alias
                )
            )
            for i in range(count)
        ]
        assert wait_for(lambda: shared.hub.waiting() == count, 5)
        assert shared.hub.subscribed.wait(3)
        pubsub = raw.client_list(_type="pubsub")
        assert len(pubsub) == 1, pubsub
        blocked = [c for c in raw.client_list() if "b" in c["flags"]]
        assert blocked == []  # no connection sits in a blocking command
        print(f"\n{count} waiters: {len(raw.client_list())} connections in all")

        for i, one in enumerate(held):
            payload = cache.envelope.encode(
                f"v{i}", Meta(50_000, 60_000, 0, 5), key=one.value_key
            )
            assert lease.release(one, payload, 60_000) is True
        assert [call.join(5) for call in calls] == [f"v{i}" for i in range(count)]
        assert max(call.elapsed for call in calls) < 3
        assert compute.calls == 0
        raw.close()
    finally:
        server.close()


def test_dead_holder_waiter_takes_over_after_the_lease(make_cache, raw_redis):
    alias, cache = make_cache()
    hold_lease(cache, "dead", 1000)  # never released, never renewed
    compute = Compute("taken over")
    started = time.monotonic()
    result = django_apee.get_or_set_stampede_safe("dead", compute, 60, cache=alias)
    elapsed = time.monotonic() - started
    print(f"\ntakeover after a dead 1 s lease: {elapsed * 1000:.0f} ms")
    assert result == "taken over"
    assert compute.calls == 1
    assert 0.9 <= elapsed <= 1.6
    assert cache.get("dead") == "taken over"
    assert raw_redis.exists(lease_key(cache, "dead")) == 0


def test_wait_timeout_computes_locally_and_stores_nothing(make_cache, raw_redis):
    alias, cache = make_cache(WAIT_TIMEOUT=0.5)
    held = hold_lease(cache, "busy", 1000)
    stop = threading.Event()

    def renew_forever() -> None:
        while not stop.wait(0.1):
            raw_redis.pexpire(held.lease_key, 1000)

    renewer = threading.Thread(target=renew_forever, daemon=True)
    renewer.start()
    try:
        before = metric(alias, "fallbacks", reason="wait_timeout")
        compute = Compute("local")
        started = time.monotonic()
        result = django_apee.get_or_set_stampede_safe("busy", compute, 60, cache=alias)
        elapsed = time.monotonic() - started
        print(f"\nWAIT_TIMEOUT 0.5 s: fallback after {elapsed * 1000:.0f} ms")
        assert result == "local"
        assert compute.calls == 1
        assert 0.45 <= elapsed < 1.0
        assert metric(alias, "fallbacks", reason="wait_timeout") - before == 1
        assert raw_redis.exists(made_key(cache, "busy")) == 0  # nothing stored
        assert raw_redis.get(held.lease_key) == held.token.encode()  # still theirs
    finally:
        stop.set()
        renewer.join(2)


# -- Redis down ------------------------------------------------------------------------


def test_redis_down_computes_and_never_raises(make_cache):
    alias, cache = make_cache(f"redis://127.0.0.1:{free_port()}/0")
    compute = Compute("computed anyway")
    for _ in range(5):
        assert (
            django_apee.get_or_set_stampede_safe("down", compute, 60, cache=alias)
            == "computed anyway"
        )
        assert cache.get_or_set("down", compute, 60) == "computed anyway"
    assert compute.calls == 10
    assert metric(alias, "redis_errors") >= 1


def test_redis_down_single_flight_still_holds(make_cache):
    alias, _ = make_cache(f"redis://127.0.0.1:{free_port()}/0")
    compute = Compute("v", sleep=0.3)
    for wave in (1, 2, 3):
        results, errors, _ = run_threads(
            16,
            lambda _: django_apee.get_or_set_stampede_safe(
                "one", compute, 60, cache=alias
            ),
        )
        assert errors == [None] * 16
        assert results == ["v"] * 16
        assert compute.calls == wave  # one compute per wave of 16


def test_breaker_spares_later_calls_the_timeout():
    # A listener that never answers: every command costs SOCKET_TIMEOUT.
    with socket.socket() as blackhole, ExitStack() as stack:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        location = f"redis://127.0.0.1:{blackhole.getsockname()[1]}/0"
        alias = "stampede-blackhole"
        config = {
            **settings.CACHES,
            alias: {
                "BACKEND": APEE,
                "LOCATION": location,
                "OPTIONS": {
                    "SOCKET_TIMEOUT": 0.3,
                    "SOCKET_CONNECT_TIMEOUT": 0.3,
                    "BREAKER_THRESHOLD": 3,
                    "BREAKER_COOLDOWN": 30,
                },
            },
        }
        stack.enter_context(override_settings(CACHES=config))
        compute = Compute("computed")
        latencies = []
        for _ in range(13):
            started = time.monotonic()
            result = django_apee.get_or_set_stampede_safe(
                "bh", compute, 60, cache=alias
            )
            latencies.append(time.monotonic() - started)
            assert result == "computed"
        print(
            "\nbreaker: first calls "
            + ", ".join(f"{x * 1000:.0f}" for x in latencies[:3])
            + " ms; later max "
            + f"{max(latencies[3:]) * 1000:.2f} ms"
        )
        assert all(latency >= 0.25 for latency in latencies[:3])  # paid the timeout
        assert all(latency < 0.05 for latency in latencies[3:])
        assert compute.calls == 13
        assert metric(alias, "fallbacks", reason="circuit_open") == 10
        assert caches[alias].runtime.coordinator.breaker.is_open


# -- the decorator ---------------------------------------------------------------------


def test_decorator_keys_bound_arguments_with_defaults(make_cache):
    alias, cache = make_cache()
    calls = []

    @django_apee.stampede_safe(timeout=60, cache=alias)
    def total(a, b=2):
        calls.append((a, b))
        return a + b

    assert total(1, b=2) == 3
    assert total(1, 2) == 3
    assert total(a=1, b=2) == 3
    assert total(1) == 3
    assert calls == [(1, 2)]
    key = total.cache_key(1)
    assert key == total.cache_key(1, 2) == total.cache_key(a=1, b=2)
    assert cache.get(key) == 3

    assert total(1, 3) == 4
    assert total(2) == 4
    assert calls == [(1, 2), (1, 3), (2, 2)]
    assert len({total.cache_key(1), total.cache_key(1, 3), total.cache_key(2)}) == 3
    assert total.__name__ == "total"


def test_decorator_canonical_containers(make_cache):
    alias, _ = make_cache()
    calls = []

    @django_apee.stampede_safe(timeout=60, cache=alias)
    def f(x):
        calls.append(x)
        return len(x)

    assert f({"a": 1, "b": [1, 2]}) == 2
    assert f({"b": [1, 2], "a": 1}) == 2  # dict order does not matter
    assert f({3, 1, 2}) == 3
    assert f({1, 2, 3}) == 3
    assert len(calls) == 2
    assert f.cache_key([1, 2]) != f.cache_key((1, 2))  # type is part of the key


@pytest.mark.django_db
def test_decorator_on_model_methods_keys_by_pk(make_cache, monkeypatch):
    from django.contrib.auth.models import User

    alias, cache = make_cache()
    calls = []

    def label(self):
        calls.append(self.pk)
        return f"<{self.username}>"

    monkeypatch.setattr(
        User,
        "apee_label",
        django_apee.stampede_safe(timeout=60, cache=alias)(label),
        raising=False,
    )
    alice = User.objects.create(username="alice")
    bob = User.objects.create(username="bob")
    assert alice.apee_label() == "<alice>"
    assert User.objects.get(pk=alice.pk).apee_label() == "<alice>"  # other instance
    assert bob.apee_label() == "<bob>"
    assert calls == [alice.pk, bob.pk]
    assert User.apee_label.cache_key(alice) == User.apee_label.cache_key(
        User.objects.get(pk=alice.pk)
    )
    assert User.apee_label.cache_key(alice) != User.apee_label.cache_key(bob)
    assert cache.get(User.apee_label.cache_key(bob)) == "<bob>"
    with pytest.raises(TypeError, match="key="):
        User(username="unsaved").apee_label()  # no pk: no stable identity


def test_decorator_refuses_unsupported_arguments(make_cache):
    alias, _ = make_cache()
    calls = []

    @django_apee.stampede_safe(timeout=60, cache=alias)
    def f(x):
        calls.append(x)
        return 1

    with pytest.raises(TypeError, match="key=") as info:
        f(object())
    assert "object" in str(info.value)
    with pytest.raises(TypeError, match="key="):
        f.cache_key([1, object()])
    assert calls == []


def test_decorator_key_callable_overrides(make_cache, raw_redis):
    alias, cache = make_cache()
    calls = []

    @django_apee.stampede_safe(
        timeout=60, cache=alias, key=lambda user_id, request=None: f"profile:{user_id}"
    )
    def profile(user_id, request=None):
        calls.append(user_id)
        return {"id": user_id}

    thing = object()  # unsupported by the default key, fine with key=
    assert profile.cache_key(7, request=thing) == "profile:7"
    assert profile(7, request=thing) == {"id": 7}
    assert profile(7) == {"id": 7}
    assert calls == [7]
    assert cache.get("profile:7") == {"id": 7}
    cache.delete(profile.cache_key(7))  # invalidation by the same key
    assert profile(7) == {"id": 7}
    assert calls == [7, 7]


def test_decorator_huge_arguments_give_a_short_key(make_cache):
    alias, cache = make_cache()

    @django_apee.stampede_safe(timeout=60, cache=alias)
    def size(blob):
        return len(blob)

    huge = "x" * 1_000_000
    other = "x" * 999_999 + "y"
    key = size.cache_key(huge)
    assert len(key) < 200
    assert key != size.cache_key(other)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheKeyWarning)
        assert size(huge) == 1_000_000
        assert size(other) == 1_000_000
    assert cache.get(key) == 1_000_000


# -- background refresh and DB connections ---------------------------------------------


@pytest.mark.django_db
def test_background_refresh_closes_its_db_connections(make_cache, monkeypatch):
    from django.db import connection, connections

    # The test database is an in-memory SQLite, whose close() is a no-op on
    # purpose; let the worker's close really close (the shared in-memory
    # database lives on through the main thread's connection).
    monkeypatch.setattr(
        type(connections["default"]), "is_in_memory_db", lambda self: False
    )
    _, cache = make_cache()
    cache.get_or_set_stampede_safe("db", lambda: "old", 60, soft_timeout=0.1)
    time.sleep(0.15)
    used: list[tuple[Any, str]] = []

    def compute() -> str:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            assert cursor.fetchone() == (1,)
        # The wrapper itself, not the thread-resolving proxy.
        wrapper = connections["default"]
        assert wrapper.connection is not None
        used.append((wrapper, threading.current_thread().name))
        return "new"

    assert cache.get_or_set_stampede_safe("db", compute, 60, soft_timeout=0.1) == "old"
    assert wait_for(lambda: cache.get("db") == "new", 3)
    assert len(used) == 1
    worker_conn, thread_name = used[0]
    assert thread_name.startswith("django-apee-refresh")
    assert worker_conn is not connections["default"]  # the worker's own
    assert wait_for(lambda: worker_conn.connection is None, 3)
    assert connections["default"].connection is not None  # ours untouched


def test_add_replaces_an_entry_past_hard_but_kept_for_grace(make_cache, raw_redis):
    _, cache = make_cache()
    write_entry(cache, raw_redis, "a", "old", Meta(800, 1000, 30_000, 5), px=29_500)
    # PTTL 29.5 s with 30 s of grace: 0.5 s past hard, so absent for Django.
    assert cache.get("a", "absent") == "absent"
    assert cache.add("a", "new") is True
    assert cache.get("a") == "new"
    assert cache.add("a", "newer") is False  # a live value is not replaced
    write_entry(cache, raw_redis, "b", "old", Meta(800, 1000, 30_000, 5), px=29_900)
    assert cache.add("b", "new") is True  # 0.1 s past hard: absent too
    write_entry(cache, raw_redis, "c", "live", Meta(800, 1000, 30_000, 5), px=30_500)
    assert cache.add("c", "new") is False  # inside hard: present
    assert cache.get("c") == "live"


def test_aget_or_set_takes_the_stampede_path_without_blocking_the_loop(make_cache):
    import asyncio

    _, cache = make_cache()
    compute = Compute("async", sleep=0.3)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async def main() -> list[Any]:
        task = asyncio.ensure_future(ticker())
        try:
            calls = [
                cache.aget_or_set_stampede_safe("ak", compute, 10) for _ in range(20)
            ]
            calls.append(cache.aget_or_set("ak", compute, 10))
            return await asyncio.wait_for(asyncio.gather(*calls), timeout=10)
        finally:
            task.cancel()

    assert asyncio.run(main()) == ["async"] * 21
    assert compute.calls == 1
    assert ticks >= 10  # the loop kept running during the 0.3 s compute


def test_a_forked_worker_refreshes_with_its_own_threads(make_cache, raw_redis):
    """gunicorn --preload: the parent used the cache, then forked a worker."""
    import os

    _, cache = make_cache()
    # The parent starts the refresh pool, the renewer and the wake hub.
    write_entry(cache, raw_redis, "f1", "old", Meta(100, 60_000, 0, 5), px=59_000)
    assert cache.get_or_set_stampede_safe("f1", Compute("new"), 60) == "old"
    assert wait_for(lambda: cache.get("f1") == "new", timeout=3)
    pid = os.fork()
    if pid == 0:  # the worker: a stale read must be refreshed by its own pool
        code = 1
        try:
            write_entry(
                cache, raw_redis, "f2", "old", Meta(100, 60_000, 0, 5), px=59_000
            )
            cache.get_or_set_stampede_safe("f2", Compute("forked"), 60)
            code = 0 if wait_for(lambda: cache.get("f2") == "forked", timeout=3) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 20
    while (waited := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked worker hung")
        time.sleep(0.02)
    assert os.waitstatus_to_exitcode(waited[1]) == 0
    assert cache.get("f2") == "forked"
