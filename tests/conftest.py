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
from tests.support.redis_server import RedisServer, session_server

# The machines that run the suite are shared and noisy: a property that takes
# 20 ms may take 400 ms once. Correctness is what hypothesis checks here, not
# speed (benchmarks live in bench/), so no per-example deadline.
hypothesis_settings.register_profile("apee", deadline=None)
hypothesis_settings.load_profile("apee")


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
def raw_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _empty_redis(raw_redis: redis.Redis) -> None:
    raw_redis.flushdb()


_aliases = itertools.count()
Made = Callable[..., tuple[str, ApeeCache]]


@pytest.fixture
def make_cache(redis_url: str) -> Iterator[Made]:
    """``make_cache(**OPTIONS) -> (alias, caches[alias])`` with a fresh alias."""
    with ExitStack() as stack:

        def make(location: str | None = None, **options: Any) -> tuple[str, ApeeCache]:
            alias = f"apee-test-{next(_aliases)}"
            config = {
                **settings.CACHES,
                alias: {
                    "BACKEND": "django_apee.cache.ApeeCache",
                    "LOCATION": location or redis_url,
                    "OPTIONS": options,
                },
            }
            stack.enter_context(override_settings(CACHES=config))
            backend = caches[alias]
            assert isinstance(backend, ApeeCache)
            return alias, backend

        yield make
