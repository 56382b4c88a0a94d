"""The near cache's memory: an LRU bounded by entries and bytes, with tickets.

Pure bookkeeping (no Redis, no clock of its own): ``store/tracking.py``
keeps it coherent with Redis and ``client_near.py`` decides what goes in.

Why tickets. A reader fills the near cache with what it read from Redis,
and the invalidation of a write can overtake that fill: the write lands
after our GET, its invalidation reaches this process before the GET's
answer is put in. Filling blindly would keep the old value until the next
write. So a reader first *reserves* the key (a placeholder, before its GET
is sent), and ``fill`` only replaces that same placeholder: an invalidation
or a flush in between removes it, and the fill is refused. A flush also
moves the ``epoch`` on, so reservations made before a lost connection are
refused even for keys the flush did not see.

Entries are opaque to this module; each comes with its size in bytes as
the caller measured it (payload plus key plus a fixed overhead), so the
bound is on what the cache holds, not on Python's exact accounting.
Placeholders count as entries (they hold a slot) and as ``PLACEHOLDER_BYTES``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

#: What a placeholder is charged against MAX_BYTES.
PLACEHOLDER_BYTES = 64
#: Bytes every entry is charged beyond its payload and key (the dict slot,
#: the tuple, the metadata object), so a cache of tiny values is bounded too.
ENTRY_OVERHEAD = 200


class Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class NearEvents(Protocol):
    """Where the near cache counts (``observe.metrics.AliasMetrics`` fits)."""

    #: Near hits of the stampede-safe path (``near_served`` counts get's).
    near_hits: Counter
    near_evictions: Counter
    near_invalidations: Counter
    near_flushes: Counter

    def near_served(self, hits: int) -> None:
        """``hits`` keys were answered from memory (get hits and near hits)."""


class _Placeholder:
    """A reservation: only the ticket that made it may fill it."""

    __slots__ = ("serial",)

    def __init__(self, serial: int) -> None:
        self.serial = serial


@dataclass(frozen=True)
class Ticket:
    """What ``reserve`` hands out and ``fill`` takes back."""

    key: str
    epoch: int
    serial: int


@dataclass(frozen=True)
class Limits:
    """The bounds of one near cache (OPTIONS ``NEAR_CACHE``)."""

    max_entries: int = 10_000
    max_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_entries < 1 or self.max_bytes < 1:
            raise ValueError("near cache limits must be >= 1")


class NearStore:
    """An LRU of ``key -> (entry, size)`` under ``Limits``; thread-safe.

    Every method takes one lock for a few dict operations: the hit path
    costs one ``get``.
    """

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._serial = 0
        self._lock = threading.Lock()
        #: Moves on at every flush; tickets of an older epoch fill nothing.
        self.epoch = 0
        #: Totals since start, for tests and stats (metrics count elsewhere).
        self.evictions = 0
        self.invalidations = 0
        self._evicted_since = 0

    # -- reading ------------------------------------------------------------

    def get(self, key: str) -> Any | None:
        """The entry under ``key`` (now the most recently used), or None."""
        with self._lock:
            found = self._items.get(key)
            if found is None or type(found[0]) is _Placeholder:
                return None
            self._items.move_to_end(key)
            return found[0]

    # -- filling ------------------------------------------------------------

    def reserve(self, key: str) -> Ticket:
        """Hold ``key``'s place before reading it from Redis (see the module)."""
        with self._lock:
            self._serial += 1
            self._put(key, _Placeholder(self._serial), PLACEHOLDER_BYTES)
            return Ticket(key, self.epoch, self._serial)

    def fill(self, ticket: Ticket, entry: Any, size: int) -> bool:
        """Store ``entry`` if ``ticket``'s placeholder is still there.

        An entry larger than the whole byte budget is not kept (it would
        evict everything else and then itself).
        """
        with self._lock:
            found = self._items.get(ticket.key)
            if (
                ticket.epoch != self.epoch
                or found is None
                or type(found[0]) is not _Placeholder
                or found[0].serial != ticket.serial
            ):
                return False
            if size > self.limits.max_bytes:
                self._remove(ticket.key)
                return False
            self._put(ticket.key, entry, size)
            return True

    def release(self, ticket: Ticket) -> None:
        """Drop ``ticket``'s placeholder (the read found nothing to keep)."""
        with self._lock:
            found = self._items.get(ticket.key)
            if (
                found is not None
                and type(found[0]) is _Placeholder
                and found[0].serial == ticket.serial
            ):
                self._remove(ticket.key)

    def _put(self, key: str, entry: Any, size: int) -> None:
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._items[key] = (entry, size)
        self._bytes += size
        evicted = 0
        limits = self.limits
        while len(self._items) > limits.max_entries or self._bytes > limits.max_bytes:
            _, (_, victim_size) = self._items.popitem(last=False)
            self._bytes -= victim_size
            evicted += 1
        self.evictions += evicted
        self._evicted_since += evicted

    def take_evictions(self) -> int:
        """Evictions since the last call (the caller counts them in metrics)."""
        with self._lock:
            evicted, self._evicted_since = self._evicted_since, 0
            return evicted

    # -- forgetting ---------------------------------------------------------

    def invalidate(self, keys: Iterable[str]) -> int:
        """Forget ``keys`` (entries and placeholders); how many were held."""
        removed = 0
        with self._lock:
            for key in keys:
                if key in self._items:
                    self._remove(key)
                    removed += 1
            self.invalidations += removed
        return removed

    def _remove(self, key: str) -> None:
        _, size = self._items.pop(key)
        self._bytes -= size

    def flush(self) -> int:
        """Forget everything and refuse older tickets; how many were held."""
        with self._lock:
            held = len(self._items)
            self._items = OrderedDict()
            self._bytes = 0
            self.epoch += 1
            return held

    # -- figures ------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def figures(self) -> dict[str, int]:
        """What this process's near cache holds now (JSON-ready)."""
        with self._lock:
            return {
                "entries": len(self._items),
                "bytes": self._bytes,
                "max_entries": self.limits.max_entries,
                "max_bytes": self.limits.max_bytes,
                "evictions": self.evictions,
                "invalidations": self.invalidations,
                "epoch": self.epoch,
            }
