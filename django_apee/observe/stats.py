"""What ``manage.py apee_stats`` reports, gathered as plain dicts.

The command only formats; everything here returns JSON-ready data (the shape
is ``stats.schema.json``) so tests check numbers, not text. Every Redis call
is bounded: SCAN with a cap (never KEYS), short socket timeouts come from the
alias's OPTIONS, and a server that forbids a command yields "unknown" rather
than an exception.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError, ResponseError

from django_apee.core import keys, policy
from django_apee.core.compression import decompress
from django_apee.core.wire import COMPRESSIONS, DecodeError, describe, peek_meta
from django_apee.observe import metrics
from django_apee.store import fleet, lease

if TYPE_CHECKING:
    from redis import Redis

    from django_apee.cache import ApeeCache

SCHEMA_VERSION = 1
#: How far back the fleet rates look, in minute buckets (the current one too).
WINDOW_MINUTES = 5
UNKNOWN = "unknown"
#: Below this much data a fragmentation ratio says nothing.
DEFRAG_MIN_BYTES = 64 * 2**20


class StatsError(Exception):
    """Something the command reports and exits non-zero on (no traceback)."""


def backend_of(alias: str) -> ApeeCache:
    from django.conf import settings
    from django.core.cache import caches

    from django_apee.cache import ApeeCache

    if alias not in settings.CACHES:
        raise StatsError(f"no cache alias {alias!r} in CACHES")
    backend = caches[alias]
    if not isinstance(backend, ApeeCache):
        raise StatsError(f"cache {alias!r} is not a django_apee ApeeCache")
    return backend


def client_of(backend: ApeeCache) -> Redis:
    client: Redis = backend.client.get_client(write=True)
    return client


def _ratio(part: float, whole: float) -> float | None:
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
        "memory_ratio": _ratio(used, maxmemory or 0),
        "fragmentation_ratio": info.get("mem_fragmentation_ratio"),
        "evicted_keys": info.get("evicted_keys"),
        "maxmemory_policy": str(info.get("maxmemory_policy", UNKNOWN)),
        "connected_clients": info.get("connected_clients"),
        "maxclients": info.get("maxclients"),
        "keyspace_hits": hits,
        "keyspace_misses": misses,
        "keyspace_hit_ratio": _ratio(hits, hits + misses),
    }


# -- the fleet's counters --------------------------------------------------------------


def _ints(raw: dict[Any, Any]) -> dict[str, int]:
    return {_text(k): int(v) for k, v in raw.items()}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def fleet_counters(
    client: Redis, key_prefix: str, alias: str, window_minutes: int = WINDOW_MINUTES
) -> dict[str, Any]:
    """Totals since the first flush, and the last few minutes' counts and rates.

    The window is the last ``window_minutes`` minute buckets by Redis's clock,
    the current (partial) minute included; rates divide by its real length,
    or by the time since the fleet's first flush if that is shorter.
    """
    seconds, micros = client.time()
    minute = int(seconds) // 60
    pipeline = client.pipeline(transaction=False)
    pipeline.hgetall(fleet.stats_key(key_prefix, alias))
    for back in range(window_minutes):
        pipeline.hgetall(fleet.minute_key(key_prefix, alias, minute - back))
    totals_raw, *buckets = pipeline.execute()
    window: dict[str, int] = {}
    for bucket in buckets:
        for field, amount in _ints(bucket).items():
            window[field] = window.get(field, 0) + amount
    now = int(seconds) + int(micros) / 1e6
    elapsed = (window_minutes - 1) * 60 + now % 60
    totals = _ints(totals_raw)
    since = totals.pop("_since", None)
    if since is not None:  # a fleet younger than the window: its real age
        elapsed = min(elapsed, max(now - since, 1.0))
    return {
        "first_flush_unix": since,
        "totals": totals,
        "window_seconds": round(elapsed, 3),
        "window": window,
        "rates": rates(window, elapsed),
        "ratios": ratios(window),
        "ratios_total": ratios(totals),
    }


def _sum(fields: dict[str, int], prefix: str) -> int:
    return sum(
        v for k, v in fields.items() if k == prefix or k.startswith(prefix + ":")
    )


def rates(fields: dict[str, int], seconds: float) -> dict[str, float]:
    """Per-second rates (computes per minute) over ``seconds``."""
    seconds = max(seconds, 1.0)
    gets = fields.get("hits", 0) + fields.get("misses", 0)
    calls = fields.get("stampede_hits", 0) + fields.get("stampede_misses", 0)
    return {
        "gets_per_second": round(gets / seconds, 3),
        "stampede_calls_per_second": round(calls / seconds, 3),
        "computes_per_minute": round(_sum(fields, "computes") * 60 / seconds, 3),
        "fallbacks_per_minute": round(_sum(fields, "fallbacks") * 60 / seconds, 3),
        "redis_errors_per_minute": round(
            fields.get("redis_errors", 0) * 60 / seconds, 3
        ),
    }


def ratios(fields: dict[str, int]) -> dict[str, float | None]:
    """Hit ratios, the stale share of hits and the lease-wait p95."""
    hits, misses = fields.get("hits", 0), fields.get("misses", 0)
    s_hits = fields.get("stampede_hits", 0)
    s_misses = fields.get("stampede_misses", 0)
    return {
        "hit_ratio": _ratio(hits, hits + misses),
        "stampede_hit_ratio": _ratio(s_hits, s_hits + s_misses),
        "stale_share": _ratio(fields.get("stale_served", 0), s_hits),
        "lease_wait_p95_seconds": quantile(fields, "lease_wait_seconds", 0.95),
    }


def quantile(fields: dict[str, int], name: str, q: float) -> float | None:
    """Upper bound of the histogram bucket holding quantile ``q`` (None: empty).

    The fleet stores per-bucket counts (``<name>_le_<bound>``); like
    Prometheus's ``histogram_quantile`` the answer is only as fine as the
    buckets, so this reports the bucket's upper bound, never an interpolation.
    """
    prefix = f"{name}_le_"
    buckets = sorted(
        (math.inf if k[len(prefix) :] == "+Inf" else float(k[len(prefix) :]), v)
        for k, v in fields.items()
        if k.startswith(prefix)
    )
    count = sum(v for _, v in buckets)
    if not count:
        return None
    seen = 0
    for bound, amount in buckets:
        seen += amount
        if seen >= q * count:
            return bound if math.isfinite(bound) else metrics.BUCKETS[-1]
    return None  # pragma: no cover  # the loop always reaches count


# -- leases held now -------------------------------------------------------------------


def value_key_of(companion: str, kind: str = keys.LEASE) -> str | None:
    """The value key a companion key belongs to (the inverse of keys.companion)."""
    marker = f"|apee:{kind}"
    if companion.startswith(f"apee:{kind}|"):
        return companion[len(kind) + 6 :]
    tag = keys.hash_tag(companion)
    if tag is None or not companion.startswith("{"):
        return None
    rest = companion[len(tag) + 2 :]
    if rest == marker:
        return tag
    if rest.startswith(marker + "|"):
        return rest[len(marker) + 1 :]
    return None


def leases(
    client: Redis, key_prefix: str, *, limit: int = 1000, max_calls: int = 100
) -> dict[str, Any]:
    """Leases held now on this alias's keys (SCAN, at most ``max_calls`` calls)."""
    found: list[str] = []
    cursor, calls = 0, 0
    while True:
        cursor, batch = client.scan(cursor, match="*apee:lease*", count=1000)
        calls += 1
        for raw in batch:
            name = _text(raw)
            value_key = value_key_of(name)
            if value_key is not None and value_key.startswith(f"{key_prefix}:"):
                found.append(name)
        if cursor == 0 or len(found) >= limit or calls >= max_calls:
            break
    complete = cursor == 0 and len(found) <= limit
    found = found[:limit]
    now_ms = _now_ms(client)
    described = [lease_of(client, name, now_ms) for name in found]
    held = [one for one in described if one is not None]
    aged = [one for one in held if one["age_seconds"] is not None]
    oldest = max(aged, key=lambda one: one["age_seconds"]) if aged else None
    return {"count": len(held), "complete": complete, "oldest": oldest}


