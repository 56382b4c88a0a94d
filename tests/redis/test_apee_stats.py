"""manage.py apee_stats and the system checks, against real redis-servers.

Besides the session's server: one with CONFIG renamed away (a managed Redis),
one tuned as the article says, one with ``maxmemory-policy noeviction``, and
a port nobody listens on.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from importlib import resources
from io import StringIO
from typing import Any

import jsonschema
import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test.utils import override_settings

from django_apee import checks
from django_apee.core import keys
from django_apee.core.envelope import Meta
from django_apee.observe import metrics, stats
from django_apee.store import fleet, lease
from tests.support import target
from tests.support.redis_server import RedisServer, free_port

APEE = "django_apee.cache.ApeeCache"
SCHEMA = json.loads(
    resources.files("django_apee.observe").joinpath("stats.schema.json").read_text()
)
# activedefrag stays off: Debian's build cannot enable it, and on a small
# dataset the lint does not ask for it.
TUNED = (
    "--maxmemory", "64mb", "--maxmemory-policy", "allkeys-lfu",
    "--lazyfree-lazy-eviction", "yes", "--lazyfree-lazy-expire", "yes",
    "--tcp-keepalive", "60",
)  # fmt: skip


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, RedisServer]]:
    started: dict[str, RedisServer] = {}
    try:
        for name, args in (
            ("no_config", ("--rename-command", "CONFIG", "")),
            ("tuned", TUNED),
            ("noeviction", ("--maxmemory", "64mb", "--maxmemory-policy", "noeviction")),
        ):
            started[name] = RedisServer(extra_args=args).start()
        yield started
    finally:
        for server in started.values():
            server.close()


def caches_for(**locations: str) -> dict[str, Any]:
    return {
        **settings.CACHES,
        **{
            alias: {"BACKEND": APEE, "LOCATION": url}
            for alias, url in locations.items()
        },
    }


def run(*args: str, **locations: str) -> tuple[int, str]:
    """Run apee_stats; return its exit status and output (stdout + error)."""
    out = StringIO()
    with override_settings(CACHES=caches_for(**locations)):
        try:
            call_command("apee_stats", *args, stdout=out)
        except CommandError as error:
            return error.returncode, out.getvalue() + str(error)
    return 0, out.getvalue()


def run_json(*args: str, **locations: str) -> tuple[int, list[dict[str, Any]]]:
    code, text = run("--json", *args, **locations)
    documents = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    for document in documents:
        jsonschema.validate(document, SCHEMA)
    return code, documents


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


# -- the default mode ------------------------------------------------------------------


def test_overview_reports_health_fleet_and_leases(raw_redis):
    # Earlier tests counted on "default" too: send their counts away first.
    fleet.flush()
    raw_redis.flushdb()
    cache = caches["default"]
    cache.set("a", 1, 60)
    for key in ("a", "a", "b"):
        cache.get(key)
    cache.get_or_set_stampede_safe("c", lambda: 3, 60)
    held = lease.acquire(
        cache.client.get_client(write=True),
        str(cache.client.make_key("d")),
        30_000,
        channel=cache.client.wake_channel,
    )
    assert held.lease is not None
    fleet.flush()
    code, (document,) = run_json("--cache", "default")
    assert code == 0
    (result,) = document["results"]
    assert result["server"]["version"].count(".") == 2
    assert result["server"]["maxmemory_policy"] == "noeviction"
    window = result["fleet"]["window"]
    assert (window["hits"], window["misses"]) == (2, 1)
    assert window["stampede_misses"] == 1
    assert window["computes:ok"] == 1
    assert result["fleet"]["ratios"]["hit_ratio"] == pytest.approx(2 / 3)
    # The fleet's first flush was just now: rates divide by its age, not 5 min.
    assert 1.0 <= result["fleet"]["window_seconds"] < 60
    assert result["leases"]["count"] == 1
    oldest = result["leases"]["oldest"]
    assert oldest["key"] == str(cache.client.make_key("d"))
    assert oldest["holder"].endswith(f":{os.getpid()}")
    assert 0 < oldest["ttl_ms"] <= 30_000

    code, text = run("--cache", "default")
    assert code == 0
    # The labels' column is as wide as the widest (a cluster's primaries).
    assert re.search(r"\n  eviction policy +noeviction\n", text)
    assert re.search(r"\n  leases held now +1\n", text)
    assert re.search(r"\n  hit ratio +66\.7 %\n", text)
    if target.on_cluster():  # a line per primary; one of them has the lease
        assert text.count(", noeviction, 0 evicted, ") == 3
        assert text.count(", 1 leases") == 1


def test_lease_wait_p95_comes_from_the_fleet_buckets(raw_redis):
    family = metrics.LEASE_WAIT_SECONDS.labels(cache="default")
    for _ in range(19):
        family.observe(0.002)
    family.observe(0.7)
    fleet.flush()
    _, (document,) = run_json("--cache", "default")
    ratios = document["results"][0]["fleet"]["ratios"]
    assert ratios["lease_wait_p95_seconds"] == 0.0025  # 19 of 20 are <= 2.5 ms
    family.observe(0.7)
    fleet.flush()
    _, (document,) = run_json("--cache", "default")
    ratios = document["results"][0]["fleet"]["ratios"]
    assert ratios["lease_wait_p95_seconds"] == 1.0  # now 2 of 21 are slow


def test_watch_repeats_a_bounded_number_of_times(raw_redis):
    code, documents = run_json("--cache", "default", "--watch", "0.05", "--count", "3")
    assert code == 0
    assert len(documents) == 3
    assert "interval" not in documents[0]["results"][0]["fleet"]
    assert documents[2]["results"][0]["fleet"]["interval"]["seconds"] > 0


def test_dead_port_is_a_clear_error_and_a_non_zero_exit():
    code, text = run("--cache", "gone", gone=dead_url())
    assert code == 1
    assert "cache 'gone': ERROR" in text
    assert "Redis unreachable" in text
    assert "Traceback" not in text
    code, (document,) = run_json("--cache", "gone", gone=dead_url())
    assert code == 1
    assert "Redis unreachable" in document["results"][0]["error"]


def test_unknown_alias_is_an_error():
    code, text = run("--cache", "nope")
    assert code == 1
    assert "no cache alias 'nope'" in text


# -- --check ---------------------------------------------------------------------------


def test_check_passes_on_a_tuned_redis(servers):
    code, (document,) = run_json("--check", "--cache", "t", t=servers["tuned"].url)
    lint = document["results"][0]["lint"]
    assert [c["status"] for c in lint["checks"]] == ["ok"] * 7
    assert code == 0
    assert all(c["source"] == "config" for c in lint["checks"])


def test_check_fails_on_noeviction_and_says_why(servers):
    url = servers["noeviction"].url
    code, text = run("--check", "--cache", "n", n=url)
    assert code == 2
    policy_line = next(line for line in text.splitlines() if "maxmemory-policy" in line)
    assert "noeviction" in policy_line
    assert "FINDING" in policy_line
    assert "allkeys-lfu" in policy_line
    _, (document,) = run_json("--check", "--cache", "n", n=url)
    found = {c["name"]: c["status"] for c in document["results"][0]["lint"]["checks"]}
    assert found["maxmemory-policy"] == "finding"
    assert found["maxmemory"] == "ok"


def test_check_without_config_falls_back_to_info_then_unknown(servers):
    code, (document,) = run_json("--check", "--cache", "m", m=servers["no_config"].url)
    by_name = {c["name"]: c for c in document["results"][0]["lint"]["checks"]}
    assert by_name["maxmemory-policy"]["source"] == "info"
    assert by_name["maxmemory-policy"]["value"] == "noeviction"
    assert by_name["hz"]["source"] == "info"
    for name in ("tcp-keepalive", "activedefrag", "lazyfree-lazy-eviction/expire"):
        assert by_name[name]["status"] == "unknown", name
        assert by_name[name]["value"] is None
    assert code == 2  # maxmemory 0 and noeviction are still findings
    code, text = run("--check", "--cache", "m", m=servers["no_config"].url)
    assert "Traceback" not in text
    assert "3 unknown" in text


def test_overview_works_on_a_redis_without_config(servers):
    code, (document,) = run_json("--cache", "m", m=servers["no_config"].url)
    assert code == 0
    assert document["results"][0]["server"]["maxclients"] == 10000


# -- --key -----------------------------------------------------------------------------


def entry(key: str) -> dict[str, Any]:
    code, (document,) = run_json("--cache", "default", "--key", key)
    assert code == 0
    result: dict[str, Any] = document["results"][0]["entry"]
    return result


def test_key_states_fresh_stale_leased_corrupt(raw_redis):
    cache = caches["default"]
    cache.get_or_set_stampede_safe("fresh", lambda: "x" * 5000, 60)
    made = str(cache.client.make_key("stale"))
    meta = Meta(soft_ms=1_000, hard_ms=60_000, grace_ms=0, delta_ms=40, seed=1)
    raw_redis.set(made, cache.envelope.encode("old", meta, key=made), px=50_000)
    client = cache.client.get_client(write=True)
    held = lease.acquire(
        client,
        str(cache.client.make_key("leased")),
        20_000,
        channel=cache.client.wake_channel,
    )
    assert held.lease is not None
    raw_redis.set(str(cache.client.make_key("corrupt")), b"\xc1\xa9\x02\xe0junk")

    fresh = entry("fresh")
    assert fresh["state"] == "fresh"
    assert (fresh["encoding"], fresh["codec"], fresh["compression"]) == (
        "envelope", "pickle", "zstd",
    )  # fmt: skip
    assert fresh["stored_bytes"] < fresh["raw_bytes"]
    assert 55_000 < fresh["hard_ttl_ms"] <= 60_000
    assert 0 < fresh["soft_ttl_ms"] < fresh["hard_ttl_ms"]
    assert fresh["lease"] is None

    stale = entry("stale")
    assert stale["state"] == "stale"
    assert stale["delta_ms"] == 40
    assert stale["soft_ttl_ms"] < 0 < stale["hard_ttl_ms"] <= 50_000

    leased = entry("leased")
    assert leased["state"] == "absent"
    assert leased["lease"]["holder"].endswith(f":{os.getpid()}")
    assert 0 < leased["lease"]["ttl_ms"] <= 20_000

    corrupt = entry("corrupt")
    assert (corrupt["state"], corrupt["error"]) == ("unreadable", "corrupt")

    _, text = run("--cache", "default", "--key", "leased")
    assert re.search(r"^  lease +held by .+:\d+, [\d.]+ s left$", text, re.M)
    assert keys.parse_lease_token(held.lease.token) is not None


def test_key_version_and_raw_int(raw_redis):
    cache = caches["default"]
    cache.set("n", 41, 60, version=3)
    found = entry("n")
    assert found["state"] == "absent"
    _, (document,) = run_json("--cache", "default", "--key", "n", "--version", "3")
    found = document["results"][0]["entry"]
    assert (found["encoding"], found["state"]) == ("raw-int", "fresh")


# -- --scan ----------------------------------------------------------------------------


def test_scan_lists_the_largest_keys_first(raw_redis):
    cache = caches["default"]
    cache.set("small", "x", 60)
    cache.set("big", "y" * 20_000, 60)  # zstd makes it small; pickle its size
    raw_redis.set(str(cache.client.make_key("huge")), b"z" * 50_000)
    code, (document,) = run_json("--cache", "default", "--scan", "--top", "2")
    assert code == 0
    scan = document["results"][0]["scan"]
    assert scan["scanned"] == 3
    assert scan["top"][0]["key"] == ":1:huge"
    assert len(scan["top"]) == 2
    code, (document,) = run_json("--cache", "default", "--scan", "*small*")
    assert [one["key"] for one in document["results"][0]["scan"]["top"]] == [":1:small"]


# -- system checks ---------------------------------------------------------------------


def test_static_checks_name_the_bad_option():
    config = caches_for()
    config["bad"] = {"BACKEND": APEE, "LOCATION": dead_url(),
                     "OPTIONS": {"CODEC": "yaml"}}  # fmt: skip
    config["herd"] = {
        "BACKEND": APEE,
        "LOCATION": dead_url(),
        "OPTIONS": {"CLIENT_CLASS": "django_redis.client.HerdClient"},
    }
    flags = {"METRICS": "yes", "STATS_FLUSH_INTERVAL": 0}
    config["flags"] = {"BACKEND": APEE, "LOCATION": dead_url(), "OPTIONS": flags}
    with override_settings(CACHES=config):
        found = {(m.obj, m.id) for m in checks.check_options()}
    assert found == {
        ("bad", "apee.E001"),
        ("herd", "apee.E002"),
        ("flags", "apee.E003"),
    }
    with override_settings(CACHES=config):
        messages = [m.msg for m in checks.check_options() if m.obj == "flags"]
    assert len(messages) == 2


def test_manage_py_check_reports_bad_options_and_use_raises_them():
    from django.core.management import call_command
    from django.core.management.base import SystemCheckError

    config = caches_for()
    config["bad"] = {"BACKEND": APEE, "LOCATION": dead_url(),
                     "OPTIONS": {"CODEC": "yaml"}}  # fmt: skip
    with override_settings(CACHES=config):
        with pytest.raises(SystemCheckError, match=r"apee\.E001.*CODEC"):
            call_command("check")
        with pytest.raises(ImproperlyConfigured, match="CODEC"):
            caches["bad"].get("k")
        with pytest.raises(ImproperlyConfigured, match="CODEC"):
            caches["bad"].get_or_set_stampede_safe("k", lambda: 1, 10)


def test_deploy_checks_warn_and_never_raise(servers):
    config = caches_for(gone=dead_url(), n=servers["noeviction"].url,
                        t=servers["tuned"].url)  # fmt: skip
    with override_settings(CACHES=config):
        found = checks.check_redis()
    by_alias: dict[str, list[str]] = {}
    for message in found:
        by_alias.setdefault(message.obj, []).append(message.id)
    assert by_alias["gone"] == ["apee.W001"]
    assert "t" not in by_alias
    assert "apee.W002" in by_alias["n"]
    policy = [m for m in found if m.obj == "n" and "maxmemory-policy" in m.msg]
    assert len(policy) == 1


def test_deploy_checks_connect_as_the_backend_does():
    """A password or ACL user in OPTIONS is used: no false apee.W001.

    The live checks once opened a connection of their own from LOCATION and
    reported a password-protected Redis as unreachable. The aliases without
    the credentials show the check can still fail on that server.
    """
    server = RedisServer(
        extra_args=(*TUNED, "--requirepass", "s3cret"), password="s3cret"
    ).start()
    try:
        admin = redis.Redis(port=server.port, password="s3cret")
        admin.execute_command(
            "ACL", "SETUSER", "ops", "on", ">ops-pw", "~*", "&*", "+@all"
        )
        admin.close()
        # One database each: django-redis shares a connection pool per URL.
        options = {
            "nopw": {},
            "wrongpw": {"PASSWORD": "nope"},
            "pw": {"PASSWORD": "s3cret"},
            "user": {"USERNAME": "ops", "PASSWORD": "ops-pw"},
            "poolkw": {"CONNECTION_POOL_KWARGS": {"password": "s3cret"}},
        }
        config = {**settings.CACHES}
        for db, (alias, opts) in enumerate(options.items()):
            location = f"redis://127.0.0.1:{server.port}/{db}"
            config[alias] = {"BACKEND": APEE, "LOCATION": location, "OPTIONS": opts}
        with override_settings(CACHES=config):
            found = checks.check_redis() + checks.check_wake_channel()
        by_alias: dict[str, list[str]] = {}
        for message in found:
            by_alias.setdefault(message.obj, []).append(message.id)
        for alias in ("pw", "user", "poolkw"):
            assert alias not in by_alias, (alias, [m.msg for m in found])
        assert by_alias["nopw"] == ["apee.W001"]
        assert by_alias["wrongpw"] == ["apee.W001"]
    finally:
        server.close()


def test_checks_are_registered_with_the_deploy_tag_for_live_ones():
    from django.core.checks.registry import registry

    assert checks.check_options in registry.get_checks(include_deployment_checks=False)
    assert checks.check_redis not in registry.get_checks(
        include_deployment_checks=False
    )
    assert checks.check_redis in registry.get_checks(include_deployment_checks=True)
    assert SCHEMA["properties"]["schema_version"]["const"] == stats.SCHEMA_VERSION
