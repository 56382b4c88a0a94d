"""Wake-ups: how waiters learn that an entry's lease ended, without polling.

``WakeHub`` is one pub/sub connection per process and Redis: waiters block
on an in-process event, so the number of blocked Redis connections does not
grow with the number of waiting threads. A missed message costs a waiter at
most the lease's remaining life: it times its wait to the lease's PTTL.

Wake-ups travel on one pub/sub channel per KEY_PREFIX (``wake_channel``);
messages carry the value key. One channel for all of a prefix's keys keeps
one subscription per process and alias; computes are rare by design, so
every process seeing every wake-up of its prefix costs little. Apps that
share a Redis under different prefixes do not hear each other's key names,
and an ACL user can be granted exactly its own channel. Aliases with the
same prefix share their keys, so they share the channel too. The Lua
scripts that end a lease publish on the channel name they are given, with
``redis.pcall``: a user denied the channel still gets its write, only the
wake-up is lost (its waiters wait to the lease's end).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from redis.exceptions import NoPermissionError

from django_apee.core.process import ProcessThread

if TYPE_CHECKING:
    from redis import Redis

logger = logging.getLogger("django_apee")

#: What every wake-up channel starts with; the KEY_PREFIX follows.
CHANNEL_PREFIX = "django_apee:wake:"
#: A subscription refused by an ACL is logged at most this often per channel.
NOPERM_LOG_SECONDS = 60.0
#: Longest pause between two attempts to subscribe again. Short: a failover
#: takes seconds, and every waiter whose wake-up is lost meanwhile waits to
#: its lease's end.
MAX_BACKOFF_S = 0.5
#: How long the subscriber blocks reading before it checks ``reconnect``.
POLL_S = 0.25
#: How long ``close`` waits for the subscriber to end (a few polls).
CLOSE_WAIT_S = 2.0

#: The first pause before subscribing again after a failure, in seconds.
RESUBSCRIBE_S = 0.05

E = TypeVar("E", threading.Event, asyncio.Event)

_GLOB_SPECIALS = re.compile(r"([*?\[\]\\])")


def wake_channel(key_prefix: str) -> str:
    """The pub/sub channel on which the end of a lease under ``key_prefix``
    wakes its waiters: the one place that names it."""
    return f"{CHANNEL_PREFIX}{key_prefix}"


def acl_rule(channel: str, user: str | None = None, *, sharded: bool = False) -> str:
    """The ``ACL SETUSER`` line that lets ``user`` use ``channel``.

    ACL channel rules are glob patterns: glob characters in the prefix are
    escaped so the rule grants exactly this channel. ``sharded``: the shard
    channels of ``channel`` on a cluster, one per hash slot, named
    ``{<hash tag>}|<channel>`` (``keys.slot_channel``), and the sharded
    pub/sub commands (``store/shardwake.py``).
    """
    pattern = _GLOB_SPECIALS.sub(r"\\\1", channel)
    if sharded:
        return (
            f"ACL SETUSER {user or '<user>'} &*|{pattern} "
            "+spublish +ssubscribe +sunsubscribe"
        )
    return f"ACL SETUSER {user or '<user>'} &{pattern} +publish +subscribe"


def acl_user(client: Redis) -> str:
    """The ACL user a client authenticates as, from its settings (no I/O).

    A RedisCluster has no single pool; its nodes share its connection kwargs.
    """
    pool = getattr(client, "connection_pool", None)
    if pool is not None:
        kwargs = getattr(pool, "connection_kwargs", {})
    else:
        kwargs = getattr(client, "get_connection_kwargs", dict)()
    return str(kwargs.get("username") or "default")


class _OncePer:
    """At most one log line per topic per interval, process-wide (``store``
    cannot use ``observe``'s ``RateLimitedLog``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def due(self, topic: str) -> bool:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(topic)
            if last is not None and now - last < self.seconds:
                return False
            self._last[topic] = now
            return True


NOPERM_LOG = _OncePer(NOPERM_LOG_SECONDS)


class Waiters(Generic[E]):
    """Who waits for which key's wake-up: the registry both hubs share.

    ``expect(key)`` registers interest *before* the caller looks again (so a
    wake-up that lands in between is not missed), and ``done`` unregisters.
    The event type is the waiter's: ``threading.Event`` for threads,
    ``asyncio.Event`` for coroutines of one loop.
    """

    def __init__(self, new_event: Callable[[], E], channel: str) -> None:
        #: The channel this hub listens on (``wake_channel``); the leases
        #: taken for its waiters announce their end there.
        self.channel = channel
        self._new_event: Callable[[], E] = new_event
        self._waiting: dict[str, set[E]] = {}
        self._lock = threading.Lock()

    def expect(self, value_key: str) -> E:
        event = self._new_event()
        with self._lock:
            self._listening()
            self._waiting.setdefault(value_key, set()).add(event)
        return event

    def _listening(self) -> None:
        """Make sure the subscription runs (called under the lock)."""

    def done(self, value_key: str, event: E) -> None:
        with self._lock:
            events = self._waiting.get(value_key)
            if events is not None:
                events.discard(event)
                if not events:
                    del self._waiting[value_key]

    def waiting(self) -> int:
        with self._lock:
            return sum(len(events) for events in self._waiting.values())

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

    def _heard(self, message: dict[str, Any] | None) -> None:
        """Wake the waiters of the key a pub/sub ``message`` names."""
        if message is None or message.get("type") != "message":
            return
        key = message["data"]
        self._wake(key.decode() if isinstance(key, bytes) else str(key))


def pause_after_failure(previous: float, was_subscribed: bool) -> float:
    """The pause before subscribing again after a failure: 50 ms, doubled
    for each failure in a row up to ``MAX_BACKOFF_S``; a subscription that
    had worked (or no pause yet) starts again at 50 ms."""
    if was_subscribed or not previous:
        return RESUBSCRIBE_S
    return min(previous * 2, MAX_BACKOFF_S)


def warn_denied(
    channel: str, connect: Callable[[], Redis], *, sharded: bool = False
) -> None:
    """The ACL refuses ``channel`` (``sharded``: its shard channels, to
    SSUBSCRIBE): say how to fix it, once a minute."""
    if not NOPERM_LOG.due(channel):
        logger.debug("django_apee: subscription to %r refused (NOPERM)", channel)
        return
    try:
        user = acl_user(connect())
    except Exception:
        user = None
    logger.warning(
        "django_apee: the Redis user may not %s to %r (NOPERM): "
        "waiters are not woken when a computation ends and wait to its "
        "lease's end instead (slower, never wrong). Grant the channel: %s",
        "SSUBSCRIBE (sharded pub/sub, a channel per hash slot)"
        if sharded
        else "SUBSCRIBE",
        channel,
        acl_rule(channel, user, sharded=sharded),
    )


class WakeHub(Waiters[threading.Event]):
    """Wake-ups on one channel, over one pub/sub connection per process.

    Threads block on their ``threading.Event``. When the subscription is
    down, waits simply run to their timeout, which the caller sets to the
    lease's remaining life.
    """

    def __init__(self, connect: Callable[[], Redis], channel: str) -> None:
        super().__init__(threading.Event, channel)
        self._connect = connect
        self.subscribed = threading.Event()
        #: Set by ``reconnect``: the subscription moves to wherever the
        #: connection points now (a new Sentinel primary).
        self._moved = threading.Event()
        #: Set by ``close``: the thread returns and is not started again.
        self._closed = threading.Event()
        self._worker = ProcessThread(
            self._run, "django-apee-wake", on_start=self.subscribed.clear
        )

    def _listening(self) -> None:
        self._worker.ensure()

    def reconnect(self) -> None:
        """Subscribe again on a fresh connection (the primary moved).

        Wake-ups are published where the leases end, on the primary: a
        subscription left on a demoted primary hears none. Waiters are woken
        to look again, so none sleeps through the move.
        """
        self._moved.set()

    def close(self, timeout: float = CLOSE_WAIT_S) -> bool:
        """The configuration is dropped: unsubscribe, give the pub/sub
        connection back and end the thread (waiting ``timeout`` at most).

        Waiters still registered are woken; later ones wait to their
        timeout, as when the subscription is down. True if the thread ended.
        """
        self._closed.set()
        self.reconnect()  # leaves the listening loop within POLL_S
        self._wake_all()
        return self._worker.close(timeout)

    def _run(self) -> None:
        pause = 0.0
        while not self._closed.is_set():
            try:
                self._listen()
            except NoPermissionError:
                warn_denied(self.channel, self._connect)
            except Exception:
                logger.debug("django_apee: wake-up subscription lost", exc_info=True)
            if self._closed.is_set():
                break
            pause = pause_after_failure(pause, self.subscribed.is_set())
            self.subscribed.clear()
            self._wake_all()  # they look again rather than sleep to their timeout
            if self._moved.is_set():
                self._moved.clear()
                pause = 0.0
                continue  # a move, not a failure: at once
            time.sleep(pause)

    def _listen(self) -> None:
        pubsub = self._connect().pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        try:
            pubsub.subscribe(self.channel)
            while not self._moved.is_set():
                message = pubsub.get_message(timeout=POLL_S)
                if not self.subscribed.is_set() and pubsub.subscribed:
                    self.subscribed.set()
                    # A wake-up published before the subscription was up
                    # never reached us: whoever registered meanwhile looks
                    # again instead of sleeping to the lease's end.
                    self._wake_all()
                self._heard(message)
        finally:
            pubsub.close()
