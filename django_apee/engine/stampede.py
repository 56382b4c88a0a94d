"""get_or_set_stampede_safe: one computation per expiry, fleet-wide.

This module only composes: ``policy`` decides (state, XFetch, lease and wait
lengths), ``lease`` talks to Redis, ``singleflight`` coalesces the threads of
one process, ``breaker`` keeps an outage from costing every request a timeout.

The path of one call:

1. *Hit*: one round trip reads the value and its PTTL. Fresh: return it.
   Early (picked by XFetch) or stale: return it, and whoever wins the lease
   refreshes it, in the background by default, so no request waits.
2. *Miss* (absent, past its hard timeout, unreadable): the threads of this
   process coalesce; their leader takes the lease and computes, or waits for
   the holder's wake-up, timed to the lease's life, and takes over if the
   holder died. No wait outlives ``WAIT_TIMEOUT``; then the value is computed
   here and not stored (``fallback``).
3. *Redis trouble*: compute here, still coalesced in this process, and let
   the circuit breaker spare the next requests the timeout.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django_redis.exceptions import ConnectionInterrupted

from django_apee.client import REDIS_ERRORS, to_milliseconds
from django_apee.core import policy
from django_apee.core.breaker import CircuitBreaker
from django_apee.core.envelope import Meta
from django_apee.core.singleflight import (
    LeaderAborted,
    SingleFlight,
    SingleFlightTimeout,
)
from django_apee.observe import metrics
from django_apee.store import lease

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis import Redis

    from django_apee.cache import ApeeCache

logger = logging.getLogger("django_apee")

_MISSING: Any = object()


@dataclass(frozen=True)
class Spec:
    """How one entry is to be stored: its timeouts in milliseconds."""

    hard_ms: int
    soft_ms: int
    grace_ms: int

    @property
    def px(self) -> int | None:
        return self.hard_ms + self.grace_ms if self.hard_ms else None

    def meta(self, delta_ms: int) -> Meta:
        seed = random.randrange(1, policy.SEED_RANGE)
        return Meta(self.soft_ms, self.hard_ms, self.grace_ms, delta_ms, seed)


@functools.lru_cache(maxsize=1024)
def make_spec(
    timeout: float | None,
    soft_timeout: float | None,
    stale_if_error: float | None,
    rules: policy.Policy,
) -> Spec:
    hard_ms = 0 if timeout is None else to_milliseconds(timeout)
    soft_ms = None if soft_timeout is None else to_milliseconds(soft_timeout)
    if soft_ms is not None and hard_ms and soft_ms > hard_ms:
        raise ValueError(
            f"soft_timeout ({soft_timeout}) must not exceed timeout ({timeout})."
        )
    if hard_ms == 0:
        soft_ms = None  # a persistent entry has no soft timeout either
    grace_ms = to_milliseconds(stale_if_error) if stale_if_error else 0
    return Spec(hard_ms, policy.soft_timeout_ms(hard_ms, soft_ms, rules), grace_ms)


@dataclass
class Call:
    """One ``get_or_set_stampede_safe`` call, as it travels through its steps."""

    backend: ApeeCache
    made: str
    compute: Callable[[], Any]
    spec: Spec
    client: Redis | None = None
    #: The metadata and PTTL read on the hit path (None / -2: nothing read).
    previous: Meta | None = None
    read_pttl: int = -2


class Coordinator:
    """What the threads of one process share for one cache alias."""

    def __init__(self, backend: ApeeCache) -> None:
        options = backend.apee
        self.alias = backend.alias
        self.policy = options.policy
        self.wait_timeout = options.wait_timeout
        self.refresh_mode = options.refresh
        self.flights: SingleFlight[Any] = SingleFlight()
        # Labelled children resolved once: labels() costs more than inc().
        self._hits = metrics.HITS.labels(cache=self.alias)
        self._misses = metrics.MISSES.labels(cache=self.alias)
        self._stale_served = metrics.STALE_SERVED.labels(cache=self.alias)
        self.breaker = CircuitBreaker(
            threshold=options.breaker_threshold, cooldown=options.breaker_cooldown
        )
        self.hub = lease.wake_hub(
            str(backend._server), lambda: backend.client.get_client(write=True)
        )
        self._refreshing: set[str] = set()
        #: made key -> (until, seed of the entry then): another process holds
        #: its lease. The seed tells the entry's writes apart, so a memo made
        #: about one entry is not applied to the refreshed one.
        self._held_elsewhere: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=options.refresh_workers,
            thread_name_prefix="django-apee-refresh",
        )
        self._pool_slots = threading.BoundedSemaphore(options.refresh_workers * 2)

    # -- the call -------------------------------------------------------------

    def get_or_set(self, call: Call) -> Any:
        if not self.breaker.allow():
            return self._local(call, reason="circuit_open")
        try:
            call.client = client = call.backend.client.get_client(write=True)
            raw, call.read_pttl = lease.read(client, call.made)
        except REDIS_ERRORS:
            self._redis_failed()
            return self._local(call, reason="redis_error")
        self.breaker.success()
        stale = _MISSING
        if raw is not None:
            decoded = call.backend.client.decode_entry(raw)
            if decoded is not None:
                value, call.previous = decoded
                state = policy.state(
                    call.previous,
                    call.read_pttl,
                    policy=self.policy,
                    rand=policy.xfetch_rand(call.previous, random.random()),
                )
                if state.servable:
                    return self._serve(call, value, state)
                if state is policy.State.GRACE:
                    stale = value
        self._misses.inc()
        return self._coalesced(call.made, lambda: self._fill(call, stale))

    def _serve(self, call: Call, value: Any, state: policy.State) -> Any:
        self._hits.inc()
        if state is policy.State.FRESH:
            return value
        if state is policy.State.STALE:
            self._stale_served.inc()
        refreshed = self._refresh(call, state)
        return value if refreshed is _MISSING else refreshed

    # -- refresh while a value is servable ------------------------------------

    def _refresh(self, call: Call, state: policy.State) -> Any:
        """Refresh ``made`` if this caller wins its lease; never wait for it.

        Returns the new value when refreshed inline, else ``_MISSING``.
        """
        made, read_pttl = call.made, call.read_pttl
        seed = call.previous.seed if call.previous is not None else 0
        now = time.monotonic()
        with self._lock:
            held_elsewhere = self._held_elsewhere.get(made, (0.0, 0))
            if made in self._refreshing or (
                held_elsewhere[0] > now and held_elsewhere[1] == seed
            ):
                return _MISSING  # this process, or another we know of, is on it
            self._refreshing.add(made)
        try:
            attempt = lease.acquire(_client(call), made, self._lease_ms(call.previous))
        except REDIS_ERRORS:
            self._forget_refresh(made)
            self._redis_failed()
            return _MISSING
        held = attempt.lease
        if held is None:
            self._forget_refresh(made, held=(attempt.lease_pttl_ms, seed))
            return _MISSING
        if attempt.pttl_ms > read_pttl >= 0:
            # Rewritten since we read it (a PTTL only falls): another
            # process's refresh landed between our read and this acquire, and
            # its lease is free again. Refreshing now would be a second
            # compute for one expiry.
            self._forget_refresh(made)
            self._release_quietly(held)
            return _MISSING
        if state is policy.State.EARLY:
            metrics.EARLY_REFRESHES.labels(cache=self.alias).inc()
        if self.refresh_mode == "inline":
            try:
                return self._compute_and_store(call, held, _MISSING)
            finally:
                self._forget_refresh(made)
        if not self._pool_slots.acquire(blocking=False):
            self._forget_refresh(made)
            self._release_quietly(held)
            metrics.FALLBACKS.labels(cache=self.alias, reason="refresh_pool_full").inc()
            return _MISSING
        try:
            self._pool.submit(self._background, call, held)
        except RuntimeError:  # the interpreter is shutting down
            self._pool_slots.release()
            self._forget_refresh(made)
            self._release_quietly(held)
        return _MISSING

    def _background(self, call: Call, held: lease.Lease) -> None:
        from django.db import connections

        try:
            self._compute_and_store(call, held, _MISSING)
        except Exception:
            logger.warning(
                "django_apee: background refresh of %s failed",
                held.value_key,
                exc_info=True,
            )
        finally:
            self._pool_slots.release()
            self._forget_refresh(held.value_key)
            connections.close_all()  # this thread's connections only

    def _forget_refresh(self, made: str, held: tuple[int, int] = (0, 0)) -> None:
        """Done refreshing ``made``; remember another holder's lease, if any.

        While another process holds the lease, stale reads here skip the
        acquire round trip until that lease would run out (``held``: its
        PTTL and the seed of the entry it was seen on).
        """
        held_for_ms, seed = held
        with self._lock:
            self._refreshing.discard(made)
            if held_for_ms > 0:
                now = time.monotonic()
                if len(self._held_elsewhere) > 10_000:
                    self._held_elsewhere = {
                        k: h for k, h in self._held_elsewhere.items() if h[0] > now
                    }
                self._held_elsewhere[made] = (now + held_for_ms / 1000, seed)

    # -- miss ------------------------------------------------------------------

    def _coalesced(self, made: str, fill: Callable[[], Any]) -> Any:
        try:
            return self.flights.do(made, fill, timeout=self.wait_timeout).value
        except (SingleFlightTimeout, LeaderAborted) as error:
            raise _Fallback("wait_timeout") from error

    def _fill(self, call: Call, stale: Any) -> Any:
        """Leader of this process: take the lease and compute, or wait for it."""
        client, made = _client(call), call.made
        deadline = time.monotonic() + self.wait_timeout
        lease_ms = self._lease_ms(call.previous)
        waited = 0.0
        woken = False
        while True:
            event = self.hub.expect(made)
            try:
                try:
                    if woken:
                        # Woken (or timed out): most often the value has
                        # landed. A plain read returns it without taking the
                        # now-free lease only to release it and wake everyone
                        # again.
                        raw, pttl = lease.read(client, made)
                        landed = self._servable(call.backend, raw, pttl)
                        if landed is not _MISSING:
                            self._observe_wait(waited)
                            return landed
                    attempt = lease.acquire(client, made, lease_ms)
                except REDIS_ERRORS:
                    self._redis_failed()
                    return self._compute_unstored(call.compute, "redis_error")
                # Look at the value first: a waiter woken by the holder's
                # release finds the lease free *and* the value landed; taking
                # the free lease and computing again would be a second compute
                # for one expiry.
                landed = self._servable(call.backend, attempt.raw, attempt.pttl_ms)
                if landed is not _MISSING:
                    if attempt.lease is not None:
                        self._release_quietly(attempt.lease)
                    self._observe_wait(waited)
                    return landed
                if attempt.lease is not None:
                    self._observe_wait(waited)
                    return self._compute_and_store(call, attempt.lease, stale)
                remaining_ms = int((deadline - time.monotonic()) * 1000)
                if remaining_ms <= 0:
                    break
                started = time.monotonic()
                event.wait(policy.wait_ms(attempt.lease_pttl_ms, remaining_ms) / 1000)
                waited += time.monotonic() - started
                woken = True
            finally:
                self.hub.done(made, event)
        self._observe_wait(waited)
        return self._compute_unstored(call.compute, "wait_timeout")

    def _servable(self, backend: ApeeCache, raw: bytes | None, pttl: int) -> Any:
        if raw is None:
            return _MISSING
        decoded = backend.client.decode_entry(raw)
        if decoded is None:
            return _MISSING
        value, meta = decoded
        state = policy.state(meta, pttl, policy=self.policy, rand=0.0)
        return value if state.servable else _MISSING

    # -- computing -------------------------------------------------------------

    def _compute_and_store(self, call: Call, held: lease.Lease, stale: Any) -> Any:
        lease.RENEWER.track(held)
        started = time.monotonic()
        try:
            value = call.compute()
        except Exception:
            lease.RENEWER.untrack(held)
            self._release_quietly(held)  # free at once: the next caller retries
            metrics.COMPUTES.labels(cache=self.alias, outcome="error").inc()
            if stale is not _MISSING:
                metrics.FALLBACKS.labels(
                    cache=self.alias, reason="stale_if_error"
                ).inc()
                return stale
            raise
        except BaseException:
            lease.RENEWER.untrack(held)
            self._release_quietly(held)
            raise
        elapsed = time.monotonic() - started
        lease.RENEWER.untrack(held)
        metrics.COMPUTES.labels(cache=self.alias, outcome="ok").inc()
        metrics.COMPUTE_SECONDS.labels(cache=self.alias).observe(elapsed)
        try:
            payload = call.backend.envelope.encode(
                value, call.spec.meta(policy.measured_delta_ms(elapsed))
            )
        except Exception:
            self._release_quietly(held)
            raise
        assert isinstance(payload, bytes)  # values with meta are always enveloped
        try:
            ours = lease.release(held, payload, call.spec.px)
        except REDIS_ERRORS:
            self._redis_failed()
            return value
        if not ours:  # ``held.lost`` can be a renewal that raced this release
            metrics.LEASE_LOST.labels(cache=self.alias).inc()
        metrics.LEASE_RENEWALS.labels(cache=self.alias).inc(held.renewals)
        return value

    def _compute_unstored(self, compute: Callable[[], Any], reason: str) -> Any:
        metrics.FALLBACKS.labels(cache=self.alias, reason=reason).inc()
        return compute()

    def _local(self, call: Call, reason: str) -> Any:
        """Redis is away: compute here, coalesced with this process's threads."""
        metrics.FALLBACKS.labels(cache=self.alias, reason=reason).inc()
        return self._coalesced(call.made, call.compute)

    def _release_quietly(self, held: lease.Lease) -> None:
        try:
            lease.release(held, None, None)
        except REDIS_ERRORS:
            self._redis_failed()

    def _redis_failed(self) -> None:
        metrics.REDIS_ERRORS.labels(cache=self.alias).inc()
        self.breaker.failure()

    def _lease_ms(self, previous: Meta | None) -> int:
        delta = previous.delta_ms if previous is not None else None
        return policy.lease_ms(delta or None, self.policy)

    def _observe_wait(self, waited: float) -> None:
        if waited:
            metrics.LEASE_WAIT_SECONDS.labels(cache=self.alias).observe(waited)


