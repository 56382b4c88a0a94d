"""Herd mode for ``aget``/``aget_many``: ``Herd``'s decisions, awaited.

``Herd.sort`` says which rows are served, which one reader may have to
recompute and which are absent; the claims, the memos and what a wait's
outcome means are ``Herd``'s too, shared with the threads of the process
(a lease a coroutine wins from ``aget`` is written by a sync ``set`` as
well as by ``aset``). Only the lease round trips and the waits are done
here, on the loop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from django_apee.core import MISSING
from django_apee.engine.aio import waiting as awaiting
from django_apee.store.errors import REDIS_ERRORS

if TYPE_CHECKING:
    from django_apee.core import policy
    from django_apee.core.envelope import Meta
    from django_apee.engine.aio.loop import LoopIO
    from django_apee.engine.herd import Absent, Herd, Row


async def read(herd: Herd, io: LoopIO, rows: list[Row]) -> dict[Any, Any]:
    """``Herd.read`` on the loop."""
    found, contested, absent = herd.sort(rows)
    for row, value, meta, state in contested:
        if not await contend(herd, io, row, meta, state):
            found[row.key] = value
    if absent and herd.waits():
        found.update(await wait_for(herd, io, absent))
    return found


async def contend(
    herd: Herd, io: LoopIO, row: Row, meta: Meta, state: policy.State
) -> bool:
    """``Herd.contend`` on the loop: True, this reader misses and writes."""
    made, raw = row.made, row.raw
    assert raw is not None  # contested rows were read
    now = time.monotonic()
    if herd.claimed(made, now):
        return herd.contended(made, state, None, None, claimed=True)
    lease_ms = herd.lease_ms(meta)
    attempt = await awaiting.try_lease(herd.waiting, io, made, lease_ms, hash(raw), now)
    held = herd.won(made, raw, row.pttl_ms, attempt, now)
    if held is not None:
        await awaiting.release_quietly(herd.waiting, io, held)
    return herd.contended(made, state, attempt, held)


async def wait_for(herd: Herd, io: LoopIO, absent: list[Absent]) -> dict[Any, Any]:
    """``Herd.wait_for`` on the loop."""
    deadline = herd.deadline()
    landed: dict[Any, Any] = {}
    for made, key, state in herd.to_wait(absent):
        lease_ms = herd.rules.default_lease_ms
        try:
            outcome = await awaiting.wait(herd.waiting, io, made, lease_ms, deadline)
        except REDIS_ERRORS:
            herd.events.redis_errors.inc()
            break
        value = herd.waited(made, outcome, state)
        if value is not MISSING:
            landed[key] = value
    return landed
