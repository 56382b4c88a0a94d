"""Child process of the hostile-values suite: plant bytes, ``cache.get``, report.

``python tests/support/hostile_worker.py '<json spec>'`` configures Django
itself (``settings.configure``: a ``default`` ApeeCache on ``spec["redis"]``
with ``spec["options"]``), reads a normal value once to warm the process up,
then plants the hostile bytes under ``spec["key"]`` with a raw redis client
and reads them back through the cache. It prints one JSON line and exits 0:

``returned_default``  whether ``get`` answered the default (a miss)
``result``            the type and nesting depth of what it answered
``escaped``           the exception that came out of ``get``, or None
``seconds``           the ``get``'s wall time
``rss_growth_mib``    peak RSS during the ``get`` minus RSS before it
                      (``/proc/self/status`` VmHWM after clearing it; else
                      ``ru_maxrss``)
``errors``            ``apee_cache_serialization_errors_total`` by reason,
                      this ``get``'s increase only

A crash shows as the exit code and no report. The worker imports nothing of
``tests`` and sets Django up without ``tests.settings``, so the same script
measures another checkout of the package (``PYTHONPATH=/that/checkout``)
for the before/after figures.

Spec keys: ``redis``, ``options``, ``key``, and the bytes: ``data_file`` (a
path), or ``plant`` = ``"swap"`` (``cache.set`` a value under
``spec["source"]`` and copy its stored bytes onto ``key``).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from typing import Any

SECRET_KEY = "django-apee-tests-not-a-secret"
DEFAULT: Any = object()
SWAPPED_VALUE = {"owner": "alice", "balance": 100}


def setup(spec: dict[str, Any]) -> None:
    import django
    from django.conf import settings

    settings.configure(
        SECRET_KEY=SECRET_KEY,
        USE_TZ=True,
        INSTALLED_APPS=["django_apee"],
        CACHES={
            "default": {
                "BACKEND": "django_apee.cache.ApeeCache",
                "LOCATION": spec["redis"],
                "OPTIONS": spec.get("options") or {},
            }
        },
    )
    django.setup()


def errors(alias: str) -> dict[str, float]:
    from prometheus_client import REGISTRY

    found: dict[str, float] = {}
    for family in REGISTRY.collect():
        if family.name != "apee_cache_serialization_errors":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("cache") == alias:
                found[sample.labels["reason"]] = sample.value
    return found


def status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def clear_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")
    except OSError:
        return False
    return True


def depth_of(value: Any) -> int:
    depth = 0
    while isinstance(value, (list, tuple, set, frozenset, dict)) and len(value) == 1:
        value = next(iter(value.values() if isinstance(value, dict) else value))
        depth += 1
    return depth


def main() -> None:
    spec = json.loads(sys.argv[1])
    setup(spec)
    import redis
    from django.core.cache import caches

    cache = caches["default"]
    raw = redis.Redis.from_url(spec["redis"], socket_timeout=10)
    key = spec["key"]
    cache.set("hostile-warmup", {"warm": [1, 2, 3]}, 60)
    assert cache.get("hostile-warmup") == {"warm": [1, 2, 3]}
    if spec.get("plant") == "swap":
        cache.set(spec["source"], SWAPPED_VALUE, 60)
        data = raw.get(cache.make_key(spec["source"]))
    else:
        with open(spec["data_file"], "rb") as planted:
            data = planted.read()
    raw.set(cache.make_key(key), data, ex=60)

    before = errors("default")
    peak_cleared = clear_peak()
    rss_before = status_kib("VmRSS") if peak_cleared else None
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    escaped = None
    result: Any = DEFAULT
    started = time.perf_counter()
    try:
        result = cache.get(key, DEFAULT)
    except BaseException as error:  # what the suite is looking for
        escaped = f"{type(error).__name__}: {error}"[:500]
    seconds = time.perf_counter() - started
    peak = status_kib("VmHWM") if peak_cleared else None
    if rss_before is not None and peak is not None:
        growth_kib = peak - rss_before
    else:
        growth_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before
    after = errors("default")
    report = {
        "django_apee": __import__("django_apee").__file__,
        "returned_default": result is DEFAULT,
        "result": None
        if result is DEFAULT
        else {"type": type(result).__name__, "depth": depth_of(result)},
        "escaped": escaped,
        "seconds": round(seconds, 4),
        "rss_growth_mib": round(growth_kib / 1024, 1),
        "errors": {
            reason: after[reason] - before.get(reason, 0.0)
            for reason in after
            if after[reason] != before.get(reason, 0.0)
        },
    }
    result = None  # a deep value is freed here, before the report
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
