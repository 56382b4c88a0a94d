"""REDIS_RETRIES: the retry policy ApeeCache gives redis-py, and its bound.

A wait bound stated in socket timeouts holds only if redis-py's retries are
known: these tests check that every connection ApeeCache makes gets the
policy, from OPTIONS through django-redis's pool to the Connection itself,
and that the bound read back from a live Connection is the documented one.
"""

from __future__ import annotations

import pytest
from redis.backoff import ConstantBackoff, ExponentialWithJitterBackoff
from redis.retry import Retry

from django_apee.conf import parse
from django_apee.retry import (
    DEFAULT_REDIS_RETRIES,
    backoff_bound,
    caller_bound,
    command_bound,
    connection_bound,
)


def pool_retry(options: dict) -> Retry:
    retry: Retry = parse(options)[0].redis_options["CONNECTION_POOL_KWARGS"]["retry"]
    return retry


def test_default_is_no_retry_whatever_redis_py_defaults_to():
    assert DEFAULT_REDIS_RETRIES == 0
    assert pool_retry({}).get_retries() == 0
    assert backoff_bound(pool_retry({})._backoff, 1) == 0


def test_redis_retries_sets_the_count():
    assert pool_retry({"REDIS_RETRIES": 2}).get_retries() == 2


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True, None])
def test_a_bad_count_is_apee_e005(bad):
    parsed, problems = parse({"REDIS_RETRIES": bad})
    assert [problem.id for problem in problems] == ["apee.E005"]
    assert "REDIS_RETRIES" in problems[0].message
    assert parsed.redis_options["CONNECTION_POOL_KWARGS"]["retry"].get_retries() == 0


def test_a_users_own_retry_wins():
    theirs = Retry(ConstantBackoff(0.1), 3)
    assert pool_retry({"CONNECTION_POOL_KWARGS": {"retry": theirs}}) is theirs


def test_sentinels_get_the_policy_and_the_socket_timeouts():
    options = {
        "SENTINELS": [("127.0.0.1", 26379)],
        "SOCKET_TIMEOUT": 0.25,
        "REDIS_RETRIES": 1,
    }
    kwargs = parse(options)[0].redis_options["SENTINEL_KWARGS"]
    assert kwargs["retry"].get_retries() == 1
    assert kwargs["socket_timeout"] == 0.25
    assert kwargs["socket_connect_timeout"] == 1.0
    given = {"SENTINEL_KWARGS": {"password": "s"}, **options}
    kwargs = parse(given)[0].redis_options["SENTINEL_KWARGS"]
    assert kwargs["password"] == "s"
    assert "socket_timeout" not in kwargs  # given: redis-py's rule, kept
    assert kwargs["retry"].get_retries() == 1


def test_the_formula():
    assert command_bound(0, 0.25, 0.25) == 0.5
    assert command_bound(2, 0.1, 0.2, (0.01, 0.02)) == pytest.approx(0.93)
    assert caller_bound(0.5, 0.05) == pytest.approx(0.55)
    jitter = ExponentialWithJitterBackoff(base=0.01, cap=1)
    assert backoff_bound(jitter, 5) == 1.0  # the cap, whatever the draw


def test_the_bound_of_a_live_connection_is_read_from_it():
    from redis.connection import Connection

    retry = pool_retry({"REDIS_RETRIES": 1})
    connection = Connection(
        socket_timeout=0.25, socket_connect_timeout=0.1, retry=retry
    )
    assert connection_bound(connection) == pytest.approx(2 * 0.35)
    # redis-py's own default for Redis(host=...): 10 retries, backoff up to 1 s.
    default = Retry(ExponentialWithJitterBackoff(base=0.01, cap=1), 10)
    connection = Connection(
        socket_timeout=0.25, socket_connect_timeout=0.25, retry=default
    )
    assert connection_bound(connection) == pytest.approx(11 * 0.5 + 10 * 1.0)
    unbounded = Connection(socket_timeout=None, retry=retry)
    assert connection_bound(unbounded) == float("inf")


def test_redis_pys_own_defaults_are_what_the_docs_say():
    """docs/howto/faults.rst describes the installed redis-py's defaults:
    a client built as Redis(host, port) (as Sentinel builds its connections
    to the sentinels) retries 10 times with a backoff capped at 1 s; a pool
    built from a URL, as django-redis builds them, does not retry. A
    redis-py that changes them fails here, and the page needs a look."""
    import redis

    by_host = redis.Redis(host="127.0.0.1", port=9)
    retry = by_host.get_retry()
    assert retry is not None
    assert retry.get_retries() == 10
    assert backoff_bound(retry._backoff, 10) == 1.0
    by_url = redis.ConnectionPool.from_url("redis://127.0.0.1:9/0")
    assert by_url.make_connection().retry.get_retries() == 0


def test_failover_wait_is_part_of_the_bound():
    from redis.connection import Connection

    parsed = parse(
        {
            "SENTINELS": [("127.0.0.1", 26379)],
            "FAILOVER_WAIT": 10,
            "SOCKET_TIMEOUT": 0.25,
            "SOCKET_CONNECT_TIMEOUT": 0.25,
        }
    )[0]
    retry = parsed.redis_options["CONNECTION_POOL_KWARGS"]["retry"]
    connection = Connection(
        socket_timeout=0.25, socket_connect_timeout=0.25, retry=retry
    )
    assert connection_bound(connection) == pytest.approx(10 + 2 * 0.5)
    # The sentinels themselves are asked with the plain policy.
    assert parsed.redis_options["SENTINEL_KWARGS"]["retry"].get_retries() == 0
