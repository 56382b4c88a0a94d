"""Tests for ``django_apee.core.singleflight``: real threads and tasks, no Redis.

Every wait in here is bounded, and ordering is forced with Events, Barriers
and the public ``followers()`` counter rather than with sleeps.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from django_apee.core.singleflight import (
    RELEASE_BATCH,
    AsyncSingleFlight,
    LeaderAborted,
    Result,
    SingleFlight,
    SingleFlightTimeout,
)

BOUND = 5.0  # seconds; any wait that reaches this is a failure, not a pass
T = TypeVar("T")


@pytest.fixture(autouse=True)
def _empty_redis() -> None:
    """Shadow conftest's autouse FLUSHDB: this module needs no Redis at all."""


# --------------------------------------------------------------------- helpers


class Counter:
    """Thread-safe execution counter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.n = 0

    def bump(self) -> int:
        with self._lock:
            self.n += 1
            return self.n


def wait_until(cond: Callable[[], bool], what: str) -> None:
    """Block until ``cond()`` holds; fail after BOUND seconds.

    Used only where no Event can exist: a follower blocked *inside* ``do`` can
    only be observed through ``followers()``.
    """
    deadline = time.monotonic() + BOUND
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


def start(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def join_all(threads: list[threading.Thread]) -> None:
    deadline = time.monotonic() + BOUND
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "threads still running (hang)"


def run_callers(
    sf: SingleFlight[Any], key: str, fn: Callable[[], Any], n: int, **kw: Any
) -> tuple[list[Any], list[threading.Thread]]:
    """Start ``n`` threads that pass a Barrier together and call ``sf.do``.

    Each records its Result or the exception it raised, in ``outcomes``.
    """
    barrier = threading.Barrier(n)
    outcomes: list[Any] = []
    lock = threading.Lock()

    def caller() -> None:
        barrier.wait(BOUND)
        try:
            out: Any = sf.do(key, fn, timeout=kw.get("timeout", BOUND))
        except BaseException as exc:
            out = exc
        with lock:
            outcomes.append(out)

    return outcomes, [start(caller) for _ in range(n)]


def blocking_fn(
    counter: Counter, release: threading.Event, value: Any = None
) -> Callable[[], Any]:
    """An fn that counts itself, then holds the flight open until ``release``."""

    def fn() -> Any:
        counter.bump()
        assert release.wait(BOUND)
        return object() if value is None else value

    return fn


# ------------------------------------------------------------------- threads


def test_64_threads_one_key_run_fn_once_and_share_the_object() -> None:
    sf: SingleFlight[object] = SingleFlight()
    counter, release = Counter(), threading.Event()
    outcomes, threads = run_callers(sf, "k", blocking_fn(counter, release), 64)

    wait_until(lambda: sf.followers("k") == 63, "63 followers to join")
    release.set()
    join_all(threads)

    assert counter.n == 1
    assert all(isinstance(o, Result) for o in outcomes)
    assert len(outcomes) == 64
    assert len({id(o.value) for o in outcomes}) == 1
    assert sum(o.leader for o in outcomes) == 1
    assert all(o.shared == (not o.leader) for o in outcomes)
    assert all(o.waited == 0.0 for o in outcomes if o.leader)
    assert sf.inflight() == 0


def test_distinct_keys_run_concurrently() -> None:
    sf: SingleFlight[bool] = SingleFlight()
    started = {"a": threading.Event(), "b": threading.Event()}
    results: dict[str, Result[bool]] = {}

    def caller(me: str, other: str) -> Callable[[], None]:
        def fn() -> bool:
            started[me].set()
            # Only true if the other key's fn is running at the same time.
            return started[other].wait(BOUND)

        def run() -> None:
            results[me] = sf.do(me, fn, timeout=BOUND)

        return run

    join_all([start(caller("a", "b")), start(caller("b", "a"))])
    assert results["a"].value is True
    assert results["b"].value is True
    assert results["a"].leader
    assert results["b"].leader


def test_exception_reaches_every_follower_and_clears_the_key() -> None:
    sf: SingleFlight[object] = SingleFlight()
    counter, release = Counter(), threading.Event()
    error = ValueError("boom")

    def fn() -> object:
        counter.bump()
        assert release.wait(BOUND)
        raise error

    outcomes, threads = run_callers(sf, "k", fn, 16)
    wait_until(lambda: sf.followers("k") == 15, "15 followers to join")
    release.set()
    join_all(threads)

    assert counter.n == 1
    assert len(outcomes) == 16
    assert all(o is error for o in outcomes)
    assert sf.inflight() == 0
    again = sf.do("k", lambda: counter.bump(), timeout=BOUND)
    assert again.leader
    assert counter.n == 2


def test_follower_timeout_leaves_leader_running() -> None:
    sf: SingleFlight[str] = SingleFlight()
    counter, release = Counter(), threading.Event()
    leader: list[Result[str]] = []
    thread = start(
        lambda: leader.append(
            sf.do("k", blocking_fn(counter, release, "v1"), timeout=BOUND)
        )
    )
    wait_until(lambda: counter.n == 1, "leader to enter fn")

    began = time.monotonic()
    with pytest.raises(SingleFlightTimeout) as info:
        sf.do("k", lambda: "never", timeout=0.1)
    elapsed = time.monotonic() - began

    assert 0.09 <= elapsed < 1.0
    assert isinstance(info.value, TimeoutError)
    assert info.value.key == "k"
    assert sf.inflight() == 1  # the leader is unaffected
    release.set()
    join_all([thread])
    assert leader[0].value == "v1"
    assert leader[0].leader
    fresh = sf.do("k", lambda: "v2", timeout=BOUND)
    assert fresh.value == "v2"
    assert fresh.leader


def test_forget_mid_flight_starts_a_new_flight() -> None:
    sf: SingleFlight[str] = SingleFlight()
    counter = Counter()
    first_release, second_release = threading.Event(), threading.Event()
    out: dict[str, Any] = {}

    def first() -> None:
        out["first"] = sf.do(
            "k", blocking_fn(counter, first_release, "old"), timeout=BOUND
        )

    def old_follower() -> None:
        out["follower"] = sf.do("k", lambda: "unused", timeout=BOUND)

    def second() -> None:
        out["second"] = sf.do(
            "k", blocking_fn(counter, second_release, "new"), timeout=BOUND
        )

    threads = [start(first)]
    wait_until(lambda: counter.n == 1, "first leader to enter fn")
    threads.append(start(old_follower))
    wait_until(lambda: sf.followers("k") == 1, "old follower to join")

    assert sf.forget("k") is True
    assert sf.forget("k") is False
    threads.append(start(second))
    wait_until(lambda: counter.n == 2, "second flight to enter fn")

    first_release.set()
    join_all(threads[:2])
    # The detached flight must not remove the flight that replaced it.
    assert sf.inflight() == 1
    second_release.set()
    join_all(threads)

    assert counter.n == 2
    assert out["first"].value == "old"
    assert out["follower"].value == "old"
    assert out["second"].value == "new"
    assert out["second"].leader
    assert sf.inflight() == 0


def test_no_leak_after_many_distinct_keys() -> None:
    sf: SingleFlight[int] = SingleFlight()
    for i in range(10_000):
        assert sf.do(("key", i), partial(int, i), timeout=BOUND).value == i
    assert sf.inflight() == 0
    assert sf._flights == {}


def test_no_leak_after_failures() -> None:
    sf: SingleFlight[int] = SingleFlight()

    def fail() -> int:
        raise RuntimeError("x")

    for i in range(1_000):
        with pytest.raises(RuntimeError):
            sf.do(i, fail, timeout=BOUND)
    assert sf.inflight() == 0


@pytest.mark.parametrize("abort", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_leader_releases_followers(
    abort: type[BaseException],
) -> None:
    sf: SingleFlight[object] = SingleFlight()
    counter, release = Counter(), threading.Event()
    leader_saw: list[BaseException] = []

    def fn() -> object:
        counter.bump()
        assert release.wait(BOUND)
        raise abort()

    def lead() -> None:
        try:
            sf.do("k", fn, timeout=BOUND)
        except BaseException as exc:
            leader_saw.append(exc)

    leader = start(lead)
    wait_until(lambda: counter.n == 1, "leader to enter fn")
    # timeout=None: only the leader's try/finally can release these.
    outcomes, followers = run_callers(sf, "k", lambda: None, 8, timeout=None)
    wait_until(lambda: sf.followers("k") == 8, "8 followers to join")
    release.set()
    join_all([leader, *followers])

    assert len(leader_saw) == 1
    assert isinstance(leader_saw[0], abort)
    assert len(outcomes) == 8
    for o in outcomes:
        assert isinstance(o, LeaderAborted)
        assert o.__cause__ is leader_saw[0]
    assert sf.inflight() == 0
    assert counter.n == 1


def test_follower_result_reports_wait() -> None:
    sf: SingleFlight[str] = SingleFlight()
    counter, release = Counter(), threading.Event()
    got: list[Result[str]] = []
    leader = start(
        lambda: got.append(
            sf.do("k", blocking_fn(counter, release, "v"), timeout=BOUND)
        )
    )
    wait_until(lambda: counter.n == 1, "leader to enter fn")
    follower = start(lambda: got.append(sf.do("k", lambda: "x", timeout=BOUND)))
    wait_until(lambda: sf.followers("k") == 1, "follower to join")
    release.set()
    join_all([leader, follower])
    shared = next(r for r in got if not r.leader)
    assert shared.shared
    assert shared.value == "v"
    assert 0.0 < shared.waited < BOUND


def test_recursive_call_for_own_key_fails_fast() -> None:
    sf: SingleFlight[object] = SingleFlight()

    def fn() -> object:
        return sf.do("k", lambda: 1, timeout=1.0)

    with pytest.raises(RuntimeError, match="deadlock"):
        sf.do("k", fn, timeout=None)
    assert sf.inflight() == 0


def test_negative_timeout_is_rejected() -> None:
    with pytest.raises(ValueError, match="timeout"):
        SingleFlight[int]().do("k", lambda: 1, timeout=-1)


def test_heavy_contention_every_caller_gets_its_keys_value() -> None:
    sf: SingleFlight[tuple[str, int]] = SingleFlight()
    counter = Counter()
    keys = [f"k{i}" for i in range(4)]

    def call(i: int) -> tuple[str, Result[tuple[str, int]]]:
        key = keys[i % len(keys)]
        return key, sf.do(key, lambda: (key, counter.bump()), timeout=BOUND)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(call, range(4_000)))

    assert all(r.value[0] == key for key, r in results)
    assert counter.n == sum(r.leader for _, r in results)
    assert sf.inflight() == 0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40))
def test_property_values_match_keys_and_nothing_lingers(keys: list[int]) -> None:
    sf: SingleFlight[int] = SingleFlight()
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda k: sf.do(k, lambda: k * 10, timeout=BOUND), keys)
        )
    assert [r.value for r in results] == [k * 10 for k in keys]
    assert sf.inflight() == 0


# ------------------------------------------------------------------- asyncio


def run(coro: Awaitable[T]) -> T:
    """Run a test coroutine with an overall bound, so no test can hang."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, BOUND)

    return asyncio.run(bounded())


