"""The Lua scripts, loaded from ``lua/*.lua`` and run with EVALSHA.

redis-py's ``Script`` reloads a script after NOSCRIPT, so a ``SCRIPT FLUSH``,
a restart or a failover to a replica that never saw the script costs one extra
round trip, not an error. Scripts are read on first use, never at import.

``run_many`` sends several calls of one script in one pipelined round trip
(redis-py's pipelines check ``SCRIPT EXISTS`` in a round trip of their own
first; this sends EVALSHA at once and loads the script only after NOSCRIPT).

On Redis Cluster (``slots.py``) a ``RedisCluster`` runs a script like a
plain client does; a cluster pipeline gets ``execute_command("EVALSHA")``
(redis-py refuses its ``evalsha``), and ``slots.NoScriptPipeline`` loads
the scripts a node lacks when the pipeline runs.
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import TYPE_CHECKING, Any

from redis.client import Pipeline
from redis.cluster import ClusterPipeline
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


def source_of(sha: str) -> bytes | None:
    """The source of the script in ``lua/`` whose SHA-1 is ``sha``, else None."""
    for name in names():
        found = script(name)
        if found.sha == sha:
            return bytes(found.script)  # type: ignore[arg-type]
    return None


@functools.cache
def names() -> tuple[str, ...]:
    """Every script in ``lua/``, by name."""
    folder = resources.files("django_apee.store").joinpath("lua")
    return tuple(
        sorted(
            entry.name.removesuffix(".lua")
            for entry in folder.iterdir()
            if entry.name.endswith(".lua")
        )
    )


def run(client: Redis, name: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
    """Run script ``name`` on ``client`` (a Redis client or a pipeline).

    A plain client gets EVALSHA directly (the hit path runs a script on every
    read); after NOSCRIPT, ``Script`` loads the script and runs it again.
    """
    found = script(name)
    if isinstance(client, Pipeline):
        return found(keys=keys, args=args, client=client)
    if isinstance(client, ClusterPipeline):
        return client.execute_command("EVALSHA", found.sha, len(keys), *keys, *args)
    try:
        return client.evalsha(found.sha, len(keys), *keys, *args)
    except NoScriptError:
        return found(keys=keys, args=args, client=client)


def run_many(
    client: Redis, name: str, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
) -> list[Any]:
    """Run script ``name`` once per ``(keys, args)`` in ``calls``, pipelined.

    One round trip while Redis has the script; after NOSCRIPT the script is
    loaded and the calls that met it are sent again (they did not run), so
    every call runs exactly once. Returns the results in order; the first
    other error is raised, as a pipeline would.
    """
    found = script(name)
    results = _evalsha_all(client, found.sha, calls)
    missed = no_script(results)
    if missed:
        found.sha = client.script_load(found.script)
        again = _evalsha_all(client, found.sha, [calls[i] for i in missed])
        return settled(results, missed, again)
    return settled(results, [], [])


def no_script(results: list[Any]) -> list[int]:
    """The positions of a pipeline's calls that met NOSCRIPT (did not run)."""
    return [i for i, one in enumerate(results) if isinstance(one, NoScriptError)]


def settled(results: list[Any], missed: list[int], again: list[Any]) -> list[Any]:
    """``results`` with the ``missed`` calls' second answers in their places;
    the first error raised, as a pipeline would."""
    for i, one in zip(missed, again, strict=True):
        results[i] = one
    for one in results:
        # A cluster pipeline also answers a node's ConnectionError this way.
        if isinstance(one, Exception):
            raise one
    return results


def _evalsha_all(
    client: Redis, sha: str, calls: Sequence[tuple[Sequence[Any], Sequence[Any]]]
) -> list[Any]:
    pipeline = client.pipeline(transaction=False)
    for keys, args in calls:
        # Not ``evalsha``: cluster pipelines refuse it, and this is the same.
        pipeline.execute_command(  # type: ignore[no-untyped-call]
            "EVALSHA", sha, len(keys), *keys, *args
        )
    return list(pipeline.execute(raise_on_error=False))