def _now_ms(client: Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def lease_of(client: Redis, lease_key: str, now_ms: int) -> dict[str, Any] | None:
    """Holder, age and remaining life of one lease; None when not held."""
    pipeline = client.pipeline(transaction=False)
    pipeline.get(lease_key)
    pipeline.pttl(lease_key)
    token, pttl = pipeline.execute()
    if token is None:
        return None
    parsed = keys.parse_lease_token(_text(token))
    return {
        "key": value_key_of(lease_key),
        "holder": f"{parsed[0]}:{parsed[1]}" if parsed else UNKNOWN,
        "age_seconds": round((now_ms - parsed[2]) / 1000, 3) if parsed else None,
        "ttl_ms": int(pttl),
    }


# -- one entry -------------------------------------------------------------------------


def inspect_key(
    backend: ApeeCache, client: Redis, key: str, version: int | None = None
) -> dict[str, Any]:
    """Everything about one entry: bytes, codec, timing, state and lease."""
    made = str(backend.client.make_key(key, version=version))
    raw, pttl = lease.read(client, made)  # atomically, as the hit path reads
    now_ms = _now_ms(client)
    result: dict[str, Any] = {
        "key": key,
        "redis_key": made,
        "lease": lease_of(client, keys.companion(made, keys.LEASE), now_ms),
    }
    if raw is None:
        return {**result, "state": "absent", "encoding": None}
    result.update(stored_bytes=len(raw), pttl_ms=int(pttl))
    result.update(_describe_bytes(backend, raw))
    meta = peek_meta(raw)
    result.update(_timing(meta, int(pttl)))
    if result["encoding"] == "unreadable":
        result["state"] = "unreadable"
    else:
        # Its stored XFetch draw decides, as for every reader; without one,
        # a draw of 0 (never early) shows the plain soft/hard state.
        rules, rand = backend.apee.policy, policy.xfetch_rand(meta, 0.0)
        result["state"] = policy.state(meta, int(pttl), policy=rules, rand=rand).value
    return result


def _describe_bytes(backend: ApeeCache, raw: bytes) -> dict[str, Any]:
    try:
        backend.envelope.decode(raw)
    except DecodeError as error:
        return {"encoding": "unreadable", "error": error.reason}
    header = describe(raw)
    if header is None:  # it decoded, so it is a raw int
        return {"encoding": "raw-int", "raw_bytes": len(raw)}
    payload = raw[header.header_len :]
    if header.compression != "none":
        limit = backend.envelope.max_decompressed_bytes
        payload = decompress(COMPRESSIONS[header.compression], payload, limit)
    return {
        "encoding": "envelope",
        "codec": header.codec,
        "compression": header.compression,
        "raw_bytes": len(payload),
    }


def _timing(meta: Any, pttl: int) -> dict[str, Any]:
    if meta is None:
        return {"hard_ttl_ms": None if pttl < 0 else pttl, "soft_ttl_ms": None}
    age = policy.age_ms(meta, pttl)
    hard_left = None if age is None else meta.hard_ms - age
    soft_left = None if age is None or not meta.soft_ms else meta.soft_ms - age
    return {
        "hard_ttl_ms": hard_left,
        "soft_ttl_ms": soft_left,
        "delta_ms": meta.delta_ms,
        "grace_ms": meta.grace_ms,
    }


# -- the largest keys ------------------------------------------------------------------


def scan_top(
    client: Redis, pattern: str, top: int, *, max_keys: int = 100_000
) -> dict[str, Any]:
    """The ``top`` largest keys matching ``pattern`` (SCAN + MEMORY USAGE, bounded)."""
    sizes: list[tuple[int, str]] = []
    scanned = 0
    cursor = 0
    while True:
        cursor, batch = client.scan(cursor, match=pattern, count=1000)
        names = [_text(n) for n in batch][: max_keys - scanned]
        scanned += len(names)
        pipeline = client.pipeline(transaction=False)
        for name in names:
            pipeline.memory_usage(name)
            pipeline.pttl(name)
        answers = pipeline.execute() if names else []
        for index, name in enumerate(names):
            usage = answers[2 * index]
            if usage is not None:
                sizes.append((int(usage), name))
        sizes = sorted(sizes, reverse=True)[:top]
        if cursor == 0 or scanned >= max_keys:
            break
    return {
        "pattern": pattern,
        "scanned": scanned,
        "complete": cursor == 0,
        "top": [{"key": name, "memory_bytes": size} for size, name in sizes],
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
        config = {_text(k): _text(v) for k, v in client.config_get("*").items()}
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


# -- everything for one alias ----------------------------------------------------------


def overview(alias: str) -> dict[str, Any]:
    """Health, fleet counters and leases of one alias (the default mode)."""
    backend = backend_of(alias)
    client = client_of(backend)
    return {
        "alias": alias,
        "location": _location(backend),
        "server": health(client),
        "fleet": fleet_counters(client, backend.key_prefix, alias),
        "leases": leases(client, backend.key_prefix),
    }


def _location(backend: ApeeCache) -> str:
    servers = backend._server
    first = servers[0] if isinstance(servers, (list, tuple)) else str(servers)
    return str(first).split("@")[-1]  # never print a password


def guarded(alias: str, gather: Any) -> dict[str, Any]:
    """Run ``gather(alias)``; turn a Redis failure into a StatsError."""
    try:
        result: dict[str, Any] = gather(alias)
    except (RedisError, OSError) as error:
        raise StatsError(f"cache {alias!r}: Redis unreachable: {error}") from error
    except Exception as error:
        if type(error).__name__ == "ConnectionInterrupted":
            raise StatsError(f"cache {alias!r}: Redis unreachable: {error}") from error
        raise
    return result
