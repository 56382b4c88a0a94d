"""FailoverRetry: which errors it waits out, and for how long (no server)."""

from __future__ import annotations

import copy
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError

from django_apee.store import failover


def flaky(errors: list[Exception]):
    """A command that raises ``errors`` in turn, then answers "ok"."""
    calls: list[float] = []

    def do() -> str:
        calls.append(time.monotonic())
        if errors:
            raise errors.pop(0)
        return "ok"

    return do, calls


def test_waits_out_connection_errors_and_refusals_until_a_primary_answers():
    errors = [
        RedisConnectionError("refused"),
        ResponseError("NOREPLICAS Not enough good replicas to write."),
        ReadOnlyError("READONLY You can't write against a read only replica."),
    ]
    do, calls = flaky(errors)
    failed: list[Exception] = []
    retry = failover.FailoverRetry(0, window_s=5.0)
    assert retry.call_with_retry(do, failed.append) == "ok"
    assert len(calls) == 4
    assert len(failed) == 3  # each failure dropped the connection
    assert calls[-1] - calls[0] >= 3 * failover.RETRY_PAUSE_S * 0.9


def test_gives_up_after_the_window():
    do, calls = flaky([RedisConnectionError("down")] * 100)
    retry = failover.FailoverRetry(0, window_s=0.35)
    began = time.monotonic()
    with pytest.raises(RedisConnectionError):
        retry.call_with_retry(do, lambda error: None)
    assert 0.2 <= time.monotonic() - began < 1.0
    assert 2 <= len(calls) <= 5


def test_other_response_errors_are_the_callers():
    do, calls = flaky([ResponseError("WRONGTYPE Operation against a key")])
    retry = failover.FailoverRetry(0, window_s=5.0)
    with pytest.raises(ResponseError):
        retry.call_with_retry(do, lambda error: None)
    assert len(calls) == 1


def test_a_nested_call_does_not_wait_again():
    retry = failover.FailoverRetry(0, window_s=5.0)
    inner_calls: list[float] = []

    def inner() -> str:
        inner_calls.append(time.monotonic())
        raise RedisConnectionError("refused")

    outer = [0]

    def do() -> str:
        outer[0] += 1
        if outer[0] < 3:
            return retry.call_with_retry(inner, lambda error: None)
        return "ok"

    assert retry.call_with_retry(do, lambda error: None) == "ok"
    assert len(inner_calls) == 2  # once per outer attempt, no wait inside


def test_each_connection_gets_its_own_copy():
    retry = failover.FailoverRetry(2, window_s=3.0)
    copied = copy.deepcopy(retry)
    assert copied == retry
    assert copied is not retry
    assert copied.get_retries() == 2


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ResponseError("NOREPLICAS Not enough good replicas to write."), True),
        (ReadOnlyError("READONLY You can't write"), True),
        (ResponseError("NOSCRIPT No matching script"), False),
        (RedisConnectionError("x"), False),
    ],
)
def test_not_primary(error, expected):
    assert failover.not_primary(error) is expected
