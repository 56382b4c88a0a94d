"""Counts kept off the hit path: one atomic step per event, handed on later.

A Prometheus increment takes a lock and costs as much as the rest of a
near-cache hit, or a sixth of a plain hit's own work. A :class:`Tally`
counts with ``next()`` on an ``itertools.count``, one step under the GIL
that no thread can interleave; whoever owns it calls ``take`` off the hit
path (before a collection, at a request's end, on a timer) and adds the
result to the real counters.
"""

from __future__ import annotations

import itertools
import threading


class Tally:
    """Events counted without a lock. ``take`` returns what was counted
    since its last call (its own step excluded)."""

    def __init__(self) -> None:
        self._count = itertools.count()
        self._taken = -1
        self._lock = threading.Lock()

    def add(self) -> None:
        next(self._count)

    def take(self) -> int:
        with self._lock:
            now = next(self._count)
            counted = now - self._taken - 1
            self._taken = now
            return counted
