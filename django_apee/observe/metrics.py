"""Prometheus metrics and fleet counters.

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
import os
import threading
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram

from django_apee.core.envelope import DECODE_REASONS
from django_apee.core.tally import Tally
from django_apee.store import fleet

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
    """A counter child: a single step is ticked (``core/tally.py``) and
    settled later, any other amount counted at once."""

    __slots__ = ("_prom", "_slot", "ticks")

    def __init__(self, prom: Any, slot: tuple[str, str]) -> None:
        self._prom = prom
        self._slot = slot
        self.ticks = Tally()

    def inc(self, amount: float = 1) -> None:
        if amount == 1:
            self.ticks.add()
        else:
            self._count(amount)

    def settle(self) -> None:
        ticked = self.ticks.take()
        if ticked:
            self._count(ticked)

    def _count(self, amount: float) -> None:
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
            children, self._children = self._children, {}
        for child in children.values():
            if isinstance(child, _CounterChild):
                child.settle()

    def counters(self) -> list[_CounterChild]:
        """The children whose steps are ticked (``settle`` and fork)."""
        return [
            c for c in list(self._children.values()) if isinstance(c, _CounterChild)
        ]


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


class _Settle:
    """A collector with no metrics of its own, registered before every
    counter here: each collection of the default registry settles first."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        settle()
        return []


# Before any counter: the registry collects in the order of registration.
REGISTRY.register(_Settle())
fleet.before_flush(lambda: settle())
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _forget_ticks())

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
LEASE_TAKEOVERS = counter(
    "apee_cache_lease_takeovers",
    "Leases taken over at once because their holder's Redis client was gone.",
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
    "Stored values not in django-apee's format, by reason: misses, and "
    "(reason legacy) old pickles that LEGACY_READS decoded.",
    "reason",
)

NEAR_HITS = counter(
    "apee_cache_near_hits",
    "get/get_many keys answered from process memory (the near cache).",
)
NEAR_EVICTIONS = counter(
    "apee_cache_near_evictions",
    "Near-cache entries dropped to stay within MAX_ENTRIES and MAX_BYTES.",
)
NEAR_INVALIDATIONS = counter(
    "apee_cache_near_invalidations",
    "Near-cache entries dropped because their key was written or deleted.",
)
NEAR_FLUSHES = counter(
    "apee_cache_near_flushes",
    "Times a near cache was emptied: clear(), FLUSHDB, or tracking lost or "
    "re-established.",
)

#: What each labelled family's series are initialised with.
KNOWN_LABELS: dict[str, tuple[str, ...]] = {
    COMPUTES.name: OUTCOMES,
    FALLBACKS.name: FALLBACK_REASONS,
    SERIALIZATION_ERRORS.name: (*DECODE_REASONS, "legacy"),
}


# -- per-alias switch ----------------------------------------------------------------

_enabled: dict[str, bool] = {}
#: django-prometheus's get/hit/miss counters, when the Django surface found
#: the package installed (``use_django_prometheus``).
_django_counters: tuple[Any, Any, Any] | None = None


def enabled(alias: str) -> bool:
    """Whether ``alias`` counts (OPTIONS ``METRICS``, told by ``configure``)."""
    return _enabled.get(alias, True)


def configure(alias: str, *, enabled: bool) -> None:
    """Switch ``alias``'s counting on or off (its OPTIONS ``METRICS``)."""
    if _enabled.get(alias, True) != enabled:
        _enabled[alias] = enabled
        _forget_children()
    else:
        _enabled[alias] = enabled


def use_django_prometheus(counters: tuple[Any, Any, Any] | None) -> None:
    """Also feed django-prometheus's own cache counters (total, hits, misses)."""
    global _django_counters
    _django_counters = counters
    settle()
    _gets.clear()


def reset() -> None:
    """Forget every alias's switch and children (CACHES changed)."""
    _enabled.clear()
    _forget_children()


