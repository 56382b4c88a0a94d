"""ApeeClusterClient on a real 6-node Redis Cluster (3 primaries, 3 replicas).

What a cluster changes, asserted against one started here (~2.5 s, shared by
the module; ``APEE_SERVER_BIN=valkey`` makes it a Valkey cluster): multi-key
operations over keys of every primary, scripts a node lacks (SCRIPT FLUSH, a
replica promoted by ``CLUSTER FAILOVER``), keys and clear on every primary,
keys refused because their lease could not share their slot, stampede
protection across two aliases, one RedisCluster per process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
import time
import uuid
from typing import Any

import pytest
from django.conf import settings
from django.core.cache import caches
from django.test import override_settings

from django_apee.cluster import CrossSlotKey
from django_apee.core.keys import LEASE, companion
from tests.support.deployments import ClusterDeployment, wait_until

pytestmark = pytest.mark.faults

CLIENT = "django_apee.cluster.ApeeClusterClient"


def spread(cluster: ClusterDeployment, prefix: str, count: int) -> dict[str, int]:
    """``count`` keys named ``prefix<n>``, with the port of the primary that
    owns each made key (``:1:<key>``); every primary owns some."""
    names = [f"{prefix}{n}" for n in range(count)]
    keys = {name: cluster.primary_for(f":1:{name}") for name in names}
    assert len(set(keys.values())) == cluster.primaries
    return keys


def noscript_errors(cluster: ClusterDeployment, port: int) -> int:
    """How many NOSCRIPT errors the node has answered since it started."""
    stats = cluster.node(port).info("errorstats")
    found = stats.get("errorstat_NOSCRIPT", {})
    return int(found.get("count", 0)) if isinstance(found, dict) else 0


def flush_scripts(cluster: ClusterDeployment) -> None:
    for node in cluster.live:
        with node.client() as client:
            client.script_flush()


def test_many_operations_over_every_primary(cluster, on_cluster):
    cache = on_cluster()
    tag = uuid.uuid4().hex[:6]
    keys = spread(cluster, f"many-{tag}-", 60)
    # More keys of one slot than one script call takes (GET_CHUNK, 512).
    tagged = {f"{{t{tag}}}{n}": n for n in range(600)}
    data = {key: {"n": i} for i, key in enumerate(keys)} | tagged
    assert cache.set_many(data, timeout=300) == []
    asked = [*reversed(list(data)), f"absent-{tag}"]
    assert cache.get_many(asked) == data
    # set_many keeps the timeout on every key (django-valkey's does not).
    for key in list(keys)[:5]:
        assert 290 <= cache.ttl(key) <= 300
    gone = list(keys)[:30]
    cache.delete_many(gone)
    left = cache.get_many(list(data))
    assert set(left) == set(data) - set(gone)


def test_scripts_flushed_everywhere_every_operation_reloads_them(cluster, on_cluster):
    cache = on_cluster()
    tag = uuid.uuid4().hex[:6]
    keys = list(spread(cluster, f"flush-{tag}-", 20))
    cache.set_many(dict.fromkeys(keys, "v"), timeout=60)
    for operation in (
        lambda: cache.set_many(dict.fromkeys(keys, "w"), timeout=60),
        lambda: cache.get_many(keys),
        lambda: cache.delete_many(keys[:3]),
        lambda: cache.get(keys[5]),
        lambda: cache.set(keys[6], "x", 60),
        lambda: cache.get_or_set_stampede_safe(f"s-{tag}", lambda: "computed", 60),
        lambda: cache.incr_version(keys[7]),
    ):
        flush_scripts(cluster)
        operation()
    assert cache.get_many(keys[3:5]) == dict.fromkeys(keys[3:5], "w")
    assert cache.get(keys[6]) == "x"
    assert cache.get(keys[7], version=2) == "w"
    assert cache.get(f"s-{tag}") == "computed"


def test_a_promoted_replica_lacks_the_scripts_and_pipelines_load_them(
    cluster, on_cluster
):
    cache = on_cluster()
    tag = uuid.uuid4().hex[:6]
    keys = spread(cluster, f"promo-{tag}-", 40)
    cache.set_many(dict.fromkeys(keys, 1), timeout=60)
    old = next(iter(keys.values()))
    (replica,) = cluster.replicas_of(old)
    took = cluster.failover(replica)
    print(f"CLUSTER FAILOVER {old} -> {replica}: {took:.2f}s")
    before = noscript_errors(cluster, replica)
    assert cache.set_many(dict.fromkeys(keys, 2), timeout=60) == []
    assert noscript_errors(cluster, replica) > before  # it met NOSCRIPT...
    assert cache.get_many(list(keys)) == dict.fromkeys(keys, 2)  # ...and recovered
    cache.delete_many(list(keys))
    assert cache.get_many(list(keys)) == {}


def test_keys_iter_keys_delete_pattern_and_clear_reach_every_primary(
    cluster, on_cluster
):
    cache = on_cluster(KEY_PREFIX=f"kp{uuid.uuid4().hex[:6]}")
    names = [f"pat-{n}" for n in range(60)]
    owners = {cluster.primary_for(cache.make_key(name)) for name in names}
    assert len(owners) == cluster.primaries
    cache.set_many(dict.fromkeys(names, "v"), timeout=60)
    cache.set("other", "v", 60)
    assert sorted(cache.keys("pat-*")) == sorted(names)
    assert sorted(cache.iter_keys("pat-*")) == sorted(names)
    # A lease held on a matching key is revoked with it.
    client = cache.client.get_client()
    held = companion(cache.make_key("pat-1"), LEASE)
    client.set(held, "someone", px=60_000)
    assert cache.delete_pattern("pat-*") == len(names)
    assert cache.keys("*") == ["other"]
    assert not client.exists(held)
    cache.clear()
    assert cache.keys("*") == []


def test_a_key_whose_lease_cannot_share_its_slot_is_refused(on_cluster):
    cache = on_cluster()
    with pytest.raises(CrossSlotKey, match="hash tag"):
        cache.set("a}b", 1)
    with pytest.raises(CrossSlotKey):
        cache.get("a}b")
    assert cache.set("{a}}b", 1) is True  # a tag first: its companions share it
    assert cache.get("{a}}b") == 1


def test_stampede_safe_on_the_cluster_one_compute_for_two_aliases(cluster_alias):
    """Two aliases with one KEY_PREFIX share the keys but not a process's
    coordinator: the lease and the wake-up make them compute once."""
    prefix = f"st{uuid.uuid4().hex[:6]}"
    aliases = [cluster_alias(KEY_PREFIX=prefix) for _ in range(2)]
    computes: list[str] = []
    results: list[Any] = []
    start = threading.Barrier(8)

    def compute() -> str:
        computes.append("x")
        time.sleep(0.3)
        return "value"

    def call(alias: str) -> None:
        start.wait()
        results.append(caches[alias].get_or_set_stampede_safe("hot", compute, 60))

    threads = [threading.Thread(target=call, args=(aliases[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == ["value"] * 8
    assert len(computes) == 1


def _child_cluster(location: list[str], parent_id: int, out: Any) -> None:
    cache = caches["forked"]
    client = cache.client.get_client()
    cache.set("from-child", 1, 60)
    out.send((id(client) != parent_id, cache.get("from-child")))


def test_one_cluster_per_process_and_a_new_one_after_fork(cluster, cluster_alias):
    alias = cluster_alias()
    cache = caches[alias]
    client = cache.client.get_client()
    other = caches.create_connection(alias)  # another thread's backend
    assert other.client.get_client() is client
    cache.set("from-parent", 1, 60)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(caches.settings, "forked", caches.settings[alias])
        context = multiprocessing.get_context("fork")
        mine, theirs = context.Pipe()
        child = context.Process(
            target=_child_cluster, args=(cluster.urls, id(client), theirs)
        )
        child.start()
        try:
            assert mine.poll(20), "the forked child did not answer"
            fresh, seen = mine.recv()
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
    assert fresh is True
    assert seen == 1
    assert cache.get("from-parent") == 1


def test_deploy_checks_look_at_a_cluster_without_failing(cluster_alias):
    from django_apee import checks
    from django_apee.store.wake import acl_user

    alias = cluster_alias()
    assert acl_user(caches[alias].client.get_client()) == "default"
    with override_settings(CACHES={alias: settings.CACHES[alias]}):
        found = checks.check_redis() + checks.check_wake_channel()
    assert "apee.W001" not in [message.id for message in found], found
    assert "apee.W006" not in [message.id for message in found], found


def test_a_user_denied_the_shard_channels_is_warned_with_the_rule_that_fixes_it(
    cluster, cluster_alias, caplog
):
    """apee.W006 on a cluster: a user allowed the single-server wake-up
    channels (PUBLISH/SUBSCRIBE on ``django_apee:wake:*``) but not the
    shard channels the cluster's wake-ups use is warned, the warning names
    SSUBSCRIBE and SPUBLISH, and its hint, run on every node, clears it.
    The sharded wake-up thread, refused, logs the same rule."""
    import logging

    from django_apee import checks
    from django_apee.store.wake import acl_rule, wake_channel

    user, prefix = f"w6{uuid.uuid4().hex[:6]}", f"acl{uuid.uuid4().hex[:6]}"

    def on_every_node(*command: str) -> None:
        for node in cluster.live:
            with node.client() as client:
                client.execute_command(*command)

    def w006() -> list[Any]:
        return [m for m in checks.check_wake_channel() if m.id == "apee.W006"]

    on_every_node(
        "ACL", "SETUSER", user, "on", ">pw", "~*", "+@all",
        "resetchannels", "&django_apee:wake:*",
    )  # fmt: skip
    try:
        alias = cluster_alias(
            KEY_PREFIX=prefix, OPTIONS={"USERNAME": user, "PASSWORD": "pw"}
        )
        with override_settings(CACHES={alias: settings.CACHES[alias]}):
            (warning,) = w006()
            assert warning.obj == alias
            assert "may not SSUBSCRIBE or SPUBLISH" in warning.msg
            assert f"'*|django_apee:wake:{prefix}'" in warning.msg
            rule = acl_rule(wake_channel(prefix), user, sharded=True)
            assert rule in warning.hint
            cache = caches[alias]
            made = str(cache.client.make_key("k"))
            with caplog.at_level(logging.WARNING, logger="django_apee"):
                cache.runtime.hub.done(made, cache.runtime.hub.expect(made))
                wait_until(
                    lambda: any(rule in r.getMessage() for r in caplog.records),
                    5,
                    "the wake-up thread's NOPERM warning",
                )
            on_every_node(*rule.split())
            assert w006() == []
    finally:
        on_every_node("ACL", "DELUSER", user)


def test_a_cluster_nobody_answers_fails_open(settings):
    """No startup node reachable: stampede-safe calls compute, plain ones
    raise what redis-py raised, as django-redis does (IGNORE_EXCEPTIONS:
    they return their default)."""
    from redis.exceptions import RedisClusterException

    from tests.support.nodes import free_ports

    (port,) = free_ports(1)  # nobody listens there
    dead = {
        "BACKEND": "django_apee.cache.ApeeCache",
        "LOCATION": f"redis://127.0.0.1:{port}",
        "OPTIONS": {"CLIENT_CLASS": CLIENT},
    }
    quiet = {**dead, "OPTIONS": {**dead["OPTIONS"], "IGNORE_EXCEPTIONS": True}}
    with override_settings(CACHES={**settings.CACHES, "dead": dead, "quiet": quiet}):
        assert caches["dead"].get_or_set_stampede_safe("k", lambda: "v", 60) == "v"
        with pytest.raises(RedisClusterException, match="cannot be connected"):
            caches["dead"].get("k")
        assert caches["quiet"].get("k", "default") == "default"


def test_apee_stats_reports_every_primary_and_sums_the_counter_shards(
    cluster, cluster_alias
):
    import json
    from importlib import resources
    from io import StringIO

    import jsonschema
    from django.core.management import call_command
    from django.core.management.base import CommandError

    from django_apee.store import fleet, scripts

    schema = json.loads(
        resources.files("django_apee.observe").joinpath("stats.schema.json").read_text()
    )
    prefix = f"st{uuid.uuid4().hex[:6]}"
    alias = cluster_alias(KEY_PREFIX=prefix)
    cache = caches[alias]
    names = [f"stat-{n}" for n in range(30)]
    cache.set_many(dict.fromkeys(names, "x" * 2000), timeout=60)
    client = cache.client.get_client()
    client.set(companion(cache.make_key("held"), LEASE), "a-holder", px=60_000)
    # Two processes' flushes, on two shards (two slots): both are summed.
    now = int(client.time()[0])
    for shard, hits in ((3, 5), (11, 7)):
        keys = fleet.stats_keys(prefix, alias, now, shard)
        scripts.run(client, "stats", keys=keys, args=[3600, now, "hits", hits])
    # The shards' slots are spread over every primary; a process adds to one.
    owners = {
        cluster.primary_for(fleet.stats_key(prefix, alias, shard))
        for shard in fleet.shards_of(client)
    }
    assert len(owners) == cluster.primaries
    assert fleet.shard_for(client) == os.getpid() % fleet.SHARDS

    def run(*args: str) -> dict[str, Any]:
        out = StringIO()
        only = override_settings(CACHES={alias: settings.CACHES[alias]})
        with only, contextlib.suppress(CommandError):  # --check: findings exit 1
            call_command("apee_stats", "--json", *args, stdout=out)
        document = json.loads(out.getvalue().splitlines()[0])
        jsonschema.validate(document, schema)
        (result,) = document["results"]
        return result

    overview = run()
    assert [node["address"] for node in overview["nodes"]] == sorted(
        f"127.0.0.1:{port}" for port in cluster.primary_ports()
    )
    assert overview["leases"]["count"] == 1
    assert overview["fleet"]["totals"]["hits"] >= 12
    scanned = run("--scan", "--top", "5")["scan"]
    assert scanned["complete"]
    assert scanned["scanned"] == len(names)
    assert len(scanned["top"]) == 5
    entry = run("--key", "stat-1")["entry"]
    assert entry["state"] == "fresh"
    assert entry["encoding"] == "envelope"
    checks = run("--check")["lint"]["checks"]
    assert {one["name"].split("@")[1] for one in checks} == {
        f"127.0.0.1:{port}" for port in cluster.primary_ports()
    }


def test_wake_ups_go_by_sharded_pub_sub_in_the_entrys_slot(cluster, cluster_alias):
    """A waiter in another alias (another coordinator) is woken when the
    holder's value lands, well before the lease would end; the wake-up was
    an SPUBLISH on the node of the entry's slot, and nobody PUBLISHed."""
    from django_apee.store.shardwake import ShardWakeHub

    prefix = f"wk{uuid.uuid4().hex[:6]}"
    holder, waiter = (
        caches[cluster_alias(KEY_PREFIX=prefix, OPTIONS={"LEASE_TIMEOUT": 10})]
        for _ in range(2)
    )
    assert isinstance(waiter.runtime.hub, ShardWakeHub)
    owner = cluster.primary_for(holder.make_key("slow"))

    def counts(command: str) -> int:
        found = 0
        for node in cluster.live:
            stats = node.info("commandstats").get(f"cmdstat_{command}", {})
            found += int(stats.get("calls", 0)) if isinstance(stats, dict) else 0
        return found

    def spublish_on_owner() -> int:
        stats = cluster.node(owner).info("commandstats")
        return int(stats.get("cmdstat_spublish", {}).get("calls", 0))

    publishes, spublishes = counts("publish"), spublish_on_owner()
    started = threading.Event()

    def slow() -> str:
        started.set()
        time.sleep(0.5)
        return "landed"

    got: list[Any] = []
    computing = threading.Thread(
        target=lambda: got.append(holder.get_or_set_stampede_safe("slow", slow, 60))
    )
    computing.start()
    assert started.wait(5)
    began = time.monotonic()
    value = waiter.get_or_set_stampede_safe("slow", lambda: "second compute", 60)
    waited = time.monotonic() - began
    computing.join(10)
    assert value == "landed"
    assert got == ["landed"]
    assert waited < 3.0, waited  # woken, not timed out to the 10 s lease
    assert spublish_on_owner() > spublishes
    assert counts("publish") == publishes


def test_a_dropped_cluster_runtime_ends_its_shard_subscriber(cluster, on_cluster):
    """``Runtime.close`` (a changed CACHES) ends the sharded wake-up thread
    and its ClusterPubSub, as it does the single-node hub's."""
    cache = on_cluster()
    hub = cache.runtime.hub
    key = cache.make_key(f"wk-{uuid.uuid4().hex[:6]}")
    hub.done(key, hub.expect(key))  # the subscriber runs, one channel subscribed
    assert hub.subscribed.wait(10)
    thread = hub._worker._thread
    assert thread is not None
    assert thread.is_alive()
    assert hub.close(timeout=10) is True
    assert not thread.is_alive()
    hub.done(key, hub.expect(key))  # a late waiter starts nothing again
    assert hub._worker._thread is thread
