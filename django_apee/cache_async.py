"""ApeeCache's async methods, on ``redis.asyncio`` (``engine/aio``).

Django's ``BaseCache`` gives every backend ``aget`` and friends as
``sync_to_async`` of the sync method: a thread hand-off per call, and a
coroutine that waits for another's computation holds a thread for the whole
wait. Here the reads and the stampede-safe path run on the event loop:
the same envelope, scripts, keys, leases, wake-up channel and metrics as
the sync methods (what one writes the other reads), with waits on the
loop's wake-up subscription and the coroutines of a loop coalesced.

What still runs the sync method in a worker thread (``thread_sensitive=False``:
off the one thread ``sync_to_async`` shares, so a wait stalls no ORM call):
everything when the client has no ``redis.asyncio`` twin (a Redis Cluster
without sharded pub/sub, before 7) or the near cache is on (its hits are in
process memory already). The writes
``aset``, ``aadd``, ``aset_many`` and ``ahas_key`` are in
``cache_async_write.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from asgiref.sync import async_to_sync, sync_to_async
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django_redis.exceptions import ConnectionInterrupted
from redis.exceptions import ResponseError

from django_apee import client_read
from django_apee.cache_async_write import AsyncWriteMixin
from django_apee.client_inplace import revoke_call
from django_apee.client_invalidate import retime_call
from django_apee.client_read import GET_CHUNK
from django_apee.core import MISSING
from django_apee.core.keys import LEASE, companion
from django_apee.engine.aio import herd as aherd
from django_apee.observe import metrics, trace
from django_apee.store.aio import cluster as acluster
from django_apee.store.aio import scripts as ascripts
from django_apee.store.aio.cluster import is_cluster
from django_apee.store.errors import REDIS_ERRORS

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from django_apee.engine.aio.loop import LoopIO
    from django_apee.engine.aio.stampede import AsyncCoordinator
    from django_apee.engine.stampede import Call
    from django_apee.store.near import Near


def _constant(value: Any) -> Callable[[], Any]:
    """An ``async def`` compute returning ``value``: no thread for a value."""

    async def constant() -> Any:
        return value

    return constant


class AsyncCacheMixin(AsyncWriteMixin):
    """The ``a*`` methods of :class:`~django_apee.cache.ApeeCache`."""

    if TYPE_CHECKING:  # supplied by ApeeCache and django-redis's RedisCache

        @property
        def client(self) -> Any: ...
        @property
        def runtime(self) -> Any: ...
        @property
        def alias(self) -> str: ...

        options: Any
        _ignore_exceptions: bool
        _log_ignored_exceptions: bool
        logger: Any

        get: Callable[..., Any]
        get_many: Callable[..., Any]
        delete: Callable[..., Any]
        delete_many: Callable[..., Any]
        touch: Callable[..., Any]
        incr: Callable[..., Any]
        get_or_set_stampede_safe: Callable[..., Any]
        stampede_call: Callable[..., tuple[Callable[[], Any], Call | None]]

    def _native(self) -> AsyncCoordinator | None:
        """The async engine, or None: run the sync method in a thread.

        With a near cache, writes stay on the sync client, which forgets
        their keys here at once (reads of this process see their writes);
        reads and stampede-safe calls are native (``_native_reads``).
        """
        if self.options.near_cache is not None:
            return None
        return self._native_reads()

    def _native_reads(self) -> AsyncCoordinator | None:
        """The async engine for reads, or None: run them in a thread."""
        engine: AsyncCoordinator | None = self.runtime.acoordinator
        return engine

    async def _near_read(self, io: LoopIO, near: Near, made: Any) -> Any:
        """``GET made``, reserved in the near cache before it is sent and
        filled from its answer, as the sync near client's reads are."""
        ticket = near.reserve(made)
        sent = time.monotonic()
        try:
            raw = await io.get(made)
        except BaseException:
            if ticket is not None:
                near.store.release(ticket)
            raise
        if ticket is not None:
            near.fill(ticket, raw, sent)
        return raw

    def _omitted(self, error: Exception, value: Any) -> Any:
        """A Redis error: ``value`` under IGNORE_EXCEPTIONS (as django-redis's
        ``omit_exception`` does for the sync methods), else raised."""
        if not self._ignore_exceptions:
            raise error
        if self._log_ignored_exceptions:
            self.logger.exception("Exception ignored")
        return value

    # -- reads -------------------------------------------------------------------
    #
    # The sync read path's (``client_read.py``): a plain GET (MGET), judged
    # by the write time the envelope carries; what that cannot call fresh
    # goes through ``lua/get.lua`` and herd mode.

    async def aget(
        self, key: Any, default: Any = None, version: int | None = None
    ) -> Any:
        """Django's ``aget``: ``get`` on the loop (herd mode included; the
        near cache first, where the alias has one)."""
        engine = self._native_reads()
        if engine is None:
            return await sync_to_async(self.get, thread_sensitive=False)(
                key, default, version
            )
        client = self.client
        made = client.make_key(key, version=version)
        near = self.runtime.near
        if near is not None:
            value = near.lookup(made)
            if value is not MISSING:
                return value
        if client._lean_reads:
            io = engine.loops.get()
            try:
                if near is None:
                    raw = await io.read(made, lambda: io.get(made))
                else:
                    raw = await self._near_read(io, near, made)
            except REDIS_ERRORS as error:
                return self._omitted(error, default)
            if raw is not None:
                await self._clock_sampled(io)
                value = client._lean_answer(made, raw)
                if value is client_read._UNREADABLE:
                    return default
                if value is not client_read._FULL_PATH:
                    return value
        found = await self._afull(engine, {made: key}, {}, 0)
        return found.get(key, default)

    async def aget_many(self, keys: Any, version: int | None = None) -> Any:
        """Django's ``aget_many``: ``get_many`` on the loop (with a near
        cache, in a thread)."""
        engine = self._native()
        if engine is None:
            return await sync_to_async(self.get_many, thread_sensitive=False)(
                keys, version
            )
        client = self.client
        by_made_key = {client.make_key(key, version=version): key for key in keys}
        if not by_made_key:
            return {}
        if not client._lean_reads:
            return await self._afull(engine, by_made_key, {}, 0)
        io = engine.loops.get()
        try:
            raws = await _read_values(io.client, list(by_made_key))
        except REDIS_ERRORS as error:
            found: dict[Any, Any] = self._omitted(error, {})
            return found
        await self._clock_sampled(io)
        found, full, unreadable = client._sort_lean(by_made_key, raws)
        if not full:
            metrics.count_gets(self.alias, len(found), unreadable)
            return found
        served = await self._afull(engine, full, found, unreadable)
        return client_read.merged(by_made_key, found, served)

    async def _clock_sampled(self, io: LoopIO) -> None:
        """Redis's clock is sampled (lean reads judge ages by it, writes
        stamp their time with it): the process's first sample is a round
        trip, taken in a thread, once for all the loop's coroutines."""
        clock = self.runtime.clock
        if clock.sample is None:
            await io.read(("clock",), lambda: asyncio.to_thread(clock.latest_ms))

    async def _afull(
        self,
        engine: AsyncCoordinator,
        by_made_key: dict[Any, Any],
        found: dict[Any, Any],
        unreadable: int,
    ) -> dict[Any, Any]:
        """``_full_path`` on the loop: ``lua/get.lua``, then herd mode."""
        io = engine.loops.get()
        made_keys = list(by_made_key)
        try:
            if len(made_keys) == 1:  # shared with this loop's reads of it
                key = ("get", made_keys[0])
                flat = await io.read(key, lambda: _read_rows(io.client, made_keys))
            else:
                flat = await _read_rows(io.client, made_keys)
        except REDIS_ERRORS as error:
            failed: dict[Any, Any] = self._omitted(error, {})
            return failed
        rows = self.client._rows(by_made_key, flat)
        served = await aherd.read(self.runtime.herd, io, rows)
        self.client._count_full(by_made_key, found, served, unreadable)
        return served

    # -- deletes ---------------------------------------------------------------

    async def adelete(self, key: Any, version: int | None = None) -> bool:
        """Django's ``adelete``: ``delete`` on the loop (the value and its
        lease, waking the lease's waiters: ``lua/delete.lua``)."""
        engine = self._native()
        if engine is None:
            threaded = sync_to_async(self.delete, thread_sensitive=False)
            return bool(await threaded(key, version))
        client = self.client
        made = client.make_key(key, version=version)
        io = engine.loops.get()
        try:
            deleted = await ascripts.run(
                io.client, "delete", *revoke_call(made, client.wake_channel)
            )
        except REDIS_ERRORS as error:
            return bool(self._omitted(error, False))
        return bool(int(deleted))

    async def adelete_many(self, keys: Any, version: int | None = None) -> None:
        """Django's ``adelete_many``: ``delete_many`` on the loop, pipelined."""
        engine = self._native()
        if engine is None:
            await sync_to_async(self.delete_many, thread_sensitive=False)(keys, version)
            return
        client = self.client
        made = [client.make_key(key, version=version) for key in keys]
        if not made:
            return
        io = engine.loops.get()
        calls = [revoke_call(one, client.wake_channel) for one in made]
        try:
            await ascripts.run_many(io.client, "delete", calls)
        except REDIS_ERRORS as error:
            self._omitted(error, None)

    async def atouch(
        self,
        key: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> bool:
        """Django's ``atouch``: ``touch`` on the loop (the same script: a
        computation in flight will not write over the new timeout)."""
        engine = self._native()
        if engine is None:
            threaded = sync_to_async(self.touch, thread_sensitive=False)
            return bool(await threaded(key, timeout, version))
        client = self.client
        made = client.make_key(key, version=version)
        command, ms = client.touch_command(timeout)
        name, keys, args = retime_call(made, command, ms, client.wake_channel)
        io = engine.loops.get()
        try:
            return bool(await ascripts.run(io.client, name, keys, args))
        except REDIS_ERRORS as error:
            return bool(self._omitted(error, False))

    # -- in place ----------------------------------------------------------------

    async def aincr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        """Django's ``aincr`` (and so ``adecr``): ``lua/incr.lua`` on the loop
        for a raw int; anything else (an int in an envelope, past 64 bits)
        is read, added and written back by the sync path, in a thread."""
        engine = self._native()
        if engine is None:
            threaded = sync_to_async(self.incr, thread_sensitive=False)
            return await threaded(key, delta, version)
        client = self.client
        made = client.make_key(key, version=version)
        io = engine.loops.get()
        try:
            result = await ascripts.run(io.client, "incr", [made], [delta, 0])
        except ResponseError:  # not a raw int: read, add, write back
            threaded = sync_to_async(client._incr_in_python, thread_sensitive=False)
            try:
                return await threaded(made, delta, client.get_client(write=True))
            except ConnectionInterrupted as error:
                return self._omitted(error.__cause__ or error, None)
        except REDIS_ERRORS as error:
            return self._omitted(error, None)
        if result is None:
            raise ValueError(f"Key '{key}' not found")
        return int(result)

    # -- stampede-safe computation ---------------------------------------------

    async def aget_or_set_stampede_safe(
        self,
        key: Any,
        default: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        soft_timeout: float | None = None,
        stale_if_error: float | None = None,
        version: int | None = None,
    ) -> Any:
        """The async twin of ``get_or_set_stampede_safe``.

        ``default`` may be an ``async def`` function (awaited on the loop),
        a plain callable (run in a worker thread, once per computation, not
        once per waiting coroutine) or a value.
        """
        engine = self._native_reads()
        if engine is None:
            if inspect.iscoroutinefunction(default):
                # The sync method would cache the coroutine it returns: it
                # runs on this loop instead, from the worker thread.
                default = async_to_sync(default)
            return await sync_to_async(
                self.get_or_set_stampede_safe, thread_sensitive=False
            )(
                key,
                default,
                timeout,
                soft_timeout=soft_timeout,
                stale_if_error=stale_if_error,
                version=version,
            )
        compute, call = self.stampede_call(
            key, default, timeout, soft_timeout, stale_if_error, version,
            constant=_constant,
        )  # fmt: skip
        if call is None:  # stores nothing: a value already cached, else computed
            try:
                found = await self.aget(key, MISSING, version)
            except REDIS_ERRORS:
                found = MISSING
            return await engine.run(compute) if found is MISSING else found
        if trace.enabled():  # a debugging tool records this request's calls
            with trace.call(self.alias, str(call.made)):
                return await engine.get_or_set(call)
        return await engine.get_or_set(call)

    async def aget_or_set(
        self,
        key: Any,
        default: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> Any:
        """Django's ``aget_or_set``, on the stampede-safe path on every Django.

        Django 5.2 builds it from ``aget`` and ``aadd``, which would bypass
        the lease entirely.
        """
        return await self.aget_or_set_stampede_safe(
            key, default, timeout, version=version
        )


async def _read_rows(client: aioredis.Redis, made_keys: list[Any]) -> list[Any]:
    """``lua/get.lua``'s flat answer, ``GET_CHUNK`` keys per script call
    (per hash slot on a cluster)."""
    if is_cluster(client):
        return await acluster.read_rows(client, made_keys, GET_CHUNK)  # type: ignore[arg-type]
    calls: list[tuple[list[Any], list[Any]]] = [
        (chunk + [companion(made, LEASE) for made in chunk], [])
        for chunk in _chunks(made_keys)
    ]
    if len(calls) == 1:  # EVALSHA alone, no pipeline
        return list(await ascripts.run(client, "get", *calls[0]))
    parts = await ascripts.run_many(client, "get", calls)
    return [one for part in parts for one in part]


async def _read_values(client: aioredis.Redis, made_keys: list[Any]) -> list[Any]:
    """The bytes under each key, in order: ``MGET``s of ``GET_CHUNK`` keys,
    pipelined in one round trip (per hash slot on a cluster)."""
    if is_cluster(client):
        return await acluster.read_values(client, made_keys)  # type: ignore[arg-type]
    if len(made_keys) <= GET_CHUNK:
        return list(await client.mget(made_keys))
    pipeline = client.pipeline(transaction=False)
    for chunk in _chunks(made_keys):
        pipeline.mget(chunk)
    return [raw for part in await pipeline.execute() for raw in part]


def _chunks(made_keys: list[Any]) -> Iterator[list[Any]]:
    for start in range(0, len(made_keys), GET_CHUNK):
        yield made_keys[start : start + GET_CHUNK]
