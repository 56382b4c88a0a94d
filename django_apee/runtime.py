"""What one process shares, per cache alias: the engine, wired to Django.

Django builds a cache backend per thread; the stampede engine's
single-flight table, breaker, refresh pool, herd memos and wake-up
subscription must be shared by all of them. :class:`Runtime` holds them for
one alias, built on first use from that backend's parsed options, and kept
in a per-process registry keyed by alias, LOCATION and the options'
fingerprint: after ``override_settings`` or any change to CACHES a new
configuration gets a new runtime (``forget_all`` runs on Django's
``setting_changed``), and a forked worker builds its own.

This is also where the layers below are wired together: the backend is the
engine's store, the alias's metrics its event sink, and the backend's own
connection the fleet counters' destination.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

from django_apee.core import MISSING
from django_apee.core.process import Registry
from django_apee.engine.aio.loop import per_loop
from django_apee.engine.aio.stampede import AsyncCoordinator
from django_apee.engine.herd import Herd
from django_apee.engine.stampede import Coordinator
from django_apee.observe import metrics, trace
from django_apee.store import fleet, gauges
from django_apee.store.aio.cluster import async_cluster, is_cluster
from django_apee.store.aio.connect import async_client, mappable
from django_apee.store.clock import RedisClock
from django_apee.store.errors import REDIS_ERRORS
from django_apee.store.failover import PrimaryWatch, sentinel_pool
from django_apee.store.holder import Identity
from django_apee.store.near import Near
from django_apee.store.shardwake import ShardWakeHub
from django_apee.store.tracking import tracking_connection
from django_apee.store.wake import CLOSE_WAIT_S, WakeHub, wake_channel

if TYPE_CHECKING:
    from redis import Redis

    from django_apee.cache import ApeeCache
    from django_apee.core.envelope import Meta
    from django_apee.engine.aio.loop import LoopIO
    from django_apee.store.aio.loops import PerLoop


class BackendStore:
    """The engine's ``Store``: the backend's primary connection and codec."""

    def __init__(self, backend: ApeeCache) -> None:
        self._backend = backend
        #: The alias's near cache, when on (set by the Runtime).
        self.near: Near | None = None

    def near_hit(self, made: str) -> Any:
        near = self.near
        if near is None:
            return MISSING
        value = near.find(made)
        if value is not MISSING:
            near.events.near_hits.inc()
        return value

    def read(self, connection: Redis, made: str) -> Any:
        # The client's own read: a near cache's reserves and fills.
        return self._backend.client._read_value(connection, made)

    def connection(self) -> Redis:
        connection: Redis = self._backend.client.get_client(write=True)
        return connection

    def decode_entry(self, made: str, raw: bytes) -> tuple[Any, Meta | None] | None:
        client = self._backend.client
        entry: tuple[Any, Meta | None] | None = client.decode_entry(made, raw)
        return entry

    def encode_entry(self, made: str, value: Any, meta: Meta) -> bytes:
        encoded = self._backend.envelope.encode(value, meta, key=made)
        assert isinstance(encoded, bytes)  # values with meta are always enveloped
        return encoded


class Runtime:
    """The per-process engine of one alias: herd mode, stampede, wake-ups."""

    def __init__(self, backend: ApeeCache) -> None:
        options = backend.options
        self.alias = backend.alias
        metrics.configure(self.alias, enabled=options.metrics)
        #: The engine's event sink: the metrics, also recorded per request
        #: while a debugging tool traces (observe/trace.py).
        self.events = (
            trace.TracedEvents(self.alias)
            if trace.enabled()
            else metrics.AliasMetrics(self.alias)
        )
        self.store = BackendStore(backend)
        #: Redis's clock, sampled from the primary: entries are stamped with
        #: it and the lean hit path judges their age by it.
        self.clock = RedisClock(self.store.connection)
        #: Wake-ups of the alias's KEY_PREFIX only: other apps on the same
        #: Redis neither hear its key names nor wake its waiters.
        #: A client class may bring its own (ApeeClusterClient: sharded).
        make_hub = getattr(backend.client, "wake_hub", WakeHub)
        self.hub = make_hub(self.store.connection, wake_channel(backend.key_prefix))
        #: This process's identity connection: leases taken here name its
        #: Redis client id, so other processes can tell when this one died.
        self.identity = Identity(self.store.connection)
        self.coordinator = Coordinator(
            self.store,
            self.hub,
            options.tuning,
            self.events,
            clock=self.clock,
            identity=self.identity,
        )
        self.herd = Herd(
            self.store, self.hub, options.tuning, self.events, self.identity
        )
        self._async: tuple[AsyncCoordinator | None] | None = None
        #: The near cache (OPTIONS NEAR_CACHE), None when off.
        self.near = _near(backend, self) if options.near_cache else None
        self.store.near = self.near
        if self.near is not None:
            gauges.report(self.alias, self.near.figures)
        #: Under Sentinel: follows the primary, and moves the wake-up
        #: subscription and the identity connection when it moves.
        self.watch: PrimaryWatch | None = None
        try:
            pool = sentinel_pool(self.store.connection())
        except REDIS_ERRORS:
            # Only a cluster's client does I/O to be had (ClusterUnreachable);
            # a cluster has no Sentinel to follow.
            pool = None
        if pool is not None:
            self.watch = PrimaryWatch(
                pool, [self.hub.reconnect, self.identity.reset, self._async_moved]
            )
            self.watch.start()
        fleet.register(
            self.alias,
            fleet.Sink(
                connect=self.store.connection,
                key_prefix=backend.key_prefix,
                interval=options.stats_flush_interval,
            ),
        )

    @property
    def acoordinator(self) -> AsyncCoordinator | None:
        """The async engine (``engine/aio``), built on first use: per event
        loop, a ``redis.asyncio`` client with the primary's settings, its
        wake-up subscription and flights. None when the client has no async
        twin (a cluster without sharded pub/sub): the async methods then
        run the sync ones in a thread."""
        if self._async is None:
            loops = _loops(self.store, self.hub.channel, self.hub)
            self._async = (
                AsyncCoordinator(self.coordinator, loops) if loops else None,
            )
        return self._async[0]

    def _async_moved(self) -> None:
        """The primary moved: each loop's connections and wake-up
        subscription follow it, on their own loop."""
        engine = self._async[0] if self._async is not None else None
        if engine is not None:
            engine.loops.each(lambda io: io.primary_moved())

    def close(self) -> None:
        """This configuration is dropped: end its threads and give back or
        close their connections now. Left running, each dropped runtime kept
        a pub/sub connection of the pool, the identity connection and the
        near cache's tracking connection for good, until a pool with
        ``max_connections`` refused more. Every join is bounded
        (``CLOSE_WAIT_S``); a thread still running then ends on its own.
        """
        if self.near is not None:
            gauges.report(self.alias, None)
            self.near.close()
        if self.watch is not None:
            self.watch.close(CLOSE_WAIT_S)
        self.hub.close(CLOSE_WAIT_S)
        self.identity.reset()
        self.coordinator.close()
        if self.near is not None:
            self.near.tracker.join(CLOSE_WAIT_S)


def _loops(store: BackendStore, channel: str, hub: WakeHub) -> PerLoop[LoopIO] | None:
    """The alias's async state per loop, or None if its client has no
    ``redis.asyncio`` twin (checked without I/O). On a cluster, a
    ``redis.asyncio`` RedisCluster per loop with sharded wake-ups, when
    its sync hub has them (Redis/Valkey 7+)."""
    connection = store.connection()
    if is_cluster(connection):
        if not isinstance(hub, ShardWakeHub):
            return None
        return per_loop(
            lambda: async_cluster(store.connection()),
            channel,
            store.connection,
            sharded=True,
        )
    if not mappable(connection):
        return None
    return per_loop(lambda: async_client(store.connection()), channel, store.connection)


#: This process's near caches by LOCATION and tracked prefix: aliases that
#: share keys (another VERSION of the same cache) forget a key together
#: when the process writes it, instead of waiting for Redis to tell them.
NEAR_PEERS: Registry[weakref.WeakSet[Near]] = Registry()


def _near(backend: ApeeCache, runtime: Runtime) -> Near:
    """The alias's near cache, tracking every key its KEY_FUNCTION can make."""
    assert backend.options.near_cache is not None
    prefix = tracking_prefix(backend)
    near = Near(
        backend.options.near_cache,
        backend.envelope,
        backend.options.policy,
        lambda: tracking_connection(runtime.store.connection()),
        prefix,
        runtime.events,
        # Traced events are recorded in the request that caused them.
        count_inline=trace.enabled(),
        redis_now=runtime.clock.latest_ms,
    )
    peers = NEAR_PEERS.get((str(backend._server), prefix), weakref.WeakSet)
    peers.add(near)
    near.peers = peers
    return near


