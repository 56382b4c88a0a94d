"""``get_many`` reads at most ``GET_CHUNK`` keys per command or script call.

Fresh hits are one ``MGET``; the keys that are not (absent, stale, older
entries) go through ``lua/get.lua``. Either holds Redis's one thread until
it returns, so a large get_many is split into commands of ``GET_CHUNK``
keys, sent together in one pipelined round trip, with the same answers as
one call would give. Watched with MONITOR on a private server (its only
clients are this test's; the session's server also gets other aliases'
stats flushes from a background thread).
"""

from __future__ import annotations

import math

import pytest

from django_apee.cache import ApeeCache
from django_apee.client_read import GET_CHUNK
from django_apee.core.keys import LEASE, companion
from tests.conftest import Made
from tests.redis.test_stampede import age_entry
from tests.support.monitor import client_commands, monitored, script_runs
from tests.support.redis_server import RedisServer


@pytest.fixture
def cache(own_server: RedisServer, make_cache: Made) -> ApeeCache:
    return make_cache(location=own_server.url)[1]


def test_get_chunk_is_small_enough_to_bound_a_script():
    assert 64 <= GET_CHUNK <= 1024


def mgets(seen) -> list[list[str]]:
    return [c["command"].split() for c in seen if c["command"].startswith("MGET ")]


def test_a_large_get_many_runs_one_command_per_chunk(own_server, own_raw, cache):
    count = 5000
    keys = [f"k{i}" for i in range(count)]
    present = {key: i for i, key in enumerate(keys) if i % 3}
    cache.set_many(present, 60)
    cache.get("warm")  # the script is loaded: only the calls below remain
    cache.runtime.clock.refresh()  # no TIME sample due while MONITOR watches

    with monitored(own_server) as seen:
        found = cache.get_many(keys)

    assert found == present
    assert list(found) == [key for key in keys if key in present]  # input order
    sizes = [len(call) - 1 for call in mgets(seen)]
    assert sizes == [GET_CHUNK] * 9 + [count - 9 * GET_CHUNK]
    # The absent third, and only it, goes through the script, chunked too.
    calls = [call for call, _ in script_runs(seen, "get")]
    absent = count - len(present)
    assert len(calls) == math.ceil(absent / GET_CHUNK)
    assert sum(int(call[2]) // 2 for call in calls) == absent
    # Pipelined commands only: no SCRIPT EXISTS round trip before them.
    assert client_commands(seen) == {"MGET", "EVALSHA"}


def test_a_get_many_of_fresh_hits_is_one_mget(own_server, own_raw, cache):
    cache.set_many({"a": 1, "b": 2}, 60)
    cache.runtime.clock.refresh()  # no TIME sample due while MONITOR watches
    with monitored(own_server) as seen:
        assert cache.get_many(["a", "b"]) == {"a": 1, "b": 2}
    assert client_commands(seen) == {"MGET"}
    with monitored(own_server) as seen:
        assert cache.get_many(["a", "b", "c"]) == {"a": 1, "b": 2}
    # Only the absent key takes the script, for its lease.
    (call,) = [call for call, _ in script_runs(seen, "get")]
    assert call[3:] == [":1:c", companion(":1:c", LEASE)]
    assert client_commands(seen) == {"MGET", "EVALSHA"}


def test_chunked_get_many_survives_a_script_flush(own_server, own_raw, cache):
    keys = [f"k{i}" for i in range(GET_CHUNK * 2 + 1)]
    own_raw.script_flush()
    cache.runtime.clock.refresh()  # no TIME sample due while MONITOR watches
    with monitored(own_server) as seen:
        assert cache.get_many(keys) == {}  # all absent: all through the script
    assert client_commands(seen) == {"MGET", "EVALSHA", "SCRIPT"}  # NOSCRIPT, LOAD
    assert len(script_runs(seen, "get")) == 2 * 3
    cache.set_many(dict.fromkeys(keys, "v"), 60)
    assert cache.get_many(keys) == dict.fromkeys(keys, "v")


def test_chunked_get_many_keeps_herd_mode_per_key(own_server, own_raw, cache):
    """A stale entry in the second chunk misses for one reader only, and its
    winner's set frees the lease, as with one script call."""
    keys = [f"k{i}" for i in range(GET_CHUNK + 100)]
    cache.set_many(dict.fromkeys(keys, "old"), 100)
    stale = keys[GET_CHUNK + 7]
    age_entry(cache, own_raw, stale, left_ms=2000)  # past its soft timeout

    first = cache.get_many(keys)
    assert stale not in first  # this reader won the lease
    assert len(first) == len(keys) - 1
    assert cache.get_many(keys) == dict.fromkeys(keys, "old")  # the others
    assert cache.set(stale, "new", 100) is True  # the fenced write
    assert cache.get_many(keys)[stale] == "new"
    assert own_raw.keys("*apee:lease*") == []
