"""The native async engine on a real 6-node Redis Cluster (issue 15).

On a cluster the ``a*`` methods run on the event loop like on one Redis: a
``redis.asyncio`` RedisCluster per loop built as the sync one was
(``store/aio/cluster.py``) and wake-ups by sharded pub/sub on the node that
owns the key's slot (``store/aio/shardwake.py``). Asserted here: values
cross between sync and async code, reads of keys on every primary, scripts
a node lacks, one compute for 200 coroutines without a thread each, and
waiters woken by the holder's SPUBLISH, not by their lease's end.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
from django.core.cache import caches

from django_apee.core.envelope import Meta
from django_apee.store import lease
from tests.faults.test_cluster import flush_scripts, spread
from tests.redis.test_async_native import with_thread_peak
from tests.support.deployments import wait_until

pytestmark = pytest.mark.faults

COROUTINES = 200
COMPUTE_S = 0.3


def test_async_is_native_on_a_cluster(on_cluster):
    cache = on_cluster()
    assert cache._native() is not None
    cache.set("n", 1, 60)

    async def main() -> Any:
        found = await cache.aget("n")
        return found, cache.runtime.acoordinator.loops.loops()

    assert asyncio.run(main()) == (1, 1)  # read by this loop's own client


def test_each_loops_client_is_built_from_the_same_options(on_cluster):
    """Socket timeouts, REDIS_RETRIES and read_from_replicas reach the async
    client as they reach the sync one (the same parsed arguments)."""
    cache = on_cluster(
        OPTIONS={
            "SOCKET_TIMEOUT": 1.5,
            "SOCKET_CONNECT_TIMEOUT": 0.7,
            "REDIS_RETRIES": 2,
            "REDIS_CLIENT_KWARGS": {"read_from_replicas": True},
        }
    )
    cache.set("r", "from a replica or a primary", 60)

    async def main() -> tuple[Any, Any]:
        found = await cache.aget("r")
        return found, cache.runtime.acoordinator.loops.get().client

    found, client = asyncio.run(main())
    sync = cache.client.get_client()
    assert found in ("from a replica or a primary", None)  # a replica may lag
    assert client.read_from_replicas is sync.read_from_replicas is True
    assert client.retry.get_retries() == sync.retry.get_retries() == 2
    for node in client.get_nodes():
        assert node.connection_kwargs["socket_timeout"] == 1.5
        assert node.connection_kwargs["socket_connect_timeout"] == 0.7


def test_sync_and_async_read_each_others_values_on_every_primary(cluster, on_cluster):
    cache = on_cluster()
    tag = uuid.uuid4().hex[:6]
    keys = list(spread(cluster, f"x-{tag}-", 30))
    synced, awaited = keys[:15], keys[15:]
    cache.set_many({key: f"sync {key}" for key in synced}, 60)

    async def main() -> dict[str, Any]:
        assert await cache.aget(synced[0]) == f"sync {synced[0]}"
        await cache.aset(awaited[0], f"async {awaited[0]}", 60)
        failed = await cache.aset_many({key: f"async {key}" for key in awaited[1:]}, 60)
        assert failed == []
        return dict(await cache.aget_many([*keys, "missing"]))

    found = asyncio.run(main())

    expected = {key: f"sync {key}" for key in synced}
    expected.update({key: f"async {key}" for key in awaited})
    assert found == expected
    assert cache.get_many(awaited) == {key: f"async {key}" for key in awaited}

    async def delete() -> None:
        assert await cache.adelete(keys[0])
        await cache.adelete_many(keys[1:])

    asyncio.run(delete())
    assert cache.get_many(keys) == {}


def test_scripts_a_node_lacks_are_loaded(cluster, on_cluster):
    """Every primary answers NOSCRIPT: single calls and pipelines load the
    script and run once."""
    cache = on_cluster(OPTIONS={"LEGACY_READS": False})
    tag = uuid.uuid4().hex[:6]
    keys = list(spread(cluster, f"s-{tag}-", 12))
    flush_scripts(cluster)

    async def main() -> Any:
        await cache.aset_many({key: key for key in keys}, 60)
        flush_scripts(cluster)
        many = await cache.aget_many(keys)
        flush_scripts(cluster)
        one = await cache.aget_or_set_stampede_safe(f"cold-{tag}", lambda: 7, 60)
        return many, one

    many, one = asyncio.run(main())
    assert many == {key: key for key in keys}
    assert one == 7


def test_two_hundred_coroutines_on_a_cold_key(on_cluster):
    """One compute for two loops of 100 coroutines: one loop's leader
    computes, the other's waits for its wake-up. No thread per caller."""
    cache = on_cluster()
    key = f"cold-{uuid.uuid4().hex[:6]}"
    cache.get("warm-up")  # the sync side's own threads are not the waiters'
    calls = 0

    async def compute() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(COMPUTE_S)
        return "computed"

    async def half() -> list[Any]:
        return list(
            await asyncio.gather(
                *(
                    cache.aget_or_set_stampede_safe(key, compute, 60)
                    for _ in range(COROUTINES // 2)
                )
            )
        )

    results: list[Any] = []
    added: list[int] = []

    def loop() -> None:
        found, more = asyncio.run(with_thread_peak(half()))
        results.extend(found)
        added.append(more)

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert results == ["computed"] * COROUTINES
    assert calls == 1
    assert max(added) <= 4


def test_waiters_are_woken_by_the_holders_spublish(on_cluster):
    """A lease held elsewhere (20 s): 200 coroutines wait on the shard
    channel of the key's slot and get the holder's value at its release."""
    cache = on_cluster()
    key = f"held-{uuid.uuid4().hex[:6]}"
    made = cache.client.make_key(key)
    held = lease.acquire(
        cache.client.get_client(write=True),
        made,
        20_000,
        channel=cache.runtime.hub.channel,
    ).lease
    assert held is not None

    async def local() -> str:
        return "computed here"

    async def main() -> tuple[list[Any], float]:
        calls = [
            cache.aget_or_set_stampede_safe(key, local, 60) for _ in range(COROUTINES)
        ]
        gathered = asyncio.gather(*calls)
        hub = cache.runtime.acoordinator.loops.get().hub
        while not hub.waiting():
            await asyncio.sleep(0.005)
        await asyncio.sleep(COMPUTE_S)
        payload = cache.envelope.encode(
            "from the holder", Meta(57_000, 60_000), key=str(made)
        )
        released = time.monotonic()
        await asyncio.to_thread(lease.release, held, payload, 60_000)
        found = list(await gathered)
        return found, time.monotonic() - released

    found, after = asyncio.run(main())
    assert found == ["from the holder"] * COROUTINES
    assert after < 1.0


def test_a_loop_that_ends_at_once_closes_its_wake_ups(on_cluster):
    """Each loop's first wait starts its shard subscriber; a loop that ends
    right after (``async_to_sync``: a loop per call) must not wait for it
    at its shutdown (redis-py can swallow the cancellation)."""
    cache = on_cluster()
    tag = uuid.uuid4().hex[:6]
    found: list[Any] = []

    def calls() -> None:
        for n in range(5):
            key = f"once-{tag}-{n}"
            found.append(asyncio.run(cache.aget_or_set_stampede_safe(key, n, 60)))

    thread = threading.Thread(target=calls, daemon=True)
    thread.start()
    thread.join(20)
    assert not thread.is_alive(), "a loop's shutdown hung"
    assert found == [0, 1, 2, 3, 4]


def test_async_wake_ups_follow_a_failover(cluster, cluster_alias):
    """A loop's waiters' shard channel was subscribed on a primary that then
    hands over to its replica (``CLUSTER FAILOVER``): a coroutine waiting
    for another process's compute on that slot is still woken when the
    value lands, not at its lease's end (10 s)."""
    prefix = f"af{uuid.uuid4().hex[:6]}"
    holder = caches[cluster_alias(KEY_PREFIX=prefix, OPTIONS={"LEASE_TIMEOUT": 10})]
    waiter = caches[cluster_alias(KEY_PREFIX=prefix, OPTIONS={"LEASE_TIMEOUT": 10})]
    tag = next(
        f"{{t{n}}}"
        for n in range(1000)
        if cluster.replicas_of(cluster.primary_for(holder.make_key(f"{{t{n}}}")))
    )
    owner = cluster.primary_for(holder.make_key(tag))
    loop = asyncio.new_event_loop()

    def wait_for_compute(name: str) -> float:
        started = threading.Event()

        def slow() -> str:
            started.set()
            time.sleep(COMPUTE_S)
            return name

        async def again() -> str:
            return "again"

        thread = threading.Thread(
            target=holder.get_or_set_stampede_safe, args=(name, slow, 60)
        )
        thread.start()
        assert started.wait(10)
        began = time.monotonic()
        value = loop.run_until_complete(
            waiter.aget_or_set_stampede_safe(name, again, 60)
        )
        waited = time.monotonic() - began
        thread.join(10)
        assert value == name
        return waited

    try:
        before = wait_for_compute(f"{tag}1")  # subscribed on ``owner``
        took = cluster.failover(cluster.replicas_of(owner)[0])
        wait_until(lambda: holder.get(f"{tag}0") is None, 10, "a fresh slot map")
        after = wait_for_compute(f"{tag}2")
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
    print(f"woken in {before:.2f}s; failover in {took:.2f}s; woken in {after:.2f}s")
    assert before < 3.0
    assert after < 3.0  # a lost subscription would wait out the 10 s lease
