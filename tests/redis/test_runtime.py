"""Per-process state follows the configuration it was built from."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import redis
from django.core.cache import caches
from django.test import override_settings

from django_apee.cache import ApeeCache
from django_apee.core import MISSING
from django_apee.core.decisions import WAITED_IN_PROCESS
from django_apee.core.envelope import Envelope, Meta
from django_apee.engine.protocol import Tuning
from django_apee.engine.stampede import Call, Coordinator, make_spec
from django_apee.store import fleet
from django_apee.store.wake import WakeHub, wake_channel


def test_changed_options_get_a_new_runtime(make_cache, redis_url):
    alias, cache = make_cache(WAIT_TIMEOUT=1)
    first = cache.runtime
    assert first.coordinator.tuning.wait_timeout == 1
    assert cache.runtime is first  # shared while nothing changes
    changed = {"BACKEND": "django_apee.cache.ApeeCache", "LOCATION": redis_url,
               "OPTIONS": {"WAIT_TIMEOUT": 2}}  # fmt: skip
    with override_settings(CACHES={"default": changed, alias: changed}):
        second = caches[alias].runtime
        assert second is not first
        assert second.coordinator.tuning.wait_timeout == 2


def test_backends_built_by_hand_do_not_share_state(redis_url):
    one = ApeeCache(redis_url, {"OPTIONS": {"WAIT_TIMEOUT": 1}})
    two = ApeeCache(redis_url, {"OPTIONS": {"WAIT_TIMEOUT": 3}})
    assert one.alias == two.alias == "unknown"
    assert one.runtime is not two.runtime
    assert two.runtime.coordinator.tuning.wait_timeout == 3


def test_a_forked_child_builds_its_own_runtime(make_cache):
    _, cache = make_cache()
    parent = cache.runtime
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, never return into pytest
        try:
            ok = cache.runtime is not parent and cache.get("absent") is None
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    try:
        assert os.read(read, 1) == b"1"
    finally:
        os.close(read)
        os.waitpid(pid, 0)


def test_fleet_counts_go_to_the_registering_backends_redis(make_cache, redis_url):
    other_db = redis_url.rsplit("/", 1)[0] + "/5"
    alias, cache = make_cache(location=other_db)
    cache.get("nothing")  # builds the runtime, which registers the sink
    fleet.flush()
    target = redis.Redis.from_url(other_db)
    try:
        key = fleet.stats_key(cache.key_prefix, alias)
        assert int(target.hget(key, "misses") or 0) == 1
    finally:
        target.flushdb()
        target.close()


class RawStore:
    """The engine's Store over a bare redis client: no Django cache at all."""

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self.envelope = Envelope(
            codec="msgpack", pickle_fallback=False, signing_keys=[b"raw-store-key"]
        )

    def connection(self) -> redis.Redis:
        return self.client

    def near_hit(self, made: str) -> Any:
        return MISSING

    def read(self, connection: redis.Redis, made: str) -> Any:
        return connection.get(made)

    def decode_entry(self, made: str, raw: bytes) -> tuple[Any, Meta | None] | None:
        decoded = self.envelope.decode(raw, key=made)
        return decoded.value, decoded.meta

    def encode_entry(self, made: str, value: Any, meta: Meta) -> bytes:
        encoded = self.envelope.encode(value, meta, key=made)
        assert isinstance(encoded, bytes)
        return encoded


class Count:
    def __init__(self) -> None:
        self.n = 0.0

    def inc(self, amount: float = 1) -> None:
        self.n += amount

    def observe(self, value: float) -> None:
        self.n += 1


class Events:
    """A recording sink: the engine counts through whatever it is handed."""

    def __init__(self) -> None:
        names = (
            "hits", "misses", "stale_served", "early_refreshes", "herd_misses",
            "lease_renewals", "lease_lost", "lease_takeovers", "redis_errors",
            "compute_seconds",
            "lease_wait_seconds",
        )  # fmt: skip
        for name in names:
            setattr(self, name, Count())
        self.outcomes: list[str] = []
        self.fallbacks: list[str] = []
        self.decisions: list[tuple[str, str, str]] = []

    def computed(self, outcome: str) -> None:
        self.outcomes.append(outcome)

    def fallback(self, reason: str) -> None:
        self.fallbacks.append(reason)

    def decided(self, made: str, state: str, decision: str, waited: float) -> None:
        self.decisions.append((made, state, decision))


