"""Leases name their holder's Redis client; a gone holder is taken over at once.

In one process against the session's Redis: a "dead holder" is a lease
taken on a separate connection that is then closed (what a killed process's
kernel does), a "live holder" one whose connection stays open. The
multi-process SIGKILL/SIGSTOP versions are in ``tests/faults/test_takeover.py``.
"""

from __future__ import annotations

import time

import pytest
import redis
from prometheus_client import REGISTRY

from django_apee.checks import check_holder_checks
from django_apee.core import keys
from django_apee.store import holder, lease
from django_apee.store.holder import Identity
from tests.redis.test_wake_channels import acl_server, admin, configured, unique

__all__ = ["acl_server", "admin"]  # fixtures, used by name

# A client id means something on one node only: on a cluster leases name no
# holder and a dead one's lease runs out (store/holder.py, docs/howto/cluster.rst).
pytestmark = pytest.mark.single_node


def takeovers(alias: str) -> float:
    found = REGISTRY.get_sample_value(
        "apee_cache_lease_takeovers_total", {"cache": alias}
    )
    return found or 0.0


def take_lease_on_own_connection(
    redis_url: str, made: str, lease_ms: int
) -> tuple[redis.Redis, lease.Lease]:
    """A holder with its own connection (its identity), as another process."""
    other = redis.Redis.from_url(redis_url, socket_timeout=5)
    identity = Identity(lambda: other)
    attempt = lease.acquire(other, made, lease_ms, channel="c", identity=identity)
    assert attempt.lease is not None
    return other, attempt.lease


def test_the_lease_names_the_identity_connection(make_cache, raw_redis):
    _, cache = make_cache()
    identity = cache.runtime.identity
    own_id = identity.client_id()
    assert own_id is not None
    assert own_id == identity.client().client_id()  # a connection of its own
    made = str(cache.client.make_key("named"))
    attempt = lease.acquire(
        cache.client.get_client(), made, 1000, channel="c", identity=identity
    )
    assert attempt.lease is not None
    stored = raw_redis.get(keys.companion(made, keys.LEASE))
    assert keys.lease_holder_id(stored) == own_id
    assert keys.parse_lease_token(stored.decode()) is not None  # apee_stats reads it
    lease.release(attempt.lease, None, None)


def test_a_gone_holder_is_taken_over_before_its_lease_ends(make_cache, redis_url):
    alias, cache = make_cache(HOLDER_CHECK=0.05)
    made = str(cache.client.make_key("dead"))
    other, held = take_lease_on_own_connection(redis_url, made, 5000)
    other.connection_pool.disconnect()  # its process died: sockets closed
    other.close()

    began = time.monotonic()
    assert cache.get_or_set_stampede_safe("dead", lambda: "mine", 60) == "mine"
    took = time.monotonic() - began
    assert took < 2.0  # far inside the 5 s lease
    assert takeovers(alias) == 1
    assert lease.release(held, b"late", 1000) is False  # the old holder is fenced


def test_a_live_holder_is_waited_for_not_taken_over(make_cache, redis_url):
    alias, cache = make_cache(HOLDER_CHECK=0.05)
    made = str(cache.client.make_key("alive"))
    other, _ = take_lease_on_own_connection(redis_url, made, 600)
    try:
        began = time.monotonic()
        assert cache.get_or_set_stampede_safe("alive", lambda: "mine", 60) == "mine"
        took = time.monotonic() - began
    finally:
        other.close()
    assert took >= 0.5  # waited for the lease to run out
    assert takeovers(alias) == 0


def test_without_client_list_dead_holders_end_by_expiry_and_w007_says_so(
    acl_server, admin
):
    admin.execute_command("ACL", "SETUSER", "app", "allchannels", "-client|list")
    url = f"redis://app:pw@127.0.0.1:{acl_server.port}/0"
    with configured(url, {"noclient": unique("noclient")}, HOLDER_CHECK=0.05) as made:
        cache = made["noclient"]
        (warning,) = [m for m in check_holder_checks() if m.obj == "noclient"]
        assert warning.id == "apee.W007"
        assert "CLIENT LIST" in warning.msg
        assert "CLIENT ID" not in warning.msg
        key = str(cache.client.make_key("k"))
        other, _ = take_lease_on_own_connection(url, key, 600)
        other.close()  # gone, but nobody may see that
        began = time.monotonic()
        assert cache.get_or_set_stampede_safe("k", lambda: 1, 60) == 1
        assert time.monotonic() - began >= 0.5  # the lease's expiry
        assert cache.runtime.coordinator.waiting.holders.denied
    assert [m for m in check_holder_checks() if m.obj == "noclient"] == []


def test_an_identity_closed_while_idle_is_asked_again_before_a_lease_names_it(
    make_cache, raw_redis
):
    _, cache = make_cache()
    identity = cache.runtime.identity
    old_id = identity.client_id()
    assert old_id is not None
    # The server closes an idle connection (its ``timeout`` setting).
    raw_redis.execute_command("CLIENT", "KILL", "ID", old_id)
    assert identity.client_id() == old_id  # recently alive: no round trip
    identity._alive_at -= holder.IDLE_RECHECK_S + 1
    new_id = identity.client_id()
    assert new_id is not None
    assert new_id != old_id
    assert raw_redis.execute_command("CLIENT", "LIST", "ID", new_id)
