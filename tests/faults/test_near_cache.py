"""The near cache against other processes, a restarted server and a fork.

Coherence is asserted as orderings and bounded waits: each write by another
process is eventually seen, never overtaken by an older value, and nothing
is served from memory after the server went away. How fast is
``bench/nearcache.py``'s business.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

from django_apee.cache import ApeeCache
from tests.conftest import Made
from tests.support.children import Child
from tests.support.near import BOUND, eventually, plant, warm
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.faults


@pytest.fixture
def writer() -> Iterator[Child]:
    child = Child("tests.support.near_worker")
    try:
        child.wait_ready()
        yield child
    finally:
        child.kill()


def command(child: Child, line: str) -> None:
    assert child.proc.stdin is not None
    child.proc.stdin.write(line + "\n")
    child.proc.stdin.flush()
    assert child.line(BOUND).strip() == "done"


def test_writes_and_deletes_of_another_process_are_seen_in_order(
    make_cache: Made, writer: Child
) -> None:
    """Lockstep: the value is near-cached, the other process writes, and
    this one sees that write (never an older value once it saw a newer)."""
    _, cache = make_cache(NEAR_CACHE=True)  # the same keys as "default"
    command(writer, "set k 0")
    seen: list[int] = []
    for value in range(1, 41):
        warm(cache, "k")
        command(writer, f"set k {value}")

        def caught_up(expected: int = value) -> bool:
            got = cache.get("k")["n"]
            seen.append(got)
            return bool(got == expected)

        assert eventually(caught_up), (value, seen[-5:])
    assert seen == sorted(seen), "an older value was served after a newer one"
    warm(cache, "k")
    command(writer, "delete k")
    assert eventually(lambda: cache.get("k") is None)
    assert cache.runtime.near is not None
    assert cache.runtime.near.store.invalidations >= 41


def test_a_restarted_server_leaves_nothing_stale(make_cache: Made) -> None:
    server = RedisServer().start()
    try:
        _, cache = make_cache(location=server.url, NEAR_CACHE=True)
        cache.set("k", "before", 600)
        warm(cache, "k")
        near = cache.runtime.near
        assert near is not None
        losses = near.tracker.losses
        server.restart()  # no persistence: the data is gone with it
        raw = redis.Redis.from_url(server.url)
        plant(raw, cache, "k", "after")
        # The drop is seen by the tracking thread as soon as it runs (the
        # restart alone takes longer on an idle host; not on a loaded one).
        assert eventually(lambda: near.tracker.losses > losses)
        answers = [cache.get("k") for _ in range(50)]
        assert "before" not in answers
        assert eventually(lambda: cache.get("k") == "after")
        warm(cache, "k")  # tracking came back: it serves from memory again
        raw.close()
    finally:
        server.close()


def test_bounds_hold_under_50000_distinct_keys(make_cache: Made) -> None:
    limits = {"MAX_ENTRIES": 2000, "MAX_BYTES": 256 * 1024}
    _, cache = make_cache(NEAR_CACHE=limits)
    near = cache.runtime.near
    assert near is not None
    value = {"payload": "x" * 300, "n": list(range(10))}
    cache.set("first", value, 600)
    warm(cache, "first")  # tracking is up: every read below may fill
    keys = [f"key:{i}" for i in range(50_000)]
    for start in range(0, len(keys), 5000):
        cache.set_many(dict.fromkeys(keys[start : start + 5000], value), 600)
    largest = (0, 0)
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        assert len(cache.get_many(chunk)) == len(chunk)
        figures = near.store.figures()
        largest = max(largest, (figures["entries"], figures["bytes"]))
        assert figures["entries"] <= limits["MAX_ENTRIES"]
        assert figures["bytes"] <= limits["MAX_BYTES"]
    figures = near.figures()
    assert figures["evictions"] > 40_000  # it did fill, and kept evicting
    assert largest[0] > 0


def _child_reads(cache: ApeeCache, key: str, write: Callable[[], None]) -> Any:
    """In a forked child: the near cache is the child's own and hears writes."""
    near = cache.runtime.near
    assert near is not None
    warm(cache, key)
    write()
    return eventually(lambda: cache.get(key) == "after", bound=10.0)


def test_a_forked_child_has_its_own_near_cache(make_cache: Made) -> None:
    _, cache = make_cache(NEAR_CACHE=True)
    cache.set("k", "before", 600)
    warm(cache, "k")
    parent_near = cache.runtime.near
    made = cache.client.make_key("k")
    read, written = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        ok = False
        try:
            child_near = cache.runtime.near
            fresh = child_near is not parent_near and child_near is not None
            fresh = fresh and child_near.store.get(made) is None

            def write() -> None:
                os.write(written, b"w")

            ok = fresh and _child_reads(cache, "k", write)
        finally:
            os._exit(0 if ok else 1)
    os.close(written)
    try:
        assert os.read(read, 1) == b"w", "the child never got warm"
        redis.Redis.from_url(cache._server).set(made, b"1")  # anything but "before"
        cache.set("k", "after", 600)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(read)


def test_a_silent_tracking_connection_stops_near_hits(
    make_cache: Made, redis_url: str
) -> None:
    """A blackholed network: no error, no invalidation, no PONG. Near hits
    stop once the last confirmation is older than LIVENESS, never serving a
    value written meanwhile after that; and the near cache comes back."""
    from tests.support.faulty_proxy import FaultyProxy

    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = FaultyProxy(port).start()
    try:
        _, cache = make_cache(location=proxy.url, NEAR_CACHE=True)
        near = cache.runtime.near
        assert near is not None
        cache.set("k", "old", 600)
        warm(cache, "k")
        made = cache.client.make_key("k")
        proxy.blackhole()
        direct = redis.Redis.from_url(redis_url)
        direct.set(made, b"5")  # written where this process cannot hear it
        from django_apee.core import MISSING

        served: list[Any] = []
        began = time.monotonic()
        assert eventually(
            lambda: served.append(near.lookup(made)) or served[-1] is MISSING
        )
        stopped_after = time.monotonic() - began
        assert stopped_after < near.tracker.liveness + 5  # generous on a busy host
        # Once stopped, never again while the link is silent.
        assert all(near.lookup(made) is MISSING for _ in range(100))
        proxy.restore()
        assert eventually(lambda: cache.get("k") == 5)
        direct.close()
    finally:
        proxy.close()


def test_sentinel_failover_leaves_nothing_stale(make_cache: Made) -> None:
    """Through Sentinel: tracking follows the primary, the failover drops it
    (a flush), and after it the near cache serves what the new primary has."""
    from tests.support.sentinel_group import SentinelGroup

    group = SentinelGroup()
    try:
        group.start()
        _, cache = make_cache(
            location=group.location, **group.cache_options(NEAR_CACHE=True)
        )
        near = cache.runtime.near
        assert near is not None
        cache.set("k", "before", 600)
        warm(cache, "k")  # reads that fill go to the primary, not a replica
        old = group.primary()
        with group.client_for(old, socket_timeout=6.0) as client:
            assert client.execute_command("WAIT", 2, 5000) >= 2
        losses = near.tracker.losses
        group.kill_primary()
        group.wait_new_primary(old, timeout=30)
        assert eventually(lambda: near.tracker.losses > losses)
        with group.client_for(group.primary()) as client:
            plant(client, cache, "k", "after")
        assert eventually(lambda: cache.get("k") == "after", bound=30)
        warm(cache, "k")  # tracking re-established on the new primary
        assert cache.get("k") == "after"
    finally:
        group.close()
