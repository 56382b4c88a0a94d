"""State that belongs to one process: its daemon threads and its registries.

Django builds a cache backend per thread, but coalescing, leases, wake-ups
and counters must be shared by every thread of a process, and must *not* be
shared with a child forked from it (gunicorn ``--preload`` forks workers
after the parent may have used the cache: the child inherits locks, flights
and thread objects whose threads do not exist there).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class ProcessThread:
    """One daemon thread per process, started on first need.

    Threads do not survive ``fork()``: a worker forked from a server that
    had already started one starts its own.
    """

    def __init__(
        self,
        target: Callable[[], None],
        name: str,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self._target = target
        self._name = name
        self._on_start = on_start
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._closed = False

    def ensure(self) -> None:
        """Start the thread unless it runs in this process; callers hold a lock."""
        thread = self._thread
        if self._closed or (
            thread is not None and thread.is_alive() and self._pid == os.getpid()
        ):
            return
        self._pid = os.getpid()
        if self._on_start is not None:
            self._on_start()
        self._thread = threading.Thread(
            target=self._target, name=self._name, daemon=True
        )
        self._thread.start()

    def close(self, timeout: float) -> bool:
        """Start no thread any more, and wait up to ``timeout`` seconds for
        the running one, whose target must have been told to return.

        True if no thread of this process is left running.
        """
        self._closed = True
        thread = self._thread
        if thread is None or self._pid != os.getpid():
            return True
        if thread is not threading.current_thread():
            thread.join(timeout)
        return not thread.is_alive()


class Registry(Generic[T]):
    """Objects shared by the threads of this process, one per key.

    The key says what the object depends on (a cache alias and a fingerprint
    of its options), so a changed configuration gets a fresh object instead
    of the old one running on. Entries made before a ``fork()`` are not
    seen by the child, and ``clear`` drops them all (Django's
    ``setting_changed`` for CACHES).
    """

    def __init__(self) -> None:
        self._items: dict[tuple[int, Hashable], T] = {}
        self._lock = threading.Lock()

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        full = (os.getpid(), key)
        found = self._items.get(full)
        if found is not None:
            return found
        with self._lock:
            found = self._items.get(full)
            if found is None:
                found = self._items[full] = make()
            return found

    def clear(self) -> list[T]:
        """Drop every entry; the ones this process made are returned, so
        the caller can stop what they run."""
        with self._lock:
            items, self._items = self._items, {}
        pid = os.getpid()
        return [item for (owner, _), item in items.items() if owner == pid]

    def __len__(self) -> int:
        return len(self._items)
