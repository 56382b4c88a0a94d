"""``aget_or_set_stampede_safe``: the stampede path for coroutines.

The same path as ``engine/stampede.py`` (read, judge, serve or refresh,
coalesce, wait or compute under the lease), with the sync
:class:`~django_apee.engine.stampede.Coordinator` of the alias deciding
every step: its breaker, events, refresh bookkeeping and compute steps are
shared, so a sync and an async caller of one process see one breaker and
one refresh per entry. What changes:

* the coroutines of one loop coalesce in the loop's ``AsyncSingleFlight``
  (the threads of the process still coalesce in the sync one: a process
  running a loop and threads may wait on Redis once per loop and once for
  its threads, never once per caller);
* waits for another process's computation are ``Waiting.steps`` on the loop;
* an ``async def`` compute is awaited on the loop; a plain function runs in
  a worker thread, once per flight (never once per waiting coroutine).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from django_apee.core import MISSING, policy
from django_apee.core.decisions import WAITED_IN_PROCESS
from django_apee.core.singleflight import LeaderAborted, SingleFlightTimeout
from django_apee.engine.aio import waiting as awaiting
from django_apee.engine.stampede import _UNREADABLE, Call, rewritten
from django_apee.engine.waiting import Landed, Won
from django_apee.store import lease
from django_apee.store.aio import lease as alease
from django_apee.store.errors import REDIS_ERRORS

if TYPE_CHECKING:
    from django_apee.engine.aio.loop import LoopIO
    from django_apee.engine.stampede import Coordinator
    from django_apee.store.aio.loops import PerLoop


class Fallback(Exception):
    """A coroutine's wait ran out; it computes locally."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AsyncCoordinator:
    """One alias's stampede path for the coroutines of this process."""

    def __init__(self, sync: Coordinator, loops: PerLoop[LoopIO]) -> None:
        self.sync = sync
        self.loops = loops

    async def get_or_set(self, call: Call) -> Any:
        """Serve ``call.made`` from the cache, or compute it once fleet-wide."""
        try:
            return await self._get_or_set(call)
        except Fallback as fallback:
            self.sync.events.fallback(fallback.reason)
            return await self.run(call.compute)

    async def _get_or_set(self, call: Call) -> Any:
        sync = self.sync
        value = sync.store.near_hit(call.made)
        if value is not MISSING:  # fresh in this process's near cache
            sync.events.hits.inc()
            return value
        if not sync.breaker.allow():
            return await self._local(call, reason="circuit_open")
        io = self.loops.get()
        made = call.made
        try:
            # The sync hit path's: a plain GET, fresh by the write time the
            # entry carries; else its PTTL decides (``lua/read.lua``).
            raw = await io.read(made, lambda: io.get(made))
            if raw is not None:
                if sync.clock is not None and sync.clock.sample is None:
                    await asyncio.to_thread(sync.clock.latest_ms)  # first sample
                value = sync._lean_hit(made, raw)
                if value is _UNREADABLE:
                    raw = None  # counted once; a miss, recomputed
                elif value is not MISSING:
                    sync.breaker.success()
                    sync.events.hits.inc()
                    return value
                else:
                    raw, call.read_pttl = await io.read(
                        ("read", made), lambda: alease.read(io.client, made)
                    )
        except REDIS_ERRORS:
            sync.waiting.redis_failed()
            return await self._local(call, reason="redis_error")
        sync.breaker.success()
        value, state, stale = sync.judge(call, raw)
        if state is None:
            return await self._coalesced(io, call.made, lambda: self._fill(call, stale))
        if sync.serving(state):
            return value
        refreshed = await self._refresh(io, call, state)
        return value if refreshed is MISSING else refreshed

    # -- computing -------------------------------------------------------------

    async def run(self, compute: Callable[[], Any]) -> Any:
        """Run ``compute``: awaited on the loop if it is ``async def``, else
        in a worker thread (whose database connections are then closed)."""
        if inspect.iscoroutinefunction(compute):
            return await compute()
        result = await asyncio.to_thread(self._in_thread, compute)
        if inspect.isawaitable(result):  # a plain function returning a coroutine
            return await result
        return result

    def _in_thread(self, compute: Callable[[], Any]) -> Any:
        try:
            return compute()
        finally:
            self.sync.tuning.thread_done()

    async def _compute_and_store(
        self, io: LoopIO, call: Call, held: lease.Lease, stale: Any
    ) -> Any:
        sync = self.sync
        started = sync.computing(held)
        try:
            value = await self.run(call.compute)
        except Exception:
            lease.RENEWER.untrack(held)
            await awaiting.release_quietly(sync.waiting, io, held)
            return sync.compute_failed(stale)
        except BaseException:
            lease.RENEWER.untrack(held)
            await asyncio.shield(awaiting.release_quietly(sync.waiting, io, held))
            raise
        try:
            payload = sync.computed(call, held, value, started)
        except Exception:
            await awaiting.release_quietly(sync.waiting, io, held)
            raise
        try:
            ours = await alease.release(io.client, held, payload, call.spec.px)
        except REDIS_ERRORS:
            sync.waiting.redis_failed()
            return value
        sync.stored(held, ours)
        return value

    async def _compute_unstored(self, compute: Callable[[], Any], reason: str) -> Any:
        self.sync.events.fallback(reason)
        return await self.run(compute)

    async def _local(self, call: Call, reason: str) -> Any:
        """Redis is away: compute here, coalesced with this loop's coroutines."""
        self.sync.events.fallback(reason)
        io = self.loops.get()
        return await self._coalesced(io, call.made, lambda: self.run(call.compute))

    # -- miss ------------------------------------------------------------------

    async def _coalesced(
        self, io: LoopIO, made: str, fill: Callable[[], Awaitable[Any]]
    ) -> Any:
        try:
            found = await io.flights.do(
                made, fill, timeout=self.sync.tuning.wait_timeout
            )
        except (SingleFlightTimeout, LeaderAborted) as error:
            raise Fallback("wait_timeout") from error
        if not found.leader:
            self.sync.events.decided(made, "miss", WAITED_IN_PROCESS, found.waited)
        return found.value

    async def _fill(self, call: Call, stale: Any) -> Any:
        """Leader of this loop: take the lease and compute, or wait for it."""
        sync = self.sync
        io = self.loops.get()
        deadline = time.monotonic() + sync.tuning.wait_timeout
        lease_ms = sync.lease_ms(call.previous)
        try:
            outcome = await awaiting.wait(
                sync.waiting, io, call.made, lease_ms, deadline
            )
        except REDIS_ERRORS:
            sync.waiting.redis_failed()
            return await self._compute_unstored(call.compute, "redis_error")
        if isinstance(outcome, Landed):
            return outcome.value
        if isinstance(outcome, Won):
            return await self._compute_and_store(io, call, outcome.lease, stale)
        return await self._compute_unstored(call.compute, "wait_timeout")

    # -- refresh while a value is servable ------------------------------------

    async def _refresh(self, io: LoopIO, call: Call, state: policy.State) -> Any:
        """Refresh ``call.made`` if this caller wins its lease; never wait."""
        sync = self.sync
        if not sync.refreshing(call.made):
            return MISSING  # another caller of this process is on it
        background = False
        try:
            held = await self._refresh_lease(io, call)
            if held is None:
                return MISSING
            if state is policy.State.EARLY:
                sync.events.early_refreshes.inc()
            if sync.tuning.refresh == "inline":
                return await self._compute_and_store(io, call, held, MISSING)
            background = self._start_background(io, call, held)
            if not background:
                await awaiting.release_quietly(sync.waiting, io, held)
            return MISSING
        finally:
            if not background:  # else the background work forgets it
                sync.forget_refresh(call.made)

    async def _refresh_lease(self, io: LoopIO, call: Call) -> lease.Lease | None:
        """``Coordinator._refresh_lease`` on the loop."""
        sync = self.sync
        seed = call.previous.seed if call.previous is not None else 0
        lease_ms = sync.lease_ms(call.previous)
        now = time.monotonic()
        attempt = await awaiting.try_lease(
            sync.waiting, io, call.made, lease_ms, seed, now
        )
        if attempt is None or attempt.lease is None:
            return None
        if rewritten(call, attempt):
            await awaiting.release_quietly(sync.waiting, io, attempt.lease)
            return None
        return attempt.lease

    def _start_background(self, io: LoopIO, call: Call, held: lease.Lease) -> bool:
        """A plain compute refreshes in the sync coordinator's pool (its lease
        ends through the sync client); an ``async def`` one in a task here."""
        if not inspect.iscoroutinefunction(call.compute):
            return self.sync.start_background(call, held)
        if not self.sync.pool_slot():
            return False
        io.spawn(self._background(io, call, held))
        return True

    async def _background(self, io: LoopIO, call: Call, held: lease.Lease) -> None:
        try:
            await self._compute_and_store(io, call, held, MISSING)
        except Exception:
            self.sync.background_failed(held)
        finally:
            self.sync.background_done(call)
