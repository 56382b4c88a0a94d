"""Prometheus metrics and rate-limited logging.

Metrics live on prometheus_client's default registry, so django-prometheus's
``/metrics`` view shows them. Labels name the cache alias, never the key: keys
are unbounded and would blow up the series count.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram

if TYPE_CHECKING:
    from django_apee.cache import ApeeCache

#: Buckets from 100 µs to 60 s: a hit-path wait and a minute-long compute
#: both land in a bucket that tells them apart.
BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

HITS = Counter(
    "apee_cache_stampede_hits",
    "get_or_set_stampede_safe calls answered from the cache.",
    ["cache"],
)
MISSES = Counter(
    "apee_cache_stampede_misses",
    "get_or_set_stampede_safe calls that found no servable value.",
    ["cache"],
)
STALE_SERVED = Counter(
    "apee_cache_stale_served",
    "Values served past their soft timeout (inside the hard one).",
    ["cache"],
)
EARLY_REFRESHES = Counter(
    "apee_cache_early_refreshes",
    "Refreshes started before the soft timeout, chosen by XFetch.",
    ["cache"],
)
COMPUTES = Counter(
    "apee_cache_computes",
    "Computations run under a lease, by outcome (ok, error).",
    ["cache", "outcome"],
)
COMPUTE_SECONDS = Histogram(
    "apee_cache_compute_seconds",
    "How long successful computations took.",
    ["cache"],
    buckets=BUCKETS,
)
LEASE_WAIT_SECONDS = Histogram(
    "apee_cache_lease_wait_seconds",
    "How long a caller waited for another process's computation.",
    ["cache"],
    buckets=BUCKETS,
)
LEASE_RENEWALS = Counter(
    "apee_cache_lease_renewals",
    "Lease extensions made while a computation ran.",
    ["cache"],
)
LEASE_LOST = Counter(
    "apee_cache_lease_lost",
    "Computations whose lease was gone when they finished (nothing stored).",
    ["cache"],
)
FALLBACKS = Counter(
    "apee_cache_fallbacks",
    "Values computed without the cache's coordination, by reason.",
    ["cache", "reason"],
)
REDIS_ERRORS = Counter(
    "apee_cache_redis_errors",
    "Redis errors met on the stampede path.",
    ["cache"],
)
HERD_MISSES = Counter(
    "apee_cache_herd_misses",
    "Plain gets answered with a miss because the caller won the lease to "
    "write the next value (herd mode).",
    ["cache"],
)
SERIALIZATION_ERRORS = Counter(
    "apee_cache_serialization_errors",
    "Stored values that could not be read and were treated as a miss, by reason.",
    ["cache", "reason"],
)


class RateLimitedLog:
    """Log a message at most once per ``per_seconds`` for each topic.

    A corrupt hot key is read thousands of times a second; one line a minute
    (with how many were suppressed) tells the operator without drowning them.
    """

    def __init__(self, logger: logging.Logger, per_seconds: float) -> None:
        self.logger = logger
        self.per_seconds = per_seconds
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, topic: str, message: str, *args: Any) -> bool:
        """Log unless ``topic`` was logged recently; return whether it logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(topic)
            if last is not None and now - last < self.per_seconds:
                self._suppressed[topic] = self._suppressed.get(topic, 0) + 1
                return False
            self._last[topic] = now
            suppressed = self._suppressed.pop(topic, 0)
        if suppressed:
            message += " (%d similar suppressed)"
            args = (*args, suppressed)
        self.logger.warning(message, *args)
        return True


def alias_of(backend: ApeeCache) -> str:
    """Find the ``CACHES`` alias a backend was built for.

    Django does not tell a backend its alias. The handler's per-thread
    connections know it by identity; failing that (a backend built by hand),
    the settings entry with the same LOCATION and OPTIONS; else "unknown".
    """
    cached: str | None = getattr(backend, "_apee_alias", None)
    if cached is not None:
        return cached
    from django.conf import settings
    from django.core.cache import caches

    alias = "unknown"
    for name in settings.CACHES:
        if getattr(caches._connections, name, None) is backend:
            alias = name
            break
    else:
        for name, config in settings.CACHES.items():
            if (
                config.get("LOCATION") == backend._server
                and (config.get("OPTIONS") or {}) == backend.user_options
            ):
                alias = name
                break
    backend._apee_alias = alias
    return alias
