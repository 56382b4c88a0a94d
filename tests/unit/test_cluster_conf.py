"""ApeeClusterClient's configuration, without a server: what reaches RedisCluster,
what is refused, the system checks, and slot grouping."""

from __future__ import annotations

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings
from redis.crc import key_slot

from django_apee import checks
from django_apee.cluster import cluster_kwargs, cluster_problems
from django_apee.conf import ApeeOptions
from django_apee.core.keys import LEASE, companion
from django_apee.store.slots import by_slot

CLIENT = "django_apee.cluster.ApeeClusterClient"


def kwargs_for(location, **options):
    parsed = ApeeOptions.from_params({"CLIENT_CLASS": CLIENT, **options})
    servers = location.split(",") if isinstance(location, str) else location
    return cluster_kwargs(servers, parsed.redis_options)


def test_every_url_is_a_startup_node_with_its_credentials_and_tls():
    found = kwargs_for(["rediss://app:secret@10.0.0.1:7000", "rediss://10.0.0.2:7001"])
    nodes = [(node.host, node.port) for node in found["startup_nodes"]]
    assert nodes == [("10.0.0.1", 7000), ("10.0.0.2", 7001)]
    assert found["ssl"] is True
    assert (found["username"], found["password"]) == ("app", "secret")
    assert "connection_class" not in found


def test_a_comma_separated_location_and_the_default_port():
    found = kwargs_for("redis://a,redis://b:7002")
    assert [(n.host, n.port) for n in found["startup_nodes"]] == [
        ("a", 6379),
        ("b", 7002),
    ]


def test_timeouts_credentials_and_pool_kwargs_reach_every_node():
    found = kwargs_for(
        "redis://a:7000",
        SOCKET_TIMEOUT=0.25,
        USERNAME="u",
        PASSWORD="p",
        CONNECTION_POOL_KWARGS={"max_connections": 7, "ssl_ca_certs": "/ca.pem"},
    )
    assert found["socket_timeout"] == 0.25
    assert found["socket_connect_timeout"] == 1.0  # our default
    assert (found["username"], found["password"]) == ("u", "p")
    assert (found["max_connections"], found["ssl_ca_certs"]) == (7, "/ca.pem")


def test_cluster_arguments_reach_redis_cluster_itself():
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    retry = Retry(NoBackoff(), 1)
    found = kwargs_for(
        "redis://a:7000",
        REDIS_CLIENT_KWARGS={"read_from_replicas": True, "retry": retry},
        require_full_coverage=False,  # Django's lower-case style works too
    )
    assert found["read_from_replicas"] is True
    assert found["retry"] is retry
    assert found["require_full_coverage"] is False


@pytest.mark.parametrize(
    ("location", "options", "says"),
    [
        ("redis://a:7000/2", {}, "only database 0"),
        ("unix:///tmp/redis.sock", {}, "socket"),
        ("redis://a:7000", {"SENTINELS": [("s", 26379)]}, "Sentinel"),
        ("redis://a:7000", {"CONNECTION_POOL_CLASS": "x.Pool"}, "pool"),
        ("redis://a:7000", {"CONNECTION_POOL_KWARGS": {"db": 3}}, "['db']"),
        ("redis://a:7000", {"health_check_interval": 5}, "health_check_interval"),
        ("", {}, "no cluster node"),
    ],
)
def test_what_a_cluster_cannot_honour_is_refused(location, options, says):
    with pytest.raises(ImproperlyConfigured, match=says):
        kwargs_for(location, **options)


def test_by_slot_groups_keys_of_one_slot_in_order_and_cuts_groups():
    keys = ["{a}1", "b", "{a}2", "{a}3", "c", "b"]
    groups = by_slot(keys, most=2)
    assert sorted(i for group in groups for i in group) == list(range(len(keys)))
    for group in groups:
        assert len(group) <= 2
        assert group == sorted(group)
        assert len({key_slot(keys[i].encode()) for i in group}) == 1
    assert groups[0] == [0, 2]  # {a}'s keys first, in order, two at most
    assert [3] in groups


def test_companions_share_their_value_keys_slot():
    for made in [":1:plain", ":1:{user:7}:profile", "p{x}:1:k", ":1:a{b"]:
        assert key_slot(companion(made, LEASE).encode()) == key_slot(made.encode())


def config(**extra):
    return {
        "BACKEND": "django_apee.cache.ApeeCache",
        "LOCATION": "redis://127.0.0.1:7000",
        "OPTIONS": {"CLIENT_CLASS": CLIENT},
        **extra,
    }


def ids(found):
    return [message.id for message in found]


def test_checks_pass_a_plain_cluster_alias():
    assert cluster_problems(config(), {}) == []
    with override_settings(CACHES={"default": config()}):
        assert ids(checks.check_options()) == []


def test_check_refuses_a_key_prefix_no_key_could_live_with():
    with override_settings(CACHES={"default": config(KEY_PREFIX="shop}")}):
        assert ids(checks.check_options()) == ["apee.E011"]


def test_check_warns_when_every_key_shares_one_slot():
    with override_settings(CACHES={"default": config(KEY_PREFIX="{shop}")}):
        assert ids(checks.check_options()) == ["apee.W010"]


def test_redis_retries_become_the_clusters_own_retry_policy():
    found = kwargs_for("redis://a:7000", REDIS_RETRIES=2)
    assert found["retry"].get_retries() == 2


def test_check_refuses_the_near_cache_on_a_cluster():
    near = config()
    near["OPTIONS"] = {**near["OPTIONS"], "NEAR_CACHE": True}
    with override_settings(CACHES={"default": near}):
        assert ids(checks.check_options()) == ["apee.E010"]


def test_check_names_options_a_cluster_cannot_honour():
    bad = config(LOCATION="redis://127.0.0.1:7000/1")
    with override_settings(CACHES={"default": bad}):
        assert ids(checks.check_options()) == ["apee.E010"]


def test_the_wake_channel_of_an_entry_lives_in_its_slot():
    from django_apee.core.keys import slot_channel

    for made in [":1:plain", ":1:{user:7}:profile", "p{x}:1:k", ":1:a{b"]:
        channel = slot_channel(made, "django_apee:wake:p")
        assert channel.endswith("}|django_apee:wake:p")
        assert key_slot(channel.encode()) == key_slot(made.encode())
