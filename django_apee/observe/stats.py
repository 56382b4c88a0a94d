"""What ``manage.py apee_stats`` reports, gathered as plain dicts.

The command only formats; everything here returns JSON-ready data (the shape
is ``stats.schema.json``) so tests check numbers, not text. Every Redis call
is bounded: SCAN with a cap (never KEYS), short socket timeouts come from the
alias's OPTIONS, and a server that forbids a command yields "unknown" rather
than an exception.
"""

from __future__ import annotations

import math
import pickle
from typing import TYPE_CHECKING, Any

from django_apee.core import keys, policy
from django_apee.core.codec import unpack
from django_apee.core.wire import CODEC_PICKLE, DecodeError, describe, peek_meta
from django_apee.observe import metrics
from django_apee.observe.server import UNKNOWN, ratio
from django_apee.observe.text import printable, text
from django_apee.store import fleet, lease

if TYPE_CHECKING:
    from redis import Redis

    from django_apee.core.envelope import Envelope

SCHEMA_VERSION = 1
#: How far back the fleet rates look, in minute buckets (the current one too).
WINDOW_MINUTES = 5
#: Key prefixes (after KEY_PREFIX:VERSION:) whose rest is a bearer token:
#: Django's session keys. ``--scan`` shows them masked.
SECRET_KEY_PARTS = (
    "django.contrib.sessions.cache",
    "django.contrib.sessions.cached_db",
)
#: How much of a value ``--show-value`` prints.
SHOWN_VALUE_CHARS = 2000


class StatsError(Exception):
    """Something the command reports and exits non-zero on (no traceback)."""


# -- the fleet's counters --------------------------------------------------------------


def _ints(raw: dict[Any, Any]) -> dict[str, int]:
    return {text(k): int(v) for k, v in raw.items()}


def fleet_counters(
    client: Redis, key_prefix: str, alias: str, window_minutes: int = WINDOW_MINUTES
) -> dict[str, Any]:
    """Totals since the first flush, and the last few minutes' counts and rates.

    On a cluster every shard of the counters is read and summed
    (``fleet.SHARDS``). The window is the last ``window_minutes`` minute
    buckets by Redis's clock,
    the current (partial) minute included; rates divide by its real length,
    or by the time since the fleet's first flush if that is shorter.
    """
    seconds, micros = client.time()
    minute = int(seconds) // 60
    pipeline = client.pipeline(transaction=False)
    shards = fleet.shards_of(client)  # one, except on a cluster
    for shard in shards:
        pipeline.hgetall(fleet.stats_key(key_prefix, alias, shard))
        for back in range(window_minutes):
            pipeline.hgetall(fleet.minute_key(key_prefix, alias, minute - back, shard))
    answers = pipeline.execute()
    totals: dict[str, int] = {}
    window: dict[str, int] = {}
    starts = []
    for index, answer in enumerate(answers):
        fields = _ints(answer)
        if index % (window_minutes + 1) == 0:  # a shard's totals
            if "_since" in fields:
                starts.append(fields.pop("_since"))
            into = totals
        else:
            into = window
        for field, amount in fields.items():
            into[field] = into.get(field, 0) + amount
    now = int(seconds) + int(micros) / 1e6
    elapsed = (window_minutes - 1) * 60 + now % 60
    since = min(starts) if starts else None
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


def sum_of(fields: dict[str, int], prefix: str) -> int:
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
        "computes_per_minute": round(sum_of(fields, "computes") * 60 / seconds, 3),
        "fallbacks_per_minute": round(sum_of(fields, "fallbacks") * 60 / seconds, 3),
        "redis_errors_per_minute": round(
            fields.get("redis_errors", 0) * 60 / seconds, 3
        ),
    }


