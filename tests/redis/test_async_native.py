"""The async methods on ``redis.asyncio``: no thread per waiting coroutine.

Real Redis, real event loops (``asyncio.run``). What is asserted is counts
(computes, threads, connections, loops) and values, never durations.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from django_apee.cache import ApeeCache
from django_apee.core import MISSING
from django_apee.core.envelope import Meta
from django_apee.store import lease

#: What the native engine (redis.asyncio) does; a cluster has none, its async
#: methods run the sync ones in a thread (``tests/faults/test_cluster.py``).

COROUTINES = 2000
COMPUTE_S = 0.3


class Counted:
    """A compute that counts its runs (from any thread or the loop)."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.calls = 0
        self._lock = threading.Lock()

    def sync(self) -> Any:
        with self._lock:
            self.calls += 1
        time.sleep(COMPUTE_S)
        return self.value

    async def coroutine(self) -> Any:
        self.calls += 1
        await asyncio.sleep(COMPUTE_S)
        return self.value


async def with_thread_peak(work: Any) -> tuple[Any, int]:
    """Await ``work`` while sampling the process's thread count; return its
    result and how many threads it added at most."""
    baseline = threading.active_count()
    peak = baseline
    done = False

    async def sample() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, threading.active_count())
            await asyncio.sleep(0.005)

    sampler = asyncio.ensure_future(sample())
    try:
        result = await asyncio.wait_for(work, timeout=60)
    finally:
        done = True
        await sampler
    return result, peak - baseline


def held_elsewhere(cache: ApeeCache, key: str) -> tuple[str, lease.Lease]:
    """Take ``key``'s lease as another process's holder would (20 s)."""
    made = cache.client.make_key(key)
    held = lease.acquire(
        cache.client.get_client(write=True),
        made,
        20_000,
        channel=cache.runtime.hub.channel,
    ).lease
    assert held is not None
    return made, held


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_two_thousand_coroutines_on_a_cold_key(make_cache, kind):
    """One compute, every coroutine gets its value, at most 4 more threads."""
    _, cache = make_cache()
    compute = Counted({"answer": 42})
    default = compute.sync if kind == "sync" else compute.coroutine
    cache.get("warm-up")  # the sync side's own threads are not the waiters'

    async def main() -> tuple[list[Any], int]:
        calls = [
            cache.aget_or_set_stampede_safe("cold", default, 60)
            for _ in range(COROUTINES)
        ]
        return await with_thread_peak(asyncio.gather(*calls))

    results, added = asyncio.run(main())

    assert results == [{"answer": 42}] * COROUTINES
    assert compute.calls == 1
    assert added <= 4


def test_coroutines_wait_for_another_process_without_threads(make_cache, raw_redis):
    """A lease held elsewhere: 2,000 coroutines wait on the loop's wake-up."""
    _, cache = make_cache()
    made, held = held_elsewhere(cache, "elsewhere")
    local = Counted("computed here")

    async def main() -> tuple[list[Any], int]:
        async def waiters() -> list[Any]:
            calls = [
                cache.aget_or_set_stampede_safe("elsewhere", local.coroutine, 60)
                for _ in range(COROUTINES)
            ]
            gathered = asyncio.gather(*calls)
            hub = cache.runtime.acoordinator.loops.get().hub
            while not hub.waiting():
                await asyncio.sleep(0.005)
            payload = cache.envelope.encode(
                "from the holder", Meta(57_000, 60_000), key=str(made)
            )
            await asyncio.to_thread(lease.release, held, payload, 60_000)
            return await gathered

        return await with_thread_peak(waiters())

    results, added = asyncio.run(main())

    assert results == ["from the holder"] * COROUTINES
    assert local.calls == 0
    assert added <= 4  # the one to_thread above, and nothing per waiter


def test_sync_and_async_read_each_others_values(make_cache):
    _, cache = make_cache()
    cache.set("written-sync", {"n": 1}, 60)

    async def main() -> tuple[Any, Any, dict[str, Any]]:
        read = await cache.aget("written-sync")
        made = await cache.aget_or_set_stampede_safe("written-async", lambda: [2], 60)
        many = await cache.aget_many(["written-sync", "written-async", "absent"])
        return read, made, many

    read, made, many = asyncio.run(main())

    assert read == {"n": 1}
    assert made == [2]
    assert cache.get("written-async") == [2]
    assert many == {"written-sync": {"n": 1}, "written-async": [2]}


