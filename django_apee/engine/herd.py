"""Herd mode: stampede protection for code that only calls ``get`` and ``set``.

Most of a Django site's caching is cache-aside code nobody will rewrite:
``{% cache %}``, ``cache_page``, third-party apps. They read with ``get``,
compute on a miss, and write with ``set``. Herd mode gives that pattern the
lease without changing a line of it:

* Every ``set`` with a timeout stores the entry's hard timeout in its
  envelope (and the soft timeout rule applies: ``SOFT_TIMEOUT_RATIO`` of it,
  0.95 by default). Readers learn the entry's age from its PTTL, read in the
  same round trip as the value.
* Once an entry that ``set`` wrote is past its soft timeout (or early, by
  XFetch, when its compute time is known), the reader that wins its lease
  gets a *miss*, and
  recomputes and ``set``\\ s it as it always did; every other reader, in
  every process, keeps getting the value. Nothing is served past Django's
  timeout. (Entries ``get_or_set_stampede_safe`` wrote are refreshed by its
  own callers; a plain ``get`` serves them and leaves their lease alone.)
* The winner's ``set`` (or ``add``) is the fenced write that frees the lease
  (``lua/herd_set.lua``), and the time from winning to writing is stored as
  the entry's compute time (Δ), so XFetch and the lease length adapt.
* A winner that never writes holds the lease until it runs out (herd leases
  are not renewed: nobody knows when the caller will write); then the next
  reader wins.
* Optionally (``COLD_MISS_WAIT``), an *absent* key is leased too: its first
  reader gets the miss, the others wait, woken by the winner's write, for at
  most ``COLD_MISS_WAIT`` seconds, then get the value or the miss -- memcache
  leases as Facebook describes them, for callers that cannot pass a compute
  function.

This module decides; waiting and lease-taking are ``waiting.Waiting``'s, the
Redis I/O the store's.
"""

from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django_apee.core import MISSING, decisions, policy
from django_apee.core.memo import ExpiringMemo
from django_apee.engine.waiting import Landed, TimedOut, Waiting, Won
from django_apee.store import lease
from django_apee.store.errors import REDIS_ERRORS

if TYPE_CHECKING:
    from collections.abc import Iterator

    from django_apee.core.envelope import Meta
    from django_apee.engine.protocol import Events, Store, Tuning
    from django_apee.store.holder import Identity
    from django_apee.store.wake import WakeHub

#: How long this process remembers a lease it won, waiting for its write.
#: Past the lease's own end the write still lands only if the entry is
#: unchanged (``lua/herd_set.lua``); a write later than this is a plain set.
CLAIM_WINDOW_S = 60.0
#: How long a key whose cold-miss winner never wrote is taken for "absent by
#: design" (a flag nobody sets, say): gets of it miss at once instead of
#: waiting for a write that is not coming.
ABSENT_MEMORY_S = 60.0
#: In a read row, for an absent key: whether a lease is held is not known.
LEASE_UNKNOWN = -3
#: An absent key: ``(made key, key, its lease's PTTL or LEASE_UNKNOWN)``.
Absent = tuple[str, Any, int]
#: A servable entry one reader may have to recompute: its row, value,
#: metadata and state (``early`` or ``stale``).
Contested = tuple["Row", Any, "Meta", policy.State]


@dataclass(frozen=True)
class Claim:
    """A lease this process won from a plain get, waiting for its write."""

    lease: lease.Lease
    started: float
    #: SHA-1 of the entry's bytes when won; "" when it was absent.
    fingerprint: str

    def delta_ms(self, now: float) -> int:
        return policy.measured_delta_ms(now - self.started)


@dataclass(frozen=True)
class Row:
    """One key as ``lua/get.lua`` read it."""

    made: str
    key: Any
    raw: bytes | None
    pttl_ms: int
    lease_pttl_ms: int


