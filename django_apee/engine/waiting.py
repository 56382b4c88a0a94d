"""The one waiting machine: wait for an entry's writer, or become it.

Herd mode (a plain ``get`` of an entry being recomputed) and
``get_or_set_stampede_safe`` (a miss) face the same question: someone may
be computing this entry right now; wait for their write, or take the lease
and compute it here? Both answer it with :meth:`Waiting.wait`:

1. Register for the entry's wake-up *before* looking, so a write that lands
   in between is not missed.
2. After a wake-up, read the value first: most often it has landed, and
   taking the now-free lease only to release it would wake everyone again.
3. Try the lease, reading the value in the same round trip. A servable
   value wins over a free lease: a waiter woken by the holder's release
   finds both, and computing again would be a second compute for one expiry.
4. Neither: sleep until woken, timed to the holder's lease (a dead holder
   sends no wake-up) and never past the caller's deadline.

The loop ends with a value (:class:`Landed`), a lease (:class:`Won`) or the
deadline (:class:`TimedOut`); what to do then is the caller's policy. Redis
errors propagate: each caller counts and falls back in its own way.

The state the two share lives here too: the held-elsewhere memo (another
process holds an entry's lease; stale reads skip the round trip until it
would run out) and the quiet release of a lease nobody will write under.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django_apee.core import MISSING, policy
from django_apee.core.memo import ExpiringMemo
from django_apee.store import lease
from django_apee.store.errors import REDIS_ERRORS

if TYPE_CHECKING:
    from collections.abc import Callable

    from django_apee.engine.protocol import Events, Store
    from django_apee.store.wake import WakeHub


@dataclass(frozen=True)
class Landed:
    """The value arrived (or was there): serve it."""

    value: Any
    waited: float


@dataclass(frozen=True)
class Won:
    """This caller holds the entry's lease now: it computes or writes."""

    lease: lease.Lease
    waited: float


@dataclass(frozen=True)
class TimedOut:
    """The deadline passed with neither a value nor the lease."""

    waited: float


class Waiting:
    """Waiting and lease-taking for one alias, shared by herd and stampede."""

    def __init__(
        self,
        store: Store,
        hub: WakeHub,
        rules: policy.Policy,
        events: Events,
        on_redis_error: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.hub = hub
        self.rules = rules
        self.events = events
        self._on_redis_error = on_redis_error
        #: value key -> identity of the entry (its seed, or a hash of its
        #: bytes) whose lease another process holds, until that lease ends.
        #: Tied to the entry: the memo is not applied to its successor.
        self.held_elsewhere: ExpiringMemo[int] = ExpiringMemo()

    # -- what may be served --------------------------------------------------

    def servable(self, made: str, raw: bytes | None, pttl_ms: int) -> Any:
        """What ``get`` may serve of ``raw`` read from ``made`` with ``pttl_ms``,
        or MISSING."""
        if raw is None:
            return MISSING
        entry = self.store.decode_entry(made, raw)
        if entry is None:
            return MISSING
        value, meta = entry
        state = policy.state(meta, pttl_ms, policy=self.rules, rand=0.0)
        return value if state.servable else MISSING

    # -- the loop ----------------------------------------------------------------

    def wait(
        self, made: str, lease_ms: int, deadline: float
    ) -> Landed | Won | TimedOut:
        """Wait for ``made``'s value or win its lease, until ``deadline``."""
        client = self.store.connection()
        waited = 0.0
        woken = False
        try:
            while True:
                event = self.hub.expect(made)
                try:
                    if woken:
                        value = self.servable(made, *lease.read(client, made))
                        if value is not MISSING:
                            return Landed(value, waited)
                    attempt = lease.acquire(
                        client, made, lease_ms, channel=self.hub.channel
                    )
                    value = self.servable(made, attempt.raw, attempt.pttl_ms)
                    if value is not MISSING:
                        if attempt.lease is not None:
                            self.release_quietly(attempt.lease)
                        return Landed(value, waited)
                    if attempt.lease is not None:
                        return Won(attempt.lease, waited)
                    remaining_ms = int((deadline - time.monotonic()) * 1000)
                    if remaining_ms <= 0:
                        return TimedOut(waited)
                    started = time.monotonic()
                    event.wait(
                        policy.wait_ms(attempt.lease_pttl_ms, remaining_ms) / 1000
                    )
                    waited += time.monotonic() - started
                    woken = True
                finally:
                    self.hub.done(made, event)
        finally:
            if waited:
                self.events.lease_wait_seconds.observe(waited)

    # -- leases nobody writes under ---------------------------------------------

    def try_lease(
        self, made: str, lease_ms: int, identity: int, now: float
    ) -> lease.Attempt | None:
        """Try to take a servable entry's lease for a refresh; None if not worth it.

        None when another process is known to hold it (``held_elsewhere``)
        or Redis failed (counted). A lease held by another process is
        remembered for as long as it has left.
        """
        if self.held_elsewhere.get(made, now) == identity:
            return None
        try:
            attempt = lease.acquire(
                self.store.connection(), made, lease_ms, channel=self.hub.channel
            )
        except REDIS_ERRORS:
            self.redis_failed()
            return None
        if attempt.lease is None and attempt.lease_pttl_ms > 0:
            until = now + attempt.lease_pttl_ms / 1000
            self.held_elsewhere.put(made, until, identity, now)
        return attempt

    def release_quietly(self, held: lease.Lease) -> None:
        """Free ``held`` without writing; a Redis error is counted, not raised."""
        try:
            lease.release(held, None, None)
        except REDIS_ERRORS:
            self.redis_failed()

    def redis_failed(self) -> None:
        self.events.redis_errors.inc()
        if self._on_redis_error is not None:
            self._on_redis_error()
