"""Sharded wake-ups for coroutines on Redis Cluster: ``shardwake.py`` on a loop.

The sync ``ShardWakeHub`` wakes threads; this hub wakes the coroutines of
one event loop, over the same shard channels (``keys.slot_channel``: the
entry's hash tag, ``|``, the prefix's channel), published by the same
scripts (``SPUBLISH``). redis-py's async ``ClusterPubSub`` polls its nodes
in turn, one read timeout each; instead this hub keeps, per node that owns
a channel in use, one plain ``redis.asyncio`` pub/sub connection (built from
the cluster client's node: same credentials, TLS, timeouts) and one task
reading it, so a wake-up is read as soon as it arrives.

``expect`` does not wait for the ``SSUBSCRIBE`` to be confirmed: when it is,
every waiter of the loop is woken to look again, so a wake-up published
before the subscription is not missed (as ``wake.AsyncWakeHub`` does). A
channel stays subscribed ``LINGER_S`` after its last waiter. After any
error, and when a node gives a channel's slot up (an ``sunsubscribe`` we
did not ask for), every connection is dropped, the slot map refreshed, the
channels in use subscribed again where their slots are now, and every
waiter woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
import redis.asyncio.connection as aioconnection
from redis.exceptions import NoPermissionError
from redis.maint_notifications import MaintNotificationsConfig

from django_apee.core.keys import slot_channel
from django_apee.store.aio.wake import _stop_if_cancelled, cancelled
from django_apee.store.shardwake import LINGER_S, MARK, MAX_IDLE, release
from django_apee.store.wake import (
    POLL_S,
    Waiters,
    pause_after_failure,
    warn_denied,
)

if TYPE_CHECKING:
    from redis.asyncio.cluster import ClusterNode, RedisCluster

logger = logging.getLogger("django_apee")

#: A node's connection arguments that belong to the cluster client's own
#: pools (its maintenance notifications, its registries): not passed on.
_NODE_INTERNAL = ("maint_notifications", "oss_cluster_maint", "himport_registry")


class _Broken(Exception):
    """A node's subscription ended: rebuild them all."""


