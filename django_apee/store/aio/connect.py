"""An async client with the same connection settings as a sync one.

The backend's sync pools are built by django-redis from the parsed OPTIONS
(``conf.py``): address, database, username and password, socket timeouts,
the ``REDIS_RETRIES`` retry policy, TLS, and under Sentinel the sentinels
and the service. Rather than parse OPTIONS a second time (and drift from
what the sync side does), the async client is derived from a built sync
client: its pool's connection class and keyword arguments, mapped to
``redis.asyncio``'s.

Some sync-only arguments have no async counterpart (a parser class, the
client-side cache, OCSP stapling, Redis Enterprise's maintenance
notifications); they are left out, and each is named in a debug log line
once per process. Redis Cluster is not mapped here: its async twin is
built by ``store/aio/cluster.py``.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import redis.asyncio as aioredis
import redis.asyncio.connection as aioconnection
import redis.asyncio.sentinel as aiosentinel
from redis import Redis
from redis import connection as syncconnection
from redis import sentinel as syncsentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.asyncio.sentinel import MasterNotFoundError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.maint_notifications import MaintNotificationsConfig

from django_apee.store.aio.failover import (
    AsyncFailoverRetry,
    SentinelPrimaryConnection,
    SentinelPrimarySSLConnection,
)
from django_apee.store.failover import FailoverRetry, primary_named

logger = logging.getLogger("django_apee")

#: sync connection class -> its redis.asyncio twin.
_CLASSES: dict[type, type] = {
    syncconnection.Connection: aioconnection.Connection,
    syncconnection.SSLConnection: aioconnection.SSLConnection,
    syncconnection.UnixDomainSocketConnection: aioconnection.UnixDomainSocketConnection,
}
_LOGGED: set[str] = set()
#: Seconds a coroutine waits for a pooled connection when no socket timeout
#: bounds a reply (redis-py's own default).
BORROW_TIMEOUT = 20.0
#: What a sync pool adds to its connections' arguments for its own use (its
#: maintenance notifications, original addresses): never passed on.
_POOL_INTERNAL = ("maint_notifications", "orig_", "himport_registry")
#: Sync objects an async connection cannot use: its parser (redis.asyncio
#: picks hiredis itself when installed), its connect hook, its packer.
_SYNC_ONLY = {
    "parser_class",
    "redis_connect_func",
    "command_packer",
    "event_dispatcher",
}


class NotMappable(Exception):
    """This sync client has no async twin here (a cluster, an unknown class)."""


def async_client(client: Redis) -> aioredis.Redis:
    """A ``redis.asyncio`` client for the server ``client`` talks to.

    Builds its own pool (connections belong to the loop that uses them).
    """
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        raise NotMappable(f"{type(client).__name__} has no single pool")
    if isinstance(pool, syncsentinel.SentinelConnectionPool):
        return _sentinel_client(pool)
    connection_class = _async_class(pool.connection_class)
    kwargs = async_kwargs(pool.connection_kwargs, connection_class)
    # Blocking: past ``max_connections`` a coroutine waits for a connection
    # (as long as a reply may take) rather than fail. Threads are few and
    # rarely meet the bound; a loop serving an ASGI site runs hundreds of
    # coroutines at once, each holding a connection for its round trip.
    async_pool = aioconnection.BlockingConnectionPool(
        connection_class=connection_class,
        max_connections=pool.max_connections,
        timeout=kwargs.get("socket_timeout") or BORROW_TIMEOUT,
        # Its "auto" default refuses the RESP2 parser at the first connect.
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        **kwargs,
    )
    return aioredis.Redis(connection_pool=async_pool)


def mappable(client: Redis) -> bool:
    """Whether :func:`async_client` can mirror ``client`` (no I/O)."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:
        return False
    if isinstance(pool, syncsentinel.SentinelConnectionPool):
        return True
    try:
        _async_class(pool.connection_class)
    except NotMappable:
        return False
    return True


def _async_class(sync_class: type) -> type:
    for klass in sync_class.__mro__:
        if klass in _CLASSES:
            return _CLASSES[klass]
    raise NotMappable(f"no async twin for connection class {sync_class.__name__}")


