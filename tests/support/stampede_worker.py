"""Child-process entry point for the multi-process stampede tests.

``python -m tests.support.stampede_worker '<json spec>'`` sets Django up with
``tests.settings`` (the session's redis-server comes in through the inherited
``APEE_TEST_REDIS_URL``), adds the spec's cache alias, warms the process up
(coordinator, pub/sub subscription), prints ``READY`` and waits for one line
on stdin. Then its threads are released together, call
``get_or_set_stampede_safe`` and the process prints one JSON line with what
every call returned and when, plus this process's apee metrics.

The compute counts itself with a raw ``INCR`` on ``spec["counter"]``, so the
parent counts computes across processes.

Spec keys: ``alias``, ``options`` (CACHES OPTIONS), ``key``, ``threads``,
``compute_s``, ``timeout``, ``counter``, and optionally ``location`` (instead
of the session's Redis), ``keys`` (thread i calls ``keys[i % len]``; each
key's computes count on ``counter:key``), ``soft_timeout``,
``loop_s`` (call repeatedly for that long instead of once), ``pause_s``
(sleep between calls in a loop), ``answer`` (what the compute returns).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from typing import Any

METRICS = {
    "computes_ok": ("apee_cache_computes_total", {"outcome": "ok"}),
    "computes_error": ("apee_cache_computes_total", {"outcome": "error"}),
    "hits": ("apee_cache_stampede_hits_total", {}),
    "misses": ("apee_cache_stampede_misses_total", {}),
    "lease_renewals": ("apee_cache_lease_renewals_total", {}),
    "lease_lost": ("apee_cache_lease_lost_total", {}),
    "lease_takeovers": ("apee_cache_lease_takeovers_total", {}),
    "redis_errors": ("apee_cache_redis_errors_total", {}),
    "early_refreshes": ("apee_cache_early_refreshes_total", {}),
    "stale_served": ("apee_cache_stale_served_total", {}),
    "lease_waits": ("apee_cache_lease_wait_seconds_count", {}),
}


def metric_values(alias: str) -> dict[str, float]:
    """This process's apee counters for ``alias`` (0 when never touched)."""
    from prometheus_client import REGISTRY

    found = {}
    for name, (sample, labels) in METRICS.items():
        value = REGISTRY.get_sample_value(sample, {"cache": alias, **labels})
        found[name] = value or 0.0
    fallbacks = 0.0
    for family in REGISTRY.collect():
        if family.name != "apee_cache_fallbacks":
            continue
        for one in family.samples:
            if one.name.endswith("_total") and one.labels.get("cache") == alias:
                fallbacks += one.value
                reason = f"fallback:{one.labels.get('reason')}"
                found[reason] = found.get(reason, 0.0) + one.value
    found["fallbacks"] = fallbacks
    return found


def cache_config(spec: dict[str, Any]) -> dict[str, Any]:
    from tests.support import target

    if spec.get("location"):  # a deployment of the test's own, as given
        return {
            "BACKEND": "django_apee.cache.ApeeCache",
            "LOCATION": spec["location"],
            "OPTIONS": spec.get("options", {}),
        }
    return target.cache_config(spec.get("options", {}))


def main() -> None:
    spec = json.loads(sys.argv[1])
    if spec.get("log"):  # django_apee's log lines, on stderr (Child.errors)
        import logging

        logging.basicConfig(
            level=logging.DEBUG, format="%(relativeCreated)d %(threadName)s %(message)s"
        )
        logging.getLogger("django_apee").setLevel(logging.DEBUG)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.core.cache import caches
    from django.test.utils import override_settings

    from django_apee import get_or_set_stampede_safe

    alias = spec["alias"]
    override_settings(CACHES={**settings.CACHES, alias: cache_config(spec)}).enable()
    from tests.support import target

    raw = target.raw_client(socket_timeout=10)
    counter = spec["counter"]
    compute_s = float(spec["compute_s"])
    answer = spec.get("answer", "computed")

    keys = spec.get("keys") or [spec["key"]]

    def computing(key: str) -> Any:
        count_on = counter if len(keys) == 1 else f"{counter}:{key}"

        def compute() -> dict[str, Any]:
            number = int(raw.incr(count_on))
            time.sleep(compute_s)
            return {
                "answer": answer,
                "n": number,
                "pid": os.getpid(),
                "at": time.time(),
            }

        return compute

    # Warm up: the coordinator, the pools and the wake-up subscription exist
    # before the release, as in a process that has served requests already.
    warm_key = f"warmup:{os.getpid()}"
    get_or_set_stampede_safe(warm_key, "warm", 5, cache=alias)
    caches[alias].delete(warm_key)
    hub = caches[alias].runtime.hub
    hub.done(warm_key, hub.expect(warm_key))  # starts the subscriber if needed
    if not hub.subscribed.wait(5):
        raise RuntimeError("wake-up subscription did not come up")
    warm_metrics = metric_values(alias)  # reported: what the calls added

    go = threading.Event()
    results: list[dict[str, Any]] = []
    lock = threading.Lock()
    loop_s = spec.get("loop_s")
    pause_s = float(spec.get("pause_s", 0.0))

    def one_call(key: str) -> dict[str, Any]:
        started = time.time()
        try:
            value = get_or_set_stampede_safe(
                key,
                computing(key),
                spec["timeout"],
                soft_timeout=spec.get("soft_timeout"),
                cache=alias,
            )
        except Exception as error:
            return {
                "error": f"{type(error).__name__}: {error}",
                "trace": traceback.format_exc(),
                "start": started,
                "end": time.time(),
                "key": key,
            }
        return {**value, "start": started, "end": time.time(), "key": key}

    def run(key: str) -> None:
        go.wait()
        mine: list[dict[str, Any]] = []
        if loop_s is None:
            mine.append(one_call(key))
        else:
            until = time.monotonic() + float(loop_s)
            while time.monotonic() < until:
                mine.append(one_call(key))
                if pause_s:
                    time.sleep(pause_s)
        with lock:
            results.extend(mine)

    threads = [
        threading.Thread(target=run, args=(keys[i % len(keys)],))
        for i in range(int(spec["threads"]))
    ]
    for thread in threads:
        thread.start()
    print("READY", flush=True)
    sys.stdin.readline()
    go.set()
    released = time.time()
    for thread in threads:
        thread.join()
    if loop_s is not None:  # the last background refresh may still be running
        time.sleep(0.2)
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "released": released,
                "results": results,
                "metrics": {
                    name: value - warm_metrics.get(name, 0.0)
                    for name, value in metric_values(alias).items()
                },
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
