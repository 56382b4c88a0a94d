"""The waiting machine (``Waiting.steps``) driven by a coroutine.

``Waiting`` decides what to do next; this module only does it on the loop:
Redis through the loop's async client, sleeps on the loop's wake-up
subscription. A coroutine waiting here holds no thread.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from django_apee.engine.waiting import (
    Acquire,
    Alive,
    Expect,
    Landed,
    Read,
    Release,
    TimedOut,
    Waiting,
    Won,
)
from django_apee.store.aio import lease as alease
from django_apee.store.errors import REDIS_ERRORS

if TYPE_CHECKING:
    from django_apee.engine.aio.loop import LoopIO
    from django_apee.store import lease


async def wait(
    waiting: Waiting, io: LoopIO, made: str, lease_ms: int, deadline: float
) -> Landed | Won | TimedOut:
    """``Waiting.wait`` on the loop."""
    event: asyncio.Event | None = None
    machine = waiting.steps(made, lease_ms, deadline)
    try:
        step = next(machine)
        while True:
            reply: Any = None
            if isinstance(step, Expect):
                if event is not None:
                    io.hub.done(made, event)
                event = io.hub.expect(made)
            elif isinstance(step, Read):
                reply = await alease.read(io.client, made)
            elif isinstance(step, Acquire):
                reply = await acquire(waiting, io, made, step.lease_ms, step.dead)
            elif isinstance(step, Alive):
                reply = await alease.alive(waiting.holders, io.client, step.holder_id)
            elif isinstance(step, Release):
                await release_quietly(waiting, io, step.held)
            else:
                assert event is not None
                reply = await _sleep(event, step.seconds)
            step = machine.send(reply)
    except StopIteration as stop:
        outcome: Landed | Won | TimedOut = stop.value
        return outcome
    finally:
        machine.close()
        if event is not None:
            io.hub.done(made, event)


async def _sleep(event: asyncio.Event, seconds: float) -> bool:
    """Wait for ``event`` at most ``seconds``; whether it was set."""
    try:
        await asyncio.wait_for(event.wait(), timeout=max(seconds, 0.0))
    except asyncio.TimeoutError:  # not TimeoutError before Python 3.11
        return False
    return True


async def acquire(
    waiting: Waiting, io: LoopIO, made: str, lease_ms: int, dead: str | None
) -> lease.Attempt:
    """``Waiting._acquire`` on the loop."""
    return await alease.acquire(
        io.client,
        waiting.store.connection(),
        made,
        lease_ms,
        channel=waiting.hub.channel,
        identity=waiting.identity,
        dead=dead,
    )


async def try_lease(
    waiting: Waiting, io: LoopIO, made: str, lease_ms: int, identity: int, now: float
) -> lease.Attempt | None:
    """``Waiting.try_lease`` on the loop."""
    if waiting.known_held(made, identity, now):
        return None
    try:
        attempt = await acquire(waiting, io, made, lease_ms, None)
    except REDIS_ERRORS:
        waiting.redis_failed()
        return None
    return waiting.noted(made, attempt, identity, now)


async def release_quietly(waiting: Waiting, io: LoopIO, held: lease.Lease) -> None:
    """``Waiting.release_quietly`` on the loop."""
    try:
        await alease.release(io.client, held, None, None)
    except REDIS_ERRORS:
        waiting.redis_failed()
