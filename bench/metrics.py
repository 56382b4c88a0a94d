"""The hit-path cost of metrics: get latency with metrics on vs off, one run.

Two aliases on one private redis-server, identical but for
``OPTIONS["METRICS"]``; "on" feeds Prometheus (and django-prometheus's
counters when it is installed) and the fleet tally, "off" counts nothing.
Hits of plain ``get`` and of ``get_or_set_stampede_safe`` are timed in
interleaved rounds so machine noise hits both alike; the ratio of medians is
what matters. The in-process cost of the counting itself (no Redis) is
timed separately. Run::

    python bench/metrics.py [--rounds 20] [--calls 500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django
from django.conf import settings

from tests.support.redis_server import RedisServer


def setup(url: str) -> None:
    def alias(metrics: bool) -> dict:
        return {
            "BACKEND": "django_apee.cache.ApeeCache",
            "LOCATION": url,
            "OPTIONS": {"METRICS": metrics},
        }

    settings.configure(
        SECRET_KEY="bench",
        INSTALLED_APPS=["django_apee"],
        CACHES={"default": alias(True), "on": alias(True), "off": alias(False)},
    )
    django.setup()


def time_calls(call, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        call()
        out.append(time.perf_counter() - started)
    return out


def measure(rounds: int, calls: int) -> dict:
    from django.core.cache import caches

    cases = {}
    for name in ("on", "off"):
        cache = caches[name]
        cache.set("plain", {"id": 1, "name": "x" * 200}, 3600)
        cache.get_or_set_stampede_safe("safe", lambda: {"id": 2}, 3600)
        cases[("get", name)] = lambda cache=cache: cache.get("plain")
        cases[("get_or_set_stampede_safe", name)] = lambda cache=cache: (
            cache.get_or_set_stampede_safe("safe", dict, 3600)
        )
    samples: dict = {key: [] for key in cases}
    for call in cases.values():
        time_calls(call, 200)  # warm up: connections, scripts, children
    order = list(cases.items())
    for _ in range(rounds):
        for key, call in order:
            samples[key] += time_calls(call, calls)
        order.reverse()  # neither side always runs first
    result = {}
    for op in ("get", "get_or_set_stampede_safe"):
        on = statistics.median(samples[(op, "on")])
        off = statistics.median(samples[(op, "off")])
        result[op] = {
            "median_us_on": round(on * 1e6, 1),
            "median_us_off": round(off * 1e6, 1),
            "ratio_on_off": round(on / off, 3),
        }
    return result


def counting_cost() -> dict:
    """What the counting itself costs per call, without Redis (ns)."""
    from django_apee.observe import metrics

    hits = metrics.HITS.labels(cache="on")
    number = 200_000
    gets = timeit.timeit(lambda: metrics.count_gets("on", 1, 0), number=number)
    one = timeit.timeit(hits.inc, number=number)
    empty = timeit.timeit(lambda: None, number=number)
    return {
        "count_gets_ns": round((gets - empty) / number * 1e9),
        "stampede_hit_inc_ns": round((one - empty) / number * 1e9),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    server = RedisServer().start()
    try:
        setup(server.url)
        result = {
            "latency": measure(args.rounds, args.calls),
            "counting": counting_cost(),
        }
    finally:
        server.close()
    print(f"{'operation':<28}{'on µs':>9}{'off µs':>9}{'on/off':>9}")
    for op, row in result["latency"].items():
        print(
            f"{op:<28}{row['median_us_on']:>9}{row['median_us_off']:>9}"
            f"{row['ratio_on_off']:>9}"
        )
    counting = result["counting"]
    print(
        f"counting alone: count_gets {counting['count_gets_ns']} ns, "
        f"one stampede hit {counting['stampede_hit_inc_ns']} ns"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
