"""Surviving a Sentinel failover: wait for the new primary, move to it at once.

Two things go wrong when Sentinel replaces a primary, and this module
answers both:

* **The primary is gone** (killed, frozen, cut off). Until the sentinels
  agree and promote a replica (``down-after-milliseconds`` plus an election
  and a promotion, 2-3 s in the test deployment, 30 s and more with
  Sentinel's default settings), every command fails. Failing open is right
  for an outage of unknown length, but under Sentinel the outage has a
  known end. With ``FAILOVER_WAIT`` seconds set, ``FailoverRetry`` (the
  retry policy of the primary's connections) keeps re-sending a command that
  failed, every ``RETRY_PAUSE_S``, for at most ``FAILOVER_WAIT``; each attempt
  reconnects, and a Sentinel-managed connection asks the sentinels where the
  primary is as it connects. So the command lands on the new primary as soon
  as one is named, and the caller's wait is the failover's length plus at
  most a pause and a round trip.
* **The old primary lives on** (``SENTINEL FAILOVER``, or a primary that
  comes back after a partition). Sentinel reconfigures it as a replica only
  seconds later (~10 s measured); meanwhile it accepts writes, and pooled
  connections, which ask the sentinels only when they connect, keep writing
  to it: those writes are lost. ``PrimaryWatch`` asks the sentinels every
  ``WATCH_INTERVAL_S`` where the primary is; when the answer changes, idle
  connections are closed (busy ones are closed when they go back to the
  pool: redis-py's ``SentinelConnectionPool`` checks their address), and
  the wake-up subscriber and the identity connection reconnect.
  ``min-replicas-to-write 1`` on every data node closes the rest of the
  window: the old primary refuses writes (``NOREPLICAS``) once its replicas
  follow the new one, and ``FailoverRetry`` sends the refused command again,
  to wherever the sentinels point by then.

Where *is* the primary? redis-py asks ``SENTINEL MASTERS``, whose entry
keeps the old primary's address until a failover has completed, replicas
reconfigured and all (seconds after the promotion; ~10 s measured), so every
connection opened meanwhile went to the old primary. ``PrimarySentinel``
also asks ``SENTINEL GET-MASTER-ADDR-BY-NAME``, which names the promoted
replica as soon as it is promoted, and prefers that answer.

And a connection dropped in the middle of a command's retries must ask the
sentinels again when it reconnects: redis-py's ``SentinelManagedConnection``
does so in ``connect`` but not when ``send_packed_command`` reconnects it,
which then goes back to the address it had, the dead primary's, for as long
as the retries last (``SentinelPrimaryConnection`` fixes that).

Errors that mean "this is not the primary (any more)": ``READONLY`` (redis-py
turns it into a ``ConnectionError`` for Sentinel-managed connections),
``NOREPLICAS`` and ``MasterNotFoundError`` (a ``ConnectionError``). On each,
the connection is dropped and the next attempt asks the sentinels again.
Both refusals happen before anything is written (a script fails at its first
write), so sending the command again cannot apply it twice.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

from redis.backoff import ConstantBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry
from redis.sentinel import (
    MasterNotFoundError,
    Sentinel,
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from django_apee.core.process import ProcessThread

logger = logging.getLogger("django_apee")

T = TypeVar("T")

#: Pause between two attempts while waiting for a failover.
RETRY_PAUSE_S = 0.1
#: How often each process asks the sentinels where the primary is.
WATCH_INTERVAL_S = 0.5
#: Error prefixes of a write refused by a node that is no longer (or not)
#: the primary the write is meant for.
NOT_PRIMARY = ("NOREPLICAS", "READONLY")


def not_primary(error: BaseException) -> bool:
    """True for a refusal that means "ask the sentinels again"."""
    if isinstance(error, ReadOnlyError):
        return True
    return isinstance(error, ResponseError) and str(error).startswith(NOT_PRIMARY)


class Attempts:
    """One command's failures under ``FailoverRetry``'s rule (the sync policy
    and its ``redis.asyncio`` twin, ``store/aio/failover.py``, both ask it).

    ``counts(error)`` after each failure: False, raise it now (a refusal
    that is not "not the primary", or one ``is_retryable`` refuses); then,
    once the failure is reported, ``pause(error)``: how long to wait before
    the next attempt (0: at once, the ``REDIS_RETRIES`` ones), or None:
    the window has passed, raise it.
    """

    def __init__(self, retries: int, window_s: float) -> None:
        self.retries = retries
        self.window_s = window_s
        self.failures = 0
        self.deadline: float | None = None

    def counts(
        self, error: Exception, is_retryable: Callable[[Exception], bool] | None
    ) -> bool:
        if isinstance(error, ResponseError) and not not_primary(error):
            return False
        if is_retryable is not None and not is_retryable(error):
            return False
        self.failures += 1
        return True

    def pause(self, error: Exception) -> float | None:
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.window_s
        if self.failures <= self.retries:
            return 0.0  # REDIS_RETRIES: at once, as outside Sentinel
        if now + RETRY_PAUSE_S > self.deadline:
            return None
        logger.debug("django_apee: waiting for a primary after %r", error)
        return RETRY_PAUSE_S


class FailoverRetry(Retry):
    """redis-py's retry policy for a Sentinel primary: wait out a failover.

    Outside a failover it behaves as ``Retry(NoBackoff(), retries)`` (the
    ``REDIS_RETRIES`` policy). After a connection error, a timeout, or a
    ``NOREPLICAS``/``READONLY`` refusal it drops the connection and tries
    again every ``RETRY_PAUSE_S`` until ``window_s`` has passed since the
    first failure; then the last error is raised. A nested call (redis-py
    retries the connect inside a command's retry) does not wait again.
    """

    def __init__(self, retries: int, window_s: float) -> None:
        super().__init__(ConstantBackoff(RETRY_PAUSE_S), retries)
        self.window_s = window_s
        self._local = threading.local()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FailoverRetry):
            return NotImplemented
        return (self._retries, self.window_s) == (other._retries, other.window_s)

    __hash__ = Retry.__hash__

    def __deepcopy__(self, memo: dict[int, Any]) -> FailoverRetry:
        # redis-py gives each connection a deep copy; the thread-local
        # nesting flag cannot be copied, and must not be shared.
        return FailoverRetry(self._retries, self.window_s)

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        if getattr(self._local, "active", False):
            return self._once(do, fail, with_failure_count)
        self._local.active = True
        try:
            return self._waiting(do, fail, is_retryable, with_failure_count)
        finally:
            self._local.active = False

    def _once(
        self, do: Callable[[], T], fail: Callable[..., Any], with_count: bool
    ) -> T:
        try:
            return do()
        except self._caught() as error:
            if not Attempts(0, 0.0).counts(error, None):
                raise
            self._fail(fail, error, 1, with_count)
            raise

    def _waiting(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None,
        with_count: bool,
    ) -> T:
        attempts = Attempts(self._retries, self.window_s)
        while True:
            try:
                return do()
            except self._caught() as error:
                if not attempts.counts(error, is_retryable):
                    raise
                self._fail(fail, error, attempts.failures, with_count)
                if (pause := attempts.pause(error)) is None:
                    raise
                if pause:
                    time.sleep(pause)

    def _caught(self) -> tuple[type[Exception], ...]:
        return (*self._supported_errors, ResponseError)

    @staticmethod
    def _fail(fail: Callable[..., Any], error: Exception, n: int, count: bool) -> None:
        if count:
            fail(error, n)
        else:
            fail(error)


class PrimarySentinel(Sentinel):
    """redis-py's ``Sentinel``, naming a promoted replica at once.

    For each sentinel in turn: its ``SENTINEL MASTERS`` entry must exist and
    see enough other sentinels (``min_other_sentinels``, as redis-py checks);
    then, if ``GET-MASTER-ADDR-BY-NAME`` names another address than that
    entry, a failover has promoted it: that is the primary. Otherwise the
    entry's address, if it is not down (redis-py's rule).
    """

    def discover_master(self, service_name: str) -> tuple[str, int]:
        errors: list[str] = []
        for number, sentinel in enumerate(self.sentinels):
            try:
                masters: Any = sentinel.sentinel_masters()
                named = sentinel.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", service_name
                )
            except (RedisConnectionError, RedisTimeoutError) as error:
                errors.append(f"{sentinel} - {error!r}")
                continue
            found = primary_named(
                masters.get(service_name),
                named,
                self.min_other_sentinels,
                lambda state: bool(self.check_master_state(state, service_name)),  # type: ignore[no-untyped-call]
            )
            if found is None:
                continue
            # The sentinel that answered is asked first next time.
            self.sentinels[0], self.sentinels[number] = sentinel, self.sentinels[0]
            return found
        raise MasterNotFoundError(
            f"No master found for {service_name!r}"
            + (f" : {', '.join(errors)}" if errors else "")
        )


def primary_named(
    state: dict[str, Any] | None,
    named: Any,
    min_other_sentinels: int,
    up: Callable[[dict[str, Any]], bool],
) -> tuple[str, int] | None:
    """What one sentinel says the primary is (``PrimarySentinel``'s rule),
    from its ``SENTINEL MASTERS`` entry ``state`` and its
    ``GET-MASTER-ADDR-BY-NAME`` reply ``named``; None: ask the next one.
    ``up(state)``: redis-py's check that the entry's address is not down.
    The async client's sentinel (``store/aio/connect.py``) decides by it too.
    """
    if not state or state["num-other-sentinels"] < min_other_sentinels:
        return None
    known = (str(state["ip"]), int(state["port"]))
    promoted = _address(named)
    if promoted is not None and promoted != known:
        return promoted
    return known if up(state) else None


def _address(reply: Any) -> tuple[str, int] | None:
    if not reply or len(reply) != 2:
        return None
    host, port = reply
    host = host.decode() if isinstance(host, bytes) else str(host)
    return host, int(port)


class SentinelPrimaryConnection(SentinelManagedConnection):
    """A Sentinel-managed connection that asks the sentinels on every reconnect.

    redis-py reconnects a dropped connection inside ``send_packed_command``
    with the address it had; a command retried after its primary died then
    knocks on the dead address until its retries run out.
    """

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect()  # type: ignore[no-untyped-call]  # where the sentinels say
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class SentinelPrimarySSLConnection(SentinelManagedSSLConnection):
    """``SentinelPrimaryConnection`` over TLS."""

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        if not self._sock:
            self.connect()  # type: ignore[no-untyped-call]
        super().send_packed_command(command, check_health)  # type: ignore[no-untyped-call]


class PrimaryWatch:
    """Asks the sentinels where the primary is, and acts when it moves.

    One per alias and process, for a primary pool managed by Sentinel; its
    thread holds it only weakly and ends when the alias's runtime closes it
    (``close``) or is gone.
    ``on_change`` callbacks run in the watch thread with the new address.
    """

    def __init__(
        self,
        pool: SentinelConnectionPool,
        on_change: list[Callable[[], None]],
        interval_s: float = WATCH_INTERVAL_S,
    ) -> None:
        self.pool = pool
        self.on_change = on_change
        self.interval_s = interval_s
        self.primary: tuple[str, int] | None = None
        #: (monotonic time, old, new) of every move seen, for the timeline.
        self.moves: list[tuple[float, Any, Any]] = []
        self._thread = ProcessThread(
            _watch_loop(weakref.ref(self)), "django-apee-primary-watch"
        )
        self._lock = threading.Lock()
        #: Set by ``close``: the thread returns at once.
        self.closed = threading.Event()

    def start(self) -> None:
        with self._lock:
            self._thread.ensure()

    def close(self, timeout: float) -> bool:
        """End the thread (the alias's configuration is dropped), waiting
        ``timeout`` seconds at most; True if it ended."""
        self.closed.set()
        with self._lock:
            return self._thread.close(timeout)

    def poll(self) -> None:
        """Ask once; on a move, close idle connections and run the callbacks."""
        try:
            # Closes the pool's idle connections when the address changed;
            # busy ones are closed on release (their address is checked).
            found = tuple(self.pool.get_master_address())  # type: ignore[no-untyped-call]
        except Exception:  # no primary named right now: FailoverRetry waits
            logger.debug("django_apee: sentinels name no primary", exc_info=True)
            return
        address = (str(found[0]), int(found[1]))
        old, self.primary = self.primary, address
        if old is None or old == address:
            return
        self.moves.append((time.monotonic(), old, address))
        logger.warning(
            "django_apee: Sentinel moved the primary of %r from %s:%s to %s:%s; "
            "reconnecting",
            self.pool.service_name,
            *old,
            *address,
        )
        for callback in self.on_change:
            try:
                callback()
            except Exception:
                logger.debug("django_apee: failover callback failed", exc_info=True)


def _watch_loop(ref: weakref.ref[PrimaryWatch]) -> Callable[[], None]:
    def run() -> None:
        while True:
            watch = ref()
            if watch is None or watch.closed.is_set():
                return
            watch.poll()
            interval, closed = watch.interval_s, watch.closed
            del watch
            closed.wait(interval)

    return run


def sentinel_pool(client: Any) -> SentinelConnectionPool | None:
    """The client's pool if Sentinel manages it as a primary's, else None."""
    pool = getattr(client, "connection_pool", None)
    if isinstance(pool, SentinelConnectionPool) and pool.is_master:
        return pool
    return None
