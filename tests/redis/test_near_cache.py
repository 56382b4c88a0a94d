"""The near cache through a real ApeeCache on the session's redis-server.

Coherence is asserted as orderings and bounded waits (a loaded machine may
be slow, never wrong); timings are in ``bench/nearcache.py``.
"""

from __future__ import annotations

import time

import pytest
import redis

from django_apee.cache import ApeeCache
from django_apee.core import MISSING
from tests.conftest import Made
from tests.support.near import eventually, plant, warm

# NEAR_CACHE is refused on a cluster (apee.E010): CLIENT TRACKING is per node.
pytestmark = pytest.mark.single_node


def near_of(cache: ApeeCache):  # type: ignore[no-untyped-def]
    near = cache.runtime.near
    assert near is not None
    return near


def settled(near) -> None:  # type: ignore[no-untyped-def]
    """Until every invalidation of what was written so far was handled: a
    PING sent after now came back (they arrive in order before its PONG)."""
    now = time.monotonic()
    assert eventually(lambda: near.tracker.confirmed_at > now)


@pytest.fixture
def near_cache(make_cache: Made) -> ApeeCache:
    return make_cache(NEAR_CACHE=True)[1]


def sample(name: str, alias: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, {"cache": alias}) or 0.0


def test_a_hit_is_served_from_memory_and_not_shared(near_cache: ApeeCache) -> None:
    near_cache.set("k", {"a": [1, 2]}, 60)
    warm(near_cache, "k")
    near = near_of(near_cache)
    near.count()
    alias = near_cache.alias
    hits, near_hits = (
        sample("apee_cache_hits_total", alias),
        sample("apee_cache_near_hits_total", alias),
    )
    first = near_cache.get("k")
    first["a"].append(3)  # callers mutate what they get
    assert near_cache.get("k") == {"a": [1, 2]}
    assert near_cache.get_many(["k", "absent"]) == {"k": {"a": [1, 2]}}
    near.count()  # the tracking thread does it every heartbeat
    assert sample("apee_cache_near_hits_total", alias) - near_hits == 3
    assert sample("apee_cache_hits_total", alias) - hits == 3  # near hits are hits


def test_another_clients_write_and_delete_are_seen(
    near_cache: ApeeCache, raw_redis: redis.Redis
) -> None:
    near_cache.set("k", "old", 60)
    warm(near_cache, "k")
    made = near_cache.client.make_key("k")
    plant(raw_redis, near_cache, "k", {"v": 7})
    assert eventually(lambda: near_cache.get("k") == {"v": 7})
    warm(near_cache, "k")
    raw_redis.delete(made)
    assert eventually(lambda: near_cache.get("k") is None)


def test_own_writes_are_read_at_once(near_cache: ApeeCache) -> None:
    near_cache.set("k", [1], 60)
    warm(near_cache, "k")
    for value in range(2, 50):
        near_cache.set("k", [value], 60)
        assert near_cache.get("k") == [value]  # no wait: forgotten locally
        warm(near_cache, "k")
    near_cache.delete("k")
    assert near_cache.get("k") is None
    near_cache.set_many({"a": [1], "b": [2]}, 60)
    warm(near_cache, "a")
    near_cache.set_many({"a": [3]}, 60)
    assert near_cache.get("a") == [3]
    warm(near_cache, "a")
    near_cache.delete_many(["a"])
    assert near_cache.get("a") is None
    near_cache.set("n", 1, 60)
    near_cache.incr("n")
    assert near_cache.get("n") == 2


def test_nothing_is_served_past_its_soft_timeout(near_cache: ApeeCache) -> None:
    """A near entry stops at the instant its Redis read would stop being
    FRESH: never later than the soft (so the hard) timeout."""
    near_cache.set("k", "v", 1.0)  # soft timeout 0.95 s
    warm(near_cache, "k")
    made = near_cache.client.make_key("k")
    fresh_until = near_of(near_cache).store.get(made)[0]
    assert fresh_until - time.monotonic() <= 0.95
    time.sleep(max(0.0, fresh_until - time.monotonic()) + 0.01)
    assert near_of(near_cache).lookup(made) is MISSING


