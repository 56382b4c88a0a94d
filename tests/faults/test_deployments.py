"""The test deployments do what the fault tests will rely on.

Each test asserts behaviour of a real deployment started here: a write
through django-redis's SentinelClient lands on the primary the sentinels
name, before and after the primary is killed; a Cluster keeps its data
across a replica's failover; valkey-server runs alone and as a cluster; the
proxy's faults show up in a client as delays, ConnectionErrors and timeouts.
Deployments are module-scoped (a cluster takes ~2.5 s to form) and closed
by PID in fixture teardown. Measured times are printed (``-rP`` shows them).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import key_slot
from redis.retry import Retry

from tests.support.deployments import (
    ClusterDeployment,
    FaultyProxy,
    Node,
    SentinelGroup,
    server_binary,
    wait_until,
)

pytestmark = pytest.mark.faults

#: What the sentinels get to replace a killed primary: ~1 s to see it down,
#: ~1-2 s to agree and promote, up to 2 s more for all to know; one retried
#: election (after 2 x failover-timeout = 10 s) would still fit.
SENTINEL_FAILOVER_BOUND = 15.0


# -- Sentinel ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel_group() -> Iterator[SentinelGroup]:
    group = SentinelGroup()
    try:
        group.start()
        print(f"sentinel group ready in {group.startup_seconds:.2f}s")
        yield group
    finally:
        group.close()


def stored_on(group: SentinelGroup, address: tuple[str, int], key: str) -> bool:
    with group.client_for(address) as client:
        return bool(client.exists(key))


def replicated(group: SentinelGroup, primary: tuple[str, int], replicas: int) -> None:
    """Wait (5 s at most) until ``replicas`` replicas have the primary's writes.

    SentinelClient reads from a replica: a get right after a set can miss.
    """
    with group.client_for(primary, socket_timeout=6.0) as client:
        assert client.execute_command("WAIT", replicas, 5000) >= replicas


def test_sentinel_write_lands_on_the_primary(sentinel_group, make_cache):
    primary = sentinel_group.primary()
    assert primary == ("127.0.0.1", sentinel_group.data[0].port)
    _, cache = make_cache(
        location=sentinel_group.location, **sentinel_group.cache_options()
    )
    assert cache.set("where", "primary") is True
    assert stored_on(sentinel_group, primary, ":1:where")
    replicated(sentinel_group, primary, 2)
    assert cache.get("where") == "primary"  # read from a replica
    for replica in sentinel_group.data[1:]:
        assert replica.info("replication")["role"] == "slave"


def test_sentinel_failover_after_the_primary_is_killed(sentinel_group, make_cache):
    _, cache = make_cache(
        location=sentinel_group.location, **sentinel_group.cache_options()
    )
    old = sentinel_group.primary()
    assert cache.set("before", 1) is True
    replicated(sentinel_group, old, 2)  # so the promoted replica has it

    killed = sentinel_group.kill_primary()
    assert killed == old
    took = sentinel_group.wait_new_primary(old, timeout=SENTINEL_FAILOVER_BOUND)
    new = sentinel_group.primary()
    print(f"sentinel failover after SIGKILL: {took:.2f}s, {old} -> {new}")
    assert new != old
    assert new[1] in {node.port for node in sentinel_group.data[1:]}

    # The same cache object: its pooled connection went to the dead primary.
    began = time.monotonic()
    assert cache.set("after", 2) is True
    print(f"first write after the failover took {time.monotonic() - began:.3f}s")
    assert stored_on(sentinel_group, new, ":1:after")
    replicated(sentinel_group, new, 1)  # the other replica now follows `new`
    assert cache.get("before") == 1  # replicated before the kill
    assert cache.get("after") == 2


# -- Cluster -------------------------------------------------------------------


def keys_on_every_primary(cluster: ClusterDeployment, prefix: str) -> dict[str, int]:
    """One key per primary: ``{key: owning primary port}``."""
    found: dict[str, int] = {}
    owners: set[int] = set()
    ranges = cluster.slot_map()
    for n in range(1000):
        key = f"{prefix}{n}"
        slot = key_slot(key.encode())
        owner = next(p for (a, b), (p, _) in ranges.items() if a <= slot <= b)
        if owner not in owners:
            owners.add(owner)
            found[key] = owner
        if len(owners) == cluster.primaries:
            return found
    raise AssertionError("no key found for some primary")


def test_cluster_keys_on_all_three_primaries(cluster):
    keys = keys_on_every_primary(cluster, "all-")
    assert len(set(keys.values())) == 3
    with cluster.client() as client:
        for key in keys:
            assert client.set(key, f"value of {key}") is True
        for key, owner in keys.items():
            assert client.get(key) == f"value of {key}"
            assert cluster.primary_for(key) == owner
            with cluster.node_client(owner) as node:
                assert node.get(key) == f"value of {key}"


def test_cluster_replica_failover_keeps_the_data(cluster):
    keys = keys_on_every_primary(cluster, "fo-")
    with cluster.client() as client:
        for key in keys:
            client.set(key, key.upper())
        key, old_primary = next(iter(keys.items()))
        (replica,) = cluster.replicas_of(old_primary)

        took = cluster.failover(replica)
        print(f"cluster manual failover: {took:.2f}s, {old_primary} -> {replica}")
        assert cluster.node(replica).info("replication")["role"] == "master"
        assert cluster.primary_for(key) == replica
        assert cluster.replicas_of(replica) == [old_primary]
        with cluster.node_client(replica) as node:
            assert node.get(key) == key.upper()
        # The client still has the old slot table: it follows the MOVED.
        assert {k: client.get(k) for k in keys} == {k: k.upper() for k in keys}
        assert client.set(key, "written after") is True
    with cluster.node_client(replica) as node:
        assert node.get(key) == "written after"


# -- Valkey --------------------------------------------------------------------


@pytest.fixture(scope="module")
def valkey_binary() -> str:
    try:
        return server_binary("valkey")
    except RuntimeError as error:
        pytest.skip(str(error))


def test_valkey_single_server(valkey_binary):
    node = Node(binary=valkey_binary)
    try:
        began = time.monotonic()
        node.start()
        print(f"valkey-server ready in {time.monotonic() - began:.3f}s")
        info = node.info("server")
        assert "valkey_version" in info
        with node.client() as client:
            assert client.set("k", "v") is True
            assert client.get("k") == "v"
    finally:
        node.close()
    assert not node.alive


def test_valkey_cluster(valkey_binary):
    deployment = ClusterDeployment(binary=valkey_binary)
    try:
        deployment.start()
        print(f"valkey cluster ready in {deployment.startup_seconds:.2f}s")
        for node in deployment.nodes:
            assert "valkey_version" in node.info("server")
        keys = keys_on_every_primary(deployment, "vk-")
        with deployment.client() as client:
            for key in keys:
                client.set(key, key)
            assert [client.get(key) for key in keys] == list(keys)
    finally:
        deployment.close()
    assert not any(node.alive for node in deployment.nodes)


# -- FaultyProxy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def backend() -> Iterator[Node]:
    node = Node()
    try:
        yield node.start()
    finally:
        node.close()


@pytest.fixture
def proxy(backend) -> Iterator[FaultyProxy]:
    faulty = FaultyProxy(backend.port)
    try:
        yield faulty.start()
    finally:
        faulty.close()


def through(proxy: FaultyProxy, socket_timeout: float = 5.0) -> redis.Redis:
    """A client via the proxy that does not retry: a fault shows at once."""
    return redis.Redis(
        port=proxy.port,
        socket_connect_timeout=1.0,
        socket_timeout=socket_timeout,
        retry=Retry(NoBackoff(), 0),
    )


def test_proxy_delay(proxy):
    with through(proxy) as client:
        assert client.ping() is True  # connect and handshake first
        proxy.delay(0.2)
        began = time.monotonic()
        assert client.ping() is True
        took = time.monotonic() - began
        # 0.2 s on the way there and 0.2 s on the way back.
        assert 0.4 <= took < 1.5, took
        proxy.restore()
        began = time.monotonic()
        assert client.ping() is True
        assert time.monotonic() - began < 0.2


def test_proxy_cut_fails_a_blocking_command_at_once(proxy):
    with through(proxy) as client:
        assert client.ping() is True
        timer = threading.Timer(0.3, proxy.cut)
        began = time.monotonic()
        timer.start()
        try:
            with pytest.raises(redis.ConnectionError):
                client.blpop(["never-pushed"], timeout=5)
        finally:
            timer.cancel()
            timer.join(1.0)
        took = time.monotonic() - began
        assert 0.3 <= took < 1.0, took
        assert client.ping() is True  # a new connection is accepted


def test_proxy_blackhole_times_out_and_restore_recovers(proxy):
    with through(proxy, socket_timeout=0.3) as client:
        assert client.ping() is True
        proxy.blackhole()
        began = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        took = time.monotonic() - began
        assert 0.3 <= took < 0.8, took
        proxy.restore()
        assert client.ping() is True
        assert client.set("after", "restore") is True
        wait_until(lambda: proxy.connections == 1, 2.0, "one live connection")