def test_herd_mode_one_coroutine_misses_a_stale_entry(make_cache, raw_redis):
    """Past its soft timeout, a plain-set entry is a miss for one reader."""
    _, cache = make_cache()
    cache.set("page", "old", 10)
    made = str(cache.client.make_key("page"))
    raw = raw_redis.get(made)
    meta = cache.envelope.decode(raw, key=made).meta
    aged = Meta(hard_ms=meta.hard_ms, written_ms=meta.written_ms - 9_800)
    raw_redis.set(made, cache.envelope.encode("old", aged, key=made), px=200)

    async def main() -> list[Any]:
        return await asyncio.gather(*[cache.aget("page") for _ in range(50)])

    results = asyncio.run(main())

    assert results.count(None) == 1  # the winner, expected to set it
    assert results.count("old") == 49
    cache.set("page", "new", 10)  # the winner's fenced write frees the lease
    assert raw_redis.exists(lease.keys.companion(made, lease.keys.LEASE)) == 0


def connections(raw: redis.Redis) -> int:
    return len(raw.client_list())


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_each_loop_gets_its_connections_and_closes_them_at_its_end(
    make_cache, raw_redis
):
    _, cache = make_cache()
    cache.set("k", "v", 60)
    loops = cache.runtime.acoordinator.loops

    async def main(cold: str) -> Any:
        found = await cache.aget("k")
        await cache.aget_or_set_stampede_safe(cold, lambda: 1, 60)
        assert loops.loops() == 1
        return found

    # The first lease also opens the process's identity connection (sync,
    # kept for the process's life): count from after it.
    assert asyncio.run(main("cold-0")) == "v"
    before = connections(raw_redis)
    for n in range(1, 4):  # as a test suite or async_to_sync would: loop after loop
        assert asyncio.run(main(f"cold-{n}")) == "v"
        assert loops.loops() == 0
        assert eventually(lambda: connections(raw_redis) <= before)


def test_a_redis_error_computes_locally(make_cache):
    """Redis away: the value is computed here; aget is a miss."""
    _, cache = make_cache(location="redis://127.0.0.1:1/0")

    async def main() -> tuple[Any, Any]:
        got = await cache.aget("x", "default")
        made = await cache.aget_or_set_stampede_safe("x", lambda: "local", 60)
        return got, made

    with pytest.raises(redis.ConnectionError):
        asyncio.run(main())
    _, ignoring = make_cache(location="redis://127.0.0.1:1/0", IGNORE_EXCEPTIONS=True)

    async def ignored() -> tuple[Any, Any]:
        got = await ignoring.aget("x", "default")
        made = await ignoring.aget_or_set_stampede_safe("x", lambda: "local", 60)
        return got, made

    assert asyncio.run(ignored()) == ("default", "local")


@pytest.mark.single_node("NEAR_CACHE is refused on a cluster (apee.E010)")
def test_near_cache_reads_are_native_and_writes_are_seen_at_once(make_cache, raw_redis):
    """With a near cache, aget and aget_or_set_stampede_safe are native and
    answer from memory once filled; writes run the sync client in a thread,
    which forgets their keys at once, so this process reads its writes.
    An ``async def`` compute is awaited on the caller's loop."""
    from tests.support.near import eventually, plant

    _, cache = make_cache(NEAR_CACHE=True)
    cache.set("n", {"a": [1]}, 60)
    assert cache._native() is None  # writes: the sync near client
    assert cache._native_reads() is not None
    near = cache.runtime.near
    made = cache.client.make_key("n")
    loops: list[asyncio.AbstractEventLoop] = []

    async def compute() -> str:
        loops.append(asyncio.get_running_loop())
        return "awaited"

    async def main() -> Any:
        deadline = time.monotonic() + 10
        while near.find(made) is MISSING:  # tracking up, then filled by aget
            assert await cache.aget("n") == {"a": [1]}
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        first = await cache.aget("n")
        first["a"].append(2)  # callers mutate what they get
        assert await cache.aget("n") == {"a": [1]}
        assert await cache.aget_or_set_stampede_safe("n", compute, 60) == {"a": [1]}
        await cache.aset("n", "mine", 60)
        assert await cache.aget("n") == "mine"  # read-your-write, at once
        found = await cache.aget_or_set_stampede_safe("c", compute, 60)
        return found, asyncio.get_running_loop()

    found, loop = asyncio.run(main())
    assert found == "awaited"
    assert loops == [loop]  # on the caller's loop
    assert cache.get("c") == "awaited"
    # Another client's write reaches the async reads too.
    plant(raw_redis, cache, "n", {"v": 7})
    assert eventually(lambda: asyncio.run(cache.aget("n")) == {"v": 7})


