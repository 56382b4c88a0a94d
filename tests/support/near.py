"""Helpers of the near-cache tests (tests/redis and tests/faults).

Coherence is asserted as orderings and bounded waits: ``eventually`` polls
until a condition holds, with a bound a loaded machine survives.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from django_apee.cache import ApeeCache
from django_apee.core.envelope import Meta

#: The longest a test waits for something that should take milliseconds.
BOUND = 15.0


def eventually(condition: Callable[[], bool], bound: float = BOUND) -> bool:
    """Whether ``condition()`` became true within ``bound`` seconds."""
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.002)
    return condition()


def plant(raw: redis.Redis, cache: ApeeCache, key: str, value: object) -> None:
    """Store ``value`` under ``key`` as another process's ApeeCache would
    (an envelope with its write time in Redis's clock), behind this
    process's back."""
    made = cache.client.make_key(key)
    seconds, micros = raw.time()
    meta = Meta(hard_ms=600_000, written_ms=seconds * 1000 + micros // 1000)
    raw.set(made, cache.envelope.encode(value, meta, key=made), px=600_000)


def warm(cache: ApeeCache, key: str) -> None:
    """Read ``key`` until it is served from process memory."""
    near = cache.runtime.near
    assert near is not None
    made = cache.client.make_key(key)

    def served() -> bool:
        cache.get(key)
        return near.store.get(made) is not None and near.tracker.live(time.monotonic())

    assert eventually(served), near.figures()
