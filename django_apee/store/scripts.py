"""The Lua scripts, loaded from ``lua/*.lua`` and run with EVALSHA.

redis-py's ``Script`` reloads a script after NOSCRIPT, so a ``SCRIPT FLUSH``,
a restart or a failover to a replica that never saw the script costs one extra
round trip, not an error. Scripts are read on first use, never at import.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import TYPE_CHECKING, Any

from redis.client import Pipeline
from redis.commands.core import Script
from redis.exceptions import NoScriptError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from redis import Redis


@functools.cache
def script(name: str) -> Script:
    """Return the ``Script`` for ``lua/<name>.lua`` (source kept as bytes)."""
    source = (
        resources.files("django_apee.store").joinpath(f"lua/{name}.lua").read_bytes()
    )
    return Script(None, source)  # type: ignore[arg-type]  # bytes need no client


def run(client: Redis, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """Run script ``name`` on ``client`` (a Redis client or a pipeline).

    A plain client gets EVALSHA directly (the hit path runs a script on every
    read); after NOSCRIPT, ``Script`` loads the script and runs it again.
    """
    found = script(name)
    if isinstance(client, Pipeline):
        return found(keys=keys, args=args, client=client)
    try:
        return client.evalsha(found.sha, len(keys), *keys, *args)
    except NoScriptError:
        return found(keys=keys, args=args, client=client)
