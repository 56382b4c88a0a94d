"""What one alias keeps per event loop: its connections, wake-ups, flights.

Built on a loop's first use and closed at its end (``store/aio/loops.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django_apee.core.singleflight import AsyncSingleFlight, LeaderAborted
from django_apee.store.aio.loops import PerLoop
from django_apee.store.aio.wake import AsyncWakeHub

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis import Redis


@dataclass
class LoopIO:
    """One alias's async state on one loop."""

    client: aioredis.Redis
    hub: AsyncWakeHub
    flights: AsyncSingleFlight[Any] = field(default_factory=AsyncSingleFlight)
    #: Reads of one key at the same time share one round trip: 2,000
    #: coroutines asking for one key open one connection, not 2,000.
    reads: AsyncSingleFlight[Any] = field(default_factory=AsyncSingleFlight)
    #: Background refreshes running on this loop (kept referenced: the loop
    #: holds tasks only weakly).
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def read(self, key: Any, read: Callable[[], Awaitable[Any]]) -> Any:
        """``read()``'s answer, shared with the coroutines reading ``key``
        now (the read began after each of them asked)."""
        try:
            return (await self.reads.do(key, read, timeout=None)).value
        except LeaderAborted:  # the coroutine reading for us was cancelled
            return await read()

    def spawn(self, work: Any) -> None:
        """Run coroutine ``work`` in the background on this loop."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def aclose(self) -> None:
        await self.hub.aclose()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task
        await self.client.aclose(close_connection_pool=True)


def per_loop(
    make_client: Callable[[], aioredis.Redis],
    channel: str,
    sync_connect: Callable[[], Redis],
) -> PerLoop[LoopIO]:
    """A :class:`LoopIO` per loop, its client made by ``make_client``."""

    def make() -> LoopIO:
        client = make_client()
        return LoopIO(client, AsyncWakeHub(client, channel, sync_connect))

    async def close(io: LoopIO) -> None:
        await io.aclose()

    return PerLoop(make, close)
