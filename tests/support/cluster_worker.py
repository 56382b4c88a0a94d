"""Child process for the cluster failover test: load on three hot keys.

``python -m tests.support.cluster_worker '<json spec>'`` sets Django up with
``tests.settings``, adds the spec's alias on the cluster (``urls``, with
``ApeeClusterClient``), warms up, prints ``READY`` and waits for a line on
stdin. Then for ``loop_s`` seconds:

* ``threads`` threads call ``get_or_set_stampede_safe`` on the hot ``keys``
  in turn (``timeout`` seconds, a compute of ``compute_s``), checking that
  each value is the one computed for that key;
* ``many_threads`` more threads each ``set_many`` six keys of their own
  (spread over the slots) then ``get_many`` them, checking each value read
  is this thread's for that key and none newer than it wrote.

It prints one JSON line: every compute (key, start, end: wall clock, so the
parent can place it against the failover), every exception with its time,
wrong values, call counts, and when this process's circuit breaker was open
(sampled every 20 ms): then its callers compute locally, by design.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from typing import Any


def main() -> None:
    spec = json.loads(sys.argv[1])
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.core.cache import caches
    from django.test.utils import override_settings

    from django_apee import get_or_set_stampede_safe

    alias = spec["alias"]
    config = {
        "BACKEND": "django_apee.cache.ApeeCache",
        "LOCATION": spec["urls"],
        "OPTIONS": {
            "CLIENT_CLASS": "django_apee.cluster.ApeeClusterClient",
            **spec.get("options", {}),
        },
    }
    override_settings(CACHES={**settings.CACHES, alias: config}).enable()
    cache = caches[alias]
    keys: list[str] = spec["keys"]
    compute_s = float(spec["compute_s"])
    timeout = float(spec["timeout"])
    lock = threading.Lock()
    computes: list[tuple[str, float, float]] = []
    errors: list[dict[str, Any]] = []
    wrong: list[str] = []
    calls = {"stampede": 0, "many": 0}

    def compute_for(key: str) -> Any:
        def compute() -> dict[str, Any]:
            started = time.time()
            time.sleep(compute_s)
            with lock:
                computes.append((key, started, time.time()))
            return {"key": key, "pid": os.getpid(), "at": started}

        return compute

    def failed(kind: str, error: Exception) -> None:
        with lock:
            errors.append(
                {
                    "kind": kind,
                    "at": time.time(),
                    "error": f"{type(error).__name__}: {error}"[:300],
                    "trace": traceback.format_exc()[-1500:],
                }
            )

    # Warm up: pools, the slot map, the wake-up subscription.
    warm = f"warm:{os.getpid()}"
    get_or_set_stampede_safe(warm, "w", 5, cache=alias)
    cache.delete(warm)
    hub = cache.runtime.hub
    hub.done(warm, hub.expect(warm))
    if not hub.subscribed.wait(5):
        raise RuntimeError("wake-up subscription did not come up")

    go = threading.Event()
    until = 0.0

    def stampede(index: int) -> None:
        go.wait()
        n = index
        while time.monotonic() < until:
            key = keys[n % len(keys)]
            n += 1
            try:
                value = get_or_set_stampede_safe(
                    key, compute_for(key), timeout, cache=alias
                )
            except Exception as error:
                failed("stampede", error)
                continue
            with lock:
                calls["stampede"] += 1
                if not isinstance(value, dict) or value.get("key") != key:
                    wrong.append(f"{key}: {value!r}"[:200])
            time.sleep(float(spec.get("pause_s", 0.005)))

    def many(index: int) -> None:
        go.wait()
        mine = [f"many:{os.getpid()}:{index}:{n}" for n in range(6)]
        written = 0
        while time.monotonic() < until:
            written += 1
            try:
                cache.set_many({key: (key, written) for key in mine}, timeout=60)
            except Exception as error:
                failed("set_many", error)
                time.sleep(0.05)
                continue
            try:
                found = cache.get_many(mine)
            except Exception as error:
                failed("get_many", error)
                time.sleep(0.05)
                continue
            with lock:
                calls["many"] += 1
                for key, value in found.items():
                    if value[0] != key or value[1] > written:
                        wrong.append(f"{key}: {value!r}"[:200])
            time.sleep(0.01)

    breaker = cache.runtime.coordinator.breaker
    # What the stampede path met (it never raises them): type, first, last.
    seen: dict[str, list[float]] = {}
    waiting = cache.runtime.coordinator.waiting
    counted = waiting.redis_failed

    def redis_failed() -> None:
        kind = type(sys.exc_info()[1]).__name__
        now = time.time()
        with lock:
            entry = seen.setdefault(kind, [now, now, 0])
            entry[1:] = [now, entry[2] + 1]
        counted()

    waiting.redis_failed = redis_failed  # type: ignore[method-assign]
    opened: list[list[float]] = []  # [since, until] while the breaker was open

    def watch_breaker() -> None:
        go.wait()
        while time.monotonic() < until:
            now = time.time()
            if breaker.is_open:
                if opened and opened[-1][1] >= now - 0.1:
                    opened[-1][1] = now
                else:
                    opened.append([now, now])
            time.sleep(0.02)

    threads = (
        [threading.Thread(target=watch_breaker)]
        + [threading.Thread(target=stampede, args=(i,)) for i in range(spec["threads"])]
        + [
            threading.Thread(target=many, args=(i,))
            for i in range(spec.get("many_threads", 0))
        ]
    )
    for thread in threads:
        thread.start()
    print("READY", flush=True)
    sys.stdin.readline()
    until = time.monotonic() + float(spec["loop_s"])
    released = time.time()
    go.set()
    for thread in threads:
        thread.join()
    time.sleep(0.3)  # a background refresh still running lands in the list
    with lock:
        report = {
            "pid": os.getpid(),
            "released": released,
            "computes": computes,
            "errors": errors,
            "wrong": wrong,
            "calls": calls,
            "breaker_open": opened,
            "redis_errors": seen,
        }
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