class Herd:
    """Herd-mode state shared by the threads of one process for one alias."""

    def __init__(
        self,
        store: Store,
        hub: WakeHub,
        tuning: Tuning,
        events: Events,
        identity: Identity | None = None,
    ) -> None:
        self.tuning = tuning
        self.rules = tuning.policy
        #: Herd mode proper: a stale plain-set entry misses for one reader.
        self.stale_misses = tuning.herd
        # Leases always on the primary (``store.connection``); the identity
        # lets cold-miss waiters take over from a reader whose process died.
        self.waiting = Waiting(
            store,
            hub,
            tuning.policy,
            events,
            identity=identity,
            holder_check_s=tuning.holder_check,
        )
        self.events = events
        self._claims: ExpiringMemo[Claim] = ExpiringMemo()
        self._absent: ExpiringMemo[bool] = ExpiringMemo()

    def excluded(self, key: Any) -> bool:
        """Keys that must never get a herd miss (``HERD_EXCLUDE``)."""
        return isinstance(key, str) and key.startswith(self.tuning.herd_exclude)

    # -- one get_many ----------------------------------------------------------

    def read(self, rows: list[Row]) -> dict[Any, Any]:
        """What a plain get/get_many returns for ``rows``: key -> value.

        Past its hard timeout an entry is a miss (entries kept for
        ``stale_if_error`` outlive it in Redis); past its soft timeout herd
        mode may make it a miss for one reader; an absent key whose lease
        is held is being computed, and is waited for.
        """
        found, contested, absent = self.sort(rows)
        for row, value, meta, state in contested:
            if not self.contend(row.made, row.raw, meta, row.pttl_ms, state):  # type: ignore[arg-type]
                found[row.key] = value
        if absent and self.waits():
            found.update(self.wait_for(absent))
        return found

    def sort(
        self, rows: list[Row]
    ) -> tuple[dict[Any, Any], list[Contested], list[Absent]]:
        """Sort ``rows`` into values to serve, values one reader may have to
        recompute (herd mode: the reader that wins their lease misses), and
        keys absent or as good as absent (perhaps being computed)."""
        found: dict[Any, Any] = {}
        contested: list[Contested] = []
        absent: list[Absent] = []
        for row in rows:
            if not row.raw:
                absent.append((row.made, row.key, row.lease_pttl_ms))
                continue
            entry = self.waiting.store.decode_entry(row.made, row.raw)
            if entry is None:
                continue
            value, meta = entry
            if meta is None:
                found[row.key] = value
                continue
            rand = policy.xfetch_rand(meta, random.random())
            state = policy.state(meta, row.pttl_ms, policy=self.rules, rand=rand)
            if not state.servable:
                # Past its hard timeout, in its last millisecond or kept for
                # stale_if_error: as good as absent, and quite possibly
                # being recomputed (its lease was not read: look).
                absent.append((row.made, row.key, LEASE_UNKNOWN))
                continue
            # Entries get_or_set_stampede_safe wrote (they store their soft
            # timeout) are refreshed by its callers, in the background: a
            # plain get serves them up to their timeout. Herd mode is for
            # what plain set wrote.
            if state is not policy.State.FRESH and self.stale_misses:
                if meta.soft_ms == 0 and not self.excluded(row.key):
                    contested.append((row, value, meta, state))
                    continue
                self.events.decided(
                    row.made,
                    state.value,
                    decisions.SERVED_EXCLUDED
                    if meta.soft_ms == 0
                    else decisions.SERVED_STAMPEDE_SAFE,
                    0.0,
                )
            found[row.key] = value
        return found, contested, absent

    def waits(self) -> bool:
        """Absent keys are waited for (herd mode or COLD_MISS_WAIT)."""
        return bool(self.tuning.herd or self.tuning.cold_miss_wait)

    # -- stale and early entries ------------------------------------------------

    def contend(
        self, made: str, raw: bytes, meta: Meta, read_pttl: int, state: policy.State
    ) -> bool:
        """Try to win the lease of a servable entry; True: this reader misses.

        False (serve the value) when this process already won it, another
        process holds it, the entry was rewritten since it was read, or
        Redis failed: herd mode only ever turns a hit into a miss for the
        one reader that will write the next value.
        """
        now = time.monotonic()
        if self.claimed(made, now):
            return self.contended(made, state, None, None, claimed=True)
        attempt = self.waiting.try_lease(made, self.lease_ms(meta), hash(raw), now)
        held = self.won(made, raw, read_pttl, attempt, now)
        if held is not None:  # won, but rewritten meanwhile: give it back
            self.waiting.release_quietly(held)
        return self.contended(made, state, attempt, held)

    def contended(
        self,
        made: str,
        state: policy.State,
        attempt: lease.Attempt | None,
        held: lease.Lease | None,
        *,
        claimed: bool = False,
    ) -> bool:
        """How a contest for ``made``'s lease ended (reported to the events'
        trace); True: this reader misses and writes the next value."""
        misses = attempt is not None and attempt.lease is not None and held is None
        if claimed:
            decision = decisions.SERVED_CLAIMED
        elif misses:
            decision = decisions.HERD_MISS
        elif held is not None:
            decision = decisions.SERVED_REWRITTEN
        else:
            decision = decisions.SERVED_HELD
        self.events.decided(made, state.value, decision, 0.0)
        return misses

    def lease_ms(self, meta: Meta) -> int:
        """The lease a reader takes to recompute an entry written with ``meta``."""
        return policy.lease_ms(meta.delta_ms or None, self.rules)

    def claimed(self, made: str, now: float) -> bool:
        """This process already won ``made``'s lease and its write is due."""
        claim = self._claims.get(made, now)
        return claim is not None and now < claim.started + claim.lease.lease_ms / 1000

    def won(
        self,
        made: str,
        raw: bytes,
        read_pttl: int,
        attempt: lease.Attempt | None,
        now: float,
    ) -> lease.Lease | None:
        """Record a lease won on a stale entry; return it instead if it must
        be given back (the entry was rewritten between our read and the
        acquire: its writer just freed the lease, and recomputing now would
        compute twice).

        The lease's identity is a hash of the bytes read: a memo about
        another holder's lease is about the entry as it was, not about its
        successor.
        """
        if attempt is None or attempt.lease is None:
            return None
        if attempt.raw != raw or attempt.pttl_ms > read_pttl:
            return attempt.lease
        digest = hashlib.sha1(raw, usedforsecurity=False).hexdigest()
        self._record(Claim(attempt.lease, now, digest))
        return None

    # -- absent entries ------------------------------------------------------------

    def wait_for(self, absent: list[Absent]) -> dict[Any, Any]:
        """Values of absent keys that another reader's write delivered.

        ``absent`` holds ``(made key, key, lease PTTL)``, the PTTL
        ``LEASE_UNKNOWN`` for a value read past its timeout. A key whose
        lease is held is being computed (a herd winner whose value expired
        while it worked, or ``get_or_set_stampede_safe``): wait for that
        write rather than compute the value again. With ``COLD_MISS_WAIT``,
        every absent key is leased: win it (this reader misses) or wait.
        The whole call waits at most ``COLD_MISS_WAIT`` if set, else
        ``WAIT_TIMEOUT``, and never past the lease's end plus a little.
        """
        deadline = self.deadline()
        landed: dict[Any, Any] = {}
        for made, key, state in self.to_wait(absent):
            try:
                outcome = self.waiting.wait(made, self.rules.default_lease_ms, deadline)
            except REDIS_ERRORS:
                self.events.redis_errors.inc()
                break
            value = self.waited(made, outcome, state)
            if value is not MISSING:
                landed[key] = value
        return landed

    def deadline(self) -> float:
        """When a read's waits for absent keys end (see ``wait_for``)."""
        cold_wait = self.tuning.cold_miss_wait
        return time.monotonic() + (cold_wait or self.tuning.wait_timeout)

    def to_wait(self, absent: list[Absent]) -> Iterator[tuple[str, Any, str]]:
        """The absent keys worth waiting for, as ``(made key, key, state)``,
        the state ``expired`` (read past its timeout) or ``absent``."""
        for made, key, lease_pttl in absent:
            # Being computed (or perhaps: expired just now), or cold-waiting.
            if lease_pttl == -2 and not self.tuning.cold_miss_wait:
                continue
            state = "expired" if lease_pttl == LEASE_UNKNOWN else "absent"
            if self.excluded(key):
                self.events.decided(made, state, decisions.MISS_EXCLUDED, 0.0)
            elif self._absent.get(made, time.monotonic()):
                self.events.decided(made, state, decisions.MISS_ABSENT, 0.0)
            else:
                yield made, key, state

    def waited(self, made: str, outcome: Landed | Won | TimedOut, state: str) -> Any:
        """The value a wait for ``made`` (``state``: see ``to_wait``) ended
        with, or MISSING: a won lease is this reader's to write (its claim
        is recorded)."""
        if isinstance(outcome, Landed):
            decision, value = decisions.WAIT_LANDED, outcome.value
        elif isinstance(outcome, Won):
            if outcome.waited:
                # The lease we waited on ran out with nothing written: the
                # key is probably absent by design.
                now = time.monotonic()
                self._absent.put(made, now + ABSENT_MEMORY_S, True, now)
            self._record(Claim(outcome.lease, time.monotonic(), ""))
            decision, value = decisions.WAIT_WON, MISSING
        else:
            self.events.fallback("cold_wait_timeout")
            decision, value = decisions.WAIT_TIMED_OUT, MISSING
        self.events.decided(made, state, decision, outcome.waited)
        return value

    # -- the winner's write ------------------------------------------------------

    def claim(self, made: str) -> Claim | None:
        """The lease this process won on ``made``, handed to the write of it."""
        return self._claims.pop(made, time.monotonic())

    def lost(self) -> None:
        """A winner's write found something newer: nothing was stored."""
        self.events.lease_lost.inc()

    def release_quietly(self, held: lease.Lease) -> None:
        self.waiting.release_quietly(held)

    def _record(self, claim: Claim) -> None:
        self.events.herd_misses.inc()
        until = claim.started + CLAIM_WINDOW_S
        self._claims.put(claim.lease.value_key, until, claim, time.monotonic())
