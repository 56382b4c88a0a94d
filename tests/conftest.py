"""Test fixtures on the session's private redis-server.

``tests/settings.py`` starts the server (or takes ``REDIS_URL``); here each
test gets an empty database, and fault tests get the process itself.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from django.conf import settings

from tests.redis_server import RedisServer, session_server


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


@pytest.fixture
def raw_redis(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture(autouse=True)
def _empty_redis(raw_redis: redis.Redis) -> None:
    raw_redis.flushdb()
