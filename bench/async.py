"""Native async vs threads: ``aget`` hit cost, and a cold key under 2,000 coroutines.

One private redis-server, one process, one run; what matters is ratios.

1. **Hit cost**, in interleaved rounds so machine noise hits every case
   alike (median per call, microseconds):

   * ``cache.get(k)`` on ApeeCache (sync, the reference);
   * ``await cache.aget(k)`` on ApeeCache (native, ``redis.asyncio``);
   * ``await cache.aget(k)`` on django-redis (Django's default:
     ``sync_to_async(get)``, a thread hand-off per call);
   * ``await sync_to_async(apee.get)(k)`` (what ApeeCache did before).

2. **Cold key**: 2,000 coroutines call ``aget_or_set_stampede_safe`` on one
   absent key whose (sync) compute takes 0.3 s, on ApeeCache (native); on
   django-redis, the same coroutines do async cache-aside (``aget``, an
   ``async def`` compute, ``aset``: ``sync_to_async`` underneath, no
   stampede protection). Reported: computes, wall time / compute, the peak number of
   threads added, and event-loop lag: a 5 ms ticker's overshoot, p99.

Targets (issue 15): aget <= 1.20x sync get and <= 0.6x django-redis's aget;
cold key: 1 compute, lag p99 <= 20 ms, wall <= 3x the compute. Run::

    python bench/async.py [--rounds 15] [--calls 300] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django
from django.conf import settings

from tests.support.redis_server import RedisServer

COROUTINES = 2000
COMPUTE_S = 0.3
TICK_S = 0.005


def setup(url: str) -> None:
    settings.configure(
        SECRET_KEY="bench",
        INSTALLED_APPS=["django_apee"],
        CACHES={
            "default": {"BACKEND": "django_apee.cache.ApeeCache", "LOCATION": url},
            "redis": {
                "BACKEND": "django_redis.cache.RedisCache",
                "LOCATION": url,
                "KEY_PREFIX": "dr",
            },
        },
    )
    django.setup()


async def per_call(call: Any, calls: int) -> float:
    """Median seconds of one awaited ``call()``."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def sync_per_call(call: Any, calls: int) -> float:
    """Median seconds of a blocking ``call()`` (run on the loop's thread)."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def hits(rounds: int, calls: int) -> dict[str, float]:
    from asgiref.sync import sync_to_async
    from django.core.cache import caches

    apee, peer = caches["default"], caches["redis"]
    apee.set("hit", {"a": 1, "b": [1, 2, 3]}, 600)
    peer.set("hit", {"a": 1, "b": [1, 2, 3]}, 600)
    threaded = sync_to_async(apee.get, thread_sensitive=False)
    cases = {
        "apee get (sync)": lambda: sync_per_call(lambda: apee.get("hit"), calls),
        "apee aget (native)": lambda: per_call(lambda: apee.aget("hit"), calls),
        "django-redis aget (sync_to_async)": lambda: per_call(
            lambda: peer.aget("hit"), calls
        ),
        "apee get in sync_to_async (before)": lambda: per_call(
            lambda: threaded("hit"), calls
        ),
    }
    for measure in cases.values():  # warm: connections, scripts, the clock
        await measure()
    medians: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, measure in cases.items():
            medians[name].append(await measure())
    return {name: statistics.median(values) * 1e6 for name, values in medians.items()}


async def cold(name: str, key: str) -> dict[str, float]:
    from django.core.cache import caches

    cache = caches[name]
    computes = 0

    def compute() -> str:
        nonlocal computes
        computes += 1
        time.sleep(COMPUTE_S)
        return "value"

    async def compute_async() -> str:
        nonlocal computes
        computes += 1
        await asyncio.sleep(COMPUTE_S)
        return "value"

    if name == "default":

        def call() -> Any:
            return cache.aget_or_set_stampede_safe(key, compute, 60)

    else:
        # Cache-aside as async views write it. (Django's aget_or_set would
        # call a sync compute on the loop once per coroutine that missed:
        # 2,000 x 0.3 s with the loop blocked.)
        async def call() -> Any:
            value = await cache.aget(key)
            if value is None:
                value = await compute_async()
                await cache.aset(key, value, 60)
            return value

    lags: list[float] = []
    done = False

    async def ticker() -> None:
        while not done:
            planned = time.perf_counter() + TICK_S
            await asyncio.sleep(TICK_S)
            lags.append(max(0.0, time.perf_counter() - planned))

    threads_before = threading.active_count()
    peak = threads_before

    async def sample() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, threading.active_count())
            await asyncio.sleep(0.01)

    tasks = [asyncio.ensure_future(ticker()), asyncio.ensure_future(sample())]
    started = time.perf_counter()
    results = await asyncio.gather(*[call() for _ in range(COROUTINES)])
    wall = time.perf_counter() - started
    done = True
    await asyncio.gather(*tasks)
    assert results == ["value"] * COROUTINES
    lags.sort()
    return {
        "computes": computes,
        "wall_s": wall,
        "wall_over_compute": wall / COMPUTE_S,
        "threads_added": peak - threads_before,
        "lag_p99_ms": lags[int(len(lags) * 0.99) - 1] * 1000 if lags else 0.0,
        "lag_max_ms": lags[-1] * 1000 if lags else 0.0,
    }


async def run(rounds: int, calls: int) -> dict[str, Any]:
    hit = await hits(rounds, calls)
    sync_get = hit["apee get (sync)"]
    native = hit["apee aget (native)"]
    peer = hit["django-redis aget (sync_to_async)"]
    return {
        "hit_us": hit,
        "aget_over_get": native / sync_get,
        "aget_over_django_redis_aget": native / peer,
        "cold_apee": await cold("default", "cold-apee"),
        "cold_django_redis": await cold("redis", "cold-dr"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        setup(server.url)
        report = asyncio.run(run(args.rounds, args.calls))
    finally:
        server.close()
    print("hit, median per call:")
    for name, us in report["hit_us"].items():
        print(f"  {name:<38} {us:8.1f} us")
    print(
        f"  aget / sync get:            {report['aget_over_get']:.2f} (target <= 1.20)"
    )
    print(
        f"  aget / django-redis aget:   {report['aget_over_django_redis_aget']:.2f}"
        " (target <= 0.60)"
    )
    for label in ("cold_apee", "cold_django_redis"):
        c = report[label]
        print(
            f"{label}: {c['computes']} compute(s), wall {c['wall_s']:.2f} s "
            f"({c['wall_over_compute']:.1f}x compute), +{c['threads_added']} threads, "
            f"loop lag p99 {c['lag_p99_ms']:.1f} ms (max {c['lag_max_ms']:.1f})"
        )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
