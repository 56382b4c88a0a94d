"""One object per running event loop, closed when that loop shuts down.

An ``asyncio`` connection, a pub/sub subscription or a flight belongs to the
loop it was made on: a connection opened on one loop cannot be awaited from
another. Django runs more than one loop over a process's life (each
``async_to_sync`` call and each test's ``asyncio.run`` is a new loop; a
server such as uvicorn runs one), so async state is kept per loop.

A loop has no "closing" callback, but ``asyncio.run`` (and ``async_to_sync``,
which uses it) shuts down the loop's asynchronous generators before closing
it: each entry here is tied to a suspended generator whose ``finally`` closes
the entry's connections, in the loop, while it still runs. A loop dropped
without that (``loop.close()`` by hand) lets its entries go with it, and
their sockets close when they are collected.

Entries made before a ``fork()`` are never used by the child: a child that
inherited a loop (rare) builds its own connections, since a socket shared
with the parent would interleave two processes' replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger("django_apee")

T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    value: T
    pid: int
    #: The suspended generator whose ``finally`` closes ``value``; kept
    #: here because the loop only holds it weakly.
    lifetime: Any = field(default=None)


class PerLoop(Generic[T]):
    """``get()`` -> this loop's T, made by ``make`` on first use and closed
    by ``close`` when the loop shuts down (or by :meth:`aclose_current`)."""

    def __init__(
        self, make: Callable[[], T], close: Callable[[T], Awaitable[None]]
    ) -> None:
        self._make = make
        self._close = close
        self._entries: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, _Entry[T]
        ] = weakref.WeakKeyDictionary()

    def get(self) -> T:
        """This loop's object; must be called from a coroutine on the loop."""
        loop = asyncio.get_running_loop()
        entry = self._entries.get(loop)
        if entry is not None and entry.pid == os.getpid():
            return entry.value
        entry = _Entry(self._make(), os.getpid())
        self._entries[loop] = entry
        entry.lifetime = self._tie(loop, entry)
        return entry.value

    def loops(self) -> int:
        """How many loops hold an entry of this process (tests, leak checks)."""
        pid = os.getpid()
        return sum(1 for entry in list(self._entries.values()) if entry.pid == pid)

    def each(self, call: Callable[[T], None]) -> None:
        """Schedule ``call(value)`` on every live loop of this process, from
        any thread (the Sentinel watch's): each runs on its own loop."""
        pid = os.getpid()
        for _ in range(3):  # a loop may add or drop its entry meanwhile
            try:
                entries = list(self._entries.items())
                break
            except RuntimeError:
                continue
        else:
            return
        for loop, entry in entries:
            if entry.pid == pid and not loop.is_closed():
                with contextlib.suppress(RuntimeError):  # closed meanwhile
                    loop.call_soon_threadsafe(call, entry.value)

    async def aclose_current(self) -> None:
        """Close this loop's object now (a changed configuration drops it)."""
        entry = self._entries.pop(asyncio.get_running_loop(), None)
        if entry is not None and entry.pid == os.getpid():
            await self._close(entry.value)

    def _tie(
        self, loop: asyncio.AbstractEventLoop, entry: _Entry[T]
    ) -> AsyncIterator[None]:
        """Start a generator the loop will close at its shutdown.

        The first ``__anext__`` registers it with the loop (its asyncgen
        hook) and runs it to its ``yield`` at once: nothing in it awaits.
        """
        lifetime = self._lifetime(loop, entry)
        step = lifetime.__anext__()
        with contextlib.suppress(StopIteration):  # suspended at its yield
            step.send(None)  # type: ignore[attr-defined]
        return lifetime

    async def _lifetime(
        self, loop: asyncio.AbstractEventLoop, entry: _Entry[T]
    ) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if self._entries.get(loop) is entry:
                del self._entries[loop]
            if entry.pid == os.getpid():
                try:
                    await self._close(entry.value)
                except Exception:
                    logger.debug("django_apee: closing async state", exc_info=True)
