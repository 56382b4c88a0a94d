"""The near cache: what a hit costs, and how soon another process's write is seen.

1. **Hits**, µs per ``cache.get`` of a key that is there, on four payloads
   (~200 B dict, ~10 KB JSON-like dict, 100 ``values()`` rows with datetimes
   and Decimals, ~20 KB HTML fragment): django-redis's RedisCache, ApeeCache
   with default OPTIONS, ApeeCache with ``NEAR_CACHE: True``. Interleaved:
   every round runs each candidate's batch of gets, in a new random order,
   so machine noise hits them alike; the figure is the median of the rounds'
   per-get means, and the ratio is to django-redis in the same run.
2. **Coherence**: another process (``--writer``, a plain ApeeCache without
   the near cache) sets one key ``--writes`` times, at random 2-20 ms gaps,
   and records when each ``set`` returned; this process reads the key with
   the near cache on, every ``--poll`` seconds, and records when it first
   sees each new value. Both use ``time.monotonic()``, one clock for every
   process of a Linux host. The delay is seen minus written: p50, p99, max
   and a text histogram. A poll gap bounds the resolution (it is added to
   every figure: a web process is not a tight loop either). Also when the
   tracking thread handled each invalidation: the near cache's own window,
   without the reader's wake-up and Redis read.

Run::

    python bench/nearcache.py [--rounds 30] [--calls 200] [--writes 300]
        [--poll 0.0002] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django
from django.conf import settings

from bench.storage import html_fragment, json_like_dict, queryset_rows
from tests.support.redis_server import RedisServer

CANDIDATES = {
    "django-redis": ("django_redis.cache.RedisCache", {}),
    "apee": ("django_apee.cache.ApeeCache", {}),
    "apee + near": ("django_apee.cache.ApeeCache", {"NEAR_CACHE": True}),
}
KEY = "bench:near"


def configure(url: str) -> None:
    settings.configure(
        SECRET_KEY="bench-nearcache",
        INSTALLED_APPS=["django_apee"],
        CACHES={
            "default": {"BACKEND": "django_apee.cache.ApeeCache", "LOCATION": url},
            **{
                name: {
                    "BACKEND": backend,
                    "LOCATION": url,
                    "OPTIONS": options,
                    "KEY_PREFIX": f"c{i}",
                }
                for i, (name, (backend, options)) in enumerate(CANDIDATES.items())
            },
        },
    )
    django.setup()


def payloads() -> dict[str, Any]:
    rng = random.Random(42)
    return {
        "200 B dict": {
            "id": 42,
            "name": "a product with a name",
            "price": "19.99",
            "tags": ["alpha", "beta", "gamma"],
            "in_stock": True,
            "rating": 4,
            "seller": {"id": 7, "name": "someone", "country": "DE"},
        },
        "10 KB JSON-like dict": json_like_dict(rng),
        "100 rows (values())": queryset_rows(rng),
        "20 KB HTML fragment": html_fragment(rng),
    }


def bench_hits(rounds: int, calls: int) -> dict[str, dict[str, float]]:
    from django.core.cache import caches

    report: dict[str, dict[str, float]] = {}
    for name, value in payloads().items():
        for candidate in CANDIDATES:
            caches[candidate].set(KEY, value, 3600)
            assert caches[candidate].get(KEY) == value
        near = caches["apee + near"].runtime.near
        deadline = time.monotonic() + 5
        while near.store.get(caches["apee + near"].make_key(KEY)) is None:
            assert time.monotonic() < deadline, "the near cache never filled"
            caches["apee + near"].get(KEY)
            time.sleep(0.001)
        per_get: dict[str, list[float]] = {c: [] for c in CANDIDATES}
        for _ in range(rounds):
            for candidate in random.sample(list(CANDIDATES), len(CANDIDATES)):
                get = caches[candidate].get
                started = time.perf_counter()
                for _ in range(calls):
                    get(KEY)
                per_get[candidate].append((time.perf_counter() - started) / calls)
        row = {c: statistics.median(s) * 1e6 for c, s in per_get.items()}
        report[name] = row
    return report


# -- coherence --------------------------------------------------------------------


def writer(url: str, writes: int) -> None:
    """The other process: set the key ``writes`` times, say when each landed."""
    settings.configure(
        SECRET_KEY="bench-nearcache",
        INSTALLED_APPS=["django_apee"],
        CACHES={
            "default": {
                "BACKEND": "django_apee.cache.ApeeCache",
                "LOCATION": url,
                "KEY_PREFIX": f"c{list(CANDIDATES).index('apee + near')}",
            }
        },
    )
    django.setup()
    from django.core.cache import cache

    rng = random.Random(7)
    print("READY", flush=True)
    sys.stdin.readline()
    written = []
    for i in range(1, writes + 1):
        cache.set(KEY, {"n": i}, 3600)
        written.append(time.monotonic())
        time.sleep(rng.uniform(0.002, 0.02))
    print(json.dumps(written), flush=True)


def bench_coherence(url: str, writes: int, poll: float) -> dict[str, Any]:
    from django.core.cache import caches

    cache = caches["apee + near"]
    cache.set(KEY, {"n": 0}, 3600)
    child = subprocess.Popen(
        [sys.executable, __file__, "--writer", url, "--writes", str(writes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "READY"
    seen: dict[int, float] = {}
    near = cache.runtime.near
    near_hits_before = near.store.figures()
    # Instrumentation: when the tracking thread handled each invalidation of
    # the key (the end of the near cache's own staleness window; what the
    # polling reader adds on top is its wake-up and a Redis read).
    made = str(cache.make_key(KEY))
    handled: list[float] = []
    invalidate = near.tracker._on_invalidate

    def recording(keys: list[str] | None) -> None:
        if keys is not None and made in keys:
            handled.append(time.monotonic())
        invalidate(keys)

    near.tracker._on_invalidate = recording
    child.stdin.write("go\n")
    child.stdin.flush()
    last = 0
    deadline = time.monotonic() + writes * 0.05 + 30
    while last < writes and time.monotonic() < deadline:
        value = cache.get(KEY)
        now = time.monotonic()
        n = value["n"] if value else last
        if n != last:
            for skipped in range(last + 1, n + 1):
                seen.setdefault(skipped, now)
            last = n
        time.sleep(poll)
    written = json.loads(child.stdout.readline())
    child.wait(timeout=30)
    near.tracker._on_invalidate = invalidate
    delays = sorted(
        (seen[i] - written[i - 1]) * 1000 for i in range(1, writes + 1) if i in seen
    )
    # One invalidation per write (the first set, before "go", came earlier).
    handled = handled[-writes:]
    handling = sorted(
        (at - wrote) * 1000 for at, wrote in zip(handled, written, strict=False)
    )
    return {
        "writes": writes,
        "seen": len(delays),
        "poll_ms": poll * 1000,
        "p50_ms": quantile(delays, 0.50),
        "p99_ms": quantile(delays, 0.99),
        "max_ms": delays[-1] if delays else None,
        "delays_ms": delays,
        "handled_p50_ms": quantile(handling, 0.50),
        "handled_p99_ms": quantile(handling, 0.99),
        "handled_max_ms": handling[-1] if handling else None,
        "written": written,
        "near": {"before": near_hits_before, "after": cache.runtime.near.figures()},
    }


def quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return sorted_values[index]


def histogram(delays: list[float]) -> str:
    bounds = [0.25, 0.5, 1, 2, 3, 5, 10, 20, 50, float("inf")]
    counts = [0] * len(bounds)
    for delay in delays:
        for i, bound in enumerate(bounds):
            if delay <= bound:
                counts[i] += 1
                break
    widest = max(counts) or 1
    lines = []
    lower = "-inf"
    for bound, count in zip(bounds, counts, strict=True):
        label = f"{lower:>5} .. {bound:<5}" if bound != float("inf") else f"> {lower}"
        bar = "#" * round(40 * count / widest)
        lines.append(f"  {label:>16} ms  {count:5}  {bar}")
        lower = f"{bound:g}"
    return "\n".join(lines)


def print_report(report: dict[str, Any]) -> None:
    print("1. get hit, µs per call (median of rounds); ratio to django-redis\n")
    names = list(CANDIDATES)
    print(f"  {'payload':24}" + "".join(f"{n:>16}" for n in names) + "   near/redis")
    for payload, row in report["hits"].items():
        cells = "".join(f"{row[n]:>16.1f}" for n in names)
        ratio = row["apee + near"] / row["django-redis"]
        print(f"  {payload:24}{cells}   {ratio:10.3f}x")
    coherence = report["coherence"]
    print(
        f"\n2. coherence: {coherence['seen']} of {coherence['writes']} writes by "
        f"another process seen; poll every {coherence['poll_ms']:.2f} ms\n"
    )
    print(
        f"  p50 {coherence['p50_ms']:.2f} ms   p99 {coherence['p99_ms']:.2f} ms   "
        f"max {coherence['max_ms']:.2f} ms\n"
    )
    print(histogram(coherence["delays_ms"]))
    print(
        f"\n  invalidation handled by the tracking thread (the near cache's own "
        f"window):\n  p50 {coherence['handled_p50_ms']:.2f} ms   "
        f"p99 {coherence['handled_p99_ms']:.2f} ms   "
        f"max {coherence['handled_max_ms']:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--poll", type=float, default=0.0002)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--writer", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.writer:
        writer(args.writer, args.writes)
        return
    server = RedisServer().start()
    try:
        configure(server.url)
        report = {
            "hits": bench_hits(args.rounds, args.calls),
            "coherence": bench_coherence(server.url, args.writes, args.poll),
        }
    finally:
        server.close()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
