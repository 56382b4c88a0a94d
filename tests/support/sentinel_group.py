"""A Redis Sentinel deployment on loopback: 1 primary, 2 replicas, 3 sentinels."""

from __future__ import annotations

import secrets
import time
from typing import Any

import redis

from tests.support.nodes import (
    Node,
    SentinelNode,
    close_all,
    free_ports,
    launch_all,
    server_binary,
    wait_until,
)

Address = tuple[str, int]
HOST = "127.0.0.1"
#: Data nodes sync replicas over the socket at once: no RDB file, no 5 s delay.
DATA_NODE_ARGS = ("--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0")
#: Sentinel's ping period (also its link retry period) during start-up, and after.
FAST_PING_MS, DEFAULT_PING_MS = 100, 1000
#: Flags a sentinel shows for an instance it cannot (yet) talk to or trust.
UNHEALTHY = {"s_down", "o_down", "disconnected", "failover_in_progress"}


class SentinelGroup:
    """1 primary + 2 replicas + 3 sentinels (quorum 2), each on a free port.

    **Config.** Each sentinel's file is written before it starts, with what
    Sentinel would otherwise take seconds to learn: its own ``myid``, the two
    replicas (``known-replica``) and the other two sentinels
    (``known-sentinel`` with their ids). Without that, sentinels find each
    other through hello messages published every 2 s, and the group is not
    ready before ~2-4 s. Everything is 127.0.0.1, so no
    ``resolve-hostnames`` or ``announce-ip`` is needed: the addresses the
    sentinels hand out are the ones the nodes listen on.

    ``down-after-milliseconds`` is 1000: a node silent for 1 s is
    subjectively down. Sentinels PING once a second, so a lower value mostly
    adds false alarms on a loaded 2-core machine. ``failover-timeout`` is
    5000: it bounds one failover attempt, and a split vote among the
    sentinels is retried after twice that, so a kill-to-new-primary wait
    allows 15 s although it takes 2.3-3.1 s here (1 s to notice, up to 1 s
    of random desync before asking for votes, the promotion, and up to 2 s
    for the other sentinels to hear of it). ``parallel-syncs`` is 2: after
    a failover both remaining replicas resync at once.

    **Start order.** The three data nodes start as primaries; once they
    answer, the two replicas get ``REPLICAOF`` (redis-server connects at
    once; started with ``--replicaof`` it waits for its once-a-second cron)
    and sync diskless with no delay; only then do the sentinels start, so
    their first connection to each node succeeds. Their links to each other
    do fail at first (the peer is not listening yet) and a sentinel retries
    a link once per ping period, so that period is 100 ms
    (``SENTINEL DEBUG ping-period``) until the group is ready, then back to
    the default 1 s.

    **Ready** (``start``) when: every replica reports
    ``master_link_status:up`` (so what is written to the primary is
    replicated and either replica can be promoted); and every sentinel names
    the primary, sees it flagged ``master`` only, lists the two replicas
    with ``master-link-status`` ok and no unhealthy flag, and lists the
    other two sentinels connected. A failover asked for before that could
    find no good replica, or no quorum. Bounded by ``timeout`` (10 s by
    default). Measured here: 0.3-0.5 s on redis-server 7.0; ~1.2 s on
    valkey-server 9.1, whose replica connects on its cron even after
    ``REPLICAOF``.

    **Service name.** Unique per group (``apee-<hex>``): django-redis keeps
    its connection pools process-wide, keyed by URL, so two groups both
    called ``mymaster`` would share pools pointing at the first group's
    sentinels.
    """

    def __init__(
        self,
        service: str | None = None,
        binary: str | None = None,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.service = service or f"apee-{secrets.token_hex(4)}"
        self.binary = binary or server_binary()
        ports = free_ports(6)
        primary_port, replica_ports, sentinel_ports = ports[0], ports[1:3], ports[3:]
        self.data: list[Node] = [
            Node(primary_port, DATA_NODE_ARGS, self.binary),
            *(Node(port, DATA_NODE_ARGS, self.binary) for port in replica_ports),
        ]
        ids = [secrets.token_hex(20) for _ in sentinel_ports]
        self.sentinel_nodes: list[SentinelNode] = []
        for port, myid in zip(sentinel_ports, ids, strict=True):
            name = self.service
            lines = [
                f"sentinel myid {myid}",
                f"sentinel monitor {name} {HOST} {primary_port} 2",
                f"sentinel down-after-milliseconds {name} {down_after_ms}",
                f"sentinel failover-timeout {name} {failover_timeout_ms}",
                f"sentinel parallel-syncs {name} 2",
                *(f"sentinel known-replica {name} {HOST} {p}" for p in replica_ports),
                *(
                    f"sentinel known-sentinel {name} {HOST} {other} {other_id}"
                    for other, other_id in zip(sentinel_ports, ids, strict=True)
                    if other != port
                ),
            ]
            self.sentinel_nodes.append(
                SentinelNode("\n".join(lines) + "\n", port, binary=self.binary)
            )
        self.startup_seconds = 0.0

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> SentinelGroup:
        began = time.monotonic()

        def left() -> float:
            return max(0.1, began + timeout - time.monotonic())

        launch_all(self.data, timeout)
        try:
            self._replicate(left())
            launch_all(self.sentinel_nodes, left())
            self._set_ping_period(FAST_PING_MS)
            wait_until(self._ready, left(), "the sentinel group to be ready")
            self._set_ping_period(DEFAULT_PING_MS)
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def close(self) -> None:
        close_all([*self.sentinel_nodes, *self.data])

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _replicate(self, timeout: float) -> None:
        """REPLICAOF at run time, and wait for the links to be up.

        A replica started with ``--replicaof`` first connects on its
        once-a-second replication cron (up to 1 s lost); the command
        connects at once.
        """
        for replica in self.data[1:]:
            with replica.client() as client:
                client.replicaof(HOST, self.data[0].port)
        wait_until(
            lambda: all(
                node.info("replication").get("master_link_status") == "up"
                for node in self.data[1:]
            ),
            timeout,
            "the replicas to sync",
        )

    def _set_ping_period(self, milliseconds: int) -> None:
        """``SENTINEL DEBUG ping-period`` on every sentinel.

        Sentinels started together refuse each other's first connection
        (the peer is not listening yet), and a sentinel retries a link only
        once per ping period: 1 s by default. During start-up it is 100 ms;
        ``start`` puts the default back once the group is ready, so faults
        are detected as in a real deployment.
        """
        for sentinel in self.sentinel_nodes:
            with sentinel.client() as client:
                client.execute_command("SENTINEL", "DEBUG", "ping-period", milliseconds)

    def _ready(self) -> bool:
        primary = (HOST, self.data[0].port)
        for replica in self.data[1:]:
            if replica.info("replication").get("master_link_status") != "up":
                return False
        for sentinel in self.sentinel_nodes:
            with sentinel.client() as client:
                master = client.execute_command("SENTINEL", "MASTER", self.service)
                master = _as_dict(master)
                if (master["ip"], int(master["port"])) != primary:
                    return False
                if master["flags"] != "master":
                    return False
                replicas = client.execute_command("SENTINEL", "REPLICAS", self.service)
                others = client.execute_command("SENTINEL", "SENTINELS", self.service)
            if not _healthy(replicas, 2, lambda r: r.get("master-link-status") == "ok"):
                return False
            if not _healthy(others, 2):
                return False
        return True

    # -- what the sentinels say ------------------------------------------------

    @property
    def sentinels(self) -> list[Address]:
        """``[(host, port), ...]`` of every sentinel, as clients list them."""
        return [(HOST, node.port) for node in self.sentinel_nodes]

    def views(self) -> dict[int, Address | None]:
        """What each live sentinel names as primary (None: it did not answer)."""
        found: dict[int, Address | None] = {}
        for sentinel in self.sentinel_nodes:
            if not sentinel.alive:
                continue
            try:
                with sentinel.client() as client:
                    answer = client.execute_command(
                        "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service
                    )
                found[sentinel.port] = (answer[0], int(answer[1])) if answer else None
            except redis.RedisError:
                found[sentinel.port] = None
        return found

    def primary(self) -> Address:
        """The primary ``(host, port)`` the live sentinels agree on."""
        named = set(self.views().values())
        if len(named) != 1 or None in named:
            raise AssertionError(f"the sentinels disagree: {self.views()}")
        (address,) = named
        assert address is not None
        return address

    def node(self, port: int) -> Node:
        for node in self.data:
            if node.port == port:
                return node
        raise KeyError(f"no data node on port {port}")

    def client_for(self, address: Address, **kwargs: Any) -> redis.Redis:
        """A plain client for one data node (the caller closes it)."""
        return self.node(address[1]).client(**kwargs)

    # -- faults ----------------------------------------------------------------

    def kill_primary(self) -> Address:
        """SIGKILL the current primary's process; return its address."""
        address = self.primary()
        self.node(address[1]).stop()
        return address

    def failover(self, settle_timeout: float = 15.0) -> Address:
        """``SENTINEL FAILOVER`` (no agreement needed); return the old primary.

        A sentinel refuses it (``INPROG``) while its previous failover is
        still reconfiguring replicas, so this first waits for
        ``wait_settled``.
        """
        self.wait_settled(settle_timeout)
        address = self.primary()
        with self.live_sentinel().client() as client:
            client.execute_command("SENTINEL", "FAILOVER", self.service)
        return address

    def live_sentinel(self) -> SentinelNode:
        for sentinel in self.sentinel_nodes:
            if sentinel.alive:
                return sentinel
        raise AssertionError("no sentinel is running")

    def wait_settled(self, timeout: float = 15.0) -> float:
        """Wait until no failover is under way; return the seconds taken.

        Settled: every live sentinel's ``SENTINEL MASTER`` shows the same
        address, flagged ``master`` alone (no ``failover_in_progress``, no
        ``s_down``/``o_down``). The leader of a failover keeps it open
        until the remaining replicas follow the new primary or
        ``failover-timeout`` runs out, a few seconds after clients already
        see the new primary.
        """

        def done() -> bool:
            addresses = set()
            for sentinel in self.sentinel_nodes:
                if not sentinel.alive:
                    continue
                with sentinel.client() as client:
                    master = _as_dict(
                        client.execute_command("SENTINEL", "MASTER", self.service)
                    )
                if master["flags"] != "master":
                    return False
                addresses.add((master["ip"], int(master["port"])))
            return len(addresses) == 1

        return wait_until(done, timeout, "the sentinels to settle", 0.05)

    def wait_new_primary(self, old: Address, timeout: float = 15.0) -> float:
        """Wait until a different primary is in charge; return the seconds taken.

        Done when every live sentinel names the same address, that address
        is not ``old``, and the node there reports ``role:master`` (a
        sentinel names the replica it promotes before the replica has
        finished turning into a primary). Sentinels other than the leader
        learn the new configuration from hello messages (every 2 s), so this
        is up to ~2 s later than the first sentinel knowing. ``timeout``
        defaults to 15 s: 1 s to notice, ~1 s to agree and elect, and room
        for one retried election (see the class docstring).
        """

        def done() -> bool:
            named = set(self.views().values())
            if len(named) != 1:
                return False
            (address,) = named
            if address is None or address == old:
                return False
            return self.node(address[1]).info("replication").get("role") == "master"

        return wait_until(done, timeout, f"a new primary instead of {old}", 0.05)

    # -- configuration helpers -------------------------------------------------

    @property
    def location(self) -> str:
        """django-redis SentinelClient's LOCATION: the service name as host."""
        return f"redis://{self.service}/0"

    @property
    def node_urls(self) -> list[str]:
        """Plain URLs of the data nodes, primary first as started."""
        return [node.url for node in self.data]

    def cache_options(self, **extra: Any) -> dict[str, Any]:
        """OPTIONS for a django-redis (or ApeeCache) alias on this group.

        django-redis 7's SentinelClient splits LOCATION into a primary and a
        replica URL and needs SentinelConnectionFactory to resolve them.
        Reads go to the replica pool: a get right after a set can miss until
        the replicas have the write (``WAIT`` on the primary settles it).
        """
        return {
            "CLIENT_CLASS": "django_redis.client.SentinelClient",
            "CONNECTION_FACTORY": "django_redis.pool.SentinelConnectionFactory",
            "SENTINELS": self.sentinels,
            **extra,
        }

    def cache_settings(
        self, backend: str = "django_apee.cache.ApeeCache", **options: Any
    ) -> dict[str, Any]:
        """One CACHES entry for this group."""
        return {
            "BACKEND": backend,
            "LOCATION": self.location,
            "OPTIONS": self.cache_options(**options),
        }


def _as_dict(entry: Any) -> dict[str, Any]:
    """A sentinel's description of an instance, as a dict.

    redis-py parses ``SENTINEL MASTER``/``SENTINELS`` replies into dicts
    but leaves ``SENTINEL REPLICAS`` a flat ``[field, value, ...]`` list.
    """
    if isinstance(entry, dict):
        return entry
    return dict(zip(entry[::2], entry[1::2], strict=True))


def _healthy(entries: list[Any], count: int, extra: Any = lambda entry: True) -> bool:
    """``count`` instances listed, none flagged unhealthy, ``extra`` true for each."""
    parsed = [_as_dict(entry) for entry in entries]
    if len(parsed) != count:
        return False
    return all(
        not UNHEALTHY & set(entry["flags"].split(",")) and extra(entry)
        for entry in parsed
    )