def _client(call: Call) -> Redis:
    assert call.client is not None  # set by the hit path before any lease step
    return call.client


class _Fallback(Exception):
    """A follower's wait ran out; the caller computes locally."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_COORDINATORS: dict[tuple[int, str, str], Coordinator] = {}
_COORDINATORS_LOCK = threading.Lock()


def coordinator(backend: ApeeCache) -> Coordinator:
    """The process-wide Coordinator of ``backend``'s alias.

    Django builds a backend per thread; coalescing, the breaker and the
    refresh pool must be shared by all of them.
    """
    # Per process: a worker forked after its parent used the cache (gunicorn
    # --preload) must not inherit the parent's pool threads, flights or locks.
    key = (os.getpid(), backend.alias, str(backend._server))
    with _COORDINATORS_LOCK:
        found = _COORDINATORS.get(key)
        if found is None:
            found = _COORDINATORS[key] = Coordinator(backend)
        return found


def get_or_set_stampede_safe(
    backend: ApeeCache,
    key: Any,
    default: Any,
    timeout: float | None,
    soft_timeout: float | None,
    stale_if_error: float | None,
    version: int | None,
) -> Any:
    compute: Callable[[], Any] = default if callable(default) else (lambda: default)
    if timeout is not None and timeout <= 0:
        # Django's get_or_set returns a value already cached, and only a
        # computed one is not stored (a timeout of 0 or less stores nothing).
        try:
            found = backend.client.get(key, _MISSING, version=version)
        except (ConnectionInterrupted, *REDIS_ERRORS):
            found = _MISSING
        return compute() if found is _MISSING else found
    made = backend.client.make_key(key, version=version)  # with Django's key checks
    spec = make_spec(timeout, soft_timeout, stale_if_error, backend.apee.policy)
    shared = coordinator(backend)
    try:
        return shared.get_or_set(Call(backend, made, compute, spec))
    except _Fallback as fallback:
        metrics.FALLBACKS.labels(cache=shared.alias, reason=fallback.reason).inc()
        return compute()
