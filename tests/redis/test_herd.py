"""Herd mode: plain get/set cache-aside code gets the lease (real Redis).

An entry past its soft timeout gives exactly one reader fleet-wide a miss;
that reader's ``set`` is the fenced write that frees the lease. With
``COLD_MISS_WAIT``, absent keys are leased too and the other readers wait
for the winner's write. Entries are put into their stale window by hand:
written with a long timeout, then ``PEXPIRE``\\ d to the last few percent of
it, so no test sleeps through a timeout to get there.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from django_apee.conf import ApeeOptions
from django_apee.core.envelope import Meta
from django_apee.store import lease
from tests.redis.test_stampede import (
    Background,
    age_entry,
    hold_lease,
    lease_key,
    made_key,
    metric,
    run_threads,
    stored,
    wait_for,
    write_entry,
)

ROOT = Path(__file__).resolve().parents[2]


def make_stale(backend, raw_redis, key, left_ms=200):
    """Leave ``key`` ``left_ms`` to live: past its soft timeout if that is < 5 %."""
    age_entry(backend, raw_redis, key, left_ms)
    pttl = raw_redis.pttl(made_key(backend, key))
    assert 0 < pttl <= left_ms


# -- what a plain set stores ---------------------------------------------------------


def test_plain_set_stores_its_hard_timeout_but_no_soft_or_delta(make_cache, raw_redis):
    _, cache = make_cache()
    cache.set("k", {"a": 1}, 30)
    value, meta = stored(cache, raw_redis, "k")
    assert value == {"a": 1}
    assert (meta.hard_ms, meta.soft_ms, meta.delta_ms, meta.seed) == (30_000, 0, 0, 0)


def test_plain_set_keeps_ints_raw_and_persistent_values_without_meta(
    make_cache, raw_redis
):
    _, cache = make_cache()
    cache.set("n", 41, 30)
    assert raw_redis.get(made_key(cache, "n")) == b"41"
    assert cache.incr("n") == 42
    cache.set("forever", "x", None)
    _, meta = stored(cache, raw_redis, "forever")
    assert meta is None


# -- stale entries: one miss fleet-wide ------------------------------------------------


def test_stale_entry_gives_one_reader_a_miss_and_the_lease(make_cache, raw_redis):
    alias, cache = make_cache()
    cache.set("page", "old", 100)
    make_stale(cache, raw_redis, "page")
    assert cache.get("page") is None  # the winner
    assert raw_redis.exists(lease_key(cache, "page")) == 1
    assert cache.get("page") == "old"  # everyone else, this process included
    assert cache.get_many(["page"]) == {"page": "old"}
    assert metric(alias, "herd_misses") == 1


def test_many_threads_on_a_stale_entry_exactly_one_miss(make_cache, raw_redis):
    _, cache = make_cache()
    cache.set("page", "old", 100)
    make_stale(cache, raw_redis, "page", left_ms=2000)
    results, errors, _ = run_threads(48, lambda i: cache.get("page"))
    assert errors == [None] * 48
    assert sorted(results, key=str).count(None) == 1
    assert results.count("old") == 47


def test_winner_set_is_fenced_frees_the_lease_and_records_delta(make_cache, raw_redis):
    _, cache = make_cache()
    cache.set("page", "old", 100)
    make_stale(cache, raw_redis, "page")
    assert cache.get("page") is None
    time.sleep(0.05)  # the winner's "compute"
    assert cache.set("page", "new", 10) is True
    assert_fenced_write(cache, raw_redis)
    assert cache.get("page") == "new"


def assert_fenced_write(cache, raw_redis):
    """The winner's "new" for "page" (10 s) landed as ``lua/herd_set.lua``
    writes it: the lease freed, the compute time (>= 50 ms) and a seed stored."""
    assert raw_redis.exists(lease_key(cache, "page")) == 0
    value, meta = stored(cache, raw_redis, "page")
    assert value == "new"
    assert meta.hard_ms == 10_000
    assert 50 <= meta.delta_ms < 5_000
    assert meta.seed > 0


def test_winner_add_is_the_fenced_write_too(make_cache, raw_redis):
    _, cache = make_cache()
    cache.set("page", "old", 100)
    make_stale(cache, raw_redis, "page")
    assert cache.get("page") is None
    assert cache.add("page", "new", 10) is True  # it was told the key is absent
    assert cache.get("page") == "new"
    assert raw_redis.exists(lease_key(cache, "page")) == 0


def test_delete_while_the_winner_computes_wins(make_cache, raw_redis):
    alias, cache = make_cache()
    cache.set("page", "old", 100)
    make_stale(cache, raw_redis, "page")
    assert cache.get("page") is None
    cache.delete("page")  # invalidation: data changed under the computation
    assert cache.set("page", "pre-invalidation", 10) is False
    assert cache.get("page") is None
    assert metric(alias, "lease_lost") == 1


def test_a_newer_plain_set_wins_over_the_winner(make_cache, raw_redis):
    _, cache = make_cache()
    cache.set("page", "old", 100)
    make_stale(cache, raw_redis, "page")
    assert cache.get("page") is None
    # Another process's plain set meanwhile, as lua/set.lua does it: the
    # new value, and the lease revoked.
    made = made_key(cache, "page")
    payload = cache.envelope.encode("newer", Meta(hard_ms=10_000), key=made)
    raw_redis.set(made, payload, px=10_000)
    raw_redis.delete(lease_key(cache, "page"))
    assert cache.set("page", "winner's", 10) is False
    assert cache.get("page") == "newer"


def test_winner_slower_than_its_lease_still_writes_an_unchanged_entry(
    make_cache, raw_redis
):
    _, cache = make_cache(LEASE_TIMEOUT=0.5, LEASE_MIN=0.1)
    cache.set("page", "old", 100)
    make_stale(cache, raw_redis, "page", left_ms=3000)
    assert cache.get("page") is None
    assert wait_for(lambda: raw_redis.exists(lease_key(cache, "page")) == 0, 3)
    assert cache.set("page", "new", 10) is True
    assert cache.get("page") == "new"


def test_winner_slower_than_its_lease_loses_to_a_new_winner(make_cache, raw_redis):
    _, cache = make_cache(LEASE_TIMEOUT=0.5, LEASE_MIN=0.1)
    cache.set("page", "old", 100)
    make_stale(cache, raw_redis, "page", left_ms=3000)
    assert cache.get("page") is None
    assert wait_for(lambda: raw_redis.exists(lease_key(cache, "page")) == 0, 3)
    # Another process's reader wins the free lease now.
    raw_redis.set(lease_key(cache, "page"), "someone-else", px=5000)
    assert cache.set("page", "late", 10) is False
    assert cache.get("page") == "old"


def test_winner_that_never_sets_is_bounded_by_its_lease(make_cache, raw_redis):
    _, cache = make_cache(LEASE_TIMEOUT=0.5, LEASE_MIN=0.1)
    cache.set("page", "old", 100)
    make_stale(cache, raw_redis, "page", left_ms=3000)
    assert cache.get("page") is None
    started = time.monotonic()
    assert cache.get("page") == "old"
    assert wait_for(lambda: raw_redis.exists(lease_key(cache, "page")) == 0, 3)
    assert time.monotonic() - started < 2.0
    assert cache.get("page") is None  # the next reader wins again


def test_fresh_entries_never_miss_and_take_no_lease(make_cache, raw_redis):
    _, cache = make_cache()
    cache.set("page", "v", 10)
    results, errors, _ = run_threads(16, lambda i: cache.get("page"))
    assert errors == [None] * 16
    assert results == ["v"] * 16
    assert raw_redis.exists(lease_key(cache, "page")) == 0


def test_nothing_is_served_past_the_timeout(make_cache, raw_redis):
    _, cache = make_cache()
    cache.set("page", "v", 0.3)
    time.sleep(0.35)
    assert cache.get("page") is None
    assert cache.get("page", "dflt") == "dflt"


def test_get_many_gives_the_miss_per_key(make_cache, raw_redis):
    _, cache = make_cache()
    cache.set_many({"fresh": 1.5, "stale": "s"}, 10)
    make_stale(cache, raw_redis, "stale")
    assert cache.get_many(["fresh", "stale", "absent"]) == {"fresh": 1.5}
    assert cache.get_many(["fresh", "stale", "absent"]) == {"fresh": 1.5, "stale": "s"}


def test_has_key_never_takes_the_lease(make_cache, raw_redis):
    _, cache = make_cache()
    cache.set("page", "old", 100)
    make_stale(cache, raw_redis, "page")
    assert cache.has_key("page")
    assert raw_redis.exists(lease_key(cache, "page")) == 0


@pytest.mark.parametrize(
    "key",
    [
        "django.contrib.sessions.cacheabc123",
        "django.contrib.sessions.cached_dbabc123",
        "views.decorators.cache.cache_header..d41d8cd98f00b204e9800998ecf8427e",
        "mine:token",
    ],
)
def test_excluded_keys_never_miss(make_cache, raw_redis, key):
    _, cache = make_cache(HERD_EXCLUDE=["mine:"])
    cache.set(key, "data", 10)
    make_stale(cache, raw_redis, key)
    assert [cache.get(key) for _ in range(3)] == ["data"] * 3
    assert raw_redis.exists(lease_key(cache, key)) == 0


def test_herd_off_serves_stale_entries_to_everyone(make_cache, raw_redis):
    _, cache = make_cache(HERD=False)
    cache.set("page", "old", 100)
    make_stale(cache, raw_redis, "page")
    assert [cache.get("page") for _ in range(3)] == ["old"] * 3
    assert raw_redis.exists(lease_key(cache, "page")) == 0


def test_get_or_set_stampede_safe_holder_keeps_plain_readers_served(
    make_cache, raw_redis
):
    _, cache = make_cache()
    started, release = threading.Event(), threading.Event()

    def slow():
        started.set()
        release.wait(5)
        return "new"

    cache.get_or_set_stampede_safe("k", lambda: "old", 10, soft_timeout=9)
    make_stale(cache, raw_redis, "k", left_ms=800)
    assert cache.get_or_set_stampede_safe("k", slow, 10, soft_timeout=9) == "old"
    assert started.wait(5)  # a background refresh holds the lease
    assert cache.get("k") == "old"  # a plain reader does not miss meanwhile
    release.set()
    assert wait_for(lambda: cache.get("k") == "new")


def test_plain_get_never_takes_the_lease_of_a_stampede_safe_entry(
    make_cache, raw_redis
):
    # Its callers refresh it in the background; a plain reader must not
    # get a miss (and leave the refresh to code that may never set).
    _, cache = make_cache()
    cache.get_or_set_stampede_safe("k", lambda: "v", 10, soft_timeout=1)
    make_stale(cache, raw_redis, "k", left_ms=800)
    assert [cache.get("k") for _ in range(3)] == ["v"] * 3
    assert raw_redis.exists(lease_key(cache, "k")) == 0


@pytest.mark.parametrize(
    "options",
    [
        {"HERD": "yes"},
        {"HERD_EXCLUDE": "sessions"},
        {"HERD_EXCLUDE": [1]},
        {"COLD_MISS_WAIT": -1},
    ],
)
def test_bad_herd_options_are_refused(options):
    with pytest.raises(ImproperlyConfigured, match=next(iter(options))):
        ApeeOptions.from_params(options)


def test_value_expiring_while_its_winner_computes_is_waited_for(make_cache, raw_redis):
    # The winner's compute outlives the entry: readers in that gap find the
    # key absent but leased, and wait for the write instead of computing.
    _, cache = make_cache()
    cache.set("page", "old", 100)
    make_stale(cache, raw_redis, "page")
    assert cache.get("page") is None  # the winner
    raw_redis.delete(made_key(cache, "page"))  # expired meanwhile
    reader = Background(lambda: cache.get("page"))
    time.sleep(0.2)
    assert reader.returned_at == 0.0  # still waiting
    assert cache.set("page", "new", 100) is True
    assert reader.join() == "new"


def test_a_key_being_computed_by_the_stampede_path_is_waited_for(make_cache, raw_redis):
    _, cache = make_cache()
    holder = hold_lease(cache, "k", 5000)  # get_or_set_stampede_safe elsewhere
    reader = Background(lambda: cache.get("k"))
    time.sleep(0.2)
    payload = cache.envelope.encode(
        "computed", Meta(hard_ms=10_000), key=holder.value_key
    )
    assert lease.release(holder, payload, 10_000)
    assert reader.join() == "computed"


def test_a_value_past_its_timeout_being_recomputed_is_waited_for(make_cache, raw_redis):
    # Kept for stale_if_error, past its hard timeout: absent for get, and
    # its lease is held, so a plain reader waits for the recompute.
    _, cache = make_cache()
    write_entry(cache, raw_redis, "k", "old", Meta(900, 1000, 10_000, 50), px=5000)
    holder = hold_lease(cache, "k", 5000)
    reader = Background(lambda: cache.get("k"))
    time.sleep(0.2)
    assert reader.returned_at == 0.0
    payload = cache.envelope.encode("new", Meta(hard_ms=10_000), key=holder.value_key)
    assert lease.release(holder, payload, 10_000)
    assert reader.join() == "new"


def test_wait_for_a_dead_holder_ends_with_its_lease(make_cache, raw_redis):
    alias, cache = make_cache(LEASE_MIN=0.1)
    raw_redis.set(lease_key(cache, "k"), "dead-holder", px=400)
    started = time.monotonic()
    assert cache.get("k") is None  # waited out the lease, then won it
    assert 0.3 <= time.monotonic() - started < 3
    assert raw_redis.get(lease_key(cache, "k")) not in (None, b"dead-holder")
    assert metric(alias, "herd_misses") == 1


def test_herd_off_never_waits(make_cache, raw_redis):
    _, cache = make_cache(HERD=False)
    hold_lease(cache, "k", 5000)
    started = time.monotonic()
    assert cache.get("k") is None
    assert time.monotonic() - started < 0.5


def test_an_excluded_key_being_computed_is_not_waited_for(make_cache, raw_redis):
    """A ``HERD_EXCLUDE`` key found absent misses at once, as on django-redis,
    even while its lease is held (docs/howto/cachalot-sessions.rst)."""
    _, cache = make_cache(HERD_EXCLUDE=["mine:"])
    hold_lease(cache, "mine:k", 5000)
    started = time.monotonic()
    assert cache.get("mine:k") is None
    assert time.monotonic() - started < 0.5


# -- cold misses ------------------------------------------------------------


def test_cold_miss_without_cold_wait_takes_no_lease(make_cache, raw_redis):
    _, cache = make_cache()
    assert cache.get("absent") is None
    assert raw_redis.exists(lease_key(cache, "absent")) == 0


def test_cold_miss_wait_one_miss_the_others_wait_for_its_set(make_cache, raw_redis):
    alias, cache = make_cache(COLD_MISS_WAIT=5)
    winners = []
    lock = threading.Lock()

    def read(index: int) -> Any:
        value = cache.get("cold")
        if value is None:
            with lock:
                winners.append(index)
            time.sleep(0.2)
            cache.set("cold", "computed", 10)
            return "computed (winner)"
        return value

    results, errors, _ = run_threads(32, read)
    assert errors == [None] * 32
    assert len(winners) == 1
    assert results.count("computed") == 31
    assert metric(alias, "herd_misses") == 1


def test_cold_miss_wait_is_bounded_when_the_winner_never_sets(make_cache, raw_redis):
    alias, cache = make_cache(COLD_MISS_WAIT=0.3)
    assert cache.get("flag") is None  # wins the lease, never sets
    started = time.monotonic()
    assert cache.get("flag") is None
    assert 0.25 <= time.monotonic() - started < 3
    assert metric(alias, "fallbacks", reason="cold_wait_timeout") == 1


def test_cold_wait_remembers_keys_nobody_sets(make_cache, raw_redis):
    _, cache = make_cache(COLD_MISS_WAIT=5, LEASE_TIMEOUT=0.3, LEASE_MIN=0.1)
    assert cache.get("flag") is None  # wins, never sets
    started = time.monotonic()
    assert cache.get("flag") is None  # waits out the lease, then wins it
    assert time.monotonic() - started < 3
    started = time.monotonic()
    assert cache.get("flag") is None  # remembered: no wait this time
    assert time.monotonic() - started < 0.25


def test_async_cold_wait_leaves_the_thread_sensitive_thread_free(make_cache, raw_redis):
    from asgiref.sync import sync_to_async

    _, cache = make_cache(COLD_MISS_WAIT=5)
    holder = hold_lease(cache, "cold", 5000)  # another process's winner
    order: list[str] = []

    async def scenario() -> Any:
        waiting = asyncio.ensure_future(cache.aget("cold"))
        many = asyncio.ensure_future(cache.aget_many(["cold"]))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        assert not many.done()
        await sync_to_async(lambda: order.append("sync"), thread_sensitive=True)()
        order.append("sync returned")
        cache.set("cold", "value", 10)  # a plain set: lands, wakes the waiters
        return await asyncio.wait_for(asyncio.gather(waiting, many), 5)

    assert asyncio.run(scenario()) == ["value", {"cold": "value"}]
    assert order == ["sync", "sync returned"]
    assert raw_redis.get(holder.lease_key) is None


# -- across processes -------------------------------------------------------


def run_herd_workers(make_cache, raw, options, processes=2, threads=12, seconds=3.5):
    """Cache-aside readers in ``processes`` x ``threads``; return the computes.

    The key is written before they start, to need its first recompute
    0.95 s into the run: the test is about expiries, not the very first
    fill.
    """
    counter = f"herd-test-computes-{time.monotonic_ns()}"
    ready, go = f"{counter}:ready", f"{counter}:go"
    # Values go stale 1 s after they are written and expire 1 s later: a
    # refresh has a second to land before readers see a hard miss (with the
    # default 0.95 ratio of a 1 s timeout it had 50 ms, and a loaded machine
    # once took longer). Still one expiry per second of the run.
    ratio = 0.5
    options = {"SOFT_TIMEOUT_RATIO": ratio, **options}
    _, cache = make_cache(**options)
    job = {
        "options": options,
        "key": "hot",
        "timeout": 2.0,
        "compute": 0.02,
        "threads": threads,
        "counter": counter,
        "ready": ready,
        "go": go,
        "seconds": seconds,
    }
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.herd_worker", json.dumps(job)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    # Every child is up (Django set up, its cache connected) before the run
    # starts: on a loaded machine start-up took seconds, and a child that
    # started after the end computed nothing.
    deadline = time.monotonic() + 120
    while int(raw.get(ready) or 0) < processes:
        assert all(c.poll() is None for c in children), "a herd worker died"
        assert time.monotonic() < deadline, "herd workers did not start in 120 s"
        time.sleep(0.01)
    start = time.time() + 0.5
    # The first recompute is due 0.95 s into the run: at the soft timeout
    # with herd mode, at the hard one without.
    due = start - time.time() + 0.95
    cache.set("hot", "generation 0", due / ratio if options.get("HERD", True) else due)
    raw.set(go, repr(start))
    outcomes = []
    try:
        for child in children:
            out, err = child.communicate(timeout=seconds + 60)
            assert child.returncode == 0, err[-2000:]
            outcomes.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(10)
    return int(raw.get(counter) or 0), outcomes


def test_cache_aside_code_across_processes_computes_once_per_expiry(
    make_cache, raw_redis
):
    # 2 processes x 12 threads read one key for 3.5 s that goes stale every
    # second (2 s timeout, SOFT_TIMEOUT_RATIO 0.5): a refresh every second
    # or a little less (once the compute time is known), so 3 or 4 computes,
    # against one per thread at every expiry without herd mode (the
    # comparison below shows the test can fail).
    computes, outcomes = run_herd_workers(make_cache, raw_redis, {})
    assert sum(o["errors"] for o in outcomes) == 0
    assert sum(o["reads"] for o in outcomes) > 1000
    assert sum(o["misses"] for o in outcomes) == computes
    assert 2 <= computes <= 5


def test_without_herd_mode_the_same_load_stampedes(make_cache, raw_redis):
    computes, outcomes = run_herd_workers(make_cache, raw_redis, {"HERD": False})
    assert sum(o["errors"] for o in outcomes) == 0
    assert computes > 5
