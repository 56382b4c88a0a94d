"""A Redis Cluster on loopback: 3 primaries and 3 replicas, made by redis-cli."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from tests.support.nodes import (
    Node,
    close_all,
    free_ports,
    launch_all,
    server_binary,
    wait_until,
)

HOST = "127.0.0.1"
SLOTS = 16384
#: slot range -> (primary port, [replica ports]), as CLUSTER SLOTS says.
SlotMap = dict[tuple[int, int], tuple[int, list[int]]]


class ClusterDeployment:
    """3 primaries + 3 replicas, ``--cluster-node-timeout 1000``.

    Every node gets two free ports, its client port and its cluster bus
    port (``--cluster-port``): the default bus port is the client port +
    10000, which for an ephemeral port can be taken or above 65535. The
    data nodes replicate diskless with no delay and persist nothing.

    The cluster is made by ``redis-cli --cluster create ... --cluster-replicas
    1 --cluster-yes`` (bounded at 30 s), which assigns the slots, introduces
    the nodes and polls, once a second, until they agree (~1.1 s). The
    primaries then take ~1 s more to call the cluster ok. ``CLUSTER SLOTS``
    lists a replica only once its replication offset is above 0, which on an
    idle primary happens at its first ping to the replicas: every 10 s by
    default, so the nodes run with ``--repl-ping-replica-period 1``. Start-up
    measured here: ~2.5 s, on redis-server 7.0 and valkey-server 9.1 alike.

    **Ready** (``start``, bounded by ``timeout``, 20 s by default) when every
    node answers ``cluster_state:ok`` with ``cluster_slots_ok:16384`` and
    knows all 6 nodes; every node's ``CLUSTER SLOTS`` gives the same slot map,
    in which each range has a live primary and a replica; and each replica
    reports ``master_link_status:up``. The last rule is beyond "the replicas
    are listed": a replica is listed before it has synced, and a manual
    failover of a replica that has not would wait for it and fail.

    ``--cluster-node-timeout 1000``: a node silent for 1 s is suspected
    (PFAIL), then failed once a majority of primaries agree; a replica of a
    failed primary waits 0.5-1 s (plus 1 s per rank) before asking for
    votes. A killed primary is replaced in 2.7-4.2 s here (``wait_stable``
    after ``kill``); a manual ``failover`` of a live primary's replica
    takes 0.15-0.5 s. A lower node timeout turns a loaded 2-core machine's
    scheduling hiccups into failovers. ``failover`` and ``wait_stable``
    default to 15 s: several times the slowest failover seen.
    """

    def __init__(
        self,
        binary: str | None = None,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
    ) -> None:
        self.binary = binary or server_binary()
        self.primaries = primaries
        self.replicas = replicas
        count = primaries * (1 + replicas)
        ports = free_ports(2 * count)
        self.nodes: list[Node] = []
        for port, bus in zip(ports[:count], ports[count:], strict=True):
            node = Node(port, (), self.binary)
            node.extra_args = (
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                os.path.join(node.dir, f"nodes-{port}.conf"),
                "--cluster-node-timeout",
                str(node_timeout_ms),
                "--cluster-port",
                str(bus),
                "--repl-diskless-sync",
                "yes",
                "--repl-diskless-sync-delay",
                "0",
                # CLUSTER SLOTS lists a replica only once its replication
                # offset is above 0; on an idle primary that is its first
                # ping to the replicas, every 10 s by default.
                "--repl-ping-replica-period",
                "1",
            )
            self.nodes.append(node)
        self.startup_seconds = 0.0
        self.create_output = ""

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> ClusterDeployment:
        began = time.monotonic()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli is needed to create the cluster")
        launch_all(self.nodes, timeout)
        try:
            created = subprocess.run(
                [
                    cli,
                    "--cluster",
                    "create",
                    *(f"{HOST}:{node.port}" for node in self.nodes),
                    "--cluster-replicas",
                    str(self.replicas),
                    "--cluster-yes",
                ],
                capture_output=True,
                text=True,
                timeout=min(30.0, timeout),
                stdin=subprocess.DEVNULL,
            )
            self.create_output = created.stdout + created.stderr
            if created.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create: {self.create_output}")
            self.wait_stable(
                max(0.1, began + timeout - time.monotonic()), replicas=True
            )
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def close(self) -> None:
        close_all(self.nodes)

    def __enter__(self) -> ClusterDeployment:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- topology --------------------------------------------------------------

    def node(self, port: int) -> Node:
        for node in self.nodes:
            if node.port == port:
                return node
        raise KeyError(f"no cluster node on port {port}")

    @property
    def live(self) -> list[Node]:
        return [node for node in self.nodes if node.alive]

    def slot_map(self, port: int | None = None) -> SlotMap:
        """CLUSTER SLOTS from one node (the first live one by default)."""
        node = self.node(port) if port is not None else self.live[0]
        with node.client() as client:
            ranges = client.execute_command("CLUSTER", "SLOTS")
        return {
            (int(entry[0]), int(entry[1])): (
                int(entry[2][1]),
                sorted(int(replica[1]) for replica in entry[3:]),
            )
            for entry in ranges
        }

    def primary_ports(self) -> list[int]:
        return sorted({primary for primary, _ in self.slot_map().values()})

    def primary_for(self, key: str | bytes) -> int:
        """The port of the primary that owns ``key``'s slot now."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for (first, last), (primary, _) in self.slot_map().items():
            if first <= slot <= last:
                return primary
        raise AssertionError(f"slot {slot} is not covered")

    def replicas_of(self, primary: int) -> list[int]:
        return sorted(
            {
                port
                for owner, found in self.slot_map().values()
                if owner == primary
                for port in found
            }
        )

    # -- faults ----------------------------------------------------------------

    def kill(self, port: int) -> None:
        """SIGKILL one node."""
        self.node(port).stop()

    def failover(
        self, replica_port: int, force: bool = False, timeout: float = 15.0
    ) -> float:
        """``CLUSTER FAILOVER [FORCE]`` on a replica; seconds until it is stable.

        Without FORCE the replica and its primary swap in agreement: the
        primary stops its clients until the replica has caught up, so no
        write is lost (the primary must be alive). FORCE is for a primary
        that is down. Returns once the replica reports ``role:master`` and
        the cluster is stable again (see ``wait_stable``).
        """
        began = time.monotonic()
        with self.node(replica_port).client() as client:
            client.execute_command("CLUSTER", "FAILOVER", *(["FORCE"] if force else []))
        wait_until(
            lambda: self.node(replica_port).info("replication")["role"] == "master",
            timeout,
            f"node {replica_port} to become a primary",
        )
        self.wait_stable(max(0.1, began + timeout - time.monotonic()))
        return time.monotonic() - began

    def wait_stable(self, timeout: float = 15.0, replicas: bool = False) -> float:
        """Wait until every live node agrees the cluster is whole; seconds taken.

        Stable: each live node says ``cluster_state:ok`` and
        ``cluster_slots_ok:16384``, they all report the same slot map, every
        primary in it is alive and reports ``role:master``. With
        ``replicas``: also every node known to all, each range with a replica,
        each replica's link up (the start-up rule).
        """

        def stable() -> bool:
            live = self.live
            maps = []
            for node in live:
                info = cluster_info(node)
                if info["cluster_state"] != "ok":
                    return False
                if int(info["cluster_slots_ok"]) != SLOTS:
                    return False
                if replicas and int(info["cluster_known_nodes"]) != len(self.nodes):
                    return False
                maps.append(self.slot_map(node.port))
            if any(found != maps[0] for found in maps):
                return False
            owners = {primary for primary, _ in maps[0].values()}
            if len(owners) != self.primaries:
                return False
            for primary in owners:
                if self.node(primary).info("replication")["role"] != "master":
                    return False
            if not replicas:
                return True
            for _, found in maps[0].values():
                if len(found) < self.replicas:
                    return False
                for port in found:
                    link = self.node(port).info("replication")
                    if link.get("master_link_status") != "up":
                        return False
            return True

        return wait_until(stable, timeout, "a stable cluster", 0.05)

    def node_id(self, port: int) -> str:
        with self.node(port).client() as client:
            return str(client.execute_command("CLUSTER", "MYID"))

    def migrate_slot(self, slot: int, to_port: int, timeout: float = 15.0) -> float:
        """Move ``slot`` and its keys to the primary on ``to_port``, as
        ``redis-cli --cluster reshard`` does; seconds until stable.

        ``SETSLOT IMPORTING`` on the target, ``MIGRATING`` on the source,
        ``MIGRATE`` of every key in the slot (TTLs kept), then ``SETSLOT
        NODE`` on the target, the source and every other primary. When the
        source gives the slot up it sends an ``sunsubscribe`` to each client
        of a shard channel in it (Redis/Valkey 7+).
        """
        began = time.monotonic()
        from_port = next(
            primary
            for (first, last), (primary, _) in self.slot_map().items()
            if first <= slot <= last
        )
        if from_port == to_port:
            raise ValueError(f"slot {slot} is on {to_port} already")
        source, target = self.node_id(from_port), self.node_id(to_port)
        with (
            self.node(from_port).client() as giving,
            self.node(to_port).client() as taking,
        ):
            taking.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source)
            giving.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target)
            while keys := giving.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
                giving.execute_command(
                    "MIGRATE", HOST, to_port, "", 0, 5000, "KEYS", *keys
                )
            taking.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)
            giving.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)
        for port in self.primary_ports():
            if port not in (from_port, to_port):
                with self.node(port).client() as other:
                    other.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target)
        self.wait_stable(max(0.1, began + timeout - time.monotonic()))
        return time.monotonic() - began

    # -- clients ---------------------------------------------------------------

    @property
    def startup_nodes(self) -> list[ClusterNode]:
        return [ClusterNode(HOST, node.port) for node in self.live]  # type: ignore[no-untyped-call]

    @property
    def urls(self) -> list[str]:
        return [f"redis://{HOST}:{node.port}" for node in self.nodes]

    def client(self, **kwargs: Any) -> RedisCluster:
        """A redis-py RedisCluster on the live nodes (the caller closes it)."""
        options: dict[str, Any] = {
            "socket_connect_timeout": 1.0,
            "socket_timeout": 2.0,
            "decode_responses": True,
            **kwargs,
        }
        return RedisCluster(startup_nodes=self.startup_nodes, **options)

    def node_client(self, port: int, **kwargs: Any) -> redis.Redis:
        return self.node(port).client(**kwargs)


def cluster_info(node: Node) -> dict[str, str]:
    """``CLUSTER INFO`` of one node as a dict (redis-py leaves it a string)."""
    with node.client() as client:
        text = client.execute_command("CLUSTER", "INFO")
    if isinstance(text, dict):
        return {str(key): str(value) for key, value in text.items()}
    return dict(line.split(":", 1) for line in str(text).splitlines() if ":" in line)


#: The session's cluster, shared with child processes through this variable
#: (its startup node URLs, comma-separated).
SESSION_CLUSTER_ENV = "APEE_TEST_CLUSTER_URLS"
_session: ClusterDeployment | None = None


def session_cluster_urls() -> list[str]:
    """Start the session's cluster once per process tree; its node URLs.

    For settings modules (read before any fixture runs), as ``session_url``
    is for the single server. Stopped by PID at exit.
    """
    global _session
    found = os.environ.get(SESSION_CLUSTER_ENV)
    if found:
        return found.split(",")
    import atexit

    _session = ClusterDeployment().start()
    atexit.register(_session.close)
    os.environ[SESSION_CLUSTER_ENV] = ",".join(_session.urls)
    return _session.urls
