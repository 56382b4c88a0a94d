"""Which Redis the suite's caches use: the session's server, or a cluster.

With ``APEE_TEST_CLUSTER=1`` the suites under ``tests/redis/`` run on the
session's 6-node Redis Cluster (``cluster.session_cluster_urls``, started
when the settings are read, shared with child processes through the
environment): the default cache, ``make_cache`` and the workers' caches use
``ApeeClusterClient``, and ``raw_redis`` is a ``RedisCluster`` that empties
every primary. The single server keeps running beside it for the tests that
start servers of their own or need one node (marker ``single_node``,
deselected in the cluster run).

One place says it: ``tests/settings.py``, ``tests/conftest.py`` and the
workers under ``tests/support/`` all ask here.
"""

from __future__ import annotations

import os
from typing import Any

import redis
from redis.cluster import RedisCluster

#: Set to ``1``: the suites' caches live on a Redis Cluster.
CLUSTER_ENV = "APEE_TEST_CLUSTER"
CLUSTER_CLIENT = "django_apee.cluster.ApeeClusterClient"


def on_cluster() -> bool:
    return os.environ.get(CLUSTER_ENV) == "1"


def location() -> str | list[str]:
    """The default LOCATION: the session's server URL, or the cluster's nodes."""
    if on_cluster():
        from tests.support.cluster import session_cluster_urls

        return session_cluster_urls()
    from tests.support.redis_server import session_url

    return session_url()


def options(given: dict[str, Any] | None = None) -> dict[str, Any]:
    """``given`` OPTIONS, with the cluster client class on a cluster (unless
    the test names a class of its own)."""
    made = dict(given or {})
    if on_cluster():
        made.setdefault("CLIENT_CLASS", CLUSTER_CLIENT)
    return made


def cache_config(
    given: dict[str, Any] | None = None, where: str | list[str] | None = None
) -> dict[str, Any]:
    """One CACHES entry for an ApeeCache on the suite's Redis."""
    return {
        "BACKEND": "django_apee.cache.ApeeCache",
        "LOCATION": where or location(),
        "OPTIONS": options(given),
    }


def raw_client(**kwargs: Any) -> redis.Redis | RedisCluster:
    """A plain client of the suite's Redis: the server, or the whole cluster
    (a RedisCluster routes each key to its node). The caller closes it."""
    found = location()
    if isinstance(found, list):
        from redis.cluster import ClusterNode

        nodes = [
            ClusterNode(url.split("//")[1].split(":")[0], int(url.rsplit(":", 1)[1]))  # type: ignore[no-untyped-call]
            for url in found
        ]
        return RedisCluster(startup_nodes=nodes, **kwargs)
    return redis.Redis.from_url(found, **kwargs)


def flush(client: redis.Redis | RedisCluster) -> None:
    """Empty the suite's Redis: FLUSHDB, or FLUSHALL on every primary."""
    if isinstance(client, RedisCluster):
        client.flushall(target_nodes=RedisCluster.PRIMARIES)
    else:
        client.flushdb()
