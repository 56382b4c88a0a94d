"""Server-assisted invalidation for the near cache: one tracking connection.

``Tracker`` keeps one RESP3 connection per process and configuration with
``CLIENT TRACKING ON BCAST PREFIX <prefix>``: Redis then pushes the name of
every key under the prefix that anyone modifies (a write, a delete, an
expiry, an eviction; ``FLUSHDB`` as a null) to that connection, and a daemon
thread hands them to the near cache.

Why BCAST on a connection of its own, and not redis-py's client-side cache
or default (per-key) tracking with REDIRECT:

- redis-py's ``cache_config`` caches command replies per connection of a
  RESP3 pool: every data connection must be RESP3 with tracking on, it
  needs Redis >= 7.4 (the suite runs 7.0 and Valkey), it keys by command
  (our reads are a script), it reads invalidations only when a connection
  sends its next command, and it bounds entries, not bytes. The bytes it
  would keep still need their MAC checked and decompressing on every hit.
- Default tracking remembers, per key, which clients read it, and tells only
  those; reads would have to go through a connection with tracking on (or
  REDIRECT from every pooled connection, each of which must stay alive for
  its keys to be tracked). A pooled connection closed by django-redis would
  silently stop invalidations for what it read.
- BCAST needs no server memory per key and nothing on the data connections:
  reads go through django-redis's pools untouched, from any thread. The
  cost: every process hears every write under the alias's KEY_PREFIX, which
  is why the near cache is opt-in; apps sharing a Redis under another
  prefix are not heard. Redis batches a prefix's keys into one push per
  event-loop turn; measured (``bench/tracking_cost.py``, pipelined SETs of
  200 B), Redis's CPU per write went from 0.76 µs with no tracking
  connection to 1.70 µs with 8 and 2.86 µs with 32.

Nothing stale after a lost connection. Messages on one connection arrive in
order, so a ``PONG`` proves that every invalidation Redis produced before it
ran that ``PING`` has been handled. The thread pings every ``HEARTBEAT``
seconds and ``live`` answers True only while the last confirmation is
younger than ``LIVENESS`` and the connection stands. A dropped connection
(``CLIENT KILL``, a restart) is seen by the reader at once and calls
``on_reset`` (the near cache flushes everything and refuses reads in
flight), and so does every new subscription, for what was filled meanwhile;
a silent one (a blackholed network) stops confirmations, so the near cache
stops answering after at most ``LIVENESS``, and flushes when the socket
timeout ends the connection.

The thread holds its tracker only weakly: when the configuration that made
it is dropped (``override_settings``, a changed CACHES), the thread closes
its connection and ends within a heartbeat. After ``fork()`` the child
builds its own (``core.process.Registry``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis._parsers import _RESP3Parser

if TYPE_CHECKING:
    from redis import Redis
    from redis.connection import AbstractConnection

logger = logging.getLogger("django_apee")

#: Seconds between PINGs on the tracking connection.
HEARTBEAT = 0.2
#: The near cache answers only while its last confirmation is this recent.
LIVENESS = 1.0
#: A tracking connection whose PONG is this late is replaced.
PONG_WAIT = 2.0
#: The name the tracking connection shows in CLIENT LIST.
CLIENT_NAME = "django-apee-near"


def tracking_connection(client: Redis) -> AbstractConnection:
    """A new RESP3 connection to the server ``client``'s pool connects to.

    Same connection class and settings as the pool's (TLS, password,
    Sentinel's master lookup), outside the pool: it never serves a command
    of the application.
    """
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    kwargs["protocol"] = 3
    kwargs["parser_class"] = _RESP3Parser
    connection: AbstractConnection = pool.connection_class(**kwargs)
    return connection


class Tracker:
    """The tracking connection of one near cache and its daemon thread."""

    def __init__(
        self,
        connect: Callable[[], AbstractConnection],
        prefix: str,
        on_invalidate: Callable[[list[str] | None], None],
        on_reset: Callable[[], None],
        *,
        heartbeat: float = HEARTBEAT,
        liveness: float = LIVENESS,
        on_tick: Callable[[], None] | None = None,
    ) -> None:
        self._connect = connect
        self.prefix = prefix
        self._on_invalidate = on_invalidate
        self._on_reset = on_reset
        #: Called by the thread once a heartbeat, whatever the connection
        #: does (the near cache counts its hits there, off the hit path).
        self._on_tick = on_tick
        self.heartbeat = heartbeat
        self.liveness = liveness
        #: Monotonic time a PING was sent whose PONG came back on a
        #: connection with tracking on; 0: not confirmed.
        self.confirmed_at = 0.0
        #: The tracking connection's CLIENT ID (None while down).
        self.client_id: int | None = None
        #: How many times tracking was lost (for stats and tests).
        self.losses = 0
        #: Set by ``stop``: nothing is reported or confirmed any more.
        self.stopped = False
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def ensure(self) -> None:
        """Start the thread unless it runs in this process (cheap when it does)."""
        thread = self._thread
        if self.stopped or (
            thread is not None and thread.is_alive() and self._pid == os.getpid()
        ):
            return
        with self._lock:
            thread = self._thread
            if thread is not None and thread.is_alive() and self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self.confirmed_at = 0.0
            self._thread = threading.Thread(
                target=_run, args=(weakref.ref(self),), name=CLIENT_NAME, daemon=True
            )
            self._thread.start()

    def stop(self) -> None:
        """End the thread at its next heartbeat; callbacks stop at once."""
        self.stopped = True
        self.confirmed_at = 0.0

    def join(self, timeout: float) -> bool:
        """After ``stop``: wait up to ``timeout`` seconds for the thread to
        close its connection and end. True if it has."""
        thread = self._thread
        if thread is None or self._pid != os.getpid():
            return True
        thread.join(timeout)
        return not thread.is_alive()

    def live(self, now: float) -> bool:
        """Whether invalidations are confirmed to arrive (see the module)."""
        return now - self.confirmed_at < self.liveness

    # -- run by the thread ----------------------------------------------------

    def _subscribe(self) -> AbstractConnection:
        made = self._connect()
        connection: Any = made  # redis-py's connection methods are untyped
        connection.connect()
        connection._parser.set_invalidation_push_handler(self._pushed)
        connection.send_command("CLIENT", "SETNAME", CLIENT_NAME)
        connection.read_response()
        connection.send_command("CLIENT", "ID")
        self.client_id = int(connection.read_response())
        command = ["CLIENT", "TRACKING", "ON", "BCAST"]
        if self.prefix:
            command += ["PREFIX", self.prefix]
        connection.send_command(*command)
        connection.read_response()
        # What was filled while tracking was down was never covered: gone.
        if not self.stopped:
            self._on_reset()
        return made

    def _cycle(self, connection: Any) -> None:
        """One PING and its PONG, then invalidations until the next PING."""
        sent = time.monotonic()
        connection.send_command("PING")
        # Whatever the socket timeout (None waits for ever), a PONG that
        # does not come within PONG_WAIT ends this connection: a new one is
        # tried, and near hits have stopped anyway (LIVENESS).
        if not connection.can_read(timeout=PONG_WAIT):
            raise TimeoutError(f"no PONG within {PONG_WAIT} s")
        connection.read_response()  # invalidations before it are handled first
        if not self.stopped:
            self.confirmed_at = sent
        deadline = sent + self.heartbeat
        while (left := deadline - time.monotonic()) > 0:
            if connection.can_read(timeout=left):
                connection.read_response(push_request=True)

    def _pushed(self, message: list[Any]) -> None:
        """``["invalidate", [key, ...]]``, or a null list for FLUSHDB/FLUSHALL."""
        if self.stopped:
            return
        keys = message[1]
        if keys is None:
            self._on_invalidate(None)
            return
        self._on_invalidate(
            [key.decode() if isinstance(key, bytes) else str(key) for key in keys]
        )

    def _tick(self) -> None:
        if self._on_tick is not None:
            try:
                self._on_tick()
            except Exception:  # counting must not end the tracking
                logger.debug("django_apee: near cache tick failed", exc_info=True)

    def _lost(self) -> None:
        if self.stopped:
            return
        self.confirmed_at = 0.0
        self.client_id = None
        self.losses += 1
        self._on_reset()


def _run(ref: weakref.ReferenceType[Tracker]) -> None:
    """The thread: (re)subscribe, confirm, listen; stop when the tracker is gone."""
    connection: AbstractConnection | None = None
    backoff = 0.05
    while True:
        tracker = ref()
        if tracker is None or tracker.stopped:
            break
        tracker._tick()
        try:
            if connection is None:
                connection = tracker._subscribe()
            tracker._cycle(connection)
            backoff = 0.05
        except Exception:
            logger.debug("django_apee: near cache tracking lost", exc_info=True)
            tracker._lost()
            if connection is not None:
                _close(connection)
                connection = None
            del tracker
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
            continue
        del tracker
    if connection is not None:
        _close(connection)


def _close(connection: Any) -> None:
    try:
        connection.disconnect()
    except Exception:  # closing a broken socket: nothing more to do
        logger.debug("django_apee: closing the tracking connection", exc_info=True)
