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
5. While waiting, every ``HOLDER_CHECK`` seconds: is the holder's Redis
   client still there (``store/holder.py``, ``core/takeover.py``)? If not,
   its process is gone: take the lease over at once, compare-and-swap on
   the dead holder's token, rather than sleep to its lease's end. A holder
   that is alive but stuck is still ended by its lease's expiry.

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

from django_apee.core import MISSING, keys, policy, takeover
from django_apee.core.memo import ExpiringMemo
from django_apee.store import lease
from django_apee.store.errors import REDIS_ERRORS
from django_apee.store.holder import HolderCheck

if TYPE_CHECKING:
    from collections.abc import Callable

    from redis import Redis

    from django_apee.engine.protocol import Events, Store
    from django_apee.store.holder import Identity
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
        *,
        identity: Identity | None = None,
        holder_check_s: float = takeover.DEFAULT_INTERVAL_S,
    ) -> None:
        self.store = store
        self.hub = hub
        self.rules = rules
        self.events = events
        self._on_redis_error = on_redis_error
        #: This process's identity on the alias's Redis: leases taken here
        #: name its client id (None: they name nobody, and a dead holder
        #: here is ended by its lease's expiry only).
        self.identity = identity
        #: Seconds between looks at a lease holder's client; 0: never look.
        self.holder_check_s = holder_check_s if identity is not None else 0.0
        self.holders = HolderCheck()
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
        started = time.monotonic()
        last_check: float | None = None
        dead: str | None = None  # the token of a holder found gone
        try:
            while True:
                event = self.hub.expect(made)
                try:
                    if woken:
                        value = self.servable(made, *lease.read(client, made))
                        if value is not MISSING:
                            return Landed(value, waited)
                    attempt = self._acquire(client, made, lease_ms, dead)
                    dead = None
                    value = self.servable(made, attempt.raw, attempt.pttl_ms)
                    if value is not MISSING:
                        if attempt.lease is not None:
                            self.release_quietly(attempt.lease)
                        return Landed(value, waited)
                    if attempt.lease is not None:
                        if attempt.took_over:
                            self.events.lease_takeovers.inc()
                        return Won(attempt.lease, waited)
                    now = time.monotonic()
                    remaining_ms = int((deadline - now) * 1000)
                    if remaining_ms <= 0:
                        return TimedOut(waited)
                    holder_id = keys.lease_holder_id(attempt.holder)
                    due = takeover.next_check(started, last_check, self.holder_check_s)
                    if takeover.should_check(
                        now, due, holder_id, attempt.lease_pttl_ms, self.holder_check_s
                    ):
                        assert holder_id is not None
                        last_check = now
                        due = takeover.next_check(started, now, self.holder_check_s)
                        if self.holders.alive(client, holder_id) is False:
                            dead = attempt.holder  # try to take it over, now
                            continue
                    lease_wait_s = (
                        policy.wait_ms(attempt.lease_pttl_ms, remaining_ms) / 1000
                    )
                    pause = (
                        takeover.pause_s(now, due, lease_wait_s)
                        if holder_id is not None
                        else lease_wait_s
                    )
                    event.wait(pause)
                    waited += time.monotonic() - now
                    woken = event.is_set()
                finally:
                    self.hub.done(made, event)
        finally:
            if waited:
                self.events.lease_wait_seconds.observe(waited)

    def _acquire(
        self, client: Redis, made: str, lease_ms: int, dead: str | None
    ) -> lease.Attempt:
        return lease.acquire(
            client,
            made,
            lease_ms,
            channel=self.hub.channel,
            identity=self.identity,
            dead=dead,
        )

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
            attempt = self._acquire(self.store.connection(), made, lease_ms, None)
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
