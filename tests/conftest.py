"""Test fixtures on the session's private redis-server.

``tests/settings.py`` starts the server (or takes ``REDIS_URL``); here each
test gets an empty database, and fault tests get the process itself.
``make_cache`` gives a test ApeeCache aliases of its own: coordinators,
breakers and herd state are per alias and process, so sharing an alias
would share them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest
import redis
from django.conf import settings
from django.core.cache import caches
from django.test import override_settings
from hypothesis import settings as hypothesis_settings

from django_apee.cache import ApeeCache
from tests.support import target
from tests.support.redis_server import RedisServer, session_server

# The machines that run the suite are shared and noisy: a property that takes
# 20 ms may take 400 ms once. Correctness is what hypothesis checks here, not
# speed (benchmarks live in bench/), so no per-example deadline.
hypothesis_settings.register_profile("apee", deadline=None)
hypothesis_settings.load_profile("apee")


#: Fixtures that give a test a redis-server of its own (or the session's
#: single server itself) instead of the suite's Redis.
OWN_SERVERS = frozenset({"own_server", "own_raw", "redis_server"})


def pytest_collection_modifyitems(
    config: pytest.Config, items: list[pytest.Item]
) -> None:
    """On a cluster (APEE_TEST_CLUSTER=1) the ``single_node`` tests are
    deselected: what they test exists on one server only (the marker's
    reason says what). So are the tests on a server of their own
    (``OWN_SERVERS``): they never touch the cluster, and ran already in the
    single-server run."""
    if not target.on_cluster():
        return
    kept, dropped = [], []
    for item in items:
        alone = item.get_closest_marker("single_node") or OWN_SERVERS.intersection(
            getattr(item, "fixturenames", ())
        )
        (dropped if alone else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def pytest_unconfigure(config: pytest.Config) -> None:
    server = session_server()
    if server is not None:
        server.close()


@pytest.fixture(scope="session")
def redis_url() -> str:
    url: str = settings.REDIS_URL
    return url


@pytest.fixture(scope="session")
def redis_server() -> RedisServer:
    """The server process itself, for fault injection (SIGSTOP, restart)."""
    server = session_server()
    if server is None:
        pytest.skip("needs a redis-server owned by the tests; REDIS_URL is set")
    return server


@pytest.fixture(scope="module")
def own_server() -> Iterator[RedisServer]:
    """A redis-server for one test module alone: MONITOR on it sees only the
    module's commands (the session's server also gets other aliases' stats
    flushes from a background thread)."""
    started = RedisServer().start()
    yield started
    started.close()


@pytest.fixture
def own_raw(own_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain client of ``own_server``, which it empties first."""
    client = redis.Redis(port=own_server.port, socket_timeout=10)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def raw_redis() -> Iterator[redis.Redis]:
    """A plain client of the caches' Redis: the session's server, or with
    APEE_TEST_CLUSTER=1 a RedisCluster (typed as the server's client: the
    tests use the commands both have)."""
    client: Any = target.raw_client(socket_timeout=5)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _empty_redis(raw_redis: redis.Redis) -> None:
    target.flush(raw_redis)


_aliases = itertools.count()
Made = Callable[..., tuple[str, ApeeCache]]


@pytest.fixture
def make_cache() -> Iterator[Made]:
    """``make_cache(**OPTIONS) -> (alias, caches[alias])`` with a fresh alias,
    on the caches' Redis (``target``: a cluster with APEE_TEST_CLUSTER=1)
    unless ``location`` names another."""
    with ExitStack() as stack:

        def make(location: str | None = None, **options: Any) -> tuple[str, ApeeCache]:
            alias = f"apee-test-{next(_aliases)}"
            config = {
                **settings.CACHES,
                alias: {
                    "BACKEND": "django_apee.cache.ApeeCache",
                    "LOCATION": location or target.location(),
                    "OPTIONS": options if location else target.options(options),
                },
            }
            stack.enter_context(override_settings(CACHES=config))
            backend = caches[alias]
            assert isinstance(backend, ApeeCache)
            return alias, backend

        yield make
