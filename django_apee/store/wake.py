"""Wake-ups: how waiters learn that an entry's lease ended, without polling.

``WakeHub`` is one pub/sub connection per process and Redis: waiters block
on an in-process event, so the number of blocked Redis connections does not
grow with the number of waiting threads. A missed message costs a waiter at
most the lease's remaining life: it times its wait to the lease's PTTL.

Wake-ups travel on one pub/sub channel; messages carry the value key. One
channel for all keys keeps one subscription per process; computes are rare
by design, so every process seeing every wake-up costs little. The Lua
scripts that end a lease publish on the channel name they are given.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from django_apee.core.process import ProcessThread

if TYPE_CHECKING:
    from redis import Redis

logger = logging.getLogger("django_apee")

#: Pub/sub channel on which the end of a lease wakes its waiters.
WAKE_CHANNEL = "django_apee:wake"


class WakeHub:
    """Wake-ups for one Redis, over one pub/sub connection per process.

    ``expect(key)`` registers interest *before* the caller looks again (so a
    wake-up that lands in between is not missed), ``wait`` blocks on it, and
    ``done`` unregisters. When the subscription is down, waits simply run to
    their timeout, which the caller sets to the lease's remaining life.
    """

    def __init__(self, connect: Callable[[], Redis]) -> None:
        self._connect = connect
        self._waiting: dict[str, set[threading.Event]] = {}
        self._lock = threading.Lock()
        self.subscribed = threading.Event()
        self._worker = ProcessThread(
            self._run, "django-apee-wake", on_start=self.subscribed.clear
        )

    def expect(self, value_key: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._worker.ensure()
            self._waiting.setdefault(value_key, set()).add(event)
        return event

    def done(self, value_key: str, event: threading.Event) -> None:
        with self._lock:
            events = self._waiting.get(value_key)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiting[value_key]

    def waiting(self) -> int:
        with self._lock:
            return sum(len(events) for events in self._waiting.values())

    def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                self._listen()
            except Exception:
                logger.debug("django_apee: wake-up subscription lost", exc_info=True)
            if self.subscribed.is_set():
                backoff = 0.05  # it worked until now: a fresh failure, not a streak
            self.subscribed.clear()
            self._wake_all()  # they look again rather than sleep to their timeout
            time.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    def _listen(self) -> None:
        pubsub = self._connect().pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(WAKE_CHANNEL)
            while True:
                message = pubsub.get_message(timeout=1.0)
                if not self.subscribed.is_set() and pubsub.subscribed:
                    self.subscribed.set()
                    # A wake-up published before the subscription was up
                    # never reached us: whoever registered meanwhile looks
                    # again instead of sleeping to the lease's end.
                    self._wake_all()
                if message is None or message.get("type") != "message":
                    continue
                key = message["data"]
                self._wake(key.decode() if isinstance(key, bytes) else str(key))
        finally:
            pubsub.close()

    def _wake(self, value_key: str) -> None:
        with self._lock:
            events = list(self._waiting.get(value_key, ()))
        for event in events:
            event.set()

    def _wake_all(self) -> None:
        with self._lock:
            events = [e for group in self._waiting.values() for e in group]
        for event in events:
            event.set()