async def until(cond: Callable[[], bool]) -> None:
    """Yield to the loop until ``cond()``; the caller bounds the whole test."""
    while not cond():
        await asyncio.sleep(0)


def test_async_100_coroutines_share_one_execution() -> None:
    async def main() -> list[Result[object]]:
        sf: AsyncSingleFlight[object] = AsyncSingleFlight()
        calls, release = Counter(), asyncio.Event()

        async def fn() -> object:
            calls.bump()
            await release.wait()
            return object()

        async def releaser() -> None:
            await until(lambda: sf.followers("k") == 99)
            release.set()

        releasing = asyncio.create_task(releaser())
        results = await asyncio.gather(
            *(sf.do("k", fn, timeout=BOUND) for _ in range(100))
        )
        await releasing
        assert calls.n == 1
        assert sf.inflight() == 0
        return results

    results = run(main())
    assert len(results) == 100
    assert len({id(r.value) for r in results}) == 1
    assert sum(r.leader for r in results) == 1


def test_async_followers_are_released_a_batch_per_loop_iteration() -> None:
    """2,000 followers do not all resume in one loop iteration (which holds
    the loop for tens of milliseconds): a task that yields once per
    iteration sees at most ``RELEASE_BATCH`` of them resume between two of
    its steps, and every one gets the value."""
    followers = 2000
    resumed_per_step: list[int] = []

    async def main() -> list[Result[object]]:
        sf: AsyncSingleFlight[object] = AsyncSingleFlight()
        release = asyncio.Event()
        resumed = 0
        done = False

        async def fn() -> object:
            await release.wait()
            return "value"

        async def call() -> Result[object]:
            nonlocal resumed
            result = await sf.do("k", fn, timeout=BOUND)
            resumed += 1
            return result

        async def stepper() -> None:
            nonlocal resumed
            while not done:
                await asyncio.sleep(0)  # one step per loop iteration
                resumed_per_step.append(resumed)
                resumed = 0

        calls = asyncio.gather(*(call() for _ in range(followers + 1)))
        await until(lambda: sf.followers("k") == followers)
        stepping = asyncio.create_task(stepper())
        release.set()
        results = await calls
        done = True
        await stepping
        return results

    results = run(main())

    assert [r.value for r in results] == ["value"] * (followers + 1)
    assert sum(resumed_per_step) >= followers
    assert max(resumed_per_step) <= RELEASE_BATCH + 1  # the leader too
    assert max(resumed_per_step) < followers // 10


