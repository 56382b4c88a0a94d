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

This module decides; its Redis I/O goes through ``lease`` and the client.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django_apee.client import MISSING, REDIS_ERRORS
from django_apee.core import policy
from django_apee.observe import metrics
from django_apee.store import lease

if TYPE_CHECKING:
    from redis import Redis

    from django_apee.cache import ApeeCache
    from django_apee.core.envelope import Meta

#: How long this process remembers a lease it won, waiting for its write.
#: Past the lease's own end the write still lands only if the entry is
#: unchanged (``lua/herd_set.lua``); a write later than this is a plain set.
CLAIM_WINDOW_S = 60.0
#: How long a key whose cold-miss winner never wrote is taken for "absent by
#: design" (a flag nobody sets, say): gets of it miss at once instead of
#: waiting for a write that is not coming.
ABSENT_MEMORY_S = 60.0
_MEMO_LIMIT = 10_000


@dataclass(frozen=True)
class Won:
    """A lease this process won from a plain get, waiting for its write."""

    lease: lease.Lease
    started: float
    #: SHA-1 of the entry's bytes when won; "" when it was absent.
    fingerprint: str

    def delta_ms(self, now: float) -> int:
        return policy.measured_delta_ms(now - self.started)


class Herd:
    """Herd-mode state shared by the threads of one process for one alias."""

    def __init__(self, backend: ApeeCache) -> None:
        options = backend.apee
        self.alias = backend.alias
        self.policy = options.policy
        self.stale = options.herd
        self.cold_miss_wait = options.cold_miss_wait
        self.wait_timeout = options.wait_timeout
        self.exclude = options.herd_exclude
        self.hub = lease.wake_hub(
            str(backend._server), lambda: backend.client.get_client(write=True)
        )
        self._won: dict[str, Won] = {}
        #: made key -> (until, identity of the entry then): another process
        #: holds its lease, so stale reads here skip the acquire round trip.
        self._held_elsewhere: dict[str, tuple[float, int]] = {}
        self._absent: dict[str, float] = {}
        self._lock = threading.Lock()
        self._herd_misses = metrics.HERD_MISSES.labels(cache=self.alias)

    def excluded(self, key: Any) -> bool:
        """Keys that must never get a herd miss (``HERD_EXCLUDE``)."""
        return isinstance(key, str) and key.startswith(self.exclude)

    # -- stale and early entries ------------------------------------------------

    def contend(
        self, client: Redis, made: str, raw: bytes, meta: Meta, read_pttl: int
    ) -> bool:
        """Try to win the lease of a servable entry; True: this reader misses.

        False (serve the value) when this process already won it, another
        process holds it, the entry was rewritten since it was read, or
        Redis failed: herd mode only ever turns a hit into a miss for the
        one reader that will write the next value.
        """
        now = time.monotonic()
        # Which write of the entry this is: a memo about another holder's
        # lease is about the entry as it was, not about its successor.
        identity = hash(raw)
        with self._lock:
            won = self._won.get(made)
            if won is not None and now < won.started + won.lease.lease_ms / 1000:
                return False
            held = self._held_elsewhere.get(made)
            if held is not None and held[0] > now and held[1] == identity:
                return False
        try:
            attempt = lease.acquire(
                client, made, policy.lease_ms(meta.delta_ms or None, self.policy)
            )
        except REDIS_ERRORS:
            metrics.REDIS_ERRORS.labels(cache=self.alias).inc()
            return False
        if attempt.lease is None:
            if attempt.lease_pttl_ms > 0:
                with self._lock:
                    self._held_elsewhere[made] = (
                        now + attempt.lease_pttl_ms / 1000,
                        identity,
                    )
                    _bound(self._held_elsewhere, lambda held: held[0] > now)
            return False
        if attempt.raw != raw or attempt.pttl_ms > read_pttl:
            # Rewritten between our read and the acquire: its writer just
            # freed the lease, and recomputing now would compute twice.
            self.release_quietly(attempt.lease)
            return False
        self._record(
            Won(
                attempt.lease, now, hashlib.sha1(raw, usedforsecurity=False).hexdigest()
            )
        )
        return True

    # -- absent entries (COLD_MISS_WAIT) ---------------------------------------

    def wait_for(
        self,
        client: Redis,
        absent: list[tuple[str, Any, int]],
        servable: Callable[[bytes | None, int], Any],
    ) -> dict[str, Any]:
        """Values of absent keys that another reader's write delivered.

        ``absent`` holds ``(made key, key, lease PTTL)``, the PTTL -3 when
        unknown (a value read past its timeout). A key whose lease
        is held is being computed (a herd winner whose value expired while
        it worked, or ``get_or_set_stampede_safe``): wait for that write
        rather than compute the value again. With ``COLD_MISS_WAIT``, every
        absent key is leased: win it (this reader misses) or wait. The
        whole call waits at most ``COLD_MISS_WAIT`` if set, else
        ``WAIT_TIMEOUT``, and never past the lease's end plus a little. ``servable(raw,
        pttl)`` decodes what was read, or returns ``MISSING`` when that is
        not a value ``get`` may serve.
        """
        deadline = time.monotonic() + (self.cold_miss_wait or self.wait_timeout)
        waiting = [
            (made, key, deadline)
            for made, key, lease_pttl in absent
            # Being computed (or perhaps: expired just now), or cold-waiting.
            if lease_pttl != -2 or self.cold_miss_wait
        ]
        landed: dict[str, Any] = {}
        for made, key, deadline in waiting:
            if self.excluded(key) or self._absent.get(made, 0.0) > time.monotonic():
                continue
            try:
                value = self._wait_one(client, made, deadline, servable)
            except REDIS_ERRORS:
                metrics.REDIS_ERRORS.labels(cache=self.alias).inc()
                break
            if value is not MISSING:
                landed[made] = value
        return landed

    def _wait_one(
        self,
        client: Redis,
        made: str,
        deadline: float,
        servable: Callable[[bytes | None, int], Any],
    ) -> Any:
        waited = 0.0
        try:
            while True:
                event = self.hub.expect(made)
                try:
                    attempt = lease.acquire(client, made, self.policy.default_lease_ms)
                    value = servable(attempt.raw, attempt.pttl_ms)
                    if value is not MISSING:
                        if attempt.lease is not None:
                            self.release_quietly(attempt.lease)
                        return value
                    if attempt.lease is not None:
                        if waited:
                            # The lease we waited on ran out with nothing
                            # written: the key is probably absent by design.
                            self._remember_absent(made)
                        self._record(Won(attempt.lease, time.monotonic(), ""))
                        return MISSING
                    remaining_ms = int((deadline - time.monotonic()) * 1000)
                    if remaining_ms <= 0:
                        metrics.FALLBACKS.labels(
                            cache=self.alias, reason="cold_wait_timeout"
                        ).inc()
                        return MISSING
                    started = time.monotonic()
                    event.wait(
                        policy.wait_ms(attempt.lease_pttl_ms, remaining_ms) / 1000
                    )
                    waited += time.monotonic() - started
                finally:
                    self.hub.done(made, event)
        finally:
            if waited:
                metrics.LEASE_WAIT_SECONDS.labels(cache=self.alias).observe(waited)

    # -- the winner's write ------------------------------------------------------

    def claim(self, made: str) -> Won | None:
        """The lease this process won on ``made``, handed to the write of it."""
        with self._lock:
            won = self._won.pop(made, None)
        if won is None or time.monotonic() > won.started + CLAIM_WINDOW_S:
            return None
        return won

    def lost(self) -> None:
        """A winner's write found something newer: nothing was stored."""
        metrics.LEASE_LOST.labels(cache=self.alias).inc()

    def release_quietly(self, held: lease.Lease) -> None:
        try:
            lease.release(held, None, None)
        except REDIS_ERRORS:
            metrics.REDIS_ERRORS.labels(cache=self.alias).inc()

    # -- memory ------------------------------------------------------------------

    def _record(self, won: Won) -> None:
        self._herd_misses.inc()
        now = time.monotonic()
        with self._lock:
            self._won[won.lease.value_key] = won
            _bound(self._won, lambda w: now < w.started + CLAIM_WINDOW_S)

    def _remember_absent(self, made: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._absent[made] = now + ABSENT_MEMORY_S
            _bound(self._absent, lambda until: until > now)


def _bound(memo: dict[str, Any], live: Callable[[Any], bool]) -> None:
    """Keep a per-process memo from growing without end (callers hold the lock).

    Past the limit, entries that are no longer ``live`` go; if all are, all
    go: forgetting costs a round trip each, never correctness.
    """
    if len(memo) <= _MEMO_LIMIT:
        return
    for key in [key for key, entry in memo.items() if not live(entry)]:
        del memo[key]
    if len(memo) > _MEMO_LIMIT:
        memo.clear()


_HERDS: dict[tuple[int, str, str], Herd] = {}
_HERDS_LOCK = threading.Lock()


def herd_for(backend: ApeeCache) -> Herd:
    """The process-wide Herd of ``backend``'s alias (backends are per thread)."""
    key = (os.getpid(), backend.alias, str(backend._server))
    with _HERDS_LOCK:
        found = _HERDS.get(key)
        if found is None:
            found = _HERDS[key] = Herd(backend)
        return found
