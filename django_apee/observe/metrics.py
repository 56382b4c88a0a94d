"""Prometheus metrics, fleet counters and rate-limited logging.

Metrics live on prometheus_client's default registry, so django-prometheus's
``/metrics`` view shows them, and are counters and histograms only, so
prometheus_client's multiprocess mode (gunicorn, uWSGI) sums them across
workers. Labels name the cache alias, never the key: keys are unbounded and
would blow up the series count.

Every increment also goes to this process's fleet tally (``fleet.py``), which
a background thread adds to Redis for ``manage.py apee_stats``. Either costs
a lock and an add, never I/O. ``OPTIONS["METRICS"] = False`` turns both off
for an alias.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter, Histogram

from django_apee.core.envelope import DECODE_REASONS
from django_apee.store import fleet

if TYPE_CHECKING:
    from django_apee.cache import ApeeCache

#: Buckets from 100 µs to 60 s: a hit-path wait and a minute-long compute
#: both land in a bucket that tells them apart.
BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip

#: Label values known in advance, so their series exist from start-up.
OUTCOMES = ("ok", "error")
FALLBACK_REASONS = (
    "circuit_open",
    "redis_error",
    "wait_timeout",
    "stale_if_error",
    "refresh_pool_full",
    "cold_wait_timeout",
)


class _Null:
    """The child of an alias whose METRICS option is False: counts nothing."""

    def inc(self, amount: float = 1) -> None:
        pass

    def observe(self, value: float) -> None:
        pass


NULL = _Null()


class _CounterChild:
    __slots__ = ("_prom", "_slot")

    def __init__(self, prom: Any, slot: tuple[str, str]) -> None:
        self._prom = prom
        self._slot = slot

    def inc(self, amount: float = 1) -> None:
        self._prom.inc(amount)
        fleet.TALLY.add(self._slot, int(amount))


class _HistogramChild:
    __slots__ = ("_alias", "_count", "_field", "_prom", "_sum")

    def __init__(self, prom: Any, alias: str, field: str) -> None:
        self._prom = prom
        self._alias = alias
        self._field = field
        self._count = (alias, f"{field}_count")
        self._sum = (alias, f"{field}_sum_us")

    def observe(self, value: float) -> None:
        self._prom.observe(value)
        fleet.TALLY.add(self._count, 1)
        fleet.TALLY.add(self._sum, round(value * 1_000_000))
        bound = bisect.bisect_left(BUCKETS, value)
        label = "+Inf" if bound == len(BUCKETS) else repr(BUCKETS[bound])
        fleet.TALLY.add((self._alias, f"{self._field}_le_{label}"), 1)


class _Family:
    """One ``apee_cache_*`` metric: its Prometheus family and its fleet field.

    ``labels(cache=alias, ...)`` returns a child whose ``inc``/``observe``
    feeds both; children are made once per label set, so callers may call
    ``labels`` on every event.
    """

    def __init__(self, prom: Any, name: str, labelnames: tuple[str, ...]) -> None:
        self.prom = prom
        self.name = name
        self.field = name.removeprefix("apee_cache_")
        self.labelnames = labelnames
        self._children: dict[tuple[str, ...], Any] = {}
        self._lock = threading.Lock()

    def labels(self, cache: str, **labels: str) -> Any:
        key = (cache, *(labels[name] for name in self.labelnames))
        child = self._children.get(key)
        if child is None:
            with self._lock:
                child = self._children.get(key)
                if child is None:
                    child = self._children[key] = self._child(cache, labels)
        return child

    def _child(self, cache: str, labels: dict[str, str]) -> Any:
        if not enabled(cache):
            return NULL
        prom = self.prom.labels(cache=cache, **labels)
        field = ":".join((self.field, *(labels[n] for n in self.labelnames)))
        if isinstance(self.prom, Histogram):
            return _HistogramChild(prom, cache, field)
        return _CounterChild(prom, (cache, field))

    def forget(self) -> None:
        """Drop resolved children (the METRICS option may have changed)."""
        with self._lock:
            self._children = {}


FAMILIES: list[_Family] = []


def counter(name: str, documentation: str, *labelnames: str) -> _Family:
    family = _Family(
        Counter(name, documentation, ["cache", *labelnames]), name, labelnames
    )
    FAMILIES.append(family)
    return family


def histogram(name: str, documentation: str) -> _Family:
    prom = Histogram(name, documentation, ["cache"], buckets=BUCKETS)
    family = _Family(prom, name, ())
    FAMILIES.append(family)
    return family


GET_HITS = counter(
    "apee_cache_hits", "Keys that get/get_many found (a servable value)."
)
GET_MISSES = counter(
    "apee_cache_misses",
    "Keys that get/get_many did not find (absent, expired or unreadable).",
)
HITS = counter(
    "apee_cache_stampede_hits",
    "get_or_set_stampede_safe calls answered from the cache.",
)
MISSES = counter(
    "apee_cache_stampede_misses",
    "get_or_set_stampede_safe calls that found no servable value.",
)
STALE_SERVED = counter(
    "apee_cache_stale_served",
    "Values served past their soft timeout (inside the hard one).",
)
EARLY_REFRESHES = counter(
    "apee_cache_early_refreshes",
    "Refreshes started before the soft timeout, chosen by XFetch.",
)
COMPUTES = counter(
    "apee_cache_computes",
    "Computations run under a lease, by outcome (ok, error).",
    "outcome",
)
COMPUTE_SECONDS = histogram(
    "apee_cache_compute_seconds", "How long successful computations took."
)
LEASE_WAIT_SECONDS = histogram(
    "apee_cache_lease_wait_seconds",
    "How long a caller waited for another process's computation.",
)
LEASE_RENEWALS = counter(
    "apee_cache_lease_renewals",
    "Lease extensions made while a computation ran.",
)
LEASE_LOST = counter(
    "apee_cache_lease_lost",
    "Computations whose lease was gone when they finished (nothing stored).",
)
FALLBACKS = counter(
    "apee_cache_fallbacks",
    "Values computed without the cache's coordination, by reason.",
    "reason",
)
REDIS_ERRORS = counter(
    "apee_cache_redis_errors", "Redis errors met on the stampede path."
)
HERD_MISSES = counter(
    "apee_cache_herd_misses",
    "Plain gets answered with a miss because the caller won the lease to "
    "write the next value (herd mode).",
)
SERIALIZATION_ERRORS = counter(
    "apee_cache_serialization_errors",
    "Stored values that could not be read and were treated as a miss, by reason.",
    "reason",
)

#: What each labelled family's series are initialised with.
KNOWN_LABELS: dict[str, tuple[str, ...]] = {
    COMPUTES.name: OUTCOMES,
    FALLBACKS.name: FALLBACK_REASONS,
    SERIALIZATION_ERRORS.name: DECODE_REASONS,
}


# -- per-alias switch ----------------------------------------------------------------

_enabled: dict[str, bool] = {}


def enabled(alias: str) -> bool:
    """Whether ``alias`` counts (OPTIONS ``METRICS``, default True)."""
    found = _enabled.get(alias)
    if found is None:
        found = _enabled[alias] = _read_enabled(alias)
    return found


def _read_enabled(alias: str) -> bool:
    from django.conf import settings

    if not settings.configured:
        return True
    options = (settings.CACHES.get(alias) or {}).get("OPTIONS") or {}
    return options.get("METRICS", True) is not False


def reset() -> None:
    """Forget every alias's switch and children (CACHES changed)."""
    _enabled.clear()
    _gets.clear()
    for family in FAMILIES:
        family.forget()


