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
    from django_apee.core.envelope import Meta
    from django_apee.engine.aio.loop import LoopIO
    from django_apee.engine.herd import Absent, Herd, Row


async def read(herd: Herd, io: LoopIO, rows: list[Row]) -> dict[Any, Any]:
    """``Herd.read`` on the loop."""
    found, contested, absent = herd.sort(rows)
    for row, value, meta in contested:
        if not await contend(herd, io, row.made, row.raw, meta, row.pttl_ms):  # type: ignore[arg-type]
            found[row.key] = value
    if absent and herd.waits():
        found.update(await wait_for(herd, io, absent))
    return found


async def contend(
    herd: Herd, io: LoopIO, made: str, raw: bytes, meta: Meta, read_pttl: int
) -> bool:
    """``Herd.contend`` on the loop: True, this reader misses and writes."""
    now = time.monotonic()
    if herd.claimed(made, now):
        return False
    lease_ms = herd.lease_ms(meta)
    attempt = await awaiting.try_lease(herd.waiting, io, made, lease_ms, hash(raw), now)
    held = herd.won(made, raw, read_pttl, attempt, now)
    if held is not None:
        await awaiting.release_quietly(herd.waiting, io, held)
    return attempt is not None and attempt.lease is not None and held is None


async def wait_for(herd: Herd, io: LoopIO, absent: list[Absent]) -> dict[Any, Any]:
    """``Herd.wait_for`` on the loop."""
    deadline = herd.deadline()
    landed: dict[Any, Any] = {}
    for made, key in herd.to_wait(absent):
        lease_ms = herd.rules.default_lease_ms
        try:
            outcome = await awaiting.wait(herd.waiting, io, made, lease_ms, deadline)
        except REDIS_ERRORS:
            herd.events.redis_errors.inc()
            break
        value = herd.waited(made, outcome)
        if value is not MISSING:
            landed[key] = value
    return landed
