"""store/clock.py: this process's estimate of Redis's clock, against a real server.

The bounds are checked against Redis ``TIME`` read around them: what the
clock calls the earliest time is never after Redis's, the latest never
before, whatever the machine's load (only the width of the interval
depends on it).
"""

from __future__ import annotations

import os
import time

import pytest
import redis

from django_apee.store.clock import RedisClock, measure
from tests.redis.test_stampede import stored
from tests.support.redis_server import free_port


def redis_ms(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds * 1000 + micros / 1000


def test_bounds_hold_redis_time(raw_redis: redis.Redis) -> None:
    clock = RedisClock(lambda: raw_redis)
    for _ in range(50):
        earliest = clock.earliest_ms()
        now = redis_ms(raw_redis)
        latest = clock.latest_ms()
        assert latest is not None
        assert earliest <= now <= latest


def test_keeps_the_shortest_round_trip(raw_redis: redis.Redis) -> None:
    ticks = iter([0.0, 0.010, 1.0, 1.001, 2.0, 2.004])  # round trips 10, 1, 4 ms
    sample = measure(raw_redis, samples=3, monotonic=lambda: next(ticks))
    assert sample.error_ms == pytest.approx(0.5 + 0.001)
    assert sample.taken == 1.001


def test_the_error_grows_with_the_sample_age(raw_redis: redis.Redis) -> None:
    now = [100.0]
    clock = RedisClock(lambda: raw_redis, refresh_s=1e9, monotonic=lambda: now[0])
    first = clock.latest_ms()
    low = clock.earliest_ms()
    assert first is not None
    now[0] += 10.0  # 10 s later, no new sample: 1000 ppm is 10 ms each way
    assert clock.latest_ms() == pytest.approx(first + 10_000 + 10, abs=1e-3)
    assert clock.earliest_ms() in range(low + 10_000 - 11, low + 10_000 - 8)


def test_refreshes_in_the_background(raw_redis: redis.Redis) -> None:
    clock = RedisClock(lambda: raw_redis, refresh_s=0.0)
    clock.latest_ms()
    first = clock.sample
    deadline = time.monotonic() + 10
    while clock.sample is first and time.monotonic() < deadline:
        clock.latest_ms()
        time.sleep(0.01)
    assert clock.sample is not first


def test_a_redis_that_is_away_gives_no_time_and_no_error() -> None:
    away = redis.Redis(port=free_port(), socket_connect_timeout=0.2)
    clock = RedisClock(lambda: away)
    assert clock.latest_ms() is None
    assert clock.earliest_ms() == 0  # a writer stamps "not recorded"
    # Retried a second later at the earliest, not on every read.
    started = time.monotonic()
    for _ in range(100):
        assert clock.latest_ms() is None
    assert time.monotonic() - started < 5


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_a_forked_child_keeps_the_sample_and_refreshes(raw_redis: redis.Redis) -> None:
    clock = RedisClock(lambda: raw_redis, refresh_s=0.0)
    clock.latest_ms()
    clock._refreshing = os.getpid()  # as if the parent's refresh were running
    pid = os.fork()
    if pid == 0:  # the child (redis-py's pool opens it a connection of its own)
        first = clock.sample
        deadline = time.monotonic() + 10
        while clock.sample is first and time.monotonic() < deadline:
            clock.latest_ms()
            time.sleep(0.01)
        os._exit(0 if clock.sample is not first else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_writers_stamp_the_redis_time_of_the_write(make_cache, raw_redis) -> None:
    """Plain set, a herd winner's set and get_or_set_stampede_safe alike."""
    _, cache = make_cache()
    before = redis_ms(raw_redis)
    cache.set("plain", "v", 30)
    cache.get_or_set_stampede_safe("safe", lambda: "v", 30)
    after = redis_ms(raw_redis)
    for key in ("plain", "safe"):
        _, meta = stored(cache, raw_redis, key)
        # A lower bound: at most the clock's error before the write.
        assert before - 1000 <= meta.written_ms <= after