def test_killing_the_tracking_connection_flushes(
    near_cache: ApeeCache, raw_redis: redis.Redis
) -> None:
    near_cache.set("k", "old", 60)
    warm(near_cache, "k")
    near = near_of(near_cache)
    losses = near.tracker.losses
    raw_redis.client_kill_filter(_id=near.tracker.client_id)
    # Written while this process hears nothing.
    plant(raw_redis, near_cache, "k", "new")
    assert eventually(lambda: near.tracker.losses > losses)
    assert near_cache.get("k") == "new"
    warm(near_cache, "k")  # and it comes back
    assert near_cache.get("k") == "new"


def test_flushdb_empties_it(near_cache: ApeeCache, raw_redis: redis.Redis) -> None:
    near_cache.set("k", "v", 60)
    warm(near_cache, "k")
    raw_redis.flushdb()
    assert eventually(lambda: near_cache.get("k") is None)


def test_off_by_default_and_the_plain_client_is_kept(make_cache: Made) -> None:
    _, cache = make_cache()
    assert cache.runtime.near is None
    assert "Near" not in type(cache.client).__name__


def test_tracking_prefix_is_the_key_prefix(near_cache: ApeeCache) -> None:
    from django_apee.runtime import tracking_prefix

    assert tracking_prefix(near_cache) == f"{near_cache.key_prefix}:"


def test_apee_stats_shows_the_fleets_near_counters(make_cache: Made) -> None:
    import json
    from io import StringIO

    from django.core.management import call_command

    from django_apee.store import fleet

    alias, cache = make_cache(NEAR_CACHE=True)
    cache.set("k", "v", 60)
    warm(cache, "k")
    for _ in range(5):
        assert cache.get("k") == "v"
    cache.set("k", "w", 60)  # forgets the near entry
    near_of(cache).count()  # as the tracking thread does every heartbeat
    fleet.flush()
    out = StringIO()
    call_command("apee_stats", "--cache", alias, "--json", stdout=out)
    (result,) = json.loads(out.getvalue())["results"]
    window = result["fleet"]["window"]
    assert window["near_hits"] >= 5
    assert window["near_invalidations"] >= 1
    assert 0 < result["fleet"]["ratios"]["near_share"] <= 1
    out = StringIO()
    call_command("apee_stats", "--cache", alias, stdout=out)
    assert "near share of hits" in out.getvalue()
    assert "near invalidations" in out.getvalue()


def test_a_read_without_pttl_is_judged_by_the_write_time_in_redis_clock(
    near_cache: ApeeCache, raw_redis: redis.Redis
) -> None:
    """What the lean path (a plain GET) brings: the bytes alone."""
    near = near_of(near_cache)
    warm_key = "warm"
    near_cache.set(warm_key, "w", 60)
    warm(near_cache, warm_key)  # tracking is up
    near_cache.set("k", {"v": 1}, 10)  # soft timeout 9.5 s
    settled(near)  # else the set's own invalidation may cancel the fill
    made = near_cache.client.make_key("k")
    ticket = near.reserve(made)
    assert ticket is not None
    sent = time.monotonic()
    near.fill(ticket, raw_redis.get(made), sent)
    entry = near.store.get(made)
    assert entry is not None
    assert sent < entry[0] <= time.monotonic() + 9.5
    assert near.lookup(made) == {"v": 1}
    # A raw int has no write time: without its PTTL it is not kept.
    raw_redis.set(made, b"3", px=60_000)
    settled(near)
    ticket = near.reserve(made)
    assert ticket is not None
    near.fill(ticket, raw_redis.get(made), time.monotonic())
    assert near.store.get(made) is None


def test_a_write_through_another_alias_over_the_same_keys_is_read_at_once(
    make_cache: Made,
) -> None:
    """Django's own tests write through caches["v2"] and read through
    "default": aliases of one process over the same keys forget together."""
    _, first = make_cache(NEAR_CACHE=True)
    _, second = make_cache(NEAR_CACHE={"MAX_ENTRIES": 100})
    first.set("k", [1], 60)
    warm(first, "k")
    warm(second, "k")
    for value in range(2, 30):
        second.set("k", [value], 60)
        assert first.get("k") == [value]
        warm(first, "k")
        first.set("k", [-value], 60)
        assert second.get("k") == [-value]
        warm(second, "k")
    second.clear()
    assert first.get("k") is None


