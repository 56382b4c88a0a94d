"""Wake-ups for coroutines: one subscription per event loop and channel.

The sync ``WakeHub`` wakes threads from a thread of its own. Coroutines wait
on an ``asyncio.Event`` instead, set by a task on their own loop that reads
the same channel (``wake_channel``) over a ``redis.asyncio`` pub/sub
connection: thousands of coroutines waiting for one key cost one
subscription and no thread. The registry of who waits for what, the
reconnect pauses and the NOPERM advice are the sync hub's
(``store/wake.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from redis.exceptions import NoPermissionError

from django_apee.store.wake import POLL_S, Waiters, pause_after_failure, warn_denied

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis import Redis

logger = logging.getLogger("django_apee")


async def cancelled(task: asyncio.Task[None] | None) -> None:
    """Cancel ``task`` (if it still runs) and wait until it has ended."""
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _stop_if_cancelled() -> None:
    """End this task if its cancellation was asked for and then lost.

    redis-py reads a reply under a timeout; a cancellation that lands as
    that timeout expires can come out of the read as a timeout (the
    cancellation swallowed), and the loop's shutdown, which cancels this
    task and waits for it, would wait forever. Python 3.11+ still counts
    the request (``Task.cancelling``); 3.10 cannot tell.
    """
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


class AsyncWakeHub(Waiters[asyncio.Event]):
    """Wake-ups on one channel for the coroutines of one loop.

    The subscribing task starts with the first ``expect`` and runs until
    :meth:`aclose` (the loop's end, see ``loops.py``). ``subscribed`` is set
    while it is subscribed.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        channel: str,
        sync_connect: Callable[[], Redis],
    ) -> None:
        super().__init__(asyncio.Event, channel)
        self._client = client
        #: For the NOPERM advice only (which ACL user to grant).
        self._sync_connect = sync_connect
        self.subscribed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: Set by ``reconnect``: subscribe again, where the client's
        #: connections point now (a new Sentinel primary).
        self._moved = False

    def _listening(self) -> None:
        if self._task is None or self._task.done():
            self.subscribed.clear()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="django-apee-wake"
            )

    def reconnect(self) -> None:
        """Subscribe again on a fresh connection (the primary moved), within
        ``POLL_S``: wake-ups are published on the primary, and a
        subscription left on a demoted one hears none. Waiters are woken to
        look again, so none sleeps through the move."""
        self._moved = True

    async def aclose(self) -> None:
        """Stop listening; waiters still registered wait to their timeout."""
        task, self._task = self._task, None
        await cancelled(task)

    async def _run(self) -> None:
        pause = 0.0
        while True:
            _stop_if_cancelled()
            try:
                await self._listen()
            except NoPermissionError:
                warn_denied(self.channel, self._sync_connect)
            except Exception:
                logger.debug("django_apee: async wake-ups lost", exc_info=True)
            pause = pause_after_failure(pause, self.subscribed.is_set())
            self.subscribed.clear()
            self._wake_all()  # they look again rather than sleep to their timeout
            await asyncio.sleep(pause)

    async def _listen(self) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            while True:
                message = await pubsub.get_message(timeout=POLL_S)
                _stop_if_cancelled()
                if self._moved:
                    self._moved = False
                    return  # _run subscribes again, on a new connection
                if not self.subscribed.is_set() and pubsub.subscribed:
                    self.subscribed.set()
                    # Published before the subscription was up: look again.
                    self._wake_all()
                self._heard(message)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
