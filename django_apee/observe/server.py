"""A Redis server as an operator of a cache sees it: health, and a lint of its settings.

``health`` reduces INFO to what matters for a cache; ``lint`` checks the
settings a stampede-proof cache relies on (eviction policy, memory limit,
lazy freeing, defragmentation, keep-alives, client limit) with CONFIG GET,
falls back to INFO where CONFIG is renamed or forbidden (managed Redis,
ACLs), and says "unknown" where both are silent, never raising for that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import ResponseError

from django_apee.observe.text import text

if TYPE_CHECKING:
    from redis import Redis

UNKNOWN = "unknown"
#: Below this much data a fragmentation ratio says nothing.
DEFRAG_MIN_BYTES = 64 * 2**20


def ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


# -- server health ---------------------------------------------------------------------


def health(client: Redis) -> dict[str, Any]:
    """The server's INFO, reduced to what an operator of a cache looks at."""
    info = client.info()
    hits, misses = info.get("keyspace_hits", 0), info.get("keyspace_misses", 0)
    maxmemory = info.get("maxmemory")
    used = info.get("used_memory", 0)
    return {
        "version": str(info.get("redis_version", UNKNOWN)),
        "role": str(info.get("role", UNKNOWN)),
        "used_memory": used,
        "maxmemory": maxmemory,
        "memory_ratio": ratio(used, maxmemory or 0),
        "fragmentation_ratio": info.get("mem_fragmentation_ratio"),
        "evicted_keys": info.get("evicted_keys"),
        "maxmemory_policy": str(info.get("maxmemory_policy", UNKNOWN)),
        "connected_clients": info.get("connected_clients"),
        "maxclients": info.get("maxclients"),
        "keyspace_hits": hits,
        "keyspace_misses": misses,
        "keyspace_hit_ratio": ratio(hits, hits + misses),
    }


# -- the Redis configuration lint ------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    name: str
    value: str | None  # None: unknown (CONFIG and INFO both silent)
    source: str


CONFIG_NAMES = (
    "maxmemory",
    "maxmemory-policy",
    "lazyfree-lazy-eviction",
    "lazyfree-lazy-expire",
    "activedefrag",
    "tcp-keepalive",
    "maxclients",
    "hz",
)
#: Settings INFO also shows, under another name, for servers without CONFIG.
INFO_NAMES = {
    "maxmemory": "maxmemory",
    "maxmemory-policy": "maxmemory_policy",
    "maxclients": "maxclients",
    "hz": "configured_hz",
}


def read_settings(client: Redis) -> tuple[dict[str, Setting], dict[str, Any]]:
    """The settings the lint needs: CONFIG GET, else INFO, else unknown."""
    try:
        info = client.info()
    except ResponseError:
        info = {}
    try:
        config = {text(k): text(v) for k, v in client.config_get("*").items()}
    except ResponseError:  # renamed or forbidden (managed Redis, ACL)
        config = {}
    found = {}
    for name in CONFIG_NAMES:
        if name in config:
            found[name] = Setting(name, config[name], "config")
        elif INFO_NAMES.get(name) in info:
            found[name] = Setting(name, str(info[INFO_NAMES[name]]), "info")
        else:
            found[name] = Setting(name, None, UNKNOWN)
    return found, info


def lint(client: Redis) -> dict[str, Any]:
    """Check a cache's Redis against the article's list; findings exit non-zero."""
    found, info = read_settings(client)
    checks = [
        _check_maxmemory(found["maxmemory"]),
        _check_policy(found["maxmemory-policy"]),
        _check_lazyfree(found["lazyfree-lazy-eviction"], found["lazyfree-lazy-expire"]),
        _check_defrag(found["activedefrag"], info),
        _check_keepalive(found["tcp-keepalive"]),
        _check_clients(found["maxclients"], info),
        _check_hz(found["hz"]),
    ]
    return {
        "checks": checks,
        "findings": sum(1 for c in checks if c["status"] == "finding"),
        "unknown": sum(1 for c in checks if c["status"] == UNKNOWN),
    }


def _result(
    setting: Setting, ok: bool | None, advice: str, *, value: str | None = None
) -> dict[str, Any]:
    status = UNKNOWN if ok is None else "ok" if ok else "finding"
    return {
        "name": setting.name,
        "value": setting.value if value is None else value,
        "source": setting.source,
        "status": status,
        "advice": "" if ok else advice,
    }


def _check_maxmemory(s: Setting) -> dict[str, Any]:
    ok = None if s.value is None else s.value != "0"
    return _result(
        s, ok, "set maxmemory: without it Redis grows until the OOM killer ends it"
    )


def _check_policy(s: Setting) -> dict[str, Any]:
    ok = None if s.value is None else s.value in ("allkeys-lfu", "allkeys-lru")
    return _result(
        s,
        ok,
        "use allkeys-lfu: 'noeviction' fails writes when memory is full, "
        "volatile-* never evicts entries stored without a timeout",
    )


def _check_lazyfree(eviction: Setting, expire: Setting) -> dict[str, Any]:
    values = (eviction.value, expire.value)
    ok = None if None in values else values == ("yes", "yes")
    merged = Setting(
        "lazyfree-lazy-eviction/expire",
        None if None in values else f"{values[0]}/{values[1]}",
        eviction.source,
    )
    return _result(
        merged,
        ok,
        "set lazyfree-lazy-eviction and lazyfree-lazy-expire yes: freeing a "
        "large value in the main thread stalls every client",
    )


def _check_defrag(s: Setting, info: dict[str, Any]) -> dict[str, Any]:
    """activedefrag off is a finding only where fragmentation costs memory.

    Small datasets show meaningless ratios (an empty server reads 10+), and
    many distribution builds cannot enable it at all (their jemalloc lacks
    the hooks), so "no" alone is not worth a non-zero exit.
    """
    ratio = info.get("mem_fragmentation_ratio")
    used = info.get("used_memory", 0)
    fragmented = ratio is not None and ratio > 1.5 and used >= DEFRAG_MIN_BYTES
    ok = None if s.value is None else s.value == "yes" or not fragmented
    return _result(
        s,
        ok,
        f"set activedefrag yes: fragmentation is {ratio} on "
        f"{used // 2**20} MiB (needs a Redis built with its own jemalloc)",
    )


def _check_keepalive(s: Setting) -> dict[str, Any]:
    ok = None if s.value is None else s.value.isdigit() and 0 < int(s.value) <= 300
    return _result(
        s, ok, "set tcp-keepalive 60-300: dead clients otherwise hold connections"
    )


def _check_clients(s: Setting, info: dict[str, Any]) -> dict[str, Any]:
    connected = info.get("connected_clients")
    if s.value is None or connected is None or not s.value.isdigit():
        return _result(s, None, "")
    ok = int(connected) <= 0.8 * int(s.value)
    return _result(
        s,
        ok,
        f"raise maxclients: {connected} of {s.value} connections in use (> 80 %)",
        value=f"{s.value} ({connected} connected)",
    )


def _check_hz(s: Setting) -> dict[str, Any]:
    ok = None if s.value is None else s.value.isdigit() and int(s.value) >= 10
    return _result(s, ok, "keep hz >= 10: expired keys are reclaimed hz times a second")
