"""A child process running cache-aside code (get, compute, set) on one key.

Run as ``python -m tests.support.herd_worker`` with ``DJANGO_SETTINGS_MODULE`` set;
it reads a JSON job from argv[1]: the cache OPTIONS, the key, timeout,
compute seconds, thread count, and the wall-clock start and end shared by
every process. Each compute INCRs a raw counter in Redis, so the parent
counts computes fleet-wide. Prints one JSON line: reads, misses, errors.
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

    settings.CACHES["herd"] = {
        "BACKEND": "django_apee.cache.ApeeCache",
        "LOCATION": settings.REDIS_URL,
        "OPTIONS": job["options"],
    }
    counter = job["counter"]
    lock = threading.Lock()
    totals = {"reads": 0, "misses": 0, "errors": 0}

    def body() -> None:
        cache = caches["herd"]
        raw = cache.client.get_client(write=True)
        reads = misses = errors = 0
        while time.time() < job["start"]:
            time.sleep(0.001)
        while time.time() < job["end"]:
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
        thread.join(job["end"] - time.time() + 30)
    print(json.dumps(totals), flush=True)


if __name__ == "__main__":
    main()
