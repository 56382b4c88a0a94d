"""Stored bytes and hit/set latency: ApeeCache vs django-redis, one run.

Every backend talks to the same private redis-server, started here, with the
same payloads: django-redis as configured by default (pickle) and with zlib,
ApeeCache by default (signed pickle + zstd), with CODEC msgpack, with lz4
and uncompressed:

- a ~10 KB JSON-like dict (nested records of str, int, float, bool, None);
- 100 rows as ``QuerySet.values()`` returns them (datetime, Decimal, str ...);
- a ~20 KB rendered HTML fragment (a ``SafeString``).

Latency is the median and p99 of many single calls, interleaved between the
backends in rounds so that machine noise hits both alike; the ratio is what
matters. Run::

    python bench/storage.py [--rounds 20] [--calls 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import statistics
import sys
import time
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django
from django.conf import settings

from tests.support.redis_server import RedisServer

#: alias -> what it is, for tables and charts.
LABELS = {
    "django_redis": "django-redis (pickle)",
    "django_redis_zlib": "django-redis + zlib",
    "apee": "django-apee (pickle + zstd)",
    "apee_msgpack": "django-apee, msgpack",
    "apee_lz4": "django-apee, lz4",
    "apee_uncompressed": "django-apee, uncompressed",
}


def json_like_dict(rng: random.Random, target: int = 10_000) -> dict:
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "zeta"]
    data: dict = {"version": 3, "generated": "2026-11-26T12:00:00Z", "items": []}
    while len(json.dumps(data)) < target:
        data["items"].append(
            {
                "id": rng.randint(1, 10**6),
                "name": " ".join(rng.choices(words, k=3)),
                "price": round(rng.uniform(1, 500), 2),
                "in_stock": rng.random() > 0.3,
                "tags": rng.sample(words, 3),
                "rating": None if rng.random() < 0.2 else rng.randint(1, 5),
            }
        )
    return data


def queryset_rows(rng: random.Random, n: int = 100) -> list[dict]:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    return [
        {
            "id": i,
            "title": f"Order {i} for customer {rng.randint(1, 5000)}",
            "created": start + dt.timedelta(seconds=rng.randint(0, 10**7)),
            "total": Decimal(rng.randint(100, 10**6)) / 100,
            "status": rng.choice(["new", "paid", "shipped", "cancelled"]),
            "customer_id": rng.randint(1, 5000),
        }
        for i in range(n)
    ]


def html_fragment(rng: random.Random, target: int = 20_000):
    from django.utils.safestring import mark_safe

    rows = []
    while sum(map(len, rows)) < target:
        n = rng.randint(1, 10**5)
        rows.append(
            f'<tr class="row"><td><a href="/products/{n}/">Product {n}</a></td>'
            f'<td class="price">{rng.uniform(1, 500):.2f}</td>'
            f"<td>{rng.choice(['In stock', 'Sold out', 'Pre-order'])}</td></tr>\n"
        )
    return mark_safe('<table class="products">\n' + "".join(rows) + "</table>")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(cache, key: str, value, rounds_out: dict, calls: int) -> None:
    timer = time.perf_counter
    sets, gets = rounds_out.setdefault("set", []), rounds_out.setdefault("get", [])
    for _ in range(calls):
        t0 = timer()
        cache.set(key, value, 600)
        t1 = timer()
        got = cache.get(key)
        t2 = timer()
        sets.append(t1 - t0)
        gets.append(t2 - t1)
    assert got == value, f"{key}: the value did not round-trip"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    server = RedisServer().start()
    try:
        settings.configure(
            SECRET_KEY="bench",
            CACHES={
                "apee": {
                    "BACKEND": "django_apee.cache.ApeeCache",
                    "LOCATION": server.url,
                },
                "apee_msgpack": {
                    "BACKEND": "django_apee.cache.ApeeCache",
                    "LOCATION": server.url,
                    "OPTIONS": {"CODEC": "msgpack"},
                },
                "apee_uncompressed": {
                    "BACKEND": "django_apee.cache.ApeeCache",
                    "LOCATION": server.url,
                    "OPTIONS": {"COMPRESSION": "none"},
                },
                "apee_lz4": {
                    "BACKEND": "django_apee.cache.ApeeCache",
                    "LOCATION": server.url,
                    "OPTIONS": {"COMPRESSION": "lz4"},
                },
                "django_redis": {
                    "BACKEND": "django_redis.cache.RedisCache",
                    "LOCATION": server.url,
                },
                "django_redis_zlib": {
                    "BACKEND": "django_redis.cache.RedisCache",
                    "LOCATION": server.url,
                    "OPTIONS": {
                        "COMPRESSOR": "django_redis.compressors.zlib.ZlibCompressor"
                    },
                },
            },
        )
        django.setup()
        report = run(server, args.rounds, args.calls)
    finally:
        server.close()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


def run(server: RedisServer, rounds: int, calls: int) -> dict:
    import redis
    from django.core.cache import caches

    rng = random.Random(42)
    payloads = {
        "10 KB JSON-like dict": json_like_dict(rng),
        "100 rows (values())": queryset_rows(rng),
        "20 KB HTML fragment": html_fragment(rng),
    }
    raw = redis.Redis.from_url(server.url)
    aliases = [
        "django_redis",
        "django_redis_zlib",
        "apee",
        "apee_msgpack",
        "apee_lz4",
        "apee_uncompressed",
    ]
    report: dict = {"labels": {alias: LABELS[alias] for alias in aliases}}
    report["payloads"] = {}
    for name, value in payloads.items():
        entry: dict = {"bytes": {}, "latency_us": {}}
        samples: dict = {alias: {} for alias in aliases}
        for _ in range(rounds):
            for alias in random.sample(aliases, len(aliases)):
                measure(caches[alias], f"bench:{alias}", value, samples[alias], calls)
        for alias in aliases:
            made = caches[alias].make_key(f"bench:{alias}")
            entry["bytes"][alias] = raw.strlen(made)
            entry["latency_us"][alias] = {
                op: {
                    "p50": statistics.median(s) * 1e6,
                    "p99": percentile(s, 0.99) * 1e6,
                }
                for op, s in samples[alias].items()
            }
        report["payloads"][name] = entry
    raw.close()
    return report


def print_report(report: dict) -> None:
    print("Stored bytes (ratio to django-redis default pickle)")
    for name, entry in report["payloads"].items():
        base = entry["bytes"]["django_redis"]
        cells = "  ".join(
            f"{alias}={size} ({size / base:.2f})"
            for alias, size in entry["bytes"].items()
        )
        print(f"  {name:24} {cells}")
    print("\nLatency, microseconds p50 / p99 (p50 ratio to django-redis default)")
    for name, entry in report["payloads"].items():
        lat = entry["latency_us"]
        for op in ("get", "set"):
            base = lat["django_redis"][op]["p50"]
            cells = "  ".join(
                f"{alias}={v[op]['p50']:.0f}/{v[op]['p99']:.0f} "
                f"({v[op]['p50'] / base:.2f})"
                for alias, v in lat.items()
            )
            print(f"  {name:24} {op}  {cells}")


if __name__ == "__main__":
    main()