def ratios(fields: dict[str, int]) -> dict[str, float | None]:
    """Hit ratios, the stale and near-cache shares of hits, the lease-wait p95."""
    hits, misses = fields.get("hits", 0), fields.get("misses", 0)
    s_hits = fields.get("stampede_hits", 0)
    s_misses = fields.get("stampede_misses", 0)
    return {
        "hit_ratio": ratio(hits, hits + misses),
        "stampede_hit_ratio": ratio(s_hits, s_hits + s_misses),
        "stale_share": ratio(fields.get("stale_served", 0), s_hits),
        # Of the get hits, those the near cache answered from process memory.
        "near_share": ratio(fields.get("near_hits", 0), hits),
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
    found: list[bytes | str] = []  # as Redis names them: maybe not UTF-8
    cursor, calls = 0, 0
    while True:
        cursor, batch = client.scan(cursor, match="*apee:lease*", count=1000)
        calls += 1
        for raw in batch:
            value_key = value_key_of(text(raw))
            if value_key is not None and value_key.startswith(f"{key_prefix}:"):
                found.append(raw)
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


def lease_of(
    client: Redis, lease_key: str | bytes, now_ms: int
) -> dict[str, Any] | None:
    """Holder, age and remaining life of one lease; None when not held."""
    pipeline = client.pipeline(transaction=False)
    pipeline.get(lease_key)
    pipeline.pttl(lease_key)
    token, pttl = pipeline.execute()
    if token is None:
        return None
    parsed = keys.parse_lease_token(text(token))
    return {
        "key": value_key_of(text(lease_key)),
        "holder": f"{parsed[0]}:{parsed[1]}" if parsed else UNKNOWN,
        "age_seconds": round((now_ms - parsed[2]) / 1000, 3) if parsed else None,
        "ttl_ms": int(pttl),
    }


# -- one entry -------------------------------------------------------------------------


def inspect_entry(
    client: Redis,
    made: str,
    envelope: Envelope,
    rules: policy.Policy,
    *,
    show_value: bool = False,
) -> dict[str, Any]:
    """Everything about one entry: bytes, codec, timing, state and lease.

    The value is described from its header and its verified, decompressed
    payload; it is turned back into a Python object (unpickled, say) only
    with ``show_value``, and then shown as an escaped, shortened ``repr``.
    """
    raw, pttl = lease.read(client, made)  # atomically, as the hit path reads
    now_ms = _now_ms(client)
    result: dict[str, Any] = {
        "redis_key": made,
        "lease": lease_of(client, keys.companion(made, keys.LEASE), now_ms),
    }
    if raw is None:
        return {**result, "state": "absent", "encoding": None}
    result.update(stored_bytes=len(raw), pttl_ms=int(pttl))
    result.update(_describe_bytes(envelope, made, raw, show_value))
    meta = peek_meta(raw)
    result.update(_timing(meta, int(pttl)))
    if result["encoding"] == "unreadable":
        result["state"] = "unreadable"
    else:
        # Its stored XFetch draw decides, as for every reader; without one,
        # a draw of 0 (never early) shows the plain soft/hard state.
        rand = policy.xfetch_rand(meta, 0.0)
        result["state"] = policy.state(meta, int(pttl), policy=rules, rand=rand).value
    return result


def _describe_bytes(
    envelope: Envelope, made: str, raw: bytes, show_value: bool
) -> dict[str, Any]:
    header = describe(raw)
    if header is None:
        try:
            value = envelope.decode(raw, key=made).value  # a raw int, or unreadable
        except DecodeError as error:
            return {"encoding": "unreadable", "error": error.reason}
        found = {"encoding": "raw-int", "raw_bytes": len(raw)}
        return {**found, "value": repr(value)} if show_value else found
    try:
        opened = envelope.open(raw, key=made)
    except DecodeError as error:
        return {"encoding": "unreadable", "error": error.reason}
    found = {
        "encoding": "envelope",
        "codec": header.codec,
        "compression": header.compression,
        "raw_bytes": len(opened.payload),
    }
    if show_value:
        value = (
            pickle.loads(opened.payload)  # its MAC verified in open()
            if opened.codec == CODEC_PICKLE
            else unpack(opened.payload)
        )
        found["value"] = printable(repr(value)[:SHOWN_VALUE_CHARS])
    return found


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


def mask_secret(name: str) -> str:
    """A key name with a session key's token replaced by ``***``."""
    for part in SECRET_KEY_PARTS:
        at = name.find(part)
        if at >= 0 and len(name) > at + len(part):
            return name[: at + len(part)] + "***"
    return name


def scan_top(
    client: Redis, pattern: str, top: int, *, max_keys: int = 100_000
) -> dict[str, Any]:
    """The ``top`` largest keys matching ``pattern`` (SCAN + MEMORY USAGE, bounded).

    Session keys come back masked: their names are bearer tokens.
    """
    sizes: list[tuple[int, bytes | str]] = []
    scanned = 0
    cursor = 0
    while True:
        cursor, batch = client.scan(cursor, match=pattern, count=1000)
        names = list(batch)[: max_keys - scanned]  # bytes: need not be UTF-8
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
        "top": [
            {"key": mask_secret(text(name)), "memory_bytes": size}
            for size, name in sizes
        ],
    }
