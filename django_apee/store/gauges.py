"""What each process holds now (its near cache), for ``manage.py apee_stats``.

Counters add up across a fleet (``fleet.py``); the size of a process's
near cache does not, and a reader wants to see each. With every fleet flush
a process writes its figures as one field of the alias's hash::

    django_apee:procs:{P:A}     field <host>:<pid>, value JSON
                                {"at": <Redis unix seconds>, "entries": ...}

(the same hash tag as the fleet counters: one Redis Cluster slot). The hash
expires a day after its last write; a process that is gone leaves a field
whose ``at`` stops moving, which :func:`read` skips (older than
``STALE_S``) and deletes. What :func:`read` returns comes from whoever can
write to Redis: only small JSON objects of non-negative ints are taken, at
most ``MAX_PROCESSES`` of them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django_apee.store import fleet

if TYPE_CHECKING:
    from redis import Redis

logger = logging.getLogger("django_apee")

PREFIX = "django_apee:procs:"
#: A process's figures older than this (Redis's clock) are a gone process's.
STALE_S = 120
#: The hash outlives its last write by this much.
KEEP_S = 86_400
#: The most processes :func:`read` looks at, and the longest value it parses.
MAX_PROCESSES = 1_000
MAX_VALUE_BYTES = 1_024

#: Each alias's figures of this process (``Near.figures``), by alias.
_SOURCES: dict[str, Callable[[], dict[str, Any]]] = {}


def procs_key(key_prefix: str, alias: str) -> str:
    return f"{PREFIX}{{{key_prefix}:{alias}}}"


def process_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def report(alias: str, figures: Callable[[], dict[str, Any]] | None) -> None:
    """Publish ``figures()`` for ``alias`` with every flush (None: stop)."""
    if figures is None:
        _SOURCES.pop(alias, None)
    else:
        _SOURCES[alias] = figures


def publish() -> None:
    """Write this process's figures for every alias that has some. Never
    raises: the next flush tries again."""
    for alias, figures in list(_SOURCES.items()):
        sink = fleet.sink_of(alias)
        if sink is None:
            continue
        with contextlib.suppress(Exception):  # Redis away: next flush
            found = {k: v for k, v in figures().items() if type(v) is int and v >= 0}
            client = sink.connect()
            now, _ = client.time()
            key = procs_key(sink.key_prefix, alias)
            pipeline = client.pipeline(transaction=False)
            pipeline.hset(key, process_name(), json.dumps({"at": now, **found}))
            pipeline.expire(key, KEEP_S)
            pipeline.execute()


def read(client: Redis, key_prefix: str, alias: str) -> list[dict[str, Any]]:
    """Every live process's figures for ``alias``, largest first; fields of
    gone processes (and unreadable ones) are deleted."""
    key = procs_key(key_prefix, alias)
    now, _ = client.time()
    live: list[dict[str, Any]] = []
    gone: list[Any] = []
    for name, raw in client.hscan_iter(key, count=100):
        if len(live) + len(gone) >= MAX_PROCESSES:
            break
        figures = _parsed(raw)
        if figures is None or now - figures["at"] > STALE_S:
            gone.append(name)
            continue
        label = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        live.append({"process": label, **figures})
    if gone:
        client.hdel(key, *gone)
    live.sort(key=lambda figures: (-figures.get("bytes", 0), figures["process"]))
    return live


def _parsed(raw: Any) -> dict[str, int] | None:
    if not isinstance(raw, bytes) or len(raw) > MAX_VALUE_BYTES:
        return None
    try:
        found = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(found, dict) or type(found.get("at")) is not int:
        return None
    return {
        str(k)[:40]: v for k, v in found.items() if type(v) is int and 0 <= v < 2**63
    }


fleet.before_flush(publish)
if hasattr(os, "register_at_fork"):
    # A child's near caches are its own; its runtime reports them anew.
    os.register_at_fork(after_in_child=_SOURCES.clear)