def async_kwargs(kwargs: dict[str, Any], connection_class: type) -> dict[str, Any]:
    """The sync connection's arguments that the async ``connection_class``
    takes, its retry policy rebuilt as ``redis.asyncio``'s ``Retry``."""
    accepted = _parameters(connection_class)
    found = {}
    for name, value in kwargs.items():
        if name.startswith(_POOL_INTERNAL) or name in _SYNC_ONLY:
            continue
        if name in accepted:
            found[name] = value
        elif name not in _LOGGED:
            _LOGGED.add(name)
            logger.debug("django_apee: %r has no redis.asyncio twin; left out", name)
    retry = found.get("retry")
    if isinstance(retry, FailoverRetry):  # FAILOVER_WAIT, under Sentinel
        found["retry"] = AsyncFailoverRetry.of(retry)
    elif retry is not None:
        found["retry"] = async_retry(retry)
    return found


def async_retry(retry: Any) -> AsyncRetry:
    """A sync ``Retry``'s policy (backoff, retries, errors) for ``redis.asyncio``."""
    return AsyncRetry(retry._backoff, retry._retries, tuple(retry._supported_errors))


def _parameters(connection_class: type) -> set[str]:
    names: set[str] = set()
    for klass in connection_class.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for parameter in inspect.signature(init).parameters.values():
            if parameter.kind is parameter.KEYWORD_ONLY or (
                parameter.kind is parameter.POSITIONAL_OR_KEYWORD
            ):
                names.add(parameter.name)
    names.discard("self")
    return names


class PrimarySentinel(aiosentinel.Sentinel):
    """``redis.asyncio``'s ``Sentinel``, deciding as the sync side's
    ``failover.PrimarySentinel`` does: a promoted replica is the primary at
    once, not once every sentinel's MASTERS entry has caught up."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        errors: list[str] = []
        for number, sentinel in enumerate(self.sentinels):
            try:
                masters: Any = await sentinel.sentinel_masters()
                named = await sentinel.execute_command(  # type: ignore[no-untyped-call]
                    "SENTINEL", "GET-MASTER-ADDR-BY-NAME", service_name
                )
            except (RedisConnectionError, RedisTimeoutError) as error:
                errors.append(f"{sentinel} - {error!r}")
                continue
            found = primary_named(
                masters.get(service_name),
                named,
                self.min_other_sentinels,
                lambda state: bool(self.check_master_state(state, service_name)),
            )
            if found is not None:
                self.sentinels[0], self.sentinels[number] = sentinel, self.sentinels[0]
                return found
        raise MasterNotFoundError(
            f"No master found for {service_name!r}"
            + (f" : {', '.join(errors)}" if errors else "")
        )


def _sentinel_client(pool: syncsentinel.SentinelConnectionPool) -> aioredis.Redis:
    """The service's primary through ``redis.asyncio.sentinel``, asking the
    same sentinels with the same sentinel arguments."""
    manager = pool.sentinel_manager
    sentinels = [
        (node.connection_pool.connection_kwargs["host"],
         node.connection_pool.connection_kwargs["port"])
        for node in manager.sentinels
    ]  # fmt: skip
    sentinel_class = _async_class(manager.sentinels[0].connection_pool.connection_class)
    sentinel_kwargs = async_kwargs(manager.sentinel_kwargs, sentinel_class)
    data_kwargs = {
        k: v for k, v in pool.connection_kwargs.items() if k != "connection_pool"
    }
    data_class = (
        SentinelPrimarySSLConnection
        if issubclass(pool.connection_class, syncconnection.SSLConnection)
        else SentinelPrimaryConnection
    )
    data_kwargs = async_kwargs(data_kwargs, data_class)
    data_kwargs.pop("host", None)
    data_kwargs.pop("port", None)
    async_manager = PrimarySentinel(  # type: ignore[no-untyped-call]
        sentinels,
        min_other_sentinels=manager.min_other_sentinels,
        sentinel_kwargs=sentinel_kwargs,
    )
    client: aioredis.Redis = async_manager.master_for(
        pool.service_name, connection_class=data_class, **data_kwargs
    )
    return client