class AsyncShardWakeHub(Waiters[asyncio.Event]):
    """Wake-ups for one loop's coroutines over sharded pub/sub (see the module)."""

    def __init__(
        self, client: RedisCluster, channel: str, sync_connect: Callable[[], Any]
    ) -> None:
        super().__init__(asyncio.Event, channel)
        self._base = channel[len(MARK) :] if channel.startswith(MARK) else channel
        self._client = client
        #: For the NOPERM advice only (which ACL user to grant).
        self._sync_connect = sync_connect
        #: Set while the subscriptions are up (every node's reader runs).
        self.subscribed = asyncio.Event()
        #: channel -> waiters on it; channel -> when its last waiter left.
        self._users: dict[str, int] = {}
        self._idle: dict[str, float] = {}
        #: Channels subscribed or asked for, and those this hub dropped itself.
        self._wanted: set[str] = set()
        self._leaving: set[str] = set()
        self._requests: asyncio.Queue[str] | None = None
        self._broken: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        #: node name -> its pub/sub and reader task.
        self._nodes: dict[str, tuple[Any, asyncio.Task[None]]] = {}
        self._stale = False

    def channel_of(self, value_key: str) -> str:
        """The shard channel that ``value_key``'s wake-ups go to."""
        return slot_channel(value_key, self._base)

    # -- waiters ---------------------------------------------------------------

    def expect(self, value_key: str) -> asyncio.Event:
        event = super().expect(value_key)
        channel = self.channel_of(value_key)
        self._users[channel] = self._users.get(channel, 0) + 1
        self._idle.pop(channel, None)
        if channel not in self._wanted and self._requests is not None:
            self._wanted.add(channel)
            self._requests.put_nowait(channel)
        return event

    def done(self, value_key: str, event: asyncio.Event) -> None:
        with self._lock:
            registered = event in self._waiting.get(value_key, ())
        super().done(value_key, event)
        if not registered:
            return
        release(self._users, self._idle, self.channel_of(value_key))

    def _listening(self) -> None:
        if self._task is None or self._task.done():
            self.subscribed.clear()
            self._requests = asyncio.Queue()
            self._broken = asyncio.Event()
            self._wanted = set()
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="django-apee-shard-wake"
            )

    def reconnect(self) -> None:
        """Subscribe everything again (nothing calls it on a cluster yet)."""
        if self._broken is not None:
            self._broken.set()

    async def aclose(self) -> None:
        """Stop listening; waiters still registered wait to their timeout."""
        task, self._task = self._task, None
        await cancelled(task)

    # -- the tasks ---------------------------------------------------------------

    async def _run(self) -> None:
        pause = 0.0
        while True:
            _stop_if_cancelled()
            try:
                await self._serve()
            except NoPermissionError:
                warn_denied(self._base, self._sync_connect, sharded=True)
            except Exception:
                logger.debug("django_apee: async shard wake-ups lost", exc_info=True)
            finally:
                await self._drop_nodes()
            pause = pause_after_failure(pause, self.subscribed.is_set())
            self.subscribed.clear()
            self._stale = True
            # What has waiters is subscribed again by the next _serve.
            self._idle = {}
            self._wanted = set(self._users)
            self._wake_all()
            await asyncio.sleep(pause)

    async def _serve(self) -> None:
        assert self._requests is not None
        assert self._broken is not None
        self._broken.clear()
        if self._stale:  # a slot moved or a node failed: ask where slots are
            await self._client.nodes_manager.initialize()
            self._stale = False
        for channel in list(self._wanted):
            await self._subscribe(channel)
        self.subscribed.set()
        while True:
            # redis-py can swallow a cancellation that lands in a command
            # (see ``_stop_if_cancelled``): the loop's shutdown would wait.
            _stop_if_cancelled()
            while not self._requests.empty():
                channel = self._requests.get_nowait()
                if channel in self._wanted:
                    await self._subscribe(channel)
            await self._expire_idle()
            get = asyncio.ensure_future(self._requests.get())
            broken = asyncio.ensure_future(self._broken.wait())
            try:
                await asyncio.wait(
                    {get, broken}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                broken.cancel()
                if not get.cancel() and not get.cancelled():
                    self._requests.put_nowait(get.result())  # looked at next turn
            if self._broken.is_set():
                raise _Broken("a node's shard subscription ended")

    async def _subscribe(self, channel: str) -> None:
        node = self._client.get_node_from_key(channel)
        if node is None:
            raise _Broken(f"no node owns {channel!r}")
        found = self._nodes.get(node.name)
        if found is None:
            pubsub = _node_client(node).pubsub()
            await pubsub.ssubscribe(channel)
            reader = asyncio.get_running_loop().create_task(
                self._read(pubsub), name="django-apee-shard-wake-node"
            )
            self._nodes[node.name] = (pubsub, reader)
        else:
            await found[0].ssubscribe(channel)

    async def _read(self, pubsub: Any) -> None:
        """Read one node's messages until it fails; then rebuild all."""
        try:
            while True:
                message = await pubsub.get_message(timeout=POLL_S)
                _stop_if_cancelled()
                if message is not None:
                    self._on_message(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.debug("django_apee: a node's shard wake-ups lost", exc_info=True)
            if self._broken is not None:
                self._broken.set()

    def _on_message(self, message: dict[str, Any]) -> None:
        kind = _text(message.get("type"))
        if kind == "ssubscribe":
            # Published before the subscription was up: look again.
            self._wake_all()
        elif kind == "smessage":
            self._wake(_text(message["data"]))
        elif kind == "sunsubscribe":
            channel = _text(message.get("channel"))
            if channel in self._leaving:
                self._leaving.discard(channel)  # we asked for it
            else:
                # The node gave the channel's slot up (resharding).
                logger.debug("django_apee: %s's slot moved", channel)
                if self._broken is not None:
                    self._broken.set()

    async def _expire_idle(self) -> None:
        now = time.monotonic()
        old = [c for c, since in self._idle.items() if now - since > LINGER_S]
        if len(self._idle) - len(old) > MAX_IDLE:
            ordered = sorted(self._idle, key=self._idle.__getitem__)
            old = ordered[: len(self._idle) - MAX_IDLE]
        for channel in old:
            del self._idle[channel]
            self._wanted.discard(channel)
            node = self._client.get_node_from_key(channel)
            found = self._nodes.get(node.name) if node is not None else None
            if found is not None:
                self._leaving.add(channel)
                await found[0].sunsubscribe(channel)

    async def _drop_nodes(self) -> None:
        nodes, self._nodes = self._nodes, {}
        self._leaving = set()
        for pubsub, reader in nodes.values():
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            with contextlib.suppress(Exception):
                await pubsub.aclose()
                await pubsub.connection_pool.disconnect()


def _node_client(node: ClusterNode) -> aioredis.Redis:
    """A client of its own on ``node``, with the cluster client's settings
    for it (a pub/sub connection is held for as long as it listens)."""
    kwargs = {
        name: value
        for name, value in node.connection_kwargs.items()
        if not name.startswith(_NODE_INTERNAL)
    }
    pool = aioconnection.ConnectionPool(
        connection_class=node.connection_class,
        maint_notifications_config=MaintNotificationsConfig(enabled=False),
        **kwargs,
    )
    return aioredis.Redis(connection_pool=pool)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
