"""Sharded wake-ups across a slot move (resharding) on a live cluster.

Issue 13: "one pub/sub connection per node in use, re-subscribed after slot
moves and failovers". Failovers are in ``test_cluster_failover.py``; here a
waiter's shard channel lives in a slot that is migrated to another primary
(``ClusterDeployment.migrate_slot``: SETSLOT IMPORTING/MIGRATING, MIGRATE,
SETSLOT NODE) while the waiter waits on a lease. The source node then sends
the waiter's process an ``sunsubscribe``; the waiter must be subscribed on
the new owner and woken by its SPUBLISH when the value lands, well before
the lease (10 s, no holder checks) would end the wait. A cluster of the
module's own (~3 s).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.cache import caches
from django.test import override_settings

from django_apee.cache import ApeeCache
from django_apee.core.envelope import Meta
from django_apee.store import lease
from django_apee.store.shardwake import ShardWakeHub
from django_apee.store.slots import slot_of
from tests.support.deployments import ClusterDeployment, wait_until

pytestmark = pytest.mark.faults

LEASE_S = 10
#: A wake-up by pub/sub comes in milliseconds; the lease would end the wait
#: after ~LEASE_S seconds.
PROMPT_S = 1.5


@pytest.fixture
def aliases(
    cluster: ClusterDeployment, settings: Any
) -> Iterator[dict[str, ApeeCache]]:
    """A waiter alias and a holder alias on the cluster, one KEY_PREFIX.

    Their OPTIONS differ (the holder's SOCKET_TIMEOUT), so each has a
    RedisCluster and a slot map of its own, as two processes would: the
    waiter's client learns of the move only from its own connections.
    """
    prefix = f"rs{uuid.uuid4().hex[:6]}"
    location = [f"redis://127.0.0.1:{node.port}" for node in cluster.live]
    base = {"CLIENT_CLASS": "django_apee.cluster.ApeeClusterClient"}
    config = {
        "w": {"LEASE_TIMEOUT": LEASE_S, "HOLDER_CHECK": 0, "SOCKET_TIMEOUT": 5},
        "h": {"LEASE_TIMEOUT": LEASE_S, "HOLDER_CHECK": 0, "SOCKET_TIMEOUT": 6},
    }
    with override_settings(
        CACHES={
            **settings.CACHES,
            **{
                alias: {
                    "BACKEND": "django_apee.cache.ApeeCache",
                    "LOCATION": location,
                    "KEY_PREFIX": prefix,
                    "OPTIONS": {**base, **options},
                }
                for alias, options in config.items()
            },
        }
    ):
        yield {alias: caches[alias] for alias in config}


def payload(cache: ApeeCache, key: str, value: Any) -> bytes:
    made = str(cache.client.make_key(key))
    encoded = cache.envelope.encode(value, Meta(54_000, 60_000, 0, 10), key=made)
    assert isinstance(encoded, bytes)
    return encoded


def spublishes(cluster: ClusterDeployment, port: int) -> int:
    stats = cluster.node(port).info("commandstats")
    found = stats.get("cmdstat_spublish", {})
    return int(found.get("calls", 0)) if isinstance(found, dict) else 0


def subscribers(cluster: ClusterDeployment, port: int, channel: str) -> int:
    """Clients of ``channel`` on the node on ``port`` (PUBSUB SHARDNUMSUB)."""
    with cluster.node(port).client() as client:
        reply = client.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    return int(reply[1]) if isinstance(reply, list) else int(reply[channel])


class Waiter:
    """``get_or_set_stampede_safe`` in a thread; when it returned, and what."""

    def __init__(self, cache: ApeeCache, key: str) -> None:
        self.value: Any = None
        self.returned_at = 0.0
        self.thread = threading.Thread(target=self._run, args=(cache, key))
        self.thread.start()

    def _run(self, cache: ApeeCache, key: str) -> None:
        self.value = cache.get_or_set_stampede_safe(key, lambda: "computed", 60)
        self.returned_at = time.monotonic()

    def join(self, timeout: float) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive()
        return self.value


def wait_then_release(
    cluster: ClusterDeployment,
    waiter: ApeeCache,
    holder: ApeeCache,
    key: str,
    value: str,
    move_to: int | None = None,
) -> float:
    """A waiter waits on ``key``'s lease (held by ``holder``); the slot moves
    to ``move_to`` meanwhile if given; the holder's value lands. Returns how
    long after the release the waiter had it, asserting the new owner's
    SPUBLISH woke it."""
    hub = waiter.runtime.hub
    assert isinstance(hub, ShardWakeHub)
    made = str(waiter.client.make_key(key))
    channel = hub.channel_of(made)
    held = lease.acquire(
        holder.client.get_client(write=True),
        str(holder.client.make_key(key)),
        LEASE_S * 1000,
        channel=holder.client.wake_channel,
    ).lease
    assert held is not None
    waiting = Waiter(waiter, key)
    wait_until(lambda: hub.waiting() == 1, 5, "the waiter to wait")
    owner = cluster.primary_for(made)
    wait_until(lambda: subscribers(cluster, owner, channel) == 1, 5, "its channel")
    if move_to is not None:
        took = cluster.migrate_slot(slot_of(made), move_to)
        print(f"slot {slot_of(made)} moved {owner} -> {move_to} in {took:.2f}s")
        owner = move_to
        # Re-subscribed on the new owner, with no command of the waiter's
        # process to the slot: it heard the old owner's sunsubscribe.
        wait_until(
            lambda: subscribers(cluster, owner, channel) == 1,
            3,
            "the waiter's channel on the slot's new owner",
        )
    assert waiting.returned_at == 0.0  # still waiting on the lease
    heard = spublishes(cluster, owner)
    released_at = time.monotonic()
    assert lease.release(held, payload(holder, key, value), 60_000) is True
    assert waiting.join(LEASE_S + 5) == value
    assert spublishes(cluster, owner) > heard  # the new owner published
    return waiting.returned_at - released_at


def test_a_waiter_is_woken_by_the_new_owner_after_its_slot_moves(cluster, aliases):
    waiter, holder = aliases["w"], aliases["h"]
    made = str(waiter.client.make_key("moving"))
    owner = cluster.primary_for(made)
    elsewhere = next(port for port in cluster.primary_ports() if port != owner)
    before = wait_then_release(cluster, waiter, holder, "moving", "one")
    holder.delete("moving")
    across = wait_then_release(
        cluster, waiter, holder, "moving", "two", move_to=elsewhere
    )
    assert cluster.primary_for(made) == elsewhere
    holder.delete("moving")
    after = wait_then_release(cluster, waiter, holder, "moving", "three")
    print(f"woken {before:.3f}s, across the move {across:.3f}s, after {after:.3f}s")
    assert before < PROMPT_S
    assert across < PROMPT_S  # the lease had ~LEASE_S left
    assert after < PROMPT_S
