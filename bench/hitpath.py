"""The hit path: django-apee's hits against django-redis's and Django's, one run.

Three reads of values that are in the cache, on four payloads (a ~200 B
dict, a ~10 KB JSON-like dict, 100 ``values()`` rows with datetimes and
Decimals, a ~20 KB HTML fragment):

``get``          one key;
``get_many``     20 keys of that payload;
``safe hit``     django-apee's ``get_or_set_stampede_safe``, and the peers'
                 ``get_or_set`` (what a caller would use instead), on a key
                 that is present.

Every backend uses its default OPTIONS and talks to one private redis-server
started here (persistence off; never the machine's shared Redis). Rounds are
interleaved: in each round every (payload, read) is timed for every backend,
the backends in a new random order, so the load of a shared machine falls on
all of them alike; the figure is the median over rounds of the mean µs per
call, and the ratio is to django-redis *in the same run*. As ``timeit``
does, the garbage collector is off inside each timed batch (and run before
it).

Run::

    python bench/hitpath.py [--rounds 15] [--calls 100] [--json out.json]

Other columns: add an entry to :data:`CANDIDATES` (alias, label, CACHES
entry); every candidate gets a column and a ratio to django-redis. The near
cache's column is one (``"OPTIONS": {"NEAR_CACHE": True}``): its ``get``,
``get_many`` and stampede-safe hits are answered from process memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import django
from django.conf import settings

from bench.storage import html_fragment, json_like_dict, queryset_rows
from tests.support.redis_server import RedisServer

#: The reference every ratio is to.
REFERENCE = "django_redis"
#: (alias, label, CACHES entry without LOCATION). Add a column here.
CANDIDATES: list[tuple[str, str, dict[str, Any]]] = [
    ("django_redis", "django-redis", {"BACKEND": "django_redis.cache.RedisCache"}),
    (
        "django",
        "Django RedisCache",
        {"BACKEND": "django.core.cache.backends.redis.RedisCache"},
    ),
    ("apee", "django-apee", {"BACKEND": "django_apee.cache.ApeeCache"}),
    (
        "apee_near",
        "django-apee + near",
        {"BACKEND": "django_apee.cache.ApeeCache", "OPTIONS": {"NEAR_CACHE": True}},
    ),
]
TIMEOUT = 3600
MANY = 20


def small_dict(rng: random.Random) -> dict[str, Any]:
    """About 200 bytes pickled: a user's profile summary, say."""
    return {
        "id": rng.randint(1, 10**6),
        "username": "user_" + str(rng.randint(1, 10**6)),
        "email": "someone@example.com",
        "is_staff": False,
        "groups": ["editors", "reviewers"],
        "score": round(rng.uniform(0, 100), 2),
        "last_seen": "2026-11-26T12:00:00Z",
    }


def payloads() -> dict[str, Any]:
    rng = random.Random(42)
    return {
        "200 B dict": small_dict(rng),
        "10 KB JSON-like dict": json_like_dict(rng),
        "100 rows (datetimes, Decimals)": queryset_rows(rng),
        "20 KB HTML": html_fragment(rng),
    }


def configure(url: str) -> None:
    settings.configure(
        SECRET_KEY="bench",
        CACHES={
            alias: {**entry, "LOCATION": url, "TIMEOUT": TIMEOUT, "KEY_PREFIX": alias}
            for alias, _, entry in CANDIDATES
        },
    )
    django.setup()


def reads(
    cache: Any, alias: str, name: str, value: Any
) -> dict[str, Callable[[], Any]]:
    """The three reads of one payload on one backend, each a no-argument call."""
    slug = "".join(c if c.isalnum() else "_" for c in name)
    key = f"hit:{slug}"
    keys = [f"many:{slug}:{i}" for i in range(MANY)]
    cache.set(key, value, TIMEOUT)
    cache.set_many(dict.fromkeys(keys, value), TIMEOUT)

    def compute() -> Any:
        raise AssertionError("a hit must not compute")

    if hasattr(cache, "get_or_set_stampede_safe"):

        def safe() -> Any:
            return cache.get_or_set_stampede_safe(key, compute, TIMEOUT)

    else:

        def safe() -> Any:
            return cache.get_or_set(key, compute, TIMEOUT)

    safe()  # the stampede-safe entry (written by set above) is a hit
    assert cache.get(key) == value, f"{alias}: {name} did not round-trip"
    assert len(cache.get_many(keys)) == MANY, f"{alias}: get_many missed"
    return {
        "get": lambda: cache.get(key),
        f"get_many({MANY})": lambda: cache.get_many(keys),
        "safe hit": safe,
    }


def settle(cache: Any) -> None:
    """A near cache's tracking connection up before its first read, so reads
    fill it from the start (it serves nothing until Redis confirms)."""
    near = getattr(getattr(cache, "runtime", None), "near", None)
    if near is None:
        return
    near.tracker.ensure()
    deadline = time.monotonic() + 10
    while not near.tracker.live(time.monotonic()):
        assert time.monotonic() < deadline, "near cache tracking never came up"
        time.sleep(0.005)


def run(rounds: int, calls: int) -> dict[str, Any]:
    from django.core.cache import caches

    aliases = [alias for alias, _, _ in CANDIDATES]
    for alias in aliases:
        settle(caches[alias])
    table: dict[str, dict[str, dict[str, Callable[[], Any]]]] = {}
    for name, value in payloads().items():
        for alias in aliases:
            for read, call in reads(caches[alias], alias, name, value).items():
                table.setdefault(f"{name} / {read}", {})[alias] = call
    samples: dict[str, dict[str, list[float]]] = {
        row: {alias: [] for alias in aliases} for row in table
    }
    timer = time.perf_counter
    for _ in range(rounds):
        for row, calls_of in table.items():
            for alias in random.sample(aliases, len(aliases)):
                call = calls_of[alias]
                n = calls if "get_many" not in row else max(1, calls // 5)
                # As timeit does: no garbage collection inside a timed batch
                # (a full collection landing in one backend's 20 ms batch of
                # get_many calls made that row swing 3x between runs).
                gc.collect()
                gc.disable()
                try:
                    started = timer()
                    for _ in range(n):
                        call()
                    samples[row][alias].append((timer() - started) / n * 1e6)
                finally:
                    gc.enable()
    return {
        "labels": {alias: label for alias, label, _ in CANDIDATES},
        "rounds": rounds,
        "calls": calls,
        "rows": {
            row: {alias: statistics.median(s) for alias, s in by_alias.items()}
            for row, by_alias in samples.items()
        },
    }


def print_report(report: dict[str, Any]) -> None:
    labels = report["labels"]
    others = [alias for alias in labels if alias != REFERENCE]
    print(
        f"Hits, µs per call: median of {report['rounds']} interleaved rounds; "
        f"ratio to {labels[REFERENCE]} in this run\n"
    )
    header = f"{'payload / read':46}" + "".join(f"{labels[a]:>19}" for a in labels)
    header += "".join(f"{'x ' + labels[a][:17]:>20}" for a in others)
    print(header)
    for row, figures in report["rows"].items():
        line = f"{row:46}" + "".join(f"{figures[a]:>19.1f}" for a in labels)
        line += "".join(f"{figures[a] / figures[REFERENCE]:>20.2f}" for a in others)
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    server = RedisServer().start()
    try:
        configure(server.url)
        report = run(args.rounds, args.calls)
    finally:
        server.close()
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
