"""Leases on ``redis.asyncio``: the calls of ``store/lease.py``, awaited.

The calls are built and their replies read by ``store/lease.py`` itself
(``acquire_call``, ``read_reply``, ``release_args``): only the round trip
differs. A lease taken here is an ordinary :class:`~django_apee.store.lease.Lease`
whose ``client`` is the *sync* primary: the process's one renewer thread
renews it (over the identity connection), as it renews every lease of the
process, and a background refresh run in a thread can end it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError

from django_apee.store import lease
from django_apee.store.aio import scripts
from django_apee.store.errors import REDIS_ERRORS

if TYPE_CHECKING:
    from redis import Redis

    from django_apee.store.holder import HolderCheck, Identity


async def read(client: aioredis.Redis, value_key: str) -> tuple[bytes | None, int]:
    """A value and its PTTL, atomically (``lua/read.lua``)."""
    return lease.read_reply(await scripts.run(client, "read", [value_key], []))


async def holder_id(identity: Identity | None) -> int | None:
    """The client id leases taken here name; the first look (one ``CLIENT
    ID`` on the identity connection, once per process) runs in a thread."""
    if identity is None:
        return None
    known = identity.known_id()
    if known is not None or identity.denied:
        return known
    return await asyncio.to_thread(identity.client_id)


async def acquire(
    client: aioredis.Redis,
    sync_client: Redis,
    value_key: str,
    lease_ms: int,
    *,
    channel: str,
    identity: Identity | None = None,
    dead: str | None = None,
) -> lease.Attempt:
    """``lease.acquire`` on ``client``; the lease it may take ends through
    ``sync_client`` when a thread ends it (see the module)."""
    call = lease.acquire_call(
        value_key,
        lease_ms,
        channel=channel,
        holder_id=await holder_id(identity),
        identity=identity,
        dead=dead,
    )
    reply = await scripts.run(client, "acquire", call.keys, call.args)
    return call.attempt(sync_client, reply)


async def release(
    client: aioredis.Redis, held: lease.Lease, payload: bytes | None, px: int | None
) -> bool:
    """``lease.release`` on ``client``: fenced write, free, wake-up."""
    keys = [held.value_key, held.lease_key]
    result = await scripts.run(
        client, "release", keys, lease.release_args(held, payload, px)
    )
    return bool(int(result))


async def alive(check: HolderCheck, client: aioredis.Redis, holder: int) -> bool | None:
    """``HolderCheck.alive`` on ``client``."""
    if check.denied:
        return None
    try:
        found = await client.execute_command(  # type: ignore[no-untyped-call]
            "CLIENT", "LIST", "ID", holder
        )
    except NoPermissionError:
        return check.refused()
    except REDIS_ERRORS:
        return check.failed()
    return bool(found)
