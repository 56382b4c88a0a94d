"""Wake-ups on Redis Cluster by sharded pub/sub: no broadcast to every node.

A cluster forwards every ``PUBLISH`` to every node, so one channel per
KEY_PREFIX (``wake.py``) costs each lease's end a message on every node's
bus. From Redis/Valkey 7 a *shard channel* lives in one hash slot: an
``SPUBLISH`` reaches only the nodes of that slot's shard. So on a cluster:

* an entry's wake-ups go to a channel in the entry's own slot,
  ``keys.slot_channel(value_key, wake_channel(prefix))``: the companions'
  hash tag, ``|``, the prefix's channel;
* the scripts that end a lease are handed the prefix's channel marked with
  ``{}`` in front (``sharded``), and then ``SPUBLISH`` on the entry's slot
  channel, which they build from the lease key (``lua/*.lua``);
* a waiter's ``expect`` subscribes to its entry's channel and returns once
  the subscription is confirmed, before the waiter reads the entry again
  (a wake-up published in between is not missed). A channel stays
  subscribed for ``LINGER_S`` after its last waiter, so the waiters of a
  hot key pay that round trip once, not at every expiry.

``ShardWakeHub`` keeps one redis-py ``ClusterPubSub`` per process and alias,
driven by one thread: it holds one connection per node with channels. After
any error (a failover, a node killed) and after a slot move it is rebuilt:
it refreshes the slot map, subscribes every channel still in use again on
its slot's owner now, and wakes every waiter so none sleeps through the
change. A slot move shows as an ``sunsubscribe`` we did not ask for: a node
that gives a slot up unsubscribes its clients from the slot's shard
channels (Redis/Valkey 7+). Nothing else tells this process: its own
commands may never touch the slot, and the holder that will SPUBLISH on the
new owner is often another process. A waiter whose wake-up is lost anyway
waits to the lease's end, as with ``wake.WakeHub``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import NoPermissionError

from django_apee.core.keys import slot_channel
from django_apee.core.process import ProcessThread
from django_apee.store.wake import WakeHub, warn_denied

if TYPE_CHECKING:
    from redis.cluster import RedisCluster

logger = logging.getLogger("django_apee")

#: What marks a channel argument of the Lua scripts as sharded.
MARK = "{}"
#: Seconds a channel stays subscribed after its last waiter left.
LINGER_S = 30.0
#: The most channels kept subscribed without a waiter (the oldest go first).
MAX_IDLE = 1000
#: The longest ``expect`` waits for its subscription to be confirmed; past
#: it the waiter goes on (its wait is bounded by the lease's life).
CONFIRM_S = 0.5
#: How long the thread listens before it looks at its queue again.
POLL_S = 0.005


def sharded(channel: str) -> str:
    """The channel argument that makes the Lua scripts SPUBLISH."""
    return MARK + channel


def release(users: dict[str, int], idle: dict[str, float], channel: str) -> None:
    """One waiter fewer on ``channel``; with none left it is idle from now
    (unsubscribed after ``LINGER_S`` unless someone waits again)."""
    left = users.get(channel, 1) - 1
    if left > 0:
        users[channel] = left
    else:
        users.pop(channel, None)
        idle[channel] = time.monotonic()


class ShardWakeHub(WakeHub):
    """``wake.WakeHub``'s interface over sharded pub/sub (see the module)."""

    def __init__(self, connect: Callable[[], RedisCluster], channel: str) -> None:
        super().__init__(connect, channel)  # type: ignore[arg-type]
        self._base = channel
        #: What the leases taken for this hub's waiters pass to the scripts.
        self.channel = sharded(channel)
        #: channel -> waiters on it; channel -> when its last waiter left.
        self._users: dict[str, int] = {}
        self._idle: dict[str, float] = {}
        self._confirmed: dict[str, threading.Event] = {}
        self._requests: queue.Queue[tuple[str, str]] = queue.Queue()
        #: Channels this hub unsubscribed from itself (the thread's own).
        self._leaving: set[str] = set()
        #: The slot map may be out of date: refreshed before subscribing.
        self._stale = False
        self._worker = ProcessThread(
            self._run, "django-apee-shard-wake", on_start=self._forget
        )

    def channel_of(self, value_key: str) -> str:
        """The shard channel that ``value_key``'s wake-ups go to."""
        return slot_channel(value_key, self._base)

    # -- waiters ---------------------------------------------------------------

    def expect(self, value_key: str) -> threading.Event:
        """Register a waiter on ``value_key``; return once its channel is
        subscribed (or ``CONFIRM_S`` passed)."""
        channel = self.channel_of(value_key)
        event = threading.Event()
        with self._lock:
            self._worker.ensure()
            self._waiting.setdefault(value_key, set()).add(event)
            self._users[channel] = self._users.get(channel, 0) + 1
            self._idle.pop(channel, None)
            confirmed = self._confirmed.get(channel)
            if confirmed is None:
                confirmed = self._confirmed[channel] = threading.Event()
                self._requests.put(("sub", channel))
        confirmed.wait(CONFIRM_S)
        return event

    def done(self, value_key: str, event: threading.Event) -> None:
        channel = self.channel_of(value_key)
        with self._lock:
            events = self._waiting.get(value_key)
            if events is not None and event in events:
                events.discard(event)
                if not events:
                    del self._waiting[value_key]
                release(self._users, self._idle, channel)

    def reconnect(self) -> None:
        """Subscribe everything again on a fresh ClusterPubSub."""
        self._requests.put(("reconnect", ""))

    # -- the thread --------------------------------------------------------------

    def _forget(self) -> None:
        """A new thread (first use, or after fork): nothing is subscribed."""
        self.subscribed.clear()
        self._confirmed = {}
        self._requests = queue.Queue()
        self._leaving = set()

    def _run(self) -> None:
        backoff = 0.05
        while not self._closed.is_set():
            try:
                self._listen()
            except NoPermissionError:
                warn_denied(self._base, self._connect, sharded=True)
            except Exception:
                logger.debug("django_apee: shard wake-ups lost", exc_info=True)
            if self._closed.is_set():
                break
            if self.subscribed.is_set():
                backoff = 0.05
            self.subscribed.clear()
            self._stale = True
            self._leaving = set()
            with self._lock:
                # What has waiters is subscribed again by the next _listen.
                self._confirmed = {}
                self._idle = {}
                for channel in list(self._users):
                    self._confirmed[channel] = threading.Event()
            self._wake_all()
            time.sleep(backoff)
            backoff = min(backoff * 2, 0.5)

    def _listen(self) -> None:
        cluster: Any = self._connect()
        if self._stale:
            # A slot moved or a node failed: subscribe where slots are now.
            cluster.nodes_manager.initialize()
            self._stale = False
        pubsub: Any = cluster.pubsub()
        try:
            with self._lock:
                wanted = list(self._confirmed)
            for channel in wanted:
                pubsub.ssubscribe(channel)
            self.subscribed.set()
            self._wake_all()  # anyone who registered meanwhile looks again
            while True:
                if not self._serve_requests(pubsub):
                    return
                self._expire_idle(pubsub)
                if not pubsub.shard_channels:
                    # Nothing to listen to: block on the queue instead.
                    with contextlib.suppress(queue.Empty):
                        self._requests.put(self._requests.get(timeout=1.0))
                    continue
                message = pubsub.get_sharded_message(timeout=POLL_S)
                if message is not None and not self._on_message(message):
                    return
        finally:
            try:
                pubsub.close()
            except Exception:
                logger.debug("django_apee: closing shard pub/sub", exc_info=True)

    def _serve_requests(self, pubsub: Any) -> bool:
        """Send the subscriptions asked for; False: rebuild the pub/sub."""
        while True:
            try:
                kind, channel = self._requests.get_nowait()
            except queue.Empty:
                return True
            if kind == "reconnect":
                return False
            pubsub.ssubscribe(channel)

    def _expire_idle(self, pubsub: Any) -> None:
        now = time.monotonic()
        with self._lock:
            old = [
                channel
                for channel, since in self._idle.items()
                if now - since > LINGER_S
            ]
            if len(self._idle) - len(old) > MAX_IDLE:
                ordered = sorted(self._idle, key=self._idle.__getitem__)
                old = ordered[: len(self._idle) - MAX_IDLE]
            for channel in old:
                del self._idle[channel]
                self._confirmed.pop(channel, None)
        for channel in old:
            self._leaving.add(channel)
            pubsub.sunsubscribe(channel)

    def _on_message(self, message: dict[str, Any]) -> bool:
        """Act on one message; False: rebuild the pub/sub (a slot moved)."""
        kind = message.get("type")
        kind = kind.decode() if isinstance(kind, bytes) else kind
        channel = message.get("channel")
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        if kind == "ssubscribe":
            with self._lock:
                confirmed = self._confirmed.get(channel)
            if confirmed is not None:
                confirmed.set()
        elif kind == "smessage":
            key = message["data"]
            self._wake(key.decode() if isinstance(key, bytes) else str(key))
        elif kind == "sunsubscribe":
            if channel in self._leaving:
                self._leaving.discard(channel)  # we asked for it
            else:
                # The node gave the channel's slot up (resharding).
                logger.debug("django_apee: %s's slot moved", channel)
                return False
        return True
