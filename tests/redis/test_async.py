"""The async twins of the stampede-safe path, on a real Redis and a real loop.

The dev venv has no pytest-asyncio, so each test drives its coroutines with
``asyncio.run`` inside a plain test. Every wait is bounded with
``asyncio.wait_for``. What is asserted is counts and values (one compute,
every caller's answer) and orderings (the loop ticked while callers waited;
a thread-sensitive call finished while a caller still waited), never how long
anything took.

Each test gets its own cache alias: ``stampede.coordinator`` keeps one
Coordinator (single-flight table, breaker) per alias for the whole process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import redis
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import caches
from django.core.handlers.asgi import ASGIHandler
from django.test import override_settings

from django_apee.cache import ApeeCache
from django_apee.core.envelope import Meta
from django_apee.store import lease
from tests.support import target, views

CALLERS = 64
_aliases = itertools.count()


class Compute:
    """A slow compute function that counts its calls across threads."""

    def __init__(self, value: Any, sleep: float) -> None:
        self.value = value
        self.sleep = sleep
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        with self._lock:
            self.calls += 1
        time.sleep(self.sleep)  # the compute's cost; the count is what is asserted
        return self.value


class Ticker:
    """A coroutine that counts 10 ms ticks: it only ticks if the loop runs."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(0.01)
            self.ticks += 1


@pytest.fixture
def make_cache() -> Iterator[Callable[[], ApeeCache]]:
    """``make_cache()`` -> an ApeeCache under a fresh alias on the test Redis
    (``target``: the cluster with APEE_TEST_CLUSTER=1)."""
    with ExitStack() as stack:

        def make() -> ApeeCache:
            alias = f"async-{next(_aliases)}"
            config = target.cache_config()
            stack.enter_context(
                override_settings(CACHES={**settings.CACHES, alias: config})
            )
            backend = caches[alias]
            assert isinstance(backend, ApeeCache)
            return backend

        yield make


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Yield to the loop until ``predicate()`` holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


def stored_meta(cache: ApeeCache, raw_redis: redis.Redis, key: str) -> Meta | None:
    made = str(cache.client.make_key(key))
    raw = raw_redis.get(made)
    assert raw is not None, f"{key} is not in Redis"
    return cache.envelope.decode(raw, key=made).meta


def run_with_ticker(calls: list[Awaitable[Any]]) -> tuple[list[Any], int]:
    """Await ``calls`` together while a ticker runs; return results and ticks."""

    async def main() -> tuple[list[Any], int]:
        ticker = Ticker()
        task = asyncio.ensure_future(ticker.run())
        try:
            results = await asyncio.wait_for(asyncio.gather(*calls), timeout=20)
        finally:
            task.cancel()
        return results, ticker.ticks

    return asyncio.run(main())


# -- many coroutines on a cold key ---------------------------------------------------


def test_cold_key_many_coroutines_compute_once_while_the_loop_runs(
    make_cache, raw_redis
):
    cache = make_cache()
    compute = Compute({"answer": 42}, sleep=0.3)

    results, ticks = run_with_ticker(
        [cache.aget_or_set_stampede_safe("cold", compute, 60) for _ in range(CALLERS)]
    )

    assert results == [{"answer": 42}] * CALLERS
    assert compute.calls == 1
    # The callers waited at least the 0.3 s compute; a loop blocked by them
    # would not have ticked at all. 5 ticks of 10 ms is a generous floor.
    assert ticks >= 5
    assert stored_meta(cache, raw_redis, "cold").hard_ms == 60_000


def test_aget_or_set_takes_the_stampede_safe_path(make_cache, raw_redis):
    """Django 5.2's aget_or_set is aget + aadd: every cold caller would compute."""
    cache = make_cache()
    compute = Compute("built once", sleep=0.3)

    results, ticks = run_with_ticker(
        [cache.aget_or_set("shared", compute, 60) for _ in range(CALLERS)]
    )

    assert results == ["built once"] * CALLERS
    assert compute.calls == 1
    assert ticks >= 5
    # Written by the stampede path: the entry carries its timing metadata,
    # which Django's aadd (a plain add) would not have written.
    meta = stored_meta(cache, raw_redis, "shared")
    assert meta is not None
    assert meta.hard_ms == 60_000
    assert 0 < meta.soft_ms < meta.hard_ms


# -- the thread-sensitive thread stays free -----------------------------------------


def test_thread_sensitive_thread_stays_free_during_a_lease_wait(make_cache):
    """A caller waiting for another holder's computation holds no shared thread.

    The lease is taken by hand, as another process's holder would. While a
    coroutine waits for it, a ``thread_sensitive=True`` call must finish: had
    the wait occupied asgiref's one thread-sensitive thread, that call would
    queue behind it and the wait (which ends only when we release the lease,
    after that call) would never end before it.
    """
    cache = make_cache()
    local = Compute("computed here", sleep=0.0)
    hub = cache.runtime.hub
    held = lease.acquire(
        cache.client.get_client(write=True),
        cache.client.make_key("busy"),
        10_000,
        channel=hub.channel,
    ).lease
    assert held is not None

    async def main() -> tuple[bool, Any]:
        # Coroutines wait on their loop's wake-ups, not on the threads' hub;
        # on a cluster (no native engine) a worker thread waits on the hub.
        engine = cache.runtime.acoordinator
        loop_hub = hub if engine is None else engine.loops.get().hub
        waiter = asyncio.ensure_future(
            cache.aget_or_set_stampede_safe("busy", local, 60)
        )
        try:
            await until(lambda: loop_hub.waiting() > 0)  # it waits on the lease
            thread = await asyncio.wait_for(
                sync_to_async(threading.get_ident, thread_sensitive=True)(), 5
            )
            assert thread != threading.get_ident()
            still_waiting = not waiter.done()
        finally:
            # The holder's result lands, as another process would store it.
            payload = cache.envelope.encode(
                "from the holder", Meta(57_000, 60_000), key=held.value_key
            )
            lease.release(held, payload, 60_000)
        return still_waiting, await asyncio.wait_for(waiter, 10)

    still_waiting, value = asyncio.run(main())

    assert still_waiting
    assert value == "from the holder"
    assert local.calls == 0  # it waited for the holder; it did not compute


# -- an async view served by Django's ASGI handler -----------------------------------


async def asgi_get(app: ASGIHandler, path: str) -> tuple[int, bytes]:
    """One GET through the ASGI protocol; returns the status and the body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"testserver")],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    requested = False
    disconnect = asyncio.Event()  # never set: the client stays connected

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnect.wait()
        return {"type": "http.disconnect"}

    status = 0
    body = b""

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    await app(scope, receive, send)
    return status, body


def test_async_view_under_concurrent_asgi_requests_computes_once(raw_redis):
    views.REPORT_RUNS.clear()
    app = ASGIHandler()

    responses, ticks = run_with_ticker(
        [asgi_get(app, "/async/report/") for _ in range(CALLERS)]
    )

    assert [status for status, _ in responses] == [200] * CALLERS
    bodies = [json.loads(body) for _, body in responses]
    assert bodies == [{"report": 42, "run": 1}] * CALLERS
    assert views.REPORT_RUNS.count() == 1
    assert ticks >= 5
