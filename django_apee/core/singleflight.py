"""In-process request coalescing ("single-flight") for threads and for asyncio.

Inside one process, callers that want the same key at the same
time share one computation (or one Redis wait), so at most one caller per key
and process touches Redis. This module is that sharing and nothing else: pure
Python, no Redis, no Django, no I/O.

Semantics
=========
* The first caller of a key (the *leader*) runs ``fn``; callers that arrive
  while it runs (*followers*) block and receive the leader's value, or the
  leader's exception re-raised in their own thread/task.
* When the flight ends the key is forgotten: the next caller runs ``fn``
  again. This is coalescing, not caching; entries never outlive a flight, so
  memory does not grow with the number of distinct keys.
* No lock is held while ``fn`` runs; the lock only guards the key table.

Timeouts
========
``timeout`` bounds only a follower's wait and is required, so every call site
decides. On expiry the follower gets :class:`SingleFlightTimeout` (a
``TimeoutError``), never a value: an exception cannot be mistaken for a result
and keeps ``Result.value`` typed as ``T``. The follower then applies its own
policy (the stampede engine computes locally, stores nothing and counts a
fallback). The leader
is not told and keeps running. ``timeout=None`` waits as long as the leader
runs; the caller is then responsible for bounding ``fn``. The leader's own run
is never bounded here: only ``fn`` can bound it.

Leaders that die
================
If ``fn`` raises an ``Exception``, followers get that same exception object.
If the leader is torn down by a ``BaseException`` that is not an
``Exception`` (``KeyboardInterrupt``, ``SystemExit``, ``asyncio.CancelledError``,
...) followers get :class:`LeaderAborted` with the original as ``__cause__``:
those exceptions describe the leader's thread or task, not the computation,
and re-raising them elsewhere would silently end a thread (``SystemExit``) or
make a task look cancelled when nobody cancelled it. ``LeaderAborted`` is an
ordinary ``Exception`` that a follower can catch and retry on (the key has been
cleared, so a retry starts a fresh flight). The leader itself re-raises the
original.

Caveat: followers share the exception *object*, so when several threads raise
it at once its traceback may interleave frames from more than one of them (the
same is true of ``concurrent.futures``). The exception type and arguments are
exact; only the printed traceback can be mixed.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, NoReturn, TypeVar, cast

__all__ = [
    "AsyncSingleFlight",
    "LeaderAborted",
    "Result",
    "SingleFlight",
    "SingleFlightError",
    "SingleFlightTimeout",
]

T = TypeVar("T")


class SingleFlightError(Exception):
    """Base class for the outcomes this module adds on top of ``fn``'s own."""


class SingleFlightTimeout(SingleFlightError, TimeoutError):
    """A follower gave up waiting for the leader; the leader keeps running.

    A ``TimeoutError`` so generic timeout handling catches it; a distinct class
    so a caller can tell "I waited too long" from a timeout raised inside ``fn``.
    """

    def __init__(self, key: Hashable, timeout: float) -> None:
        super().__init__(f"single-flight wait exceeded {timeout:g}s")
        self.key = key
        self.timeout = timeout


class LeaderAborted(SingleFlightError):
    """The leader ended without a result (interrupt, exit, cancellation).

    ``__cause__`` holds what ended it, when known. The key is already cleared,
    so calling ``do`` again starts a new flight.
    """


@dataclass(frozen=True)
class Result(Generic[T]):
    """What one caller got: the value, who computed it, how long it waited."""

    value: T
    #: True for the one caller that ran ``fn``.
    leader: bool
    #: Seconds spent waiting on another caller's flight; 0.0 for the leader.
    waited: float

    @property
    def shared(self) -> bool:
        """True when the value came from another caller's execution of ``fn``."""
        return not self.leader


class _TimedOut(Exception):
    """Set on an asyncio follower's signal when its ``timeout`` ran out."""


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(_TimedOut())


def _check_timeout(timeout: float | None) -> None:
    """Reject negative timeouts early: they are always a caller bug."""
    if timeout is not None and timeout < 0:
        raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")


