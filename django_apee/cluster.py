"""Redis Cluster and Valkey Cluster: ``ApeeClusterClient``.

Selected the django-redis way::

    CACHES = {"default": {
        "BACKEND": "django_apee.cache.ApeeCache",
        "LOCATION": ["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"],
        "OPTIONS": {"CLIENT_CLASS": "django_apee.cluster.ApeeClusterClient"},
    }}

``LOCATION`` is one URL or several (a list, or comma-separated): startup
nodes, any of which tells the client the whole cluster. One ``RedisCluster``
(``store.slots.Cluster``) per process and configuration serves every thread
of the alias: it keeps a pool per node and follows MOVED/ASK and failovers
itself. A forked worker builds its own (the registry is per process).

Every key's companions (lease, wake-up) share its hash slot
(``core/keys.py``), so the single-key scripts run as they do on one Redis.
What a cluster changes is handled here: ``get_many`` reads per slot, in one
pipelined round trip; ``keys``, ``iter_keys``, ``delete_pattern`` and
``clear`` go to every primary; keys whose companions cannot share their slot
are refused (``CrossSlotKey``). Pipelines (``set_many``, ``delete_many``)
load scripts a node lacks after a failover (``store/slots.py``). Wake-ups go by
sharded pub/sub on Redis/Valkey 7+ (``store/shardwake.py``).

OPTIONS: ``SOCKET_TIMEOUT``, ``SOCKET_CONNECT_TIMEOUT``, ``USERNAME``,
``PASSWORD``, ``rediss://`` URLs and ``CONNECTION_POOL_KWARGS`` reach every
node's connections (TLS files, ``max_connections``, ``client_name``...);
``REDIS_CLIENT_KWARGS`` (and the cluster-level keys listed in
``CLUSTER_KWARGS`` wherever given) reach ``RedisCluster`` itself:
``read_from_replicas`` (opt-in: plain reads may then see a replica that lags),
``retry``, ``require_full_coverage``, ``address_remap``... What a cluster
cannot honour (Sentinel, a database other than 0, a custom pool class or
Redis client class, the near cache) is an error (system check ``apee.E010``).

``REDIS_RETRIES`` (``retry.py``) becomes the cluster's own retry policy:
redis-py gives each node's connections none, and retries a command (after
refreshing its slot map) at the cluster level.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from django.core.cache.backends.base import InvalidCacheKey, get_key_func
from django.core.exceptions import ImproperlyConfigured
from django_redis.client import DefaultClient
from django_redis.exceptions import ConnectionInterrupted
from django_redis.util import CacheKey
from redis.cluster import REDIS_ALLOWED_KEYS, RedisCluster
from redis.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError

from django_apee.client import GET_CHUNK, ApeeClientMixin
from django_apee.client_inplace import interrupted
from django_apee.conf import Problem, fingerprint
from django_apee.core.keys import (
    LEASE,
    companion,
    companion_patterns,
    hash_tag,
    owner,
    same_slot,
)
from django_apee.core.process import Registry
from django_apee.store import scripts
from django_apee.store.errors import REDIS_ERRORS
from django_apee.store.shardwake import ShardWakeHub
from django_apee.store.slots import Cluster, by_slot, supports_sharded_pubsub
from django_apee.store.wake import WakeHub

if TYPE_CHECKING:
    from collections.abc import Iterable

#: Arguments of ``RedisCluster`` itself (not of each node's connections);
#: found in ``REDIS_CLIENT_KWARGS`` or, lower-case, in the other OPTIONS.
CLUSTER_KWARGS = frozenset(
    {
        "address_remap", "cluster_error_retry_attempts", "dynamic_startup_nodes",
        "load_balancing_strategy", "read_from_replicas", "reinitialize_steps",
        "require_full_coverage", "retry",
    }
)  # fmt: skip
#: django-redis OPTIONS that mean nothing on a cluster: refused, not ignored.
REFUSED_OPTIONS = {
    "SENTINELS": "Sentinel and Cluster exclude each other",
    "SENTINEL_KWARGS": "Sentinel and Cluster exclude each other",
    "CONNECTION_POOL_CLASS": "RedisCluster keeps its own pool per node",
    "CONNECTION_FACTORY": "ApeeClusterClient builds the RedisCluster itself",
    "REDIS_CLIENT_CLASS": "ApeeClusterClient needs its own RedisCluster subclass",
    "PARSER_CLASS": "RedisCluster does not pass a parser class to its nodes",
}
#: Why NEAR_CACHE is refused on a cluster (apee.E010).
NEAR_CACHE_REFUSED = (
    "OPTIONS['NEAR_CACHE'] is not supported with ApeeClusterClient yet: its "
    "invalidations (CLIENT TRACKING) would come from one node, so writes to "
    "the others would leave stale values in process memory."
)
#: Where RedisCluster keeps each node's connection kwargs; others it drops.
_NODE_KWARGS = frozenset(REDIS_ALLOWED_KEYS) - {"host", "port", "retry"}


class CrossSlotKey(InvalidCacheKey):  # type: ignore[misc]
    """A key whose lease could not share its Redis Cluster hash slot."""


class ClusterUnreachable(ConnectionInterrupted, RedisConnectionError):  # type: ignore[misc]
    """No startup node answered while the RedisCluster was being built.

    Building it asks a node for the slot map, so unlike a django-redis
    client, getting the client can fail. It is both django-redis's
    ConnectionInterrupted (what IGNORE_EXCEPTIONS acts on, raised by plain
    methods) and a redis ConnectionError (what the engine falls back on).
    """


def cluster_kwargs(servers: Iterable[str], options: dict[str, Any]) -> dict[str, Any]:
    """``RedisCluster``'s arguments for LOCATION ``servers`` and django-redis
    ``options`` (ours already parsed out by ``conf.py``). No I/O.

    Raises ImproperlyConfigured naming what a cluster cannot honour.
    """
    for name, why in REFUSED_OPTIONS.items():
        if options.get(name):
            raise ImproperlyConfigured(
                f"OPTIONS[{name!r}] cannot apply to ApeeClusterClient: {why}."
            )
    node: dict[str, Any] = {}
    cluster: dict[str, Any] = {"startup_nodes": []}
    for url in servers:
        _startup_node(str(url).strip(), cluster, node)
    if not cluster["startup_nodes"]:
        raise ImproperlyConfigured("LOCATION names no cluster node.")
    for option, kwarg in (
        ("USERNAME", "username"),
        ("PASSWORD", "password"),
        ("SOCKET_TIMEOUT", "socket_timeout"),
        ("SOCKET_CONNECT_TIMEOUT", "socket_connect_timeout"),
    ):
        if options.get(option) is not None:
            node[kwarg] = options[option]
    extra = {
        **(options.get("CONNECTION_POOL_KWARGS") or {}),
        **(options.get("REDIS_CLIENT_KWARGS") or {}),
    }
    unknown = []
    for name, value in extra.items():
        if name in CLUSTER_KWARGS:
            cluster[name] = value
        elif name == "db" and value in (0, "0", None):
            continue
        elif name in _NODE_KWARGS and name != "db":
            node[name] = value
        else:
            unknown.append(name)
    if unknown:
        raise ImproperlyConfigured(
            f"ApeeClusterClient cannot pass {sorted(unknown)} to a cluster "
            "(a cluster has only database 0; RedisCluster drops other "
            "connection arguments silently)."
        )
    return {**node, **cluster}


def _startup_node(url: str, cluster: dict[str, Any], node: dict[str, Any]) -> None:
    """Add ``url``'s host and port to the startup nodes; its credentials and
    TLS to every node's connection arguments."""
    if not url:
        return
    parsed = parse_url(url)  # type: ignore[no-untyped-call]
    if "path" in parsed:
        raise ImproperlyConfigured(f"a cluster node cannot be a socket: {url!r}")
    if parsed.get("db", 0) != 0:
        raise ImproperlyConfigured(
            f"a cluster has only database 0; {url!r} asks for {parsed['db']}."
        )
    from redis.cluster import ClusterNode

    cluster["startup_nodes"].append(
        ClusterNode(parsed.get("host", "127.0.0.1"), int(parsed.get("port", 6379)))  # type: ignore[no-untyped-call]
    )
    if parsed.get("connection_class") is SSLConnection:
        node["ssl"] = True
    for name, value in parsed.items():
        if name in _NODE_KWARGS and name not in ("db", "connection_class"):
            node.setdefault(name, value)