class Gone:
    """A class that disappears after its instance was near-cached."""

    def __init__(self, n: int) -> None:
        self.n = n


def test_a_payload_that_no_longer_loads_is_a_miss_not_an_error(
    near_cache: ApeeCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    near_cache.set("k", Gone(1), 60)  # pickled (msgpack cannot carry it)
    made = near_cache.client.make_key("k")

    def held() -> bool:
        near_cache.get("k")
        return near_of(near_cache).store.get(made) is not None

    assert eventually(held)
    monkeypatch.delattr(sys.modules[__name__], "Gone")  # as a deploy might
    # A miss each time (counted by the Redis read), never an exception.
    assert [near_cache.get("k") for _ in range(3)] == [None, None, None]


def test_a_stampede_safe_hit_is_served_from_memory_and_stays_coherent(
    near_cache: ApeeCache, raw_redis: redis.Redis
) -> None:
    alias = near_cache.alias
    computes: list[int] = []

    def compute() -> dict[str, list[int]]:
        computes.append(1)
        return {"a": [1, 2]}

    assert near_cache.get_or_set_stampede_safe("k", compute, 60) == {"a": [1, 2]}
    # A read that finds it in Redis keeps it near (reserve, GET, fill), once
    # tracking is confirmed.
    near = near_of(near_cache)
    made = near_cache.client.make_key("k")
    assert eventually(
        lambda: (
            near_cache.get_or_set_stampede_safe("k", compute, 60) == {"a": [1, 2]}
            and near.find(made) == {"a": [1, 2]}
        )
    )
    near_hits = sample("apee_cache_near_hits_total", alias)
    hits = sample("apee_cache_stampede_hits_total", alias)
    gets = sample("apee_cache_hits_total", alias)
    first = near_cache.get_or_set_stampede_safe("k", compute, 60)
    first["a"].append(3)  # callers mutate what they get
    assert near_cache.get_or_set_stampede_safe("k", compute, 60) == {"a": [1, 2]}
    assert sample("apee_cache_near_hits_total", alias) - near_hits == 2
    assert sample("apee_cache_stampede_hits_total", alias) - hits == 2
    assert sample("apee_cache_hits_total", alias) == gets  # not plain get hits
    assert len(computes) == 1
    # Another client's write reaches the stampede-safe path too.
    plant(raw_redis, near_cache, "k", {"v": 7})
    assert eventually(
        lambda: near_cache.get_or_set_stampede_safe("k", compute, 60) == {"v": 7}
    )
    assert len(computes) == 1


def test_apee_stats_shows_each_process_near_cache_size(
    make_cache: Made, raw_redis: redis.Redis
) -> None:
    import json
    import os
    from io import StringIO

    import jsonschema
    from django.core.management import call_command

    from django_apee.store import fleet, gauges
    from tests.redis.test_apee_stats import SCHEMA

    alias, cache = make_cache(NEAR_CACHE={"MAX_ENTRIES": 100})
    for n in range(3):
        cache.set(f"k{n}", "v" * 100, 60)
        warm(cache, f"k{n}")
    key = gauges.procs_key(cache.key_prefix, alias)
    now = int(raw_redis.time()[0])
    raw_redis.hset(key, "gone:1", json.dumps({"at": now - 3600, "entries": 9}))
    raw_redis.hset(key, "garbage:2", b"\x80not json")
    fleet.flush()  # publishes this process's figures with the counts

    out = StringIO()
    call_command("apee_stats", "--cache", alias, "--json", stdout=out)
    document = json.loads(out.getvalue())
    jsonschema.validate(document, SCHEMA)
    (result,) = document["results"]
    (mine,) = result["near_processes"]
    assert mine["process"].endswith(f":{os.getpid()}")
    assert mine["entries"] == 3
    assert 0 < mine["bytes"] <= mine["max_bytes"]
    # The gone process and the unreadable field were deleted.
    assert raw_redis.hkeys(key) == [mine["process"].encode()]
    out = StringIO()
    call_command("apee_stats", "--cache", alias, stdout=out)
    assert "near caches, 1 processes" in out.getvalue()
    assert "3 of" in out.getvalue()
