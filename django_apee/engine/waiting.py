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

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django_apee.core import MISSING, keys, policy, takeover
from django_apee.core.memo import ExpiringMemo
from django_apee.store import lease
from django_apee.store.errors import REDIS_ERRORS
from django_apee.store.holder import HolderCheck

if TYPE_CHECKING:
    from collections.abc import Callable, Generator

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


class Expect:
    """Register for the entry's wake-up (before looking at it again)."""


@dataclass(frozen=True)
class Read:
    """Read the entry's value and PTTL: answer ``(raw, pttl_ms)``."""


@dataclass(frozen=True)
class Acquire:
    """Try the entry's lease, reading its value: answer a ``lease.Attempt``."""

    lease_ms: int
    dead: str | None


@dataclass(frozen=True)
class Alive:
    """Is the lease holder's client there? Answer True, False or None."""

    holder_id: int


@dataclass(frozen=True)
class Sleep:
    """Wait for the wake-up at most ``seconds``: answer whether it came."""

    seconds: float


@dataclass(frozen=True)
class Release:
    """Free a lease without writing; a Redis error is counted, not raised."""

    held: lease.Lease


Step = Expect | Read | Acquire | Alive | Sleep | Release
EXPECT = Expect()
READ = Read()


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
        """Wait for ``made``'s value or win its lease, until ``deadline``.

        Drives :meth:`steps` with this thread's I/O (the async engine drives
        the same steps with a loop's).
        """
        client = self.store.connection()
        event: threading.Event | None = None
        machine = self.steps(made, lease_ms, deadline)
        try:
            step = next(machine)
            while True:
                reply: Any = None
                if isinstance(step, Expect):
                    if event is not None:
                        self.hub.done(made, event)
                    event = self.hub.expect(made)
                elif isinstance(step, Read):
                    reply = lease.read(client, made)
                elif isinstance(step, Acquire):
                    reply = self._acquire(client, made, step.lease_ms, step.dead)
                elif isinstance(step, Alive):
                    reply = self.holders.alive(client, step.holder_id)
                elif isinstance(step, Release):
                    self.release_quietly(step.held)
                else:
                    assert event is not None
                    reply = event.wait(step.seconds)
                step = machine.send(reply)
        except StopIteration as stop:
            outcome: Landed | Won | TimedOut = stop.value
            return outcome
        finally:
            machine.close()
            if event is not None:
                self.hub.done(made, event)

    def steps(
        self, made: str, lease_ms: int, deadline: float
    ) -> Generator[Step, Any, Landed | Won | TimedOut]:
        """The waiting machine's decisions, without its I/O.

        Yields what it needs done (:data:`Step`), is sent the answer, and
        returns the outcome. ``Expect`` (answer: None) registers for the
        entry's wake-up, replacing the previous registration; ``Sleep``'s
        answer is whether a wake-up came. The time slept is counted in
        ``lease_wait_seconds`` when the machine ends, however it ends.
        """
        waited = 0.0
        woken = False
        started = time.monotonic()
        last_check: float | None = None
        dead: str | None = None  # the token of a holder found gone
        try:
            while True:
                yield EXPECT
                if woken:
                    value = self.servable(made, *(yield READ))
                    if value is not MISSING:
                        return Landed(value, waited)
                attempt: lease.Attempt = yield Acquire(lease_ms, dead)
                dead = None
                value = self.servable(made, attempt.raw, attempt.pttl_ms)
                if value is not MISSING:
                    if attempt.lease is not None:
                        yield from self.quiet_release(attempt.lease)
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
                    if (yield Alive(holder_id)) is False:
                        dead = attempt.holder  # try to take it over, now
                        continue
                lease_wait_ms = policy.wait_ms(attempt.lease_pttl_ms, remaining_ms)
                lease_wait_s = lease_wait_ms / 1000
                pause = (
                    takeover.pause_s(now, due, lease_wait_s)
                    if holder_id is not None
                    else lease_wait_s
                )
                woken = yield Sleep(pause)
                waited += time.monotonic() - now
        finally:
            if waited:
                self.events.lease_wait_seconds.observe(waited)

    def quiet_release(self, held: lease.Lease) -> Generator[Step, Any, None]:
        """Steps that free ``held`` without writing (see ``release_quietly``)."""
        yield Release(held)

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
        if self.known_held(made, identity, now):
            return None
        try:
            attempt = self._acquire(self.store.connection(), made, lease_ms, None)
        except REDIS_ERRORS:
            self.redis_failed()
            return None
        return self.noted(made, attempt, identity, now)

    def known_held(self, made: str, identity: int, now: float) -> bool:
        """Another process holds the lease of this write of ``made``."""
        return self.held_elsewhere.get(made, now) == identity

    def noted(
        self, made: str, attempt: lease.Attempt, identity: int, now: float
    ) -> lease.Attempt:
        """Remember a lease held elsewhere for as long as it has left."""
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
