"""A bounded, expiring, thread-safe memo: what a process remembers for a while.

The engine remembers, per key, facts that save a Redis round trip ("another
process holds this lease for 2 more seconds", "this process won that lease",
"this key is absent by design"). Forgetting one costs a round trip, never
correctness, so the memo may drop entries at will: it keeps at most
``limit`` entries, dropping expired ones first and, if that is not enough,
all of them.
"""

from __future__ import annotations

import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class ExpiringMemo(Generic[T]):
    """``key -> (until, value)``; a value is seen only while ``now < until``."""

    def __init__(self, limit: int = 10_000) -> None:
        self._limit = limit
        self._items: dict[str, tuple[float, T]] = {}
        self._lock = threading.Lock()

    def get(self, key: str, now: float) -> T | None:
        found = self._items.get(key)
        if found is None or found[0] <= now:
            return None
        return found[1]

    def put(self, key: str, until: float, value: T, now: float) -> None:
        with self._lock:
            self._items[key] = (until, value)
            if len(self._items) > self._limit:
                self._items = {k: v for k, v in self._items.items() if v[0] > now}
                if len(self._items) > self._limit:
                    self._items = {}

    def pop(self, key: str, now: float) -> T | None:
        with self._lock:
            found = self._items.pop(key, None)
        if found is None or found[0] <= now:
            return None
        return found[1]

    def __len__(self) -> int:
        return len(self._items)