def initialise(alias: str) -> None:
    """Create every series of ``alias`` at zero, so it is scraped from start-up.

    A counter that appears only at its first increment breaks ``rate()`` and
    "absent" alerts; this makes the labelled children up front, without
    talking to Redis.
    """
    for family in FAMILIES:
        for value in KNOWN_LABELS.get(family.name, (None,)):
            if value is None:
                family.labels(cache=alias)
            else:
                family.labels(cache=alias, **{family.labelnames[0]: value})
    gets_of(alias)


# -- plain get / get_many ----------------------------------------------------------


class Gets:
    """The counters one ``get_many`` call feeds, resolved once per alias.

    With django-prometheus importable, its ``django_cache_get_*`` counters
    (label ``backend="redis"``, the value its own django-redis backend uses)
    count too, so dashboards built on them keep working after the swap.
    """

    def __init__(self, alias: str) -> None:
        self.hits = GET_HITS.labels(cache=alias)
        self.misses = GET_MISSES.labels(cache=alias)
        django = django_prometheus_counters() if enabled(alias) else None
        if django is None:
            self.django: tuple[Any, Any, Any] | None = None
        else:
            total, hits, misses = (c.labels(backend="redis") for c in django)
            self.django = (total, hits, misses)

    def count(self, hits: int, misses: int) -> None:
        if hits:
            self.hits.inc(hits)
        if misses:
            self.misses.inc(misses)
        if self.django is not None:
            total, found, missed = self.django
            total.inc(hits + misses)
            if hits:
                found.inc(hits)
            if misses:
                missed.inc(misses)


_gets: dict[str, Gets] = {}


def gets_of(alias: str) -> Gets:
    found = _gets.get(alias)
    if found is None:
        found = _gets[alias] = Gets(alias)
    return found


def count_gets(alias: str, hits: int, misses: int) -> None:
    """Count one get/get_many call's found and missing keys (no I/O)."""
    gets = _gets.get(alias) or gets_of(alias)
    gets.count(hits, misses)


def django_prometheus_counters() -> tuple[Any, Any, Any] | None:
    """django-prometheus's own get/hit/miss counters, if it is installed.

    Its module defines them on the default registry; importing it (once) and
    reusing its objects avoids registering duplicates.
    """
    try:
        from django_prometheus.cache import metrics as theirs
    except ImportError:
        return None
    return (
        theirs.django_cache_get_total,
        theirs.django_cache_hits_total,
        theirs.django_cache_misses_total,
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
