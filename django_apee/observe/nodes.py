"""``apee_stats`` on Redis Cluster: every primary looked at, then summed.

A cluster's INFO, SCAN, CONFIG and MEMORY USAGE answer for one node, so each
gathering of ``stats.py`` and ``server.py`` runs here once per primary, on a
plain client of that node (``RedisCluster.get_redis_connection``), and the
answers are put together in the shapes the command already prints:

* overview: ``server`` is the first primary's health and ``nodes`` lists
  every primary's (address, health, leases held there); ``leases`` sums
  them (the oldest of all);
* ``--scan``: each primary scanned within the same bounds, the top keys of
  all merged;
* ``--check``: each primary's lint, every check named with its node.

On a single Redis every function is the one of ``stats.py``/``server.py``.
The fleet counters are read through the cluster client itself (they are
keys, spread over slots by ``fleet.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from redis.cluster import RedisCluster

from django_apee.observe import server, stats

if TYPE_CHECKING:
    from redis import Redis


def primaries(client: Any) -> list[tuple[str, Redis]] | None:
    """``(address, client of that node)`` for each primary; None on one Redis."""
    if not isinstance(client, RedisCluster):
        return None
    found = []
    for node in sorted(client.get_primaries(), key=lambda node: node.name):  # type: ignore[no-untyped-call]
        found.append((str(node.name), client.get_redis_connection(node)))
    return found


def overview_parts(client: Any, key_prefix: str) -> dict[str, Any]:
    """``server`` and ``leases`` of the overview (plus ``nodes`` on a cluster)."""
    nodes = primaries(client)
    if nodes is None:
        return {
            "server": server.health(client),
            "leases": stats.leases(client, key_prefix),
        }
    described: list[dict[str, Any]] = [
        {
            "address": address,
            "server": server.health(node),
            "leases": stats.leases(node, key_prefix),
        }
        for address, node in nodes
    ]
    held = [one["leases"] for one in described]
    oldest = [one["oldest"] for one in held if one["oldest"] is not None]
    return {
        "server": described[0]["server"],
        "nodes": described,
        "leases": {
            "count": sum(one["count"] for one in held),
            "complete": all(one["complete"] for one in held),
            "oldest": max(oldest, key=lambda one: one["age_seconds"] or 0)
            if oldest
            else None,
        },
    }


def scan_top(client: Any, pattern: str, top: int) -> dict[str, Any]:
    """``stats.scan_top`` on every primary, the ``top`` largest of all kept."""
    nodes = primaries(client)
    if nodes is None:
        return stats.scan_top(client, pattern, top)
    parts = [stats.scan_top(node, pattern, top) for _, node in nodes]
    merged = sorted(
        (one for part in parts for one in part["top"]),
        key=lambda one: one["memory_bytes"],
        reverse=True,
    )
    return {
        "pattern": pattern,
        "scanned": sum(part["scanned"] for part in parts),
        "complete": all(part["complete"] for part in parts),
        "top": merged[:top],
    }


def lint(client: Any) -> dict[str, Any]:
    """``server.lint`` of every primary; each check named ``name@address``."""
    nodes = primaries(client)
    if nodes is None:
        return server.lint(client)
    checks = []
    for address, node in nodes:
        for one in server.lint(node)["checks"]:
            checks.append({**one, "name": f"{one['name']}@{address}"})
    return {
        "checks": checks,
        "findings": sum(one["status"] == "finding" for one in checks),
        "unknown": sum(one["status"] == "unknown" for one in checks),
    }
