"""get_or_set_stampede_safe: one computation per expiry, fleet-wide.

This module only composes: ``core.policy`` decides (state, XFetch, lease and
wait lengths), ``waiting.Waiting`` waits or takes the lease, ``store.lease``
talks to Redis, ``core.singleflight`` coalesces the threads of one process,
``core.breaker`` keeps an outage from costing every request a timeout.

The path of one call:

1. *Hit*: one ``GET``; fresh by the write time the entry carries and
   Redis's clock (``store/clock.py``): return it. Otherwise the value is
   read again with its PTTL, atomically, and judged by that. Early (picked
   by XFetch) or stale: return it, and whoever wins the lease refreshes it,
   in the background by default, so no request waits.
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
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django_apee.core import MISSING, policy, takeover, to_milliseconds
from django_apee.core.breaker import CircuitBreaker
from django_apee.core.decisions import WAITED_IN_PROCESS
from django_apee.core.envelope import Meta
from django_apee.core.singleflight import (
    LeaderAborted,
    SingleFlight,
    SingleFlightTimeout,
)
from django_apee.engine.waiting import Landed, Waiting, Won
from django_apee.store import lease
from django_apee.store.errors import REDIS_ERRORS

if TYPE_CHECKING:
    from collections.abc import Callable

    from django_apee.engine.protocol import Events, Store, Tuning
    from django_apee.store.clock import RedisClock
    from django_apee.store.holder import Identity
    from django_apee.store.wake import WakeHub

logger = logging.getLogger("django_apee")


#: What ``Coordinator._lean_hit`` returns for bytes that do not decode.
_UNREADABLE = object()
#: The most fresh-until deadlines ``Coordinator._untils`` keeps.
UNTILS_LIMIT = 4096


@dataclass(frozen=True)
class Spec:
    """How one entry is to be stored: its timeouts in milliseconds."""

    hard_ms: int
    soft_ms: int
    grace_ms: int

    @property
    def px(self) -> int | None:
        return self.hard_ms + self.grace_ms if self.hard_ms else None

    def meta(self, delta_ms: int, written_ms: int = 0) -> Meta:
        seed = random.randrange(1, policy.SEED_RANGE)
        return Meta(
            self.soft_ms, self.hard_ms, self.grace_ms, delta_ms, seed, written_ms
        )


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

    made: str
    compute: Callable[[], Any]
    spec: Spec
    #: The metadata and PTTL read on the hit path (None / -2: nothing read).
    previous: Meta | None = None
    read_pttl: int = -2


def rewritten(call: Call, attempt: lease.Attempt) -> bool:
    """The entry was rewritten since ``call`` read it (a PTTL only falls):
    another process's refresh landed between the read and this acquire, and
    its lease is free again. Refreshing now would be a second compute for
    one expiry."""
    return attempt.pttl_ms > call.read_pttl >= 0


class Coordinator:
    """What the threads of one process share for one cache alias."""

    def __init__(
        self,
        store: Store,
        hub: WakeHub,
        tuning: Tuning,
        events: Events,
        *,
        clock: RedisClock | None = None,
        identity: Identity | None = None,
    ) -> None:
        self.store = store
        #: Redis's clock (``store/clock.py``): entries are stamped with it,
        #: and hits judged by it. None: the PTTL path only (engine tests).
        self.clock = clock
        self.tuning = tuning
        self.rules = tuning.policy
        #: Each entry's ``policy.fresh_until_ms`` under ``rules``, by Meta.
        self._untils: dict[Meta | None, float] = {}
        self.events = events
        self.flights: SingleFlight[Any] = SingleFlight()
        self.breaker = CircuitBreaker(
            threshold=tuning.breaker_threshold, cooldown=tuning.breaker_cooldown
        )
        self.waiting = Waiting(
            store,
            hub,
            tuning.policy,
            events,
            on_redis_error=self.breaker.failure,
            identity=identity,
            holder_check_s=tuning.holder_check,
        )
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=tuning.refresh_workers,
            thread_name_prefix="django-apee-refresh",
        )
        self._pool_slots = threading.BoundedSemaphore(tuning.refresh_workers * 2)

    def close(self) -> None:
        """The configuration is dropped: idle refresh threads end; a
        refresh still running finishes, and none is started any more."""
        self._pool.shutdown(wait=False)

    # -- the call -------------------------------------------------------------

    def get_or_set(self, call: Call) -> Any:
        """Serve ``call.made`` from the cache, or compute it once fleet-wide."""
        try:
            return self._get_or_set(call)
        except _Fallback as fallback:
            self.events.fallback(fallback.reason)
            return call.compute()

    def _get_or_set(self, call: Call) -> Any:
        value = self.store.near_hit(call.made)
        if value is not MISSING:
            self.events.hits.inc()
            return value
        if not self.breaker.allow():
            return self._local(call, reason="circuit_open")
        try:
            connection = self.store.connection()
            raw: bytes | None = self.store.read(connection, call.made)
            if raw is not None:
                value = self._lean_hit(call.made, raw)
                if value is _UNREADABLE:
                    raw = None  # counted once; a miss, recomputed
                elif value is not MISSING:
                    self.breaker.success()
                    self.events.hits.inc()
                    return value
                else:  # not a fresh hit by its envelope: its PTTL decides
                    raw, call.read_pttl = lease.read(connection, call.made)
        except REDIS_ERRORS:
            self.waiting.redis_failed()
            return self._local(call, reason="redis_error")
        self.breaker.success()
        value, state, stale = self.judge(call, raw)
        if state is None:
            return self._coalesced(call.made, lambda: self._fill(call, stale))
        if self.serving(state):
            return value
        refreshed = self._refresh(call, state)
        return value if refreshed is MISSING else refreshed

    def judge(
        self, call: Call, raw: bytes | None
    ) -> tuple[Any, policy.State | None, Any]:
        """What the read of ``call.made`` found: ``(value, state, stale)``.

        ``state`` None is a miss (counted), its ``stale`` the value kept for
        ``stale_if_error`` or MISSING. Records the entry's metadata in
        ``call.previous``.
        """
        stale = MISSING
        if raw is not None:
            decoded = self.store.decode_entry(call.made, raw)
            if decoded is not None:
                value, call.previous = decoded
                state = policy.state(
                    call.previous,
                    call.read_pttl,
                    policy=self.rules,
                    rand=policy.xfetch_rand(call.previous, random.random()),
                )
                if state.servable:
                    return value, state, MISSING
                if state is policy.State.GRACE:
                    stale = value
        self.events.misses.inc()
        return MISSING, None, stale

    def _lean_hit(self, made: str, raw: bytes) -> Any:
        """The value of an entry fresh by its envelope and Redis's clock
        (``policy.fresh_until_ms``); MISSING when only its PTTL can tell;
        ``_UNREADABLE`` (counted by the store)."""
        decoded = self.store.decode_entry(made, raw)
        if decoded is None:
            return _UNREADABLE
        value, meta = decoded
        untils = self._untils
        until = untils.get(meta)
        if until is None:
            # A function of the entry and the (fixed) rules: once per entry.
            until = policy.fresh_until_ms(meta, self.rules)
            if len(untils) >= UNTILS_LIMIT:
                untils.clear()
            untils[meta] = until
        if until == policy.NO_DEADLINE:
            return value
        if until == policy.UNDECIDED or self.clock is None:
            return MISSING
        now = self.clock.latest_ms()
        return value if now is not None and now < until else MISSING

    def serving(self, state: policy.State) -> bool:
        """A servable value is served (counted): True if nothing else is to
        be done, False if the caller should try to refresh it."""
        self.events.hits.inc()
        if state is policy.State.FRESH:
            return True
        if state is policy.State.STALE:
            self.events.stale_served.inc()
        return False

    # -- refresh while a value is servable ------------------------------------

    def _refresh(self, call: Call, state: policy.State) -> Any:
        """Refresh ``made`` if this caller wins its lease; never wait for it.

        Returns the new value when refreshed inline, else ``MISSING``.
        """
        made = call.made
        if not self.refreshing(made):
            return MISSING  # another thread of this process is on it
        background = False
        try:
            held = self._refresh_lease(call)
            if held is None:
                return MISSING
            if state is policy.State.EARLY:
                self.events.early_refreshes.inc()
            if self.tuning.refresh == "inline":
                return self._compute_and_store(call, held, MISSING)
            background = self.start_background(call, held)
            if not background:
                self.waiting.release_quietly(held)
            return MISSING
        finally:
            if not background:  # else the background thread forgets it
                self.forget_refresh(made)

    def refreshing(self, made: str) -> bool:
        """This caller refreshes ``made`` unless another of the process does."""
        with self._lock:
            if made in self._refreshing:
                return False
            self._refreshing.add(made)
            return True

    def _refresh_lease(self, call: Call) -> lease.Lease | None:
        """The lease for a refresh of a servable entry, unless not worth taking.

        The entry's seed tells its writes apart, so a memo that another
        process holds the lease of one write is not applied to the next.
        """
        seed = call.previous.seed if call.previous is not None else 0
        lease_ms = self.lease_ms(call.previous)
        attempt = self.waiting.try_lease(call.made, lease_ms, seed, time.monotonic())
        if attempt is None or attempt.lease is None:
            return None
        if rewritten(call, attempt):
            self.waiting.release_quietly(attempt.lease)
            return None
        return attempt.lease

    def start_background(self, call: Call, held: lease.Lease) -> bool:
        """Refresh in the pool; False (counted) if it is full or closed."""
        if not self.pool_slot():
            return False
        try:
            self._pool.submit(self._background, call, held)
        except RuntimeError:  # the interpreter is shutting down
            self.pool_slot_free()
            return False
        return True

    def pool_slot(self) -> bool:
        """A slot for one more background refresh (the async engine's
        refreshes count too); False, counted, when all are taken."""
        if self._pool_slots.acquire(blocking=False):
            return True
        self.events.fallback("refresh_pool_full")
        return False

    def pool_slot_free(self) -> None:
        self._pool_slots.release()

    def forget_refresh(self, made: str) -> None:
        with self._lock:
            self._refreshing.discard(made)

    def _background(self, call: Call, held: lease.Lease) -> None:
        try:
            self._compute_and_store(call, held, MISSING)
        except Exception:
            self.background_failed(held)
        finally:
            self.background_done(call)
            self.tuning.thread_done()

    @staticmethod
    def background_failed(held: lease.Lease) -> None:
        """A background refresh raised: nobody waits for it, so log it."""
        logger.warning(
            "django_apee: background refresh of %s failed",
            held.value_key,
            exc_info=True,
        )

    def background_done(self, call: Call) -> None:
        """A background refresh ended: its slot and its entry are free."""
        self.pool_slot_free()
        self.forget_refresh(call.made)

    # -- miss ------------------------------------------------------------------

    def _coalesced(self, made: str, fill: Callable[[], Any]) -> Any:
        try:
            found = self.flights.do(made, fill, timeout=self.tuning.wait_timeout)
        except (SingleFlightTimeout, LeaderAborted) as error:
            raise _Fallback("wait_timeout") from error
        if not found.leader:
            self.events.decided(made, "miss", WAITED_IN_PROCESS, found.waited)
        return found.value

    def _fill(self, call: Call, stale: Any) -> Any:
        """Leader of this process: take the lease and compute, or wait for it."""
        deadline = time.monotonic() + self.tuning.wait_timeout
        try:
            outcome = self.waiting.wait(
                call.made, self.lease_ms(call.previous), deadline
            )
        except REDIS_ERRORS:
            self.waiting.redis_failed()
            return self._compute_unstored(call.compute, "redis_error")
        if isinstance(outcome, Landed):
            return outcome.value
        if isinstance(outcome, Won):
            return self._compute_and_store(call, outcome.lease, stale)
        return self._compute_unstored(call.compute, "wait_timeout")

    # -- computing -------------------------------------------------------------

    def _compute_and_store(self, call: Call, held: lease.Lease, stale: Any) -> Any:
        started = self.computing(held)
        try:
            value = call.compute()
        except Exception:
            self.compute_aborted(held)
            return self.compute_failed(stale)
        except BaseException:
            self.compute_aborted(held)
            raise
        try:
            payload = self.computed(call, held, value, started)
        except Exception:
            self.waiting.release_quietly(held)
            raise
        try:
            ours = lease.release(held, payload, call.spec.px)
        except REDIS_ERRORS:
            self.waiting.redis_failed()
            return value
        self.stored(held, ours)
        return value

    # The steps around a computation under a lease, shared with the async
    # engine (``engine/aio/stampede.py``), which awaits the compute and the
    # release instead.

    def computing(self, held: lease.Lease) -> float:
        """A computation under ``held`` starts: renew it meanwhile."""
        lease.RENEWER.track(held)
        return time.monotonic()

    def compute_failed(self, stale: Any) -> Any:
        """The compute raised (the exception is being handled; its lease is
        already freed, so the next caller retries): serve ``stale`` if kept
        for ``stale_if_error``, else re-raise."""
        self.events.computed("error")
        if stale is not MISSING:
            self.events.fallback("stale_if_error")
            return stale
        raise  # the exception being handled: this runs in its except block

    def compute_aborted(self, held: lease.Lease) -> None:
        """The compute ended without a value: stop renewing, free the lease."""
        lease.RENEWER.untrack(held)
        self.waiting.release_quietly(held)

    def computed(
        self, call: Call, held: lease.Lease, value: Any, started: float
    ) -> bytes:
        """The compute returned ``value``: count it, and encode the entry
        (stamped with Redis's clock) to be written by the fenced release.
        If encoding raises, the caller frees the lease."""
        elapsed = time.monotonic() - started
        lease.RENEWER.untrack(held)
        self.events.computed("ok")
        self.events.compute_seconds.observe(elapsed)
        written = self.clock.earliest_ms() if self.clock is not None else 0
        meta = call.spec.meta(policy.measured_delta_ms(elapsed), written)
        return self.store.encode_entry(call.made, value, meta)

    def stored(self, held: lease.Lease, ours: bool) -> None:
        """The fenced release answered: was the lease still ours?"""
        if not ours:  # ``held.lost`` can be a renewal that raced this release
            self.events.lease_lost.inc()
        self.events.lease_renewals.inc(held.renewals)

    def _compute_unstored(self, compute: Callable[[], Any], reason: str) -> Any:
        self.events.fallback(reason)
        return compute()

    def _local(self, call: Call, reason: str) -> Any:
        """Redis is away: compute here, coalesced with this process's threads."""
        self.events.fallback(reason)
        return self._coalesced(call.made, call.compute)

    def lease_ms(self, previous: Meta | None) -> int:
        delta = previous.delta_ms if previous is not None else None
        return takeover.renewed_lease_ms(delta or None, self.rules)


class _Fallback(Exception):
    """A follower's wait ran out; the caller computes locally."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
