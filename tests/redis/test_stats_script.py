"""``lua/stats.lua`` writes only the keys it is given.

The fleet flush reads Redis's TIME first and names the minute's bucket from
it, so the script declares every key it writes (KEYS), as Redis asks of
scripts, and the stored layout stays what ``apee_stats`` reads. Watched with
MONITOR on a private server (its only clients are this test's).
"""

from __future__ import annotations

from pathlib import Path

import redis
from django.conf import settings
from django.core.cache import caches
from django.test import override_settings

from django_apee.store import fleet
from tests.support.monitor import monitored, script_runs, words

LUA = Path(__file__).resolve().parents[2] / "django_apee" / "store" / "lua"


def test_the_stats_script_builds_no_key_name():
    code = [
        line.split("--")[0]
        for line in (LUA / "stats.lua").read_text().splitlines()
        if not line.lstrip().startswith("--")
    ]
    assert not any(".." in line for line in code)  # no concatenated key
    assert not any("TIME" in line for line in code)  # the caller reads it


def test_the_fleet_flush_passes_both_keys_it_writes(own_server):
    alias = "stats-script"
    config = {
        **settings.CACHES,
        alias: {"BACKEND": "django_apee.cache.ApeeCache", "LOCATION": own_server.url},
    }
    raw = redis.Redis(port=own_server.port, socket_timeout=10)
    with override_settings(CACHES=config):
        cache = caches[alias]
        cache.get("a")
        cache.set("a", 1, 60)
        cache.get("a")
        assert cache.runtime.alias == alias  # its fleet sink is this server
        totals = fleet.stats_key(cache.key_prefix, alias)

        with monitored(own_server) as seen:
            assert fleet.flush() >= 1

    # (On this fresh server the first EVALSHAs meet NOSCRIPT and run nothing.)
    runs = [run for run in script_runs(seen, "stats") if run[0][3] == totals]
    ((call, ran),) = [(call, ran) for call, ran in runs if ran]
    assert call[2] == "2"
    minute = call[4]
    assert minute.startswith(totals + ":m:")
    assert {command[1] for command in ran} == {totals, minute}  # KEYS only
    # TIME came first, from the client.
    names = [words(c)[0].upper() for c in seen if c["client_type"] != "lua"]
    assert names.index("TIME") < names.index("EVALSHA")
    # The layout apee_stats reads: the same fields in both, the bucket of
    # Redis's minute, expiring.
    assert raw.exists(totals) == 1
    assert raw.exists(minute) == 1
    assert 0 < raw.ttl(minute) <= fleet.BUCKET_SECONDS
    since = int(raw.hget(totals, "_since"))
    assert minute == fleet.minute_key(cache.key_prefix, alias, since // 60)
    assert int(raw.hget(totals, "hits")) == int(raw.hget(minute, "hits")) == 1
    assert int(raw.hget(totals, "misses")) == int(raw.hget(minute, "misses")) == 1
    raw.close()