#: One RedisCluster per process and configuration (LOCATION and OPTIONS).
CLUSTERS: Registry[Cluster] = Registry()


class ApeeClusterClient(ApeeClientMixin, DefaultClient):  # type: ignore[misc]
    """django-apee's client on a Redis or Valkey Cluster (see the module)."""

    def __init__(self, server: Any, params: dict[str, Any], backend: Any) -> None:
        super().__init__(server, params, backend)
        # The user's OPTIONS say what the cluster depends on: the parsed ones
        # hold objects made per backend (a Retry), whose repr differs each time.
        options = getattr(backend, "options", None)
        if options is not None and options.near_cache is not None:
            raise ImproperlyConfigured(NEAR_CACHE_REFUSED)
        said = options.fingerprint if options is not None else fingerprint(params)
        self._cluster_key = (tuple(self._server), said)

    # -- the connection ---------------------------------------------------------

    def connect(self, index: int = 0) -> Cluster:
        """A new RedisCluster for this configuration.

        Building one asks the startup nodes for the slot map (the only I/O
        of getting a client, unlike django-redis's pools): called on first
        use, never when the backend is built.
        """
        return Cluster(
            source_of=scripts.source_of,
            **cluster_kwargs(self._server, self._options),
        )

    def get_client(  # type: ignore[override]
        self, write: bool = True, tried: list[int] | None = None
    ) -> Cluster:
        """The process's RedisCluster; it routes reads and writes itself."""
        try:
            return CLUSTERS.get(self._cluster_key, self.connect)
        except REDIS_ERRORS as error:
            raise ClusterUnreachable(connection=None) from error  # type: ignore[call-arg]

    def get_client_with_index(
        self, write: bool = True, tried: list[int] | None = None
    ) -> tuple[Cluster, int]:
        return self.get_client(write), 0

    # -- wake-ups ---------------------------------------------------------------

    def wake_hub(self, connect: Any, channel: str) -> WakeHub:
        """The alias's wake-ups: sharded pub/sub where every primary has it
        (Redis/Valkey 7+, ``store/shardwake.py``), else WakeHub's PUBLISH.
        Asked once per process and alias, when its runtime is built; a
        cluster unreachable then gets PUBLISH until the runtime is rebuilt."""
        try:
            sharded = supports_sharded_pubsub(self.get_client())
        except REDIS_ERRORS:
            sharded = False  # unreachable now: PUBLISH works everywhere
        return (ShardWakeHub if sharded else WakeHub)(connect, channel)

    @property
    def wake_channel(self) -> str:
        """What the scripts that end a lease publish on: the runtime's hub's
        channel (marked as sharded when it is)."""
        channel: str = self._backend.runtime.hub.channel
        return channel

    def do_close_clients(self) -> None:
        """Nothing: the RedisCluster is shared by the process's threads.

        django-redis closes a backend's connections at the end of each
        request when ``CLOSE_CONNECTION`` is on; closing the shared cluster
        would cut every other thread's commands.
        """

    # -- keys -------------------------------------------------------------------

    def make_key(
        self, key: Any, version: int | None = None, prefix: str | None = None
    ) -> CacheKey:
        """The key, refused when its lease could not share its hash slot."""
        made: CacheKey = super().make_key(key, version=version, prefix=prefix)
        if not same_slot(made):
            raise CrossSlotKey(
                f"Cache key {str(made)!r} has a '}}' without a '{{' before it: "
                "on Redis Cluster its lease key could not share its hash slot. "
                "Give the key a hash tag ('{tag}...') or leave out the '}'."
            )
        return made

    @staticmethod
    def _read_values(client: Any, made_keys: list[CacheKey]) -> list[Any]:
        """``get_many``'s plain read: one ``MGET`` per hash slot, pipelined
        per node, in the order asked (``RedisCluster.mget_nonatomic``)."""
        return list(client.mget_nonatomic(made_keys))

    @staticmethod
    def _read_rows(client: Any, made_keys: list[CacheKey]) -> list[Any]:
        """``lua/get.lua``'s flat answer, one script call per hash slot (at most
        ``GET_CHUNK`` keys each), all pipelined in one round trip per node."""
        groups = by_slot(made_keys, GET_CHUNK)
        calls: list[tuple[list[str], list[Any]]] = []
        for group in groups:
            chunk = [made_keys[i] for i in group]
            calls.append((chunk + [companion(made, LEASE) for made in chunk], []))
        if len(calls) == 1:
            keys, args = calls[0]
            return list(scripts.run(client, "get", keys=keys, args=args))
        flat: list[Any] = [None] * (3 * len(made_keys))
        for group, part in zip(
            groups, scripts.run_many(client, "get", calls), strict=True
        ):
            for j, i in enumerate(group):
                flat[3 * i : 3 * i + 3] = part[3 * j : 3 * j + 3]
        return flat

    # -- every primary ----------------------------------------------------------

    def keys(
        self, search: str, version: int | None = None, client: Any = None
    ) -> list[Any]:
        """KEYS on every primary (a cluster's KEYS reaches one node only)."""
        if client is None:
            client = self.get_client(write=False)
        pattern = self.make_pattern(search, version=version)
        with interrupted(client):
            found = client.keys(pattern, target_nodes=RedisCluster.PRIMARIES)
        return [self.reverse_key(_text(key)) for key in found]

    def iter_keys(
        self,
        search: str,
        itersize: int | None = None,
        client: Any = None,
        version: int | None = None,
    ) -> Iterator[str]:
        """SCAN on every primary, one node after the other."""
        if client is None:
            client = self.get_client(write=False)
        for key in self._scan_raw(search, version, None, itersize, client):
            yield self.reverse_key(key)

    def delete_pattern(
        self,
        pattern: str,
        version: int | None = None,
        prefix: str | None = None,
        client: Any = None,
        itersize: int | None = None,
    ) -> int:
        """Delete every matching key on every primary, revoking their leases.

        As on one Redis (``client_invalidate.py``), leases are found apart
        too: a key computed for the first time has a lease and no value yet,
        and its compute must not land. Keys go in batches through
        ``delete_many``'s pipelined scripts; a key no client of ours could
        have written (its lease could not share its slot) is deleted with a
        plain DEL. Returns the number of values deleted.
        """
        if client is None:
            client = self.get_client(write=True)
        made = self.make_pattern(pattern, version=version, prefix=prefix)
        found = set(self._scan_all(made, itersize, client))
        for lease_pattern in companion_patterns(made, LEASE):
            for lease in self._scan_all(lease_pattern, itersize, client):
                if (value_key := owner(lease, LEASE)) is not None:
                    found.add(value_key)
        deleted = 0
        batch: list[CacheKey] = []
        for key in sorted(found):
            if not same_slot(key):
                with interrupted(client):
                    deleted += int(client.delete(key))
                continue
            batch.append(CacheKey(key))
            if len(batch) >= 500:
                deleted += self.delete_many(batch, client=client)
                batch = []
        if batch:
            deleted += self.delete_many(batch, client=client)
        return deleted

    def _scan_raw(
        self,
        search: str,
        version: int | None,
        prefix: str | None,
        itersize: int | None,
        client: Any,
    ) -> Iterator[str]:
        """Keys matching ``search`` made into a pattern, on every primary."""
        pattern = self.make_pattern(search, version=version, prefix=prefix)
        return self._scan_all(pattern, itersize, client)

    @staticmethod
    def _scan_all(pattern: str, itersize: int | None, client: Any) -> Iterator[str]:
        """Keys matching the Redis glob ``pattern``, SCANned on every primary
        in turn."""
        with interrupted(client):
            for key in client.scan_iter(
                match=pattern, count=itersize, target_nodes=RedisCluster.PRIMARIES
            ):
                yield _text(key)

    def clear(self, client: Any = None) -> None:
        """FLUSHDB on every primary."""
        if client is None:
            client = self.get_client(write=True)
        with interrupted(client):
            client.flushdb(target_nodes=RedisCluster.PRIMARIES)