def tracking_prefix(backend: ApeeCache) -> str:
    """What every key of the alias starts with, for ``CLIENT TRACKING PREFIX``.

    The common start of two keys that differ in key and version: with
    Django's key function, ``KEY_PREFIX:``; with a custom one, whatever it
    keeps in common (possibly nothing: then every key of the database is
    tracked, which is correct, only noisier).
    """
    made = [
        str(backend.key_func(key, backend.key_prefix, version))
        for key, version in (("a", 1), ("b", 2))
    ]
    common = 0
    while common < min(map(len, made)) and made[0][common] == made[1][common]:
        common += 1
    return made[0][:common]


RUNTIMES: Registry[Runtime] = Registry()


def runtime_of(backend: ApeeCache) -> Runtime:
    """The process's Runtime for ``backend``'s alias and configuration."""
    key = (backend.alias, str(backend._server), backend.options.fingerprint)
    return RUNTIMES.get(key, lambda: Runtime(backend))


def forget_all() -> None:
    """CACHES changed: every runtime and metric switch goes, and each
    runtime's threads and connections with it (``Runtime.close``).

    Fleet sinks stay until the alias's next runtime replaces them: counts
    already made must still reach a Redis.
    """
    for dropped in RUNTIMES.clear():
        dropped.close()
    metrics.reset()


def alias_of(backend: ApeeCache) -> str:
    """Find the ``CACHES`` alias a backend was built for.

    Django does not tell a backend its alias. The handler's per-thread
    connections know it by identity; failing that (a backend built by hand),
    the settings entry with the same LOCATION and OPTIONS; else "unknown".
    """
    from django.conf import settings
    from django.core.cache import caches

    for name in settings.CACHES:
        if getattr(caches._connections, name, None) is backend:
            return str(name)
    for name, config in settings.CACHES.items():
        if (
            config.get("LOCATION") == backend._server
            and (config.get("OPTIONS") or {}) == backend.user_options
        ):
            return str(name)
    return "unknown"