# -- an async view behind uvicorn -------------------------------------------------


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    """One HTTP/1.0 GET (no chunked body) on a fresh connection: status, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        await writer.drain()
        response = await reader.read()
    finally:
        writer.close()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def serve_asgi() -> Any:
    """Django's ASGI application behind a real uvicorn on a free port, in a
    thread (``load`` stops it)."""
    import uvicorn
    from django.core.asgi import get_asgi_application

    server = uvicorn.Server(
        uvicorn.Config(
            get_asgi_application(),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="off",
            backlog=512,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    server.thread = thread
    assert eventually(lambda: server.started, 10)
    return server


def load(server: Any, path: str, requests: int) -> list[tuple[int, bytes]]:
    """``requests`` concurrent GETs of ``path``; the server stops after."""
    port = server.servers[0].sockets[0].getsockname()[1]

    async def all_at_once() -> list[tuple[int, bytes]]:
        calls = [http_get(port, path) for _ in range(requests)]
        return await asyncio.wait_for(asyncio.gather(*calls), 60)

    try:
        return asyncio.run(all_at_once())
    finally:
        server.should_exit = True
        server.thread.join(10)


def test_uvicorn_serves_an_async_view_under_concurrent_load():
    """200 concurrent requests to a cold key through a real ASGI server:
    every one answered with the value of one computation."""
    import json

    from tests.support import views

    views.REPORT_RUNS.clear()
    responses = load(serve_asgi(), "/async/report/", 200)

    assert [status for status, _ in responses] == [200] * 200
    assert {json.loads(body)["run"] for _, body in responses} == {1}
    assert views.REPORT_RUNS.count() == 1


@pytest.mark.parametrize("tag", ["apee", "django"])
def test_apee_cache_tag_under_asgi_renders_a_cold_fragment_once(tag):
    """30 concurrent requests through uvicorn to an async view whose
    template caches a cold fragment: ``{% apee_cache %}`` renders its
    expensive part once and every page carries that render; Django's
    ``{% cache %}`` (the control) renders it in every worker thread that
    finds it cold."""
    from tests.support import views

    views.FRAGMENT_RUNS.clear()
    responses = load(serve_asgi(), f"/async/fragment/{tag}/", 30)

    assert [status for status, _ in responses] == [200] * 30
    if tag == "django":
        assert views.FRAGMENT_RUNS.count() > 1
    else:
        assert views.FRAGMENT_RUNS.count() == 1
        pages = {body.strip() for _, body in responses}
        assert pages == {b"<main><p>run 1</p></main>"}


def test_async_decorator_and_module_function(make_cache):
    """``@stampede_safe`` on ``async def``, and the module-level helper."""
    from django_apee import aget_or_set_stampede_safe, stampede_safe

    alias, cache = make_cache()
    runs: list[int] = []

    @stampede_safe(60, cache=alias)
    async def square(n: int) -> int:
        runs.append(n)
        await asyncio.sleep(0.05)
        return n * n

    async def main() -> tuple[list[int], Any]:
        squares = await asyncio.gather(*[square(7) for _ in range(100)])
        helper = await aget_or_set_stampede_safe("h", lambda: "sync", 60, cache=alias)
        return squares, helper

    squares, helper = asyncio.run(main())

    assert squares == [49] * 100
    assert runs == [7]
    assert cache.get(square.cache_key(7)) == 49  # the sync side reads it
    assert helper == "sync"


@pytest.mark.single_node(
    "redis-py's async cluster nodes hand out a connection the server closed "
    "without looking (with REDIS_RETRIES 0 the next command fails)"
)
def test_a_kept_connection_the_server_closed_is_replaced(make_cache, raw_redis):
    """The hit path's kept connection dies (CLIENT KILL): the next aget is
    served on a fresh one, as the pool would have done, without an error."""
    _, cache = make_cache()
    cache.set("k", "v", 60)

    async def main() -> tuple[Any, Any]:
        first = await cache.aget("k")
        killed = raw_redis.client_kill_filter(_type="normal", skipme=True)
        assert killed >= 1
        return first, await cache.aget("k")

    assert asyncio.run(main()) == ("v", "v")


def test_adelete_revokes_the_lease_and_wakes_its_waiters(make_cache, raw_redis):
    """``adelete`` is ``delete``: value and lease go, and a coroutine waiting
    for the revoked lease takes it and computes, instead of waiting it out."""
    _, cache = make_cache()
    held_elsewhere(cache, "busy")
    cache.set("other", 1, 60)
    local = Counted("fresh")

    async def main() -> tuple[Any, bool]:
        waiter = asyncio.ensure_future(
            cache.aget_or_set_stampede_safe("busy", local.coroutine, 60)
        )
        hub = cache.runtime.acoordinator.loops.get().hub
        while not hub.waiting():
            await asyncio.sleep(0.005)
        deleted = await cache.adelete("busy")  # nothing stored: no value
        await cache.adelete_many(["other"])
        return await asyncio.wait_for(waiter, 10), deleted

    value, deleted = asyncio.run(main())

    assert value == "fresh"
    assert local.calls == 1
    assert deleted is False  # there was no value, only a lease
    assert cache.get("other") is None


def test_atouch_is_touch(make_cache, raw_redis):
    _, cache = make_cache()
    cache.set("t", "v", 60)
    made = str(cache.client.make_key("t"))

    async def main() -> tuple[bool, bool, bool]:
        return (
            await cache.atouch("t", 500),
            await cache.atouch("absent", 10),
            await cache.atouch("t", None),
        )

    assert asyncio.run(main()) == (True, False, True)
    assert raw_redis.pttl(made) == -1  # persisted by the last atouch
    assert asyncio.run(cache.atouch("t", 0)) is True  # 0 deletes, as set would
    assert cache.get("t") is None


def test_aincr_and_adecr(make_cache):
    _, cache = make_cache()
    cache.set("n", 10, 60)
    cache.set("big", 2**70, 60)  # past 64 bits: stored in the envelope

    async def main() -> tuple[Any, Any, Any]:
        return (
            await cache.aincr("n", 5),
            await cache.adecr("n", 3),
            await cache.aincr("big"),
        )

    assert asyncio.run(main()) == (15, 12, 2**70 + 1)
    assert cache.get("big") == 2**70 + 1
    with pytest.raises(ValueError, match="not found"):
        asyncio.run(cache.aincr("absent"))


def test_a_process_forked_after_async_use_gets_fresh_async_state(make_cache):
    """A pre-fork server: the parent used the async methods (one loop ended,
    one still open: both hold connections, a wake-up subscription and
    leases taken), then forks. The child's loop builds its own pool and
    subscription, takes and ends its own leases (its own client id), and
    reads what the parent wrote; the parent's open loop goes on working
    after the child, on connections the child never touched."""
    _, cache = make_cache()
    cache.set("k", "v", 60)
    loops = cache.runtime.acoordinator.loops

    async def use(tag: str) -> tuple[Any, ...]:
        async def compute() -> str:
            return tag

        io = loops.get()
        got = await cache.aget("k")
        stored = await cache.aset(f"by-{tag}", tag, 60)
        made = await cache.aget_or_set_stampede_safe(f"cold-{tag}", compute, 60)
        return io, getattr(io.client, "connection_pool", io.client), got, stored, made

    assert asyncio.run(use("ended"))[2:] == ("v", True, "ended")
    loop = asyncio.new_event_loop()
    try:
        parent_io, parent_pool, *answers = loop.run_until_complete(use("parent"))
        assert answers == ["v", True, "parent"]
        pid = os.fork()
        if pid == 0:  # the child: report through the exit status only
            ok = False
            try:
                io, pool, *found = asyncio.run(use("child"))
                ok = io is not parent_io and pool is not parent_pool
                ok = ok and found == ["v", True, "child"]
                ok = ok and asyncio.run(cache.aget("by-parent")) == "parent"
                # The child's loops closed their state; the parent's open
                # loop's, inherited, is not the child's to count or close.
                ok = ok and loops.loops() == 0
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        io, pool, *again = loop.run_until_complete(use("parent-again"))
        assert (io, pool) == (parent_io, parent_pool)
        assert again == ["v", True, "parent-again"]
        assert cache.get_many(["by-child", "cold-child"]) == {
            "by-child": "child",
            "cold-child": "child",
        }
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
