"""Metrics and fleet counters: exact values after a known sequence, on real Redis.

Each test uses a fresh alias, so every series starts at zero (absolute values
are asserted, not deltas), and reads Prometheus through the default registry
and the fleet through the hash in Redis.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.test.utils import override_settings
from prometheus_client import REGISTRY

from django_apee.apps import django_prometheus_counters
from django_apee.cache import ApeeCache
from django_apee.contrib.prometheus import metrics_view
from django_apee.core import keys
from django_apee.core.envelope import Meta
from django_apee.observe import metrics
from django_apee.store import fleet, lease
from tests.support import target
from tests.support.redis_server import free_port

APEE = "django_apee.cache.ApeeCache"
HAVE_DJP = django_prometheus_counters() is not None
_aliases = itertools.count()


@pytest.fixture
def make_cache() -> Iterator[Any]:
    with ExitStack() as stack:

        def make(location: str | None = None, **options: Any) -> tuple[str, ApeeCache]:
            alias = f"metrics-{os.getpid()}-{next(_aliases)}"
            entry = target.cache_config(options)  # the cluster's, or the server's
            if location:
                entry = {"BACKEND": APEE, "LOCATION": location, "OPTIONS": options}
            config = {**settings.CACHES, alias: entry}
            stack.enter_context(override_settings(CACHES=config))
            backend = caches[alias]
            assert isinstance(backend, ApeeCache)
            # Named on this thread: other threads cannot tell it from
            # "default" (same LOCATION and OPTIONS), see metrics.alias_of.
            assert backend.alias == alias
            return alias, backend

        yield make


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def total(alias: str, name: str, **labels: str) -> float:
    return sample(f"apee_cache_{name}_total", cache=alias, **labels) or 0.0


def made(backend: ApeeCache, key: str) -> str:
    return str(backend.client.make_key(key))


def fleet_totals(raw_redis: redis.Redis, backend: ApeeCache, alias: str) -> dict:
    # This process's shard: the only one on one Redis, pid % 16 on a cluster.
    shard = fleet.shard_for(raw_redis)
    key = fleet.stats_key(backend.key_prefix, alias, shard)
    # The background thread may have taken counts and not sent them yet:
    # flush and read until two reads agree (bounded).
    stored, deadline = None, time.monotonic() + 5
    while True:
        fleet.flush()
        now = raw_redis.hgetall(key)
        if now == stored or time.monotonic() > deadline:
            break
        stored = now
        time.sleep(0.05)
    found = {k.decode(): int(v) for k, v in now.items()}
    if found:  # the first flush's Redis time, not a counter
        assert abs(found.pop("_since") - raw_redis.time()[0]) < 600
    return found


class Compute:
    def __init__(self, value: Any, sleep: float = 0.0) -> None:
        self.value, self.sleep, self.calls = value, sleep, 0

    def __call__(self) -> Any:
        import time

        self.calls += 1
        if self.sleep:
            time.sleep(self.sleep)  # a slow compute, not a wait for a count
        return self.value


def test_known_sequence_gives_exact_counters_and_histograms(make_cache, raw_redis):
    alias, cache = make_cache(REFRESH="inline")
    django_before = {
        name: sample(f"django_cache_get{name}_total", backend="redis") or 0.0
        for name in ("", "_hits", "_misses")
    }

    # Plain gets: 2 hits, 3 misses (one of them a corrupt payload).
    cache.set("a", 1, 60)
    assert cache.get("a") == 1
    assert cache.get("absent") is None
    assert cache.get_many(["a", "absent-too"]) == {"a": 1}
    raw_redis.set(made(cache, "bad"), b"\xc1\xa9\x02\xe0junk")  # reserved bits
    assert cache.get("bad") is None

    # Stampede-safe: a miss (slow compute), then a hit.
    slow = Compute("s", sleep=0.03)
    assert cache.get_or_set_stampede_safe("s", slow, 60) == "s"
    assert cache.get_or_set_stampede_safe("s", slow, 60) == "s"
    # A stale read: served, then refreshed inline.
    stale_meta = Meta(soft_ms=1_000, hard_ms=60_000, grace_ms=0, delta_ms=5, seed=1)
    payload = cache.envelope.encode("old", stale_meta, key=made(cache, "stale"))
    raw_redis.set(made(cache, "stale"), payload, px=50_000)  # age 10 s > soft
    assert cache.get_or_set_stampede_safe("stale", Compute("new"), 60) == "new"
    # An early refresh: XFetch fires for this seed (rand ~ 1) and delta.
    early_meta = Meta(50_000, 60_000, 0, 10_000, seed=2**32 - 1)
    payload = cache.envelope.encode("old", early_meta, key=made(cache, "early"))
    raw_redis.set(made(cache, "early"), payload, px=60_000)
    assert cache.get_or_set_stampede_safe("early", Compute("new"), 60) == "new"
    # A lease wait: another holder's 300 ms lease runs out, then we compute.
    client = cache.client.get_client(write=True)
    held = lease.acquire(
        client, made(cache, "w"), 300, channel=cache.runtime.hub.channel
    )
    assert held.lease is not None
    assert cache.get_or_set_stampede_safe("w", Compute("w"), 60) == "w"

    expected = {
        "hits": 2,
        "misses": 3,
        "stampede_hits": 3,  # "s" again, "stale", "early"
        "stampede_misses": 2,  # "s", "w"
        "stale_served": 1,
        "early_refreshes": 1,
        "lease_lost": 0,
        "redis_errors": 0,
    }
    for name, value in expected.items():
        assert total(alias, name) == value, name
    assert total(alias, "computes", outcome="ok") == 4  # s, stale, early, w
    assert total(alias, "computes", outcome="error") == 0
    assert total(alias, "serialization_errors", reason="corrupt") == 1
    assert total(alias, "fallbacks", reason="wait_timeout") == 0

    compute_count = sample("apee_cache_compute_seconds_count", cache=alias)
    fast = sample("apee_cache_compute_seconds_bucket", cache=alias, le="0.025")
    assert compute_count == 4
    assert fast == 3  # the 30 ms compute is never in a bucket below 25 ms
    assert sample("apee_cache_lease_wait_seconds_count", cache=alias) == 1
    assert sample("apee_cache_lease_wait_seconds_bucket", cache=alias, le="0.1") == 0
    assert sample("apee_cache_lease_wait_seconds_sum", cache=alias) >= 0.2

    # django-prometheus's counters saw the plain gets (5 keys looked up),
    # where it is installed (an integration: tox installs it on Django < 6.1).
    if HAVE_DJP:
        for name, added in (("", 5), ("_hits", 2), ("_misses", 3)):
            now = sample(f"django_cache_get{name}_total", backend="redis") or 0.0
            assert now - django_before[name] == added, name

    # The fleet hash in Redis holds the same numbers.
    stored = fleet_totals(raw_redis, cache, alias)
    for name, value in expected.items():
        assert stored.get(name, 0) == value, name
    assert stored["computes:ok"] == 4
    assert stored["serialization_errors:corrupt"] == 1
    assert stored["compute_seconds_count"] == 4
    assert stored["lease_wait_seconds_count"] == 1
    slow_buckets = sum(
        v
        for k, v in stored.items()
        if k.startswith("lease_wait_seconds_le_") and float(k.rsplit("_", 1)[1]) > 0.1
    )
    assert slow_buckets == 1
    assert stored["lease_wait_seconds_sum_us"] >= 200_000


def test_minute_bucket_matches_totals_and_expires(make_cache, raw_redis):
    alias, cache = make_cache()
    cache.get("x")
    cache.get("y")
    totals = fleet_totals(raw_redis, cache, alias)
    shard = fleet.shard_for(raw_redis)
    pattern = fleet.stats_key(cache.key_prefix, alias, shard) + ":m:*"
    buckets = list(raw_redis.scan_iter(match=pattern))  # on every primary
    assert totals == {"misses": 2}
    assert len(buckets) == 1  # a flush lands in one minute (Redis's clock)
    assert {k.decode(): int(v) for k, v in raw_redis.hgetall(buckets[0]).items()} == {
        "misses": 2
    }
    assert 0 < raw_redis.ttl(buckets[0]) <= fleet.BUCKET_SECONDS
    assert keys.hash_tag(buckets[0].decode()) == keys.hash_tag(
        fleet.stats_key(cache.key_prefix, alias, shard)
    )


def test_failed_flush_keeps_the_counts_for_the_next(make_cache, raw_redis, redis_url):
    alias, _ = make_cache(location=f"redis://127.0.0.1:{free_port()}/0")
    metrics.GET_HITS.labels(cache=alias).inc(3)
    assert fleet.flush() == 0  # nobody listens on that port: kept, not raised
    assert fleet.TALLY.pending()[(alias, "hits")] == 3
    metrics.GET_HITS.labels(cache=alias).inc(2)
    assert fleet.TALLY.pending()[(alias, "hits")] == 5
    fleet.TALLY.take()  # this alias will never be reachable: drop its counts


def test_metrics_off_counts_nothing(make_cache, raw_redis):
    alias, cache = make_cache(METRICS=False)
    cache.set("a", 1, 60)
    cache.get("a")
    cache.get("b")
    cache.get_or_set_stampede_safe("c", Compute(1), 60)
    assert sample("apee_cache_hits_total", cache=alias) is None
    assert sample("apee_cache_stampede_misses_total", cache=alias) is None
    assert not [slot for slot in fleet.TALLY.pending() if slot[0] == alias]
    assert fleet_totals(raw_redis, cache, alias) == {}


def test_series_exist_from_start_up():
    """A process that never touched the cache already exports every series."""
    code = (
        "import django, json; django.setup();"
        "from prometheus_client import REGISTRY as R;"
        "print(json.dumps([R.get_sample_value(n, l) for n, l in ["
        "('apee_cache_hits_total', {'cache': 'default'}),"
        "('apee_cache_computes_total', {'cache': 'default', 'outcome': 'error'}),"
        "('apee_cache_fallbacks_total',"
        " {'cache': 'default', 'reason': 'wait_timeout'}),"
        "('apee_cache_serialization_errors_total',"
        " {'cache': 'default', 'reason': 'signature'}),"
        "('apee_cache_lease_wait_seconds_bucket',"
        " {'cache': 'default', 'le': '0.0001'}),"
        "('django_cache_get_hits_total', {'backend': 'redis'})]]))"
    )
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    # django-prometheus's series exists where it is installed, else not at all.
    assert json.loads(done.stdout) == [0.0] * 5 + [0.0 if HAVE_DJP else None]


def _child_pending(alias: str, queue: Any) -> None:
    queue.put([list(slot) for slot in fleet.TALLY.pending() if slot[0] == alias])


def test_forked_child_does_not_inherit_the_parents_tally(make_cache):
    alias, _ = make_cache()
    metrics.GET_MISSES.labels(cache=alias).inc(4)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_pending, args=(alias, queue))
    child.start()
    try:
        assert queue.get(timeout=30) == []
    finally:
        child.join(timeout=30)
    assert fleet.TALLY.pending()[(alias, "misses")] == 4


def _child_ticks(alias: str, queue: Any) -> None:
    cache = caches[alias]
    for _ in range(2):
        cache.get("k")
    metrics.settle()
    queue.put(total(alias, "hits"))


def test_forked_child_counts_its_own_gets_not_the_parents_ticks(
    make_cache, monkeypatch
):
    """A get only ticks (``metrics.Gets``); the ticks not yet settled when
    the process forks are the parent's: the child counts its own alone."""
    # The fleet's background flush settles too: not during this test.
    monkeypatch.setattr(fleet, "_BEFORE_FLUSH", [])
    alias, cache = make_cache()
    cache.set("k", 1, 60)
    cache.get("k")
    assert total(alias, "hits") == 1  # collecting settles
    for _ in range(5):
        cache.get("k")  # ticked, not settled yet
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_ticks, args=(alias, queue))
    child.start()
    try:
        assert queue.get(timeout=30) == 1 + 2
    finally:
        child.join(timeout=30)
    assert total(alias, "hits") == 1 + 5


