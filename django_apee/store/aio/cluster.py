"""Redis Cluster on ``redis.asyncio``: the twin of the process's ``slots.Cluster``.

The sync client (``cluster.py``) builds one ``slots.Cluster`` per process
from LOCATION and OPTIONS (``cluster_kwargs``): startup nodes, every node's
connection arguments (username, password, TLS, socket timeouts), and the
cluster's own (``read_from_replicas``, ``retry`` from ``REDIS_RETRIES``,
``require_full_coverage``...). Each event loop gets a
``redis.asyncio.cluster.RedisCluster`` built from those same arguments
(kept on the sync one as ``build_kwargs``), its retry policy rebuilt as
``redis.asyncio``'s: OPTIONS are parsed once, in one place.

The scripts run on it as on one Redis (``store/aio/scripts.py``): a script
call's keys share a slot, ``SCRIPT LOAD`` goes to every primary, and a
pipeline's NOSCRIPT answers come back as results, sent again once loaded.
What differs is a read of many keys: ``MGET`` per slot
(``mget_nonatomic``) and ``lua/get.lua`` per slot (``read_rows``).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Sequence
from contextvars import ContextVar
from typing import Any

from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.maint_notifications import MaintNotificationsConfig

from django_apee.core.keys import LEASE, companion
from django_apee.store.aio import scripts
from django_apee.store.aio.connect import async_retry
from django_apee.store.slots import Cluster, by_slot

logger = logging.getLogger("django_apee")

_LOGGED: set[str] = set()


def is_cluster(client: Any) -> bool:
    """Whether ``client`` (sync or async) is a cluster client."""
    return isinstance(client, (Cluster, RedisCluster))


#: Set while this task holds one of its client's slots (``BoundedCluster``):
#: a command redis-py sends from inside another (a redirect, a script
#: load) does not wait for a second one.
_HOLDING: ContextVar[bool] = ContextVar("django_apee_cluster_slot", default=False)


@contextlib.asynccontextmanager
async def _slot(client: BoundedCluster) -> AsyncIterator[None]:
    """Hold one of ``client``'s slots, the cluster initialized, meanwhile."""
    if _HOLDING.get():
        yield
        return
    async with client.slots:
        token = _HOLDING.set(True)
        try:
            if client._initialize:
                await client.initialize()
            yield
        finally:
            _HOLDING.reset(token)


class BoundedCluster(RedisCluster):
    """A ``redis.asyncio`` RedisCluster that waits rather than fails.

    redis-py's async cluster fails a command past a node's
    ``max_connections`` (``MaxConnectionsError``) where the single-node
    pool (``connect.py``) makes a coroutine wait; and the commands sent
    while its first slot map is asked for can meet connections closed under
    them ("Connection closed by server"), surfacing with no retries
    (``REDIS_RETRIES`` 0). Here at most ``max_connections`` commands and
    pipelines are in flight per client (so per node), the others wait, and
    the first waits for the slot map before sending.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = asyncio.Semaphore(int(kwargs.get("max_connections") or 100))

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        async with _slot(self):
            return await super().execute_command(*args, **kwargs)

    def pipeline(
        self, transaction: Any | None = None, shard_hint: Any | None = None
    ) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused there
        return BoundedPipeline(self, transaction)  # type: ignore[abstract]


class BoundedPipeline(ClusterPipeline):
    """A pipeline that holds one of its ``BoundedCluster``'s slots."""

    async def execute(
        self, raise_on_error: bool = True, allow_redirections: bool = True
    ) -> list[Any]:
        async with _slot(self.cluster_client):  # type: ignore[arg-type]
            return await super().execute(raise_on_error, allow_redirections)


def async_cluster(sync: Any) -> RedisCluster:
    """A ``redis.asyncio`` RedisCluster built as ``sync`` (a ``slots.Cluster``)
    was (no I/O: it asks for the slot map on its first command)."""
    assert isinstance(sync, Cluster)
    accepted = set(inspect.signature(RedisCluster.__init__).parameters) - {"self"}
    kwargs: dict[str, Any] = {}
    for name, value in sync.build_kwargs.items():
        if name == "startup_nodes":
            kwargs[name] = [ClusterNode(node.host, node.port) for node in value]
        elif name == "retry" and value is not None:
            kwargs[name] = async_retry(value)
        elif name in accepted:
            kwargs[name] = value
        elif name not in _LOGGED:
            _LOGGED.add(name)
            logger.debug("django_apee: %r has no redis.asyncio cluster twin", name)
    # Its "auto" default refuses the RESP2 parser at the first connect.
    kwargs["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return BoundedCluster(**kwargs)


async def read_values(client: RedisCluster, made_keys: list[Any]) -> list[Any]:
    """The bytes under each key, in order: one ``MGET`` per slot, pipelined
    per node (``mget_nonatomic``, as the sync cluster client reads)."""
    return list(await client.mget_nonatomic(made_keys))


async def read_rows(client: RedisCluster, made_keys: list[Any], most: int) -> list[Any]:
    """``lua/get.lua``'s flat answer (3 items per key, in order): one script
    call per slot, at most ``most`` keys each, pipelined."""
    groups = by_slot(made_keys, most)
    calls: list[tuple[Sequence[Any], Sequence[Any]]] = []
    for group in groups:
        chunk = [made_keys[i] for i in group]
        calls.append((chunk + [companion(made, LEASE) for made in chunk], []))
    if len(calls) == 1:
        keys, args = calls[0]
        return list(await scripts.run(client, "get", keys, args))  # type: ignore[arg-type]
    flat: list[Any] = [None] * (3 * len(made_keys))
    parts = await scripts.run_many(client, "get", calls)  # type: ignore[arg-type]
    for group, part in zip(groups, parts, strict=True):
        for j, i in enumerate(group):
            flat[3 * i : 3 * i + 3] = part[3 * j : 3 * j + 3]
    return flat
