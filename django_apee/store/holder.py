"""Who holds a lease, as Redis sees it: a process's identity connection.

A lease records its holder's Redis ``CLIENT ID`` (``keys.lease_token``), so a
waiter can ask Redis whether that client still exists (``alive``) and take
over at once from a holder whose process died (``core/takeover.py``).

Which connection's id? Not the pooled one that took the lease: a pool hands
connections to any thread, may close one and open another, and the
renewals of the lease run on whichever connection is free. The id must live
exactly as long as the process, so each process keeps one *identity
connection* per Redis (``Identity``): taken out of the alias's own pool once
(so it has the pool's address, credentials, TLS and Sentinel routing) and
never given back. The lease renewer sends its renewals on it, so while a
lease is held the connection is in use and any breakage is noticed by the
next renewal, a quarter of a lease later.

If the identity connection is re-established (a network blip, a restart of
Redis, a failover), its client id changes; leases taken before name the old
one, and a waiter may take them over although their holder lives. That costs
one extra computation at worst, never a wrong value: the old holder's renewal
and release are fenced by its token and find the lease gone
(``lease_lost``). The same holds after a Sentinel failover, where client ids
of the old primary mean nothing on the new one.

``CLIENT LIST`` needs the ``@admin`` ACL category (``CLIENT ID`` only
``@connection``). A user refused it (NOPERM) gets no holder checks: dead
holders are then ended by their lease's expiry (slower, never wrong); a
warning says so once a minute, and the system check apee.W007 says it at
deploy time.

On Redis Cluster a client id means something on one node only, and one
identity connection cannot be on every node: leases taken through a client
without a single pool (``RedisCluster``) name no holder, and dead holders
are ended by their lease's expiry, as under NOPERM.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from django_apee.store.errors import REDIS_ERRORS

logger = logging.getLogger("django_apee")

#: A refused CLIENT LIST is logged at most this often per process.
DENIED_LOG_SECONDS = 60.0
#: An identity connection idle this long is asked its id again before a
#: lease names it: the server may have closed it meanwhile (its ``timeout``
#: setting), and a lease naming a closed connection's id would be taken over
#: from a live holder. One round trip, at most once per this many seconds.
IDLE_RECHECK_S = 10.0


class Identity:
    """One process's identity on one Redis: a connection it keeps for itself.

    ``client_id()`` is the id leases record; ``client()`` is the connection,
    for the renewer. Built lazily: nothing talks to Redis until the first
    lease is taken.
    """

    def __init__(self, connect: Callable[[], Redis]) -> None:
        self._connect = connect
        self._lock = threading.Lock()
        self._client: Redis | None = None
        self._id: int | None = None
        #: When the connection was last known to be alive (monotonic).
        self._alive_at = 0.0
        #: The ACL refuses CLIENT ID, or the client has no single pool (a
        #: cluster): leases name nobody, not asked again.
        self.denied = False

    def client(self) -> Redis:
        """The identity connection (a single-connection client of the pool),
        for a command about to be sent on it (a renewal)."""
        with self._lock:
            self._alive_at = time.monotonic()
            return self._ensure()

    def _ensure(self) -> Redis:
        if self._client is None:
            pool = self._connect().connection_pool
            client = Redis(connection_pool=pool, single_connection_client=True)
            connection: Any = client.connection
            # A reconnect gives the connection a new client id: forget ours.
            connection.register_connect_callback(self._reconnected)
            self._client = client
        return self._client

    def _reconnected(self, connection: Any) -> None:
        self._id = None

    def known_id(self) -> int | None:
        """The client id if known and its connection recently alive (no
        I/O), else None: ``client_id`` must ask."""
        known = self._id
        if known is not None and time.monotonic() - self._alive_at < IDLE_RECHECK_S:
            return known
        return None

    def client_id(self) -> int | None:
        """This process's client id on the Redis, or None if it cannot be had."""
        known = self.known_id()
        if self.denied or known is not None:
            return known
        with self._lock:
            if not hasattr(self._connect(), "connection_pool"):
                self.denied = True  # a cluster: client ids are per node
                return None
            try:
                found = self._ask_id()
            except NoPermissionError:
                self.denied = True
                logger.warning(
                    "django_apee: the Redis user may not run CLIENT ID (NOPERM): "
                    "leases taken by this process name no holder, and are taken "
                    "over only when they expire if it dies. Grant it: "
                    "ACL SETUSER <user> +client|id"
                )
                return None
            except REDIS_ERRORS:
                logger.debug("django_apee: CLIENT ID failed", exc_info=True)
                return None
            self._id = found
            self._alive_at = time.monotonic()
            return found

    def _ask_id(self) -> int:
        """CLIENT ID on the identity connection; once more on a fresh one if
        the server had closed it (``REDIS_RETRIES`` may be 0)."""
        client = self._ensure()
        try:
            return int(client.client_id())
        except (RedisConnectionError, RedisTimeoutError):
            client.connection.disconnect()  # type: ignore[union-attr]
            return int(client.client_id())

    def reset(self) -> None:
        """Drop the connection (the primary changed): the next use reconnects
        to whatever the pool names now, under a new id."""
        with self._lock:
            client, self._client, self._id = self._client, None, None
        if client is not None:
            try:
                client.close()
            except Exception:
                logger.debug("django_apee: closing the identity failed", exc_info=True)


class HolderCheck:
    """Asks Redis whether a lease holder's client still exists.

    One per alias and process; remembers a NOPERM so a refused user is not
    asked again (and is told why takeovers are slow).
    """

    def __init__(self) -> None:
        self.denied = False
        self._logged = 0.0

    def alive(self, client: Redis, holder_id: int) -> bool | None:
        """True/False: the holder's connection exists/does not; None: unknown
        (refused, or Redis failed: the lease's expiry decides then)."""
        if self.denied:
            return None
        try:
            found = client.execute_command(  # type: ignore[no-untyped-call]
                "CLIENT", "LIST", "ID", holder_id
            )
        except NoPermissionError:
            return self.refused()
        except REDIS_ERRORS:
            return self.failed()
        return bool(found)

    def refused(self) -> bool | None:
        """The ACL refused CLIENT LIST: never ask again, say why once."""
        self.denied = True
        self._warn()
        return None

    def failed(self) -> bool | None:
        """Redis failed to answer: unknown, the lease's expiry decides."""
        logger.debug("django_apee: CLIENT LIST ID failed", exc_info=True)
        return None

    def _warn(self) -> None:
        now = time.monotonic()
        if now - self._logged < DENIED_LOG_SECONDS and self._logged:
            return
        self._logged = now
        logger.warning(
            "django_apee: the Redis user may not run CLIENT LIST (NOPERM): a "
            "lease whose holder process died is taken over only when the "
            "lease expires, not at once. Grant it: ACL SETUSER <user> "
            "+client|list (or set HOLDER_CHECK to 0 to silence this)."
        )
