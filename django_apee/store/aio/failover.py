"""``FAILOVER_WAIT`` for ``redis.asyncio``: wait out a Sentinel failover.

The sync side's answer (``store/failover.py``) on the loop: a command that
failed because the primary is gone, or refused because a node is not the
primary any more, is sent again every ``RETRY_PAUSE_S`` for at most
``FAILOVER_WAIT`` seconds, each attempt on a connection that asks the
sentinels where the primary is. The rule (which failures, how long, how
often) is ``failover.Attempts``, shared with the sync policy; only the
sleep is awaited.

And as on the sync side, a dropped connection must ask the sentinels when
it reconnects: ``redis.asyncio``'s ``SentinelManagedConnection`` does in
``connect`` but not when ``send_packed_command`` reconnects it (the base
class's ``connect_check_health``, to the address it had: the dead
primary's, for the whole window).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio.sentinel as aiosentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ConstantBackoff
from redis.exceptions import ResponseError

from django_apee.store.failover import RETRY_PAUSE_S, Attempts, FailoverRetry

T = TypeVar("T")

#: Set while a command's retries run in this task: the reconnect redis-py
#: retries inside them tries once (else each would wait the window again).
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "django_apee_failover_retry", default=False
)


class AsyncFailoverRetry(AsyncRetry):
    """``FailoverRetry`` for ``redis.asyncio`` connections."""

    def __init__(self, retries: int, window_s: float) -> None:
        super().__init__(ConstantBackoff(RETRY_PAUSE_S), retries)
        self.window_s = window_s
        self._supported_errors = (*self._supported_errors, ResponseError)

    @classmethod
    def of(cls, sync: FailoverRetry) -> AsyncFailoverRetry:
        return cls(sync._retries, sync.window_s)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AsyncFailoverRetry):
            return NotImplemented
        return (self._retries, self.window_s) == (other._retries, other.window_s)

    __hash__ = AsyncRetry.__hash__

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        nested = _ACTIVE.get()
        attempts = Attempts(self._retries, 0.0 if nested else self.window_s)
        token = _ACTIVE.set(True)
        try:
            while True:
                try:
                    return await do()
                except self._supported_errors as error:
                    if not attempts.counts(error, is_retryable):
                        raise
                    if with_failure_count:
                        await fail(error, attempts.failures)
                    else:
                        await fail(error)
                    pause = None if nested else attempts.pause(error)
                    if pause is None:
                        raise
                    if pause:
                        await asyncio.sleep(pause)
        finally:
            _ACTIVE.reset(token)


class SentinelPrimaryConnection(aiosentinel.SentinelManagedConnection):
    """A Sentinel-managed async connection that asks the sentinels on every
    reconnect (see the module)."""

    async def send_packed_command(
        self, command: Any, check_health: bool = True
    ) -> None:
        if not self.is_connected:
            await self.connect()  # type: ignore[no-untyped-call]  # where the sentinels say
        await super().send_packed_command(command, check_health)


class SentinelPrimarySSLConnection(
    SentinelPrimaryConnection, aiosentinel.SentinelManagedSSLConnection
):
    """``SentinelPrimaryConnection`` over TLS."""
