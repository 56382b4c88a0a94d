"""``aset``, ``aadd``, ``aset_many`` and ``ahas_key`` on ``redis.asyncio``.

What they store is what the sync methods store (the same envelope, timings
and scripts: each side reads the other's values), herd mode's fenced write
included; and they hold no thread. Real Redis, real event loops.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from django_apee.core import MISSING
from django_apee.core.envelope import Meta
from tests.redis.test_async_native import with_thread_peak
from tests.redis.test_herd import assert_fenced_write, make_stale
from tests.redis.test_stampede import lease_key, made_key, metric, stored, write_entry


def test_async_writes_are_read_by_sync_and_the_reverse(make_cache, raw_redis):
    _, cache = make_cache()
    cache.set("sync", {"s": 1}, 30)
    cache.set_many({"sync-a": [1], "sync-b": [2]}, 30)

    async def main() -> tuple[Any, ...]:
        assert await cache.aset("async", {"a": 1}, 30) is True
        assert await cache.aset_many({"async-a": (1,), "async-b": "b"}, 30) == []
        added = await cache.aadd("async-add", 7, 30)
        return (
            added,
            await cache.aget("sync"),
            await cache.aget_many(["sync-a", "sync-b"]),
            await cache.ahas_key("sync"),
        )

    added, one, many, has = asyncio.run(main())

    assert (added, one, many, has) == (
        True,
        {"s": 1},
        {"sync-a": [1], "sync-b": [2]},
        True,
    )
    assert cache.get("async") == {"a": 1}
    assert cache.get_many(["async-a", "async-b"]) == {"async-a": (1,), "async-b": "b"}
    assert cache.get("async-add") == 7
    assert raw_redis.get(made_key(cache, "async-add")) == b"7"  # raw: INCR works
    assert cache.incr("async-add") == 8
    _, meta = stored(cache, raw_redis, "async")
    # The timings a plain set stores: the hard timeout and the write time.
    assert (meta.hard_ms, meta.soft_ms, meta.delta_ms, meta.seed) == (30_000, 0, 0, 0)
    assert meta.written_ms > 0
    assert 29_000 < raw_redis.pttl(made_key(cache, "async")) <= 30_000
    assert asyncio.run(cache.aset("forever", "x", None)) is True
    assert stored(cache, raw_redis, "forever") == ("x", None)  # no timings
    assert raw_redis.pttl(made_key(cache, "forever")) == -1


def test_aadd_and_timeouts_of_zero_follow_django(make_cache, raw_redis):
    _, cache = make_cache()
    cache.set("there", "old", 30)

    async def main() -> tuple[Any, ...]:
        return (
            await cache.aadd("there", "new", 30),  # present: not added
            await cache.aadd("absent", "new", 0),  # absent, but nothing stored
            await cache.aadd("there", "new", 0),  # present: False, left alone
            await cache.aset("gone", "v", 30),
            await cache.aset("gone", "v", 0),  # 0 deletes
            await cache.aset_many({"many": 1}, -1),  # nothing stored
        )

    assert asyncio.run(main()) == (False, True, False, True, True, [])
    assert cache.get("there") == "old"
    assert cache.get("absent", MISSING) is MISSING
    assert raw_redis.exists(made_key(cache, "gone"), made_key(cache, "many")) == 0


def test_ahas_key_is_has_key(make_cache, raw_redis):
    """Absent, persistent, fresh, and past its hard timeout inside the grace
    Redis keeps for ``stale_if_error`` (there, not served: False)."""
    _, cache = make_cache()
    cache.set("fresh", 1, 30)
    cache.set("persistent", 1, None)
    write_entry(cache, raw_redis, "graced", "v", Meta(100, 1_000, grace_ms=30_000))
    raw_redis.pexpire(made_key(cache, "graced"), 20_000)  # hard timeout passed
    names = ["absent", "fresh", "persistent", "graced"]

    async def main() -> list[Any]:
        return [await cache.ahas_key(name) for name in names]

    assert asyncio.run(main()) == [cache.has_key(name) for name in names]
    assert asyncio.run(main()) == [False, True, True, False]


@pytest.mark.parametrize("write", ["aset", "aadd", "aset_many"])
def test_a_herd_winners_async_write_is_fenced(make_cache, raw_redis, write):
    """A coroutine told a stale entry is absent (it won the lease): its
    write is ``lua/herd_set.lua``'s, as a sync ``set`` would send, and
    frees the lease; the time since it won is stored as the compute time."""
    _, cache = make_cache()
    cache.set("page", "old", 100)
    # Stale (its soft timeout is at 95 s) with 2 s left: on a cluster a
    # loop's first call asks for the slot map first, which 200 ms may not cover.
    make_stale(cache, raw_redis, "page", left_ms=2000)

    async def main() -> Any:
        assert await cache.aget("page") is None  # the winner
        assert raw_redis.exists(lease_key(cache, "page")) == 1
        await asyncio.sleep(0.05)  # its compute
        if write == "aset_many":
            return await cache.aset_many({"page": "new", "other": 2}, 10)
        return await getattr(cache, write)("page", "new", 10)

    assert asyncio.run(main()) in (True, [])
    assert_fenced_write(cache, raw_redis)


def test_a_herd_winner_overtaken_by_a_newer_write_stores_nothing(make_cache, raw_redis):
    """The fenced write loses to a newer plain write: nothing stored, and
    the lost lease counted, as on the sync side."""
    alias, cache = make_cache()
    cache.set("page", "old", 100)
    # Stale (its soft timeout is at 95 s) with 2 s left: on a cluster a
    # loop's first call asks for the slot map first, which 200 ms may not cover.
    make_stale(cache, raw_redis, "page", left_ms=2000)
    lost = metric(alias, "lease_lost")

    async def main() -> Any:
        assert await cache.aget("page") is None  # the winner
        # Another process's plain set meanwhile, as lua/set.lua does it: the
        # new value, and the lease revoked.
        made = made_key(cache, "page")
        payload = cache.envelope.encode("newer", Meta(hard_ms=10_000), key=made)
        raw_redis.set(made, payload, px=10_000)
        raw_redis.delete(lease_key(cache, "page"))
        return await cache.aset("page", "winner's", 10)

    assert asyncio.run(main()) is False
    assert cache.get("page") == "newer"
    assert metric(alias, "lease_lost") == lost + 1


def test_async_writes_hold_no_thread(make_cache):
    """500 concurrent writes and key checks, past the pool's 100
    connections: no thread per call (the thread path would add the
    executor's workers), one for the process's first sample of Redis's
    clock; the coroutines past the bound wait for a connection rather than
    fail."""
    _, cache = make_cache()
    cache.get("warm-up")  # the sync side's own threads (no clock sample: a miss)
    assert cache.runtime.clock.sample is None

    async def main() -> tuple[list[Any], int]:
        writes = [cache.aset(f"k{n}", n, 30) for n in range(250)]
        checks = [cache.ahas_key(f"k{n}") for n in range(250)]
        return await with_thread_peak(asyncio.gather(*writes, *checks))

    results, added = asyncio.run(main())

    assert results[:250] == [True] * 250
    assert added <= 1
    assert cache.get_many(["k0", "k249"]) == {"k0": 0, "k249": 249}


def test_ignored_redis_errors_answer_as_the_sync_methods_do(make_cache):
    _, cache = make_cache(location="redis://127.0.0.1:1/0", IGNORE_EXCEPTIONS=True)

    async def main() -> tuple[Any, ...]:
        return (
            await cache.aset("k", 1, 30),
            await cache.aadd("k", 1, 30),
            await cache.aset_many({"a": 1, "b": 2}, 30),
            await cache.ahas_key("k"),
        )

    assert asyncio.run(main()) == (
        cache.set("k", 1, 30),
        cache.add("k", 1, 30),
        cache.set_many({"a": 1, "b": 2}, 30),
        cache.has_key("k"),
    )
    assert asyncio.run(main())[2] == ["a", "b"]