def test_the_engine_runs_on_a_bare_store_in_two_coordinators(redis_url):
    """Two coordinators (as two processes would be) over one Redis, no backend:
    16 threads on a cold key compute it exactly once."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    events = Events()
    coordinators = [
        Coordinator(
            RawStore(client),
            WakeHub(lambda: client, wake_channel("")),
            Tuning(),
            events,
        )
        for _ in range(2)
    ]
    computes: list[int] = []

    def compute() -> str:
        computes.append(1)
        time.sleep(0.2)
        return "value"

    spec = make_spec(60, None, None, Tuning().policy)
    results: list[Any] = []
    barrier = threading.Barrier(16)

    def caller(index: int) -> None:
        barrier.wait()
        call = Call("engine:cold", compute, spec)
        results.append(coordinators[index % 2].get_or_set(call))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == ["value"] * 16
    assert len(computes) == 1
    assert events.outcomes == ["ok"]
    assert events.fallbacks == []
    # Threads that joined their process's leader report that wait, keyed.
    assert 1 <= len(events.decisions) <= 14
    assert set(events.decisions) == {("engine:cold", "miss", WAITED_IN_PROCESS)}
    assert client.get("engine:cold") is not None
    client.close()


#: Threads a runtime starts for itself (the lease renewer and the fleet
#: flusher are per process and stay).
RUNTIME_THREADS = ("django-apee-wake", "django-apee-near", "django-apee-refresh")


def _runtime_threads() -> int:
    return sum(
        thread.name.startswith(RUNTIME_THREADS) for thread in threading.enumerate()
    )


def _clients(raw: redis.Redis) -> tuple[int, int, int]:
    """Connections on the server: all of them, the pub/sub subscribers and
    the near caches' tracking connections."""
    found = raw.client_list()
    subscribers = sum(int(c["sub"]) > 0 for c in found)
    tracking = sum(c["name"] == "django-apee-near" for c in found)
    return len(found), subscribers, tracking


def _use_every_connection(cache: ApeeCache) -> None:
    """Start what a busy runtime runs: the wake-up subscriber, the identity
    connection, the near cache's tracking and a background refresh thread."""
    runtime = cache.runtime
    event = runtime.hub.expect("any")
    runtime.hub.done("any", event)
    assert runtime.hub.subscribed.wait(10)
    assert runtime.identity.client_id() is not None
    cache.set("k", "v")
    assert cache.get("k") == "v"
    near = runtime.near
    assert near is not None
    deadline = time.monotonic() + 10
    while not near.tracker.live(time.monotonic()) and time.monotonic() < deadline:
        cache.get("k")
        time.sleep(0.01)
    assert near.tracker.live(time.monotonic())
    runtime.coordinator._pool.submit(lambda: None).result(10)


def test_a_changed_caches_ends_the_dropped_runtimes_threads_and_connections(
    make_cache, own_server, own_raw
):
    _, cache = make_cache(location=own_server.url, NEAR_CACHE=True)
    _use_every_connection(cache)
    first = cache.runtime
    # The next configuration drops the first: what it ran ends at once.
    _, cache = make_cache(location=own_server.url, NEAR_CACHE=True, WAIT_TIMEOUT=2)
    assert not first.hub._worker._thread.is_alive()
    assert not first.near.tracker._thread.is_alive()
    _use_every_connection(cache)
    # A dropped runtime's idle refresh thread ends soon after its pool is
    # shut down, not at once: counted only once it has.
    for thread in list(first.coordinator._pool._threads):
        thread.join(10)
    threads, (clients, subscribers, tracking) = _runtime_threads(), _clients(own_raw)
    assert (subscribers, tracking) == (1, 1)
    for round_ in range(3):
        dropped = cache.runtime
        _, cache = make_cache(
            location=own_server.url, NEAR_CACHE=True, WAIT_TIMEOUT=3 + round_
        )
        _use_every_connection(cache)
        for thread in list(dropped.coordinator._pool._threads):
            thread.join(10)
    # Each runtime replaced the one before: nothing piled up, neither
    # threads here nor connections on the server (each dropped runtime left
    # three before: its subscriber, its identity and its tracking). The pool
    # may have opened one more for the fleet flusher running meanwhile.
    assert _runtime_threads() == threads
    now, subscribers, tracking = _clients(own_raw)
    assert (subscribers, tracking) == (1, 1)
    assert clients <= now <= clients + 1