def _text(key: str | bytes) -> str:
    return key.decode() if isinstance(key, bytes) else key


def cluster_problems(config: dict[str, Any], options: dict[str, Any]) -> list[Problem]:
    """What ``manage.py check`` says about a cluster alias (no I/O).

    apee.E010: OPTIONS or LOCATION a cluster cannot honour. apee.E011: the
    alias's keys (KEY_PREFIX, KEY_FUNCTION) contain a ``}`` that no ``{``
    opens, so no key could keep its lease in its slot: every operation
    would be refused. apee.W010: its keys carry a hash tag whatever their
    name, so they all share one slot, and one primary serves them all.
    """
    problems = []
    location = config.get("LOCATION") or ""
    servers = location.split(",") if isinstance(location, str) else list(location)
    try:
        cluster_kwargs(servers, options)
    except ImproperlyConfigured as error:
        problems.append(Problem("apee.E010", str(error)))
    if (config.get("OPTIONS") or {}).get("NEAR_CACHE"):
        problems.append(Problem("apee.E010", NEAR_CACHE_REFUSED))
    make = get_key_func(config.get("KEY_FUNCTION"))
    made = make("name", config.get("KEY_PREFIX", ""), config.get("VERSION", 1))
    if not same_slot(made):
        problems.append(
            Problem(
                "apee.E011",
                f"keys of this cache look like {made!r}: a '}}' without a "
                "'{' before it, so on Redis Cluster no key could keep its "
                "lease in its hash slot, and every key would be refused.",
                hint="Take the '}' out of KEY_PREFIX (or KEY_FUNCTION's keys).",
            )
        )
    elif hash_tag(made) is not None:
        problems.append(
            Problem(
                "apee.W010",
                f"keys of this cache look like {made!r}: every one carries the "
                f"hash tag {{{hash_tag(made)}}}, so all share one hash slot and "
                "one primary serves the whole cache.",
                hint="Take the braces out of KEY_PREFIX (or KEY_FUNCTION's keys).",
            )
        )
    return problems
