"""The Lua scripts of ``store/scripts.py``, run on a ``redis.asyncio`` client.

Same sources, same SHA-1s: EVALSHA first, and after NOSCRIPT (a restart, a
``SCRIPT FLUSH``, a failover) the script is loaded and the call sent again,
so it runs exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from django_apee.store.scripts import no_script, script, settled


async def run(
    client: aioredis.Redis, name: str, keys: Sequence[Any], args: Sequence[Any]
) -> Any:
    """Run script ``name`` (``lua/<name>.lua``) on ``client``."""
    found = script(name)
    try:
        return await client.evalsha(found.sha, len(keys), *keys, *args)
    except NoScriptError:
        found.sha = await client.script_load(found.script)
        return await client.evalsha(found.sha, len(keys), *keys, *args)


async def run_many(
    client: aioredis.Redis,
    name: str,
    calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
) -> list[Any]:
    """Run script ``name`` once per ``(keys, args)``, pipelined in one round
    trip; the calls that met NOSCRIPT are sent again once it is loaded."""
    found = script(name)
    results = await _evalsha_all(client, found.sha, calls)
    missed = no_script(results)
    if missed:
        found.sha = await client.script_load(found.script)
        again = await _evalsha_all(client, found.sha, [calls[i] for i in missed])
        return settled(results, missed, again)
    return settled(results, [], [])


async def _evalsha_all(
    client: aioredis.Redis,
    sha: str,
    calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
) -> list[Any]:
    pipeline = client.pipeline(transaction=False)
    for keys, args in calls:
        pipeline.execute_command("EVALSHA", sha, len(keys), *keys, *args)
    return list(await pipeline.execute(raise_on_error=False))