def test_async_exception_reaches_every_follower() -> None:
    error = LookupError("nope")

    async def main() -> None:
        sf: AsyncSingleFlight[int] = AsyncSingleFlight()
        calls = Counter()

        async def fn() -> int:
            calls.bump()
            await until(lambda: sf.followers("k") == 9)
            raise error

        outcomes = await asyncio.gather(
            *(sf.do("k", fn, timeout=BOUND) for _ in range(10)),
            return_exceptions=True,
        )
        assert all(o is error for o in outcomes)
        assert calls.n == 1
        assert sf.inflight() == 0
        assert (await sf.do("k", fn_ok, timeout=BOUND)).leader

    async def fn_ok() -> int:
        return 1

    run(main())


def test_async_follower_cancellation_does_not_cancel_leader() -> None:
    async def main() -> None:
        sf: AsyncSingleFlight[str] = AsyncSingleFlight()
        release = asyncio.Event()

        async def fn() -> str:
            await release.wait()
            return "v"

        leader = asyncio.create_task(sf.do("k", fn, timeout=BOUND))
        doomed = asyncio.create_task(sf.do("k", fn, timeout=None))
        other = asyncio.create_task(sf.do("k", fn, timeout=BOUND))
        await until(lambda: sf.followers("k") == 2)

        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert not leader.done()
        release.set()
        assert (await leader).value == "v"
        assert (await other).value == "v"
        assert sf.inflight() == 0

    run(main())


