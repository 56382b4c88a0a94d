"""What one alias keeps per event loop: its connections, wake-ups, flights.

Built on a loop's first use and closed at its end (``store/aio/loops.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from django_apee.core.singleflight import AsyncSingleFlight, LeaderAborted
from django_apee.store.aio.failover import AsyncFailoverRetry
from django_apee.store.aio.loops import PerLoop
from django_apee.store.aio.shardwake import AsyncShardWakeHub
from django_apee.store.aio.wake import AsyncWakeHub

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis import Redis


#: Connections a loop keeps for plain GETs at most (more concurrent GETs
#: borrow from the pool as usual).
KEPT_CONNECTIONS = 8


@dataclass
class LoopIO:
    """One alias's async state on one loop."""

    client: aioredis.Redis
    hub: AsyncWakeHub | AsyncShardWakeHub
    flights: AsyncSingleFlight[Any] = field(default_factory=AsyncSingleFlight)
    #: Reads of one key at the same time share one round trip: 2,000
    #: coroutines asking for one key open one connection, not 2,000.
    reads: AsyncSingleFlight[Any] = field(default_factory=AsyncSingleFlight)
    #: Background refreshes running on this loop (kept referenced: the loop
    #: holds tasks only weakly).
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    #: Connections kept out of the pool for plain GETs (see ``get``).
    idle: list[Any] = field(default_factory=list)

    async def read(self, key: Any, read: Callable[[], Awaitable[Any]]) -> Any:
        """``read()``'s answer, shared with the coroutines reading ``key``
        now (the read began after each of them asked)."""
        try:
            return (await self.reads.do(key, read, timeout=None)).value
        except LeaderAborted:  # the coroutine reading for us was cancelled
            return await read()

    async def get(self, made: str) -> Any:
        """``GET made`` on a connection this loop keeps for plain GETs.

        A hit is one round trip, and ``redis.asyncio``'s client wrapper (the
        pool's lock, the retry wrapper) costs about as much again: the hit
        path skips it while the retry policy has no retries to run (and no
        failover to wait for, ``FAILOVER_WAIT``). A kept
        connection the server closed meanwhile is dropped and the GET sent
        through the client, on a fresh one, as the pool would have done.
        """
        pool = getattr(self.client, "connection_pool", None)
        if pool is None:  # a cluster: its client picks the node
            return await self.client.get(made)
        retry = pool.connection_kwargs.get("retry")
        if retry is not None and (
            retry.get_retries() or isinstance(retry, AsyncFailoverRetry)
        ):
            return await self.client.get(made)
        reused = bool(self.idle)
        connection = self.idle.pop() if reused else await pool.get_connection()
        try:
            await _send(connection, connection.pack_command("GET", made))
            raw = await connection.read_response()
        except BaseException as error:
            await connection.disconnect()
            await pool.release(connection)
            if reused and isinstance(error, (RedisConnectionError, OSError)):
                return await self.client.get(made)
            raise
        if len(self.idle) < KEPT_CONNECTIONS:
            self.idle.append(connection)
        else:
            await pool.release(connection)
        return raw

    def primary_moved(self) -> None:
        """Sentinel moved the primary (``PrimaryWatch``, scheduled on this
        loop): follow it, as the sync side's pool and wake-up hub do."""
        self.spawn(self._follow_primary())

    async def _follow_primary(self) -> None:
        """Close the connections that still point at the old primary (the
        idle ones of the pool, those kept for GETs): the next connection
        asks the sentinels. Then the wake-up subscription moves, on such a
        connection."""
        idle, self.idle = self.idle, []
        pool = self.client.connection_pool
        for connection in idle:
            await connection.disconnect()
            await pool.release(connection)
        await pool.disconnect(inuse_connections=False)
        self.hub.reconnect()

    def spawn(self, work: Any) -> None:
        """Run coroutine ``work`` in the background on this loop."""
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def aclose(self) -> None:
        idle, self.idle = self.idle, []
        for connection in idle:
            await self.client.connection_pool.release(connection)
        await self.hub.aclose()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task
        if isinstance(self.client, RedisCluster):
            await self.client.aclose()
        else:
            await self.client.aclose(close_connection_pool=True)


def per_loop(
    make_client: Callable[[], Any],
    channel: str,
    sync_connect: Callable[[], Redis],
    *,
    sharded: bool = False,
) -> PerLoop[LoopIO]:
    """A :class:`LoopIO` per loop, its client made by ``make_client``
    (a cluster's when ``sharded``: wake-ups by sharded pub/sub)."""
    hub = AsyncShardWakeHub if sharded else AsyncWakeHub

    def make() -> LoopIO:
        client = make_client()
        return LoopIO(client, hub(client, channel, sync_connect))

    async def close(io: LoopIO) -> None:
        await io.aclose()

    return PerLoop(make, close)


async def _send(connection: Any, packed: list[bytes]) -> None:
    """Send a packed command, bounded by the socket timeout.

    ``redis.asyncio`` wraps every send in ``asyncio.wait_for``: a task, a
    timer and two more turns of the loop, for a write that the transport
    nearly always completes at once (a GET is a few dozen bytes). Here the
    bytes are handed to the transport first, and only what it could not
    write yet is waited for, under the same timeout. A connection without
    the stream writer this relies on is sent to the usual way.
    """
    writer = getattr(connection, "_writer", None)
    if writer is None or not connection.is_connected:
        await connection.send_packed_command(packed)
        return
    await connection.check_health()
    writer.writelines(packed)
    if writer.transport.get_write_buffer_size():
        try:
            await asyncio.wait_for(writer.drain(), connection.socket_timeout)
        except asyncio.TimeoutError:
            raise RedisTimeoutError("Timeout writing to socket") from None