def _forget_children() -> None:
    settle()
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

    A single-key ``get`` only ticks a :class:`~django_apee.core.tally.Tally`
    (``found``/``missed``); :func:`settle` hands the ticks to the counters
    before every collection of this process's registry, at the end of each
    Django request (prometheus_client's multiprocess files), before every
    fleet flush and at exit.
    """

    def __init__(self, alias: str) -> None:
        self.found = Tally()
        self.missed = Tally()
        self.hits = GET_HITS.labels(cache=alias)
        self.misses = GET_MISSES.labels(cache=alias)
        theirs = _django_counters if enabled(alias) else None
        if theirs is None:
            self.django: tuple[Any, Any, Any] | None = None
        else:
            total, hits, misses = (c.labels(backend="redis") for c in theirs)
            self.django = (total, hits, misses)

    def settle(self) -> None:
        """Count the ticks of single-key gets since the last call."""
        hits, misses = self.found.take(), self.missed.take()
        if hits or misses:
            self.count(hits, misses)

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


def tick_hit(alias: str) -> None:
    """One ``get`` found its key: the hit path's count (see :class:`Gets`)."""
    (_gets.get(alias) or gets_of(alias)).found.add()


def tick_miss(alias: str) -> None:
    """One ``get`` found its key unreadable (a miss)."""
    (_gets.get(alias) or gets_of(alias)).missed.add()


def settle() -> None:
    """Count every tick of this process (off the hit path): gets first, as
    their hits feed counters that are ticked too."""
    for gets in list(_gets.values()):
        gets.settle()
    for family in FAMILIES:
        for child in family.counters():
            child.settle()


def _forget_ticks() -> None:
    """After fork: the parent's ticks are the parent's to count."""
    for gets in list(_gets.values()):
        gets.found = Tally()
        gets.missed = Tally()
    for family in FAMILIES:
        for child in family.counters():
            child.ticks = Tally()


class AliasMetrics:
    """The engine's event sink for one alias: every family's child, resolved once.

    ``labels()`` costs more than ``inc()``; the hit path only calls the
    latter. Satisfies ``engine.protocol.Events`` and ``core.near.NearEvents``.
    """

    def __init__(self, alias: str) -> None:
        self.alias = alias
        self.hits = HITS.labels(cache=alias)
        self.misses = MISSES.labels(cache=alias)
        self.stale_served = STALE_SERVED.labels(cache=alias)
        self.early_refreshes = EARLY_REFRESHES.labels(cache=alias)
        self.herd_misses = HERD_MISSES.labels(cache=alias)
        self.lease_renewals = LEASE_RENEWALS.labels(cache=alias)
        self.lease_lost = LEASE_LOST.labels(cache=alias)
        self.lease_takeovers = LEASE_TAKEOVERS.labels(cache=alias)
        self.redis_errors = REDIS_ERRORS.labels(cache=alias)
        self.compute_seconds = COMPUTE_SECONDS.labels(cache=alias)
        self.lease_wait_seconds = LEASE_WAIT_SECONDS.labels(cache=alias)
        self.near_hits = NEAR_HITS.labels(cache=alias)
        self.near_evictions = NEAR_EVICTIONS.labels(cache=alias)
        self.near_invalidations = NEAR_INVALIDATIONS.labels(cache=alias)
        self.near_flushes = NEAR_FLUSHES.labels(cache=alias)

    def computed(self, outcome: str) -> None:
        COMPUTES.labels(cache=self.alias, outcome=outcome).inc()

    def fallback(self, reason: str) -> None:
        FALLBACKS.labels(cache=self.alias, reason=reason).inc()

    def decided(self, made: str, state: str, decision: str, waited: float) -> None:
        """Not a metric: which key a decision was about is for a trace
        (``observe/trace.py``); the counters above already count it."""

    def near_served(self, hits: int) -> None:
        """``hits`` get keys answered from the near cache: near and get hits."""
        self.near_hits.inc(hits)
        count_gets(self.alias, hits, 0)

    def unreadable(self, reason: str) -> None:
        SERIALIZATION_ERRORS.labels(cache=self.alias, reason=reason).inc()
