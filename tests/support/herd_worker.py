"""A child process running cache-aside code (get, compute, set) on one key.

Run as ``python -m tests.support.herd_worker`` with ``DJANGO_SETTINGS_MODULE`` set;
it reads a JSON job from argv[1]: the cache OPTIONS, the key, timeout,
compute seconds, thread count, how long to run, and the names of two raw
Redis keys for the start: each process INCRs ``ready`` once Django is up
and its cache connected, then waits for the parent to write the wall-clock
start under ``go``. So a process slow to start (a loaded machine) delays
the run instead of missing it. Each compute INCRs a raw counter in Redis,
so the parent counts computes fleet-wide. Prints one JSON line: reads,
misses, errors.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import django


def main() -> None:
    job = json.loads(sys.argv[1])
    django.setup()
    from django.conf import settings
    from django.core.cache import caches

    from tests.support import target

    settings.CACHES["herd"] = target.cache_config(job["options"])
    counter = job["counter"]
    raw = caches["herd"].client.get_client(write=True)
    raw.incr(job["ready"])
    waited_until = time.monotonic() + 120
    while (go := raw.get(job["go"])) is None:
        if time.monotonic() > waited_until:
            sys.exit("no start signal from the parent within 120 s")
        time.sleep(0.005)
    start = float(go)
    end = start + job["seconds"]
    lock = threading.Lock()
    totals = {"reads": 0, "misses": 0, "errors": 0}

    def body() -> None:
        cache = caches["herd"]
        raw = cache.client.get_client(write=True)
        reads = misses = errors = 0
        while time.time() < start:
            time.sleep(0.001)
        while time.time() < end:
            try:
                value = cache.get(job["key"])
                reads += 1
                if value is None:
                    misses += 1
                    generation = raw.incr(counter)
                    time.sleep(job["compute"])
                    cache.set(job["key"], f"generation {generation}", job["timeout"])
            except Exception:
                errors += 1
            time.sleep(job.get("pause", 0.002))
        with lock:
            totals["reads"] += reads
            totals["misses"] += misses
            totals["errors"] += errors

    threads = [threading.Thread(target=body) for _ in range(job["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(end - time.time() + 30)
    print(json.dumps(totals), flush=True)


if __name__ == "__main__":
    main()