class _Outcome(Generic[T]):
    """One flight's result slot, written once by the leader, read by followers."""

    __slots__ = ("error", "followers", "has_value", "traceback", "value")

    def __init__(self) -> None:
        self.value: T | None = None
        self.has_value = False
        self.error: BaseException | None = None
        self.traceback: TracebackType | None = None
        self.followers = 0

    def set_value(self, value: T) -> None:
        self.value = value
        self.has_value = True

    def set_error(self, error: BaseException) -> None:
        self.error = error
        # Kept apart: the leader's own re-raise keeps growing __traceback__.
        self.traceback = error.__traceback__

    def result(self, waited: float) -> Result[T]:
        """The follower's view: the value, or the leader's failure raised."""
        if self.error is not None:
            self._raise_error(self.error)
        if not self.has_value:
            raise LeaderAborted("single-flight leader ended without a result")
        return Result(cast(T, self.value), leader=False, waited=waited)

    def _raise_error(self, error: BaseException) -> NoReturn:
        if isinstance(error, Exception):
            raise error.with_traceback(self.traceback)
        raise LeaderAborted(
            f"single-flight leader aborted by {type(error).__name__}"
        ) from error


class _Flight(_Outcome[T]):
    """A threaded flight: the outcome plus the event followers block on."""

    __slots__ = ("done", "owner")

    def __init__(self) -> None:
        super().__init__()
        self.done = threading.Event()
        self.owner = threading.get_ident()


class SingleFlight(Generic[T]):
    """Coalesce concurrent calls per key across the threads of one process.

    One instance is shared by all threads; keys from different instances
    never meet. See the module docstring for timeout and failure semantics.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[Hashable, _Flight[T]] = {}

    def do(
        self, key: Hashable, fn: Callable[[], T], *, timeout: float | None
    ) -> Result[T]:
        """Run ``fn`` once for everyone asking for ``key`` right now.

        Raises whatever ``fn`` raised, :class:`SingleFlightTimeout` when a
        follower waited ``timeout`` seconds, or :class:`LeaderAborted`.
        """
        _check_timeout(timeout)
        mine: _Flight[T] = _Flight()
        # Registration happens inside the try so that an asynchronous
        # exception (KeyboardInterrupt) landing anywhere after it still
        # releases the key and the followers.
        try:
            with self._lock:
                flight = self._flights.setdefault(key, mine)
                if flight is not mine:
                    flight.followers += 1
            if flight is not mine:
                return self._follow(key, flight, timeout)
            return self._lead(mine, fn)
        finally:
            self._land(key, mine)

    def forget(self, key: Hashable) -> bool:
        """Detach ``key``'s current flight so the next caller starts a new one.

        For invalidation mid-compute: the running leader and the followers
        already waiting still get the old flight's outcome; later callers do
        not. Returns whether a flight was detached.
        """
        with self._lock:
            return self._flights.pop(key, None) is not None

    def inflight(self) -> int:
        """Number of keys with a flight in progress (metrics, leak checks)."""
        with self._lock:
            return len(self._flights)

    def followers(self, key: Hashable) -> int:
        """How many followers have joined ``key``'s current flight (0 if none).

        Counts joins, so followers that already timed out are included: it is
        the flight's fan-in (a coalescing metric), not the waiters right now.
        """
        with self._lock:
            flight = self._flights.get(key)
            return 0 if flight is None else flight.followers

    @staticmethod
    def _lead(flight: _Flight[T], fn: Callable[[], T]) -> Result[T]:
        try:
            value = fn()
        except BaseException as exc:
            flight.set_error(exc)
            raise
        flight.set_value(value)
        return Result(value, leader=True, waited=0.0)

    @staticmethod
    def _follow(key: Hashable, flight: _Flight[T], timeout: float | None) -> Result[T]:
        if flight.owner == threading.get_ident():
            raise RuntimeError(
                "single-flight: fn called do() for its own key; this would deadlock"
            )
        started = time.monotonic()
        if not flight.done.wait(timeout):
            raise SingleFlightTimeout(key, timeout or 0.0)
        return flight.result(time.monotonic() - started)

    def _land(self, key: Hashable, mine: _Flight[T]) -> None:
        """End ``mine``: drop the key if it is still ours, then wake followers.

        The identity check keeps a flight that ``forget`` detached from
        removing the newer flight that replaced it. The key goes before the
        wake-up so a woken follower that calls again starts a fresh flight.
        For followers ``mine`` was never registered and this is a no-op.
        """
        try:
            with self._lock:
                if self._flights.get(key) is mine:
                    del self._flights[key]
        finally:
            mine.done.set()


#: Followers of an asyncio flight woken per loop iteration when it lands.
#: Each resumes and runs on (2,000 coroutines on one key are 2,000 task
#: steps): all at once, they hold the loop for tens of milliseconds; a
#: batch at a time, other tasks and timers run between batches, and the
#: last follower resumes a few iterations later, not milliseconds.
RELEASE_BATCH = 64


class _AsyncFlight(_Outcome[T]):
    """An asyncio flight: the outcome plus one future per follower, each
    only ever given ``None`` (a signal: no "exception was never retrieved"
    warning when nobody followed a failed leader, and a follower's
    cancellation cancels its own future only)."""

    __slots__ = ("landed", "owner", "waiters")

    def __init__(self) -> None:
        super().__init__()
        self.waiters: list[asyncio.Future[None]] = []
        self.landed = False
        self.owner = asyncio.current_task()

    def waiter(self) -> asyncio.Future[None]:
        """A new follower's signal (already set if the flight landed)."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.landed:
            waiter.set_result(None)
        else:
            self.waiters.append(waiter)
        return waiter

    def land(self) -> None:
        self.landed = True
        if self.waiters:
            _release(self.waiters, 0)


