"""The near cache: hot values served from process memory, kept coherent.

One :class:`Near` per process and alias configuration (it lives in the
alias's runtime). A plain ``get``/``get_many`` asks it first; what it cannot
answer is read from Redis as usual and offered back with ``fill``. Writes and
deletes made by this process ``forget`` their keys at once; every other
change reaches it through ``store/tracking.py``.

What an entry keeps, and why. A near hit must be cheap and must not hand
two callers the same mutable object (callers mutate the dicts they get).
So an entry keeps the envelope's payload *after* its MAC was verified and
it was decompressed, and each read unpickles or unpacks it anew: for the
small and mid-sized values a near cache is for, that is a few microseconds,
cheaper than a deep copy, and no check is repeated. Raw integers (stored
unsigned so INCR works) are kept as the int itself, and only when read with
their PTTL: they carry no write time.

Freshness is still the envelope's: when an entry is filled, its metadata
give the instant (on this process's monotonic clock) at which a Redis read
would stop calling it FRESH (``policy.fresh_until_ms``: the soft timeout
less XFetch's margin for the stored draw). With a PTTL read alongside, the
age comes from it, measured from when the read was *sent* (Redis took the
PTTL later, so the deadline errs early); from a plain GET, from the write
time in Redis's clock (``store/clock.py``), met early as well. A near hit
is served only before that instant, never later than the soft timeout. Past it, the
read goes to Redis, where herd mode, XFetch and stale-while-revalidate
decide as they do without a near cache. So a near hit never serves past
the hard timeout, and never serves what a Redis read would have refreshed.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from django_apee.core import MISSING, policy
from django_apee.core.copies import copier
from django_apee.core.near import ENTRY_OVERHEAD, Limits, NearEvents, NearStore
from django_apee.core.tally import Tally
from django_apee.core.wire import DecodeError
from django_apee.store.clock import DRIFT_PPM
from django_apee.store.tracking import Tracker

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, MutableSet

    from redis.connection import AbstractConnection

    from django_apee.core.envelope import Envelope, Meta
    from django_apee.core.near import Ticket

#: Entry kinds: the value itself (immutable), or a payload loaded per read.
VALUE, PAYLOAD, COPY = 0, 1, 2
FOREVER = float("inf")
#: (fresh until, kind, codec, payload): VALUE, payload the value (a raw
#: int); PAYLOAD, the opened payload; COPY, a function copying the value.
Entry = tuple[float, int, int, Any]


def fresh_left_ms(meta: Meta | None, pttl_ms: int, rules: policy.Policy) -> float:
    """How much longer an entry read with ``meta`` and ``pttl_ms`` stays FRESH.

    ``FOREVER`` for an entry that never goes stale (no metadata, persistent);
    0 for one that is not FRESH now, or whose early refresh is drawn per read
    (no stored seed but a known compute time), which the near cache leaves to
    Redis reads. Never more than ``pttl_ms`` when the key has a TTL.

    ``policy.fresh_until_ms`` says until when an entry is FRESH counted from
    its write (soft timeout less XFetch's margin for its stored draw); the
    grace period does not move that instant, only what Redis keeps after
    the hard timeout. Asked with the write at 0, it is the age the entry
    stops being FRESH at; the age now is what the PTTL says.
    """
    cap = FOREVER if pttl_ms < 0 else float(pttl_ms)
    if meta is None or meta.hard_ms == 0 or pttl_ms < 0:
        return cap
    if meta.seed == 0 and meta.delta_ms:
        return 0.0
    fresh_age = policy.fresh_until_ms(meta._replace(written_ms=1, grace_ms=0), rules)
    age = max(0, meta.hard_ms + meta.grace_ms - pttl_ms)
    return max(0.0, min(fresh_age - 1 - age, cap))


class Near:
    """The near cache of one alias in one process."""

    def __init__(
        self,
        limits: Limits,
        envelope: Envelope,
        rules: policy.Policy,
        connect: Callable[[], AbstractConnection],
        prefix: str,
        events: NearEvents,
        *,
        count_inline: bool = False,
        redis_now: Callable[[], float | None] | None = None,
    ) -> None:
        self.store = NearStore(limits)
        self.envelope = envelope
        self.rules = rules
        self.events = events
        self.tracker = Tracker(
            connect, prefix, self._invalidated, self._reset, on_tick=self.count
        )
        self.flushes = 0
        #: Near hits not yet counted in the metrics (``count`` does, from the
        #: tracking thread every heartbeat).
        self.hits = Tally()
        #: Count each hit as it happens instead (a debugging tool records
        #: events per request: ``observe/trace.py``).
        self.count_inline = count_inline
        #: The latest Redis time it can be now (``RedisClock.latest_ms``),
        #: for reads that bring no PTTL.
        self.redis_now = redis_now
        #: Every near cache of this process over the same keys, this one
        #: included (``runtime.py`` shares the set); None: only this one.
        self.peers: MutableSet[Near] | None = None

    # -- the hit path ---------------------------------------------------------

    def lookup(self, made: str) -> Any:
        """The value near-cached under ``made``, or MISSING (ask Redis);
        a value found is counted as a get hit and a near hit."""
        value = self.find(made)
        if value is not MISSING:
            if self.count_inline:
                self.events.near_served(1)
            else:
                self.hits.add()
        return value

    def find(self, made: str) -> Any:
        """``lookup``, not counted (the stampede-safe path counts its own)."""
        entry = self.store.get(made)
        if entry is None:
            return MISSING
        now = time.monotonic()
        fresh_until, kind, codec, payload = entry
        if now >= fresh_until or not self.tracker.live(now):
            return MISSING
        if kind == VALUE:
            value = payload
        elif kind == COPY:
            value = payload()  # a copy of the kept value (core/copies.py)
        else:
            try:
                value = self.envelope.load(codec, payload)
            except Exception:
                # Verified, but not loadable here (a class gone since it was
                # pickled, a cap): a miss, and the Redis read says why.
                self.store.invalidate([made])
                return MISSING
        return value

    # -- filling ------------------------------------------------------------

    def reserve(self, made: str) -> Ticket | None:
        """A ticket to fill ``made`` with the read about to be sent, or None
        while invalidations are not confirmed to arrive."""
        tracker = self.tracker
        tracker.ensure()
        if not tracker.live(time.monotonic()):
            return None
        return self.store.reserve(made)

    def fill(
        self,
        ticket: Ticket,
        raw: Any,
        sent_at: float,
        pttl_ms: int | None = None,
    ) -> None:
        """Keep what a read sent at ``sent_at`` found under ``ticket.key``.

        ``raw`` is the stored bytes (falsy: absent). With ``pttl_ms`` (the
        key's PTTL, read with them) the entry's age comes from it; without,
        from the write time the envelope carries, in Redis's clock
        (``redis_now``). Unreadable bytes are not kept (the Redis read
        counts them); nor is anything that is not FRESH, or whose freshness
        only a PTTL could tell and none came.
        """
        entry = self._entry(ticket.key, raw, sent_at, pttl_ms)
        if entry is None:
            self.store.release(ticket)
            return
        entry, held = _kept(entry, self.envelope)
        self.store.fill(ticket, entry, ENTRY_OVERHEAD + len(ticket.key) + held)
        evicted = self.store.take_evictions()
        if evicted:
            self.events.near_evictions.inc(evicted)

    def _entry(
        self, made: str, raw: Any, sent_at: float, pttl_ms: int | None
    ) -> tuple[float, int, int, Any] | None:
        if not raw or pttl_ms == -2:
            return None
        if isinstance(raw, str):
            raw = raw.encode()
        payload: Any
        try:
            codec, meta, payload = self.envelope.open(raw, key=made)
        except DecodeError:
            try:
                value = self.envelope.decode(raw, key=made).value
            except DecodeError:
                return None
            if type(value) is not int:
                return None
            kind, codec, payload, meta = VALUE, 0, value, None
        else:
            kind = PAYLOAD
        if pttl_ms is not None:
            left = fresh_left_ms(meta, pttl_ms, self.rules)
            if left <= 0:
                return None
            return (sent_at + left / 1000.0, kind, codec, payload)
        until = self._fresh_until_local(meta)
        return None if until is None else (until, kind, codec, payload)

    def _fresh_until_local(self, meta: Meta | None) -> float | None:
        """When (this process's monotonic clock) an entry stops being FRESH,
        judged from its envelope alone; None if it is not FRESH now or only
        its PTTL could tell.

        A raw int carries no metadata: its TTL is Redis's alone, and Redis
        may delete an expired key some time after its TTL (its expiry cycle
        samples), so without a PTTL it is not kept. The deadline in Redis's
        clock is met early, never late: ``latest_ms`` is the latest Redis
        time it can be now, and the span left is shortened by the two
        clocks' largest drift.
        """
        if meta is None:
            return None
        until = policy.fresh_until_ms(meta, self.rules)
        if until == policy.NO_DEADLINE:
            return FOREVER
        if until == policy.UNDECIDED or self.redis_now is None:
            return None
        now = time.monotonic()
        latest = self.redis_now()
        if latest is None or latest >= until:
            return None
        return now + (until - latest) * (1 - DRIFT_PPM / 1e6) / 1000.0

    # -- forgetting -----------------------------------------------------------

    def forget(self, made_keys: Iterable[str]) -> None:
        """Drop ``made_keys`` (Redis said they changed)."""
        removed = self.store.invalidate(made_keys)
        if removed:
            self.events.near_invalidations.inc(removed)

    def clear(self) -> None:
        """Everything goes (FLUSHDB, a lost tracking connection)."""
        self.store.flush()
        self.flushes += 1
        self.events.near_flushes.inc()

    def wrote(self, made_keys: Iterable[str]) -> None:
        """This process wrote or deleted ``made_keys``: drop them now, here
        and in every near cache of this process over the same keys (another
        alias with the same LOCATION and prefix, e.g. another VERSION), so
        no alias of the process reads an older value after the write."""
        made_keys = list(made_keys)
        for near in self._peers():
            near.forget(made_keys)

    def cleared(self) -> None:
        """This process emptied the database (``cache.clear()``): all of
        its near caches over it are emptied now."""
        for near in self._peers():
            near.clear()

    def _peers(self) -> list[Near]:
        return list(self.peers) if self.peers is not None else [self]

    def count(self) -> None:
        """Hand the near hits counted since the last call to the metrics."""
        hits = self.hits.take()
        if hits:
            self.events.near_served(hits)

    @property
    def closed(self) -> bool:
        return self.tracker.stopped

    def close(self) -> None:
        """Stop tracking and serve nothing more (the configuration is gone)."""
        self.tracker.stop()
        self.store.flush()
        self.count()

    def _invalidated(self, keys: list[str] | None) -> None:
        if keys is None:
            self.clear()
        else:
            self.forget(keys)

    def _reset(self) -> None:
        self.clear()

    # -- figures ------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        """This process's near cache now (JSON-ready), for apee_stats and tests."""
        self.count()
        return {
            **self.store.figures(),
            "flushes": self.flushes,
            "tracking": self.tracker.live(time.monotonic()),
            "tracking_losses": self.tracker.losses,
        }


def _kept(entry: Entry, envelope: Envelope) -> tuple[Entry, int]:
    """What to keep for a fresh entry, and the bytes it holds: the value
    and its copier when its shape has one (``core/copies.py``), else the
    opened payload, unpacked per read."""
    until, kind, codec, payload = entry
    if kind != PAYLOAD:
        return entry, 32
    try:
        found = copier(envelope.load(codec, payload))
    except Exception:  # not loadable here: the payload, as before
        found = None
    if found is None:
        return entry, len(payload)
    copy, size = found
    return (until, COPY, codec, copy), size