def test_a_request_end_settles_the_ticked_gets(make_cache, monkeypatch):
    """prometheus_client's multiprocess mode reads what ``inc`` wrote to the
    worker's files: the end of each request settles the gets it ticked."""
    from django.core.signals import request_finished

    from django_apee.apps import _settle_counts

    # The fleet's background flush settles too: not during this test.
    monkeypatch.setattr(fleet, "_BEFORE_FLUSH", [])
    alias, cache = make_cache()
    cache.set("k", 1, 60)
    child = metrics.GET_HITS.labels(cache=alias)
    assert cache.get("k") == 1
    assert cache.get("missing") is None
    assert child._prom._value.get() == 0  # ticked only
    # Django's own receivers of the signal touch the database; ours alone.
    receivers = request_finished._live_receivers(None)
    receivers = receivers[0] if isinstance(receivers, tuple) else receivers
    assert _settle_counts in receivers
    _settle_counts()
    assert child._prom._value.get() == 1


def test_threads_counting_at_once_lose_nothing(make_cache, raw_redis):
    alias, cache = make_cache()
    cache.set("k", 1, 60)

    def reads() -> None:
        for _ in range(200):
            cache.get("k")

    threads = [threading.Thread(target=reads) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert total(alias, "hits") == 1600
    assert fleet_totals(raw_redis, cache, alias)["hits"] == 1600


def test_metrics_view_exports_our_series_without_django_prometheus(make_cache):
    """``django_apee.contrib.prometheus.metrics_view`` needs prometheus_client only."""
    from django.test import RequestFactory
    from prometheus_client.parser import text_string_to_metric_families

    alias, cache = make_cache()
    cache.set("a", 1, 60)
    assert cache.get("a") == 1
    assert cache.get("b") is None
    response = metrics_view(RequestFactory().get("/metrics"))
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    found = {
        (s.name, s.labels.get("cache")): s.value
        for family in text_string_to_metric_families(response.content.decode())
        for s in family.samples
    }
    assert found[("apee_cache_hits_total", alias)] == 1
    assert found[("apee_cache_misses_total", alias)] == 1