def _release(waiters: list[asyncio.Future[None]], start: int) -> None:
    """Wake ``RELEASE_BATCH`` followers from ``start``, and the next batch
    in the loop's next iteration (after the woken ones have run)."""
    end = start + RELEASE_BATCH
    for waiter in waiters[start:end]:
        if not waiter.done():  # a follower that timed out or was cancelled
            waiter.set_result(None)
    if end < len(waiters):
        waiters[end].get_loop().call_soon(_release, waiters, end)


class AsyncSingleFlight(Generic[T]):
    """Coalesce concurrent awaits per key among the tasks of one event loop.

    Not thread-safe, by design: asyncio code runs on one loop thread, and a
    flight's signal belongs to that loop. Use one instance per loop.

    Cancellation: a cancelled follower stops waiting (it gets
    ``CancelledError``) and nobody else notices: each follower waits on a
    future of its own. A cancelled
    leader re-raises ``CancelledError`` itself and every follower gets
    :class:`LeaderAborted` (cause: the ``CancelledError``), which they can
    catch and retry, rather than a ``CancelledError`` nobody asked for.
    """

    def __init__(self) -> None:
        self._flights: dict[Hashable, _AsyncFlight[T]] = {}

    async def do(
        self,
        key: Hashable,
        fn: Callable[[], Awaitable[T]],
        *,
        timeout: float | None,
    ) -> Result[T]:
        """Await ``fn()`` once for every task asking for ``key`` right now.

        Raises like :meth:`SingleFlight.do`.
        """
        _check_timeout(timeout)
        flight = self._flights.get(key)
        if flight is not None:
            flight.followers += 1
            return await self._follow(key, flight, timeout)
        # No await between the lookup and here: registration is atomic.
        mine: _AsyncFlight[T] = _AsyncFlight()
        self._flights[key] = mine
        try:
            return await self._lead(mine, fn)
        finally:
            self._land(key, mine)

    def forget(self, key: Hashable) -> bool:
        """Like :meth:`SingleFlight.forget`."""
        return self._flights.pop(key, None) is not None

    def inflight(self) -> int:
        """Number of keys with a flight in progress (metrics, leak checks)."""
        return len(self._flights)

    def followers(self, key: Hashable) -> int:
        """How many callers have joined ``key``'s current flight (0 if none)."""
        flight = self._flights.get(key)
        return 0 if flight is None else flight.followers

    @staticmethod
    async def _lead(
        flight: _AsyncFlight[T], fn: Callable[[], Awaitable[T]]
    ) -> Result[T]:
        try:
            value = await fn()
        except BaseException as exc:
            flight.set_error(exc)
            raise
        flight.set_value(value)
        return Result(value, leader=True, waited=0.0)

    @staticmethod
    async def _follow(
        key: Hashable, flight: _AsyncFlight[T], timeout: float | None
    ) -> Result[T]:
        if flight.owner is not None and flight.owner is asyncio.current_task():
            raise RuntimeError(
                "single-flight: fn called do() for its own key; this would deadlock"
            )
        started = time.monotonic()
        waiter = flight.waiter()
        if timeout is None:
            await waiter
        else:
            timer = waiter.get_loop().call_later(timeout, _time_out, waiter)
            try:
                await waiter
            except _TimedOut:
                raise SingleFlightTimeout(key, timeout) from None
            finally:
                timer.cancel()
        return flight.result(time.monotonic() - started)

    def _land(self, key: Hashable, mine: _AsyncFlight[T]) -> None:
        """End ``mine``; see :meth:`SingleFlight._land` for the ordering."""
        if self._flights.get(key) is mine:
            del self._flights[key]
        mine.land()
