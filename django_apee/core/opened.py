"""Envelopes already opened: the MAC checked and the payload decompressed
once per stored value, not once per read.

A hot entry is read thousands of times between two writes, and every read
brings the same bytes back from Redis. Checking their MAC and decompressing
them again costs more than the ``GET`` saves on a local network (a 20 KB
HTML fragment: ~13 µs of zstd and SHA-256 per read, against ~4 µs for the
rest of the hit). :class:`OpenedMemo` remembers what opening gave, keyed
by the stored bytes themselves: a read whose bytes and key are *equal* to
ones opened before gets the same verified, decompressed payload. It is not
a cache of values (each read still unpacks or unpickles its own copy, so no
two callers share a mutable object) and it cannot go stale: equal bytes
under an equal key open to equal results, and the bytes still come from
Redis on every read.

Memory is bounded: at most ``max_entries`` entries and ``max_bytes`` in all
(stored bytes, key and decompressed payload counted); an entry larger than
``max_entry_bytes`` is not kept. When a new entry would pass a bound, the
memo is emptied and starts again (cheaper than an LRU on every read; the
next reads of the hot entries fill it back). Bytes that do not verify are
never kept, so hostile values cannot fill it.
"""

from __future__ import annotations

import threading
from typing import Any

#: The defaults: enough for a site's hot set of typical values.
MAX_ENTRIES = 2048
MAX_BYTES = 8 * 1024 * 1024
MAX_ENTRY_BYTES = 256 * 1024

#: ``(key, codec, meta, payload)``: what ``Envelope._open`` found, and under
#: which key. ``payload`` may be a memoryview of the stored bytes.
Opened = tuple[str, int, Any, Any]


class OpenedMemo:
    """Stored bytes -> what opening them under a key gave. Thread-safe:
    reads take no lock (one dict lookup under the GIL), writes take one."""

    __slots__ = (
        "_bytes",
        "_items",
        "_lock",
        "max_bytes",
        "max_entries",
        "max_entry_bytes",
    )

    def __init__(
        self,
        max_entries: int = MAX_ENTRIES,
        max_bytes: int = MAX_BYTES,
        max_entry_bytes: int = MAX_ENTRY_BYTES,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self._items: dict[bytes, Opened] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, data: bytes, key: str) -> Opened | None:
        """What opening ``data`` under ``key`` gave, if it is remembered."""
        found = self._items.get(data)
        if found is None or found[0] != key:
            return None
        return found

    def put(self, data: bytes, key: str, codec: int, meta: Any, payload: bytes) -> None:
        """Remember that ``data`` opened under ``key`` to ``(codec, meta, payload)``.

        An uncompressed payload is kept as a view of ``data`` (no copy).
        """
        size = len(data) + len(key)
        if data.endswith(payload):
            kept: Any = memoryview(data)[len(data) - len(payload) :]
        else:
            kept = payload
            size += len(payload)
        if size > self.max_entry_bytes:
            return
        with self._lock:
            if data in self._items:
                return
            full = len(self._items) >= self.max_entries
            if full or self._bytes + size > self.max_bytes:
                self._items = {}
                self._bytes = 0
            self._items[data] = (key, codec, meta, kept)
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._items = {}
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def size(self) -> int:
        """Bytes held now (stored bytes, keys and decompressed payloads)."""
        return self._bytes