def test_async_leader_cancellation_releases_followers() -> None:
    async def main() -> None:
        sf: AsyncSingleFlight[str] = AsyncSingleFlight()
        entered, never = asyncio.Event(), asyncio.Event()

        async def fn() -> str:
            entered.set()
            await never.wait()
            return "unreachable"

        leader = asyncio.create_task(sf.do("k", fn, timeout=BOUND))
        await entered.wait()
        followers = [
            asyncio.create_task(sf.do("k", fn, timeout=None)) for _ in range(5)
        ]
        await until(lambda: sf.followers("k") == 5)

        leader.cancel()
        outcomes = await asyncio.wait_for(
            asyncio.gather(*followers, return_exceptions=True), 1.0
        )
        assert leader.cancelled()
        for o in outcomes:
            assert isinstance(o, LeaderAborted)
            assert isinstance(o.__cause__, asyncio.CancelledError)
        assert sf.inflight() == 0

        async def retry() -> str:
            return "fresh"

        assert (await sf.do("k", retry, timeout=BOUND)).value == "fresh"

    run(main())


def test_async_follower_timeout_leaves_leader_running() -> None:
    async def main() -> None:
        sf: AsyncSingleFlight[str] = AsyncSingleFlight()
        entered, release = asyncio.Event(), asyncio.Event()

        async def fn() -> str:
            entered.set()
            await release.wait()
            return "v"

        leader = asyncio.create_task(sf.do("k", fn, timeout=BOUND))
        await entered.wait()
        began = time.monotonic()
        with pytest.raises(SingleFlightTimeout):
            await sf.do("k", fn, timeout=0.1)
        assert 0.09 <= time.monotonic() - began < 1.0
        assert not leader.done()
        release.set()
        assert (await leader).leader
        assert sf.inflight() == 0

    run(main())


def test_async_recursive_call_for_own_key_fails_fast() -> None:
    async def main() -> None:
        sf: AsyncSingleFlight[object] = AsyncSingleFlight()

        async def inner() -> object:
            return 1

        async def fn() -> object:
            return await sf.do("k", inner, timeout=1.0)

        with pytest.raises(RuntimeError, match="deadlock"):
            await sf.do("k", fn, timeout=None)
        assert sf.inflight() == 0

    run(main())


def test_async_no_leak_after_many_distinct_keys() -> None:
    async def main() -> None:
        sf: AsyncSingleFlight[int] = AsyncSingleFlight()
        for i in range(10_000):

            async def fn(i: int = i) -> int:
                return i

            assert (await sf.do(i, fn, timeout=BOUND)).value == i
        assert sf.inflight() == 0

    run(main())


def test_async_forget_mid_flight_starts_a_new_flight() -> None:
    async def main() -> None:
        sf: AsyncSingleFlight[str] = AsyncSingleFlight()
        calls = Counter()
        releases = [asyncio.Event(), asyncio.Event()]

        def make(n: int, value: str) -> Callable[[], Awaitable[str]]:
            async def fn() -> str:
                calls.bump()
                await releases[n].wait()
                return value

            return fn

        first = asyncio.create_task(sf.do("k", make(0, "old"), timeout=BOUND))
        await until(lambda: calls.n == 1)
        assert sf.forget("k") is True
        second = asyncio.create_task(sf.do("k", make(1, "new"), timeout=BOUND))
        await until(lambda: calls.n == 2)

        releases[0].set()
        assert (await first).value == "old"
        assert sf.inflight() == 1  # the detached flight left the new one alone
        releases[1].set()
        assert (await second).value == "new"
        assert sf.inflight() == 0

    run(main())
