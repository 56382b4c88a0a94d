"""ApeeCache's async writes and ``ahas_key``, on ``redis.asyncio``.

``aset``, ``aadd``, ``aset_many`` and ``ahas_key`` send what their sync
twins send, built by the same client methods (``set_call``,
``set_many_calls``, ``peek`` and ``served_pttl`` in ``client.py``): the same
envelope and timings, the same ``lua/set.lua`` and fenced
``lua/herd_set.lua`` calls (a lease a coroutine or a thread of this process
won from a get is written under by either), the same metrics. Only the
round trips are awaited, on the loop's own client.

Like the reads, they run the sync method in a worker thread when the client
has no ``redis.asyncio`` twin (a Redis Cluster before 7) or the near cache
is on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from asgiref.sync import sync_to_async
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.exceptions import SynchronousOnlyOperation

from django_apee.client import peek, px_of, served_pttl
from django_apee.client_inplace import revoke_call
from django_apee.core.wire import UnserializableValueError
from django_apee.engine.aio import waiting as awaiting
from django_apee.store.aio import scripts as ascripts
from django_apee.store.errors import REDIS_ERRORS

if TYPE_CHECKING:
    from django_apee.engine.aio.loop import LoopIO
    from django_apee.engine.aio.stampede import AsyncCoordinator
    from django_apee.store import lease

T = TypeVar("T")
#: Ends a won lease whose value could not be encoded.
Release = Callable[["lease.Lease"], None]


class AsyncWriteMixin:
    """``aset``, ``aadd``, ``aset_many`` and ``ahas_key`` of ApeeCache."""

    if TYPE_CHECKING:  # supplied by ApeeCache, AsyncCacheMixin and RedisCache

        @property
        def client(self) -> Any: ...
        @property
        def runtime(self) -> Any: ...

        default_timeout: Any
        set: Callable[..., Any]
        add: Callable[..., Any]
        set_many: Callable[..., Any]
        has_key: Callable[..., Any]

        def _native(self) -> AsyncCoordinator | None: ...
        def _omitted(self, error: Exception, value: Any) -> Any: ...
        async def _clock_sampled(self, io: LoopIO) -> None: ...

    async def aset(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None
    ) -> Any:
        """Django's ``aset``: ``set`` on the loop."""
        return await self._astore(self.set, key, value, timeout, version, "")

    async def aadd(
        self, key: Any, value: Any, timeout: Any = DEFAULT_TIMEOUT, version: Any = None
    ) -> Any:
        """Django's ``aadd``: ``add`` (``set`` with NX) on the loop."""
        return await self._astore(self.add, key, value, timeout, version, "NX")

    async def aset_many(
        self,
        data: dict[Any, Any],
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> list[Any]:
        """Django's ``aset_many``: ``set_many`` on the loop, one round trip
        for the plain writes; the keys that failed (all of them when an
        ignored Redis error lost the write, as ``set_many`` says)."""
        engine = self._native()
        if engine is None:
            threaded = sync_to_async(self.set_many, thread_sensitive=False)
            failed: list[Any] = await threaded(data, timeout, version)
            return failed
        client = self.client
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        io = engine.loops.get()
        try:
            if timeout is not None and timeout <= 0:
                for key in data:
                    await self._aexpire_now(io, client.make_key(key, version=version))
                return []
            await self._clock_sampled(io)
            plain, fenced = await self._encoded(
                io,
                lambda release: client.set_many_calls(data, timeout, version, release),
            )
            if plain:
                await ascripts.run_many(io.client, "set", plain)
            for call in fenced:
                stored = await ascripts.run(io.client, call.name, call.keys, call.args)
                client.set_stored(call, stored)
        except REDIS_ERRORS as error:
            self._omitted(error, None)
            return list(data)
        return []

    async def ahas_key(self, key: Any, version: int | None = None) -> Any:
        """Django's ``ahas_key``: ``has_key`` on the loop (the header and the
        PTTL, never the value)."""
        engine = self._native()
        if engine is None:
            threaded = sync_to_async(self.has_key, thread_sensitive=False)
            return await threaded(key, version)
        made = self.client.make_key(key, version=version)
        io = engine.loops.get()
        try:
            raw, pttl = await peek(
                io.client.pipeline(transaction=False), made
            ).execute()
        except REDIS_ERRORS as error:
            return self._omitted(error, None)
        return served_pttl(raw, pttl) != 0

    # -- the one write -----------------------------------------------------------

    async def _astore(
        self,
        method: Callable[..., Any],
        key: Any,
        value: Any,
        timeout: float | None,
        version: int | None,
        mode: str,
    ) -> Any:
        """``set``/``add`` (``method``, run in a thread without the async
        engine): ``client.set`` with its round trip awaited."""
        engine = self._native()
        if engine is None:
            threaded = sync_to_async(method, thread_sensitive=False)
            return await threaded(key, value, timeout, version)
        client = self.client
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        made = client.make_key(key, version=version)
        io = engine.loops.get()
        try:
            if timeout is not None and timeout <= 0:
                return await self._aexpire_now(io, made, mode)
            await self._clock_sampled(io)  # the write time the envelope carries
            px = px_of(timeout)
            call = await self._encoded(
                io, lambda release: client.set_call(made, value, px, mode, release)
            )
            stored = await ascripts.run(io.client, call.name, call.keys, call.args)
        except REDIS_ERRORS as error:
            return self._omitted(error, None)
        return client.set_stored(call, stored)

    async def _aexpire_now(self, io: LoopIO, made: str, mode: str = "") -> bool:
        """``client._expire_now`` on the loop: a timeout of 0 or less stores
        nothing; the old value and its lease go (``add``: whether it was
        absent, and nothing deleted)."""
        herd = self.runtime.herd
        if (won := herd.claim(made)) is not None:
            await awaiting.release_quietly(herd.waiting, io, won.lease)
        if mode == "NX":
            return not await io.client.exists(made)
        keys, args = revoke_call(made, self.client.wake_channel)
        deleted = bool(int(await ascripts.run(io.client, "delete", keys, args)))
        return deleted if mode == "XX" else True

    async def _encoded(self, io: LoopIO, build: Callable[[Release | None], T]) -> T:
        """``build(release)``: a write's script calls, its values encoded on
        the loop. A value whose pickling reaches the database (a QuerySet
        runs its query) cannot be encoded there (Django refuses the ORM in
        an event loop): it is encoded in Django's sync thread, as Django's
        own ``aset`` would. A lease a reader of this process had won on the
        key was released by the first try: the second write is a plain
        one, which frees the lease anyway."""
        try:
            return build(self._releaser(io))
        except UnserializableValueError as error:
            if not isinstance(error.__cause__, SynchronousOnlyOperation):
                raise
        return await sync_to_async(build)(None)

    def _releaser(self, io: LoopIO) -> Release:
        """Ends a won lease whose value could not be encoded, from the sync
        ``set_call``: the release is a task on this loop, not a round trip
        in the loop's thread."""
        waiting = self.runtime.herd.waiting

        def release(held: lease.Lease) -> None:
            io.spawn(awaiting.release_quietly(waiting, io, held))

        return release
