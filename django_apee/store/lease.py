"""The lease: who recomputes an entry, and how everyone else learns it landed.

* ``acquire`` takes an entry's lease (``SET NX PX`` with a random token) and
  reads the value in the same round trip.
* ``Renewer`` is one thread per process that extends every lease held in that
  process with an owner-checked ``PEXPIRE``, so a long computation keeps its
  lease without a thread per lease, and a lost lease is noticed, not revived.
* ``release`` is the fenced end: write only if the lease is still ours, free
  it and publish a wake-up, atomically (``lua/release.lua``).
* ``WakeHub`` is one pub/sub connection per process and Redis: waiters block
  on an in-process event, so the number of blocked Redis connections does not
  grow with the number of waiting threads. A missed message costs a waiter at
  most the lease's remaining life: it times its wait to the lease's PTTL.

All Redis I/O of the stampede path lives here; the decisions live in
``policy.py`` and their composition in ``stampede.py``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django_apee.client import WAKE_CHANNEL
from django_apee.core import keys
from django_apee.core.policy import renew_every_ms
from django_apee.store import scripts

if TYPE_CHECKING:
    from redis import Redis

logger = logging.getLogger("django_apee")

# Wake-ups travel on one pub/sub channel (WAKE_CHANNEL); messages carry the
# value key. One channel for all keys keeps one subscription per process;
# computes are rare by design, so every process seeing every wake-up costs
# little.


class ProcessThread:
    """One daemon thread per process, started on first need.

    Threads do not survive ``fork()``: a worker forked from a server that
    had already started one (gunicorn ``--preload``) starts its own.
    """

    def __init__(
        self,
        target: Callable[[], None],
        name: str,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self._target = target
        self._name = name
        self._on_start = on_start
        self._thread: threading.Thread | None = None
        self._pid = 0

    def ensure(self) -> None:
        """Start the thread unless it runs in this process; callers hold a lock."""
        thread = self._thread
        if thread is not None and thread.is_alive() and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        if self._on_start is not None:
            self._on_start()
        self._thread = threading.Thread(
            target=self._target, name=self._name, daemon=True
        )
        self._thread.start()


@dataclass
class Lease:
    """A lease this process holds on one entry."""

    client: Redis
    value_key: str
    lease_key: str
    token: str
    lease_ms: int
    lost: threading.Event = field(default_factory=threading.Event)
    renewals: int = 0
    next_renewal: float = 0.0


@dataclass(frozen=True)
class Attempt:
    """What one acquire round trip found."""

    lease: Lease | None
    lease_pttl_ms: int
    raw: bytes | None
    pttl_ms: int


def read(client: Redis, value_key: str) -> tuple[bytes | None, int]:
    """Read a value and its PTTL atomically (one round trip)."""
    raw, pttl = scripts.run(client, "read", keys=[value_key], args=[])
    return (raw or None), int(pttl)


def acquire(client: Redis, value_key: str, lease_ms: int) -> Attempt:
    """Try to take the lease of ``value_key``; read the value meanwhile."""
    lease_key = keys.companion(value_key, keys.LEASE)
    token = keys.lease_token()
    held, lease_pttl, raw, pttl = scripts.run(
        client, "acquire", keys=[value_key, lease_key], args=[token, lease_ms]
    )
    lease = Lease(client, value_key, lease_key, token, lease_ms) if int(held) else None
    return Attempt(lease, int(lease_pttl), raw or None, int(pttl))


def release(lease: Lease, payload: bytes | None, px: int | None) -> bool:
    """Store ``payload`` (None: store nothing) only if ``lease`` is still ours.

    Frees the lease and wakes waiters either way. Returns whether the lease
    was still ours; False means someone newer owns the entry, or it was
    invalidated, and nothing was written.
    """
    args = [
        lease.token,
        WAKE_CHANNEL,
        "1" if payload is not None else "0",
        payload if payload is not None else b"",
        "" if px is None else px,
    ]
    result = scripts.run(
        lease.client, "release", keys=[lease.value_key, lease.lease_key], args=args
    )
    return bool(int(result))


class Renewer:
    """One thread per process that keeps every held lease alive.

    Each lease is extended every quarter of its length (``policy``), so two
    missed renewals in a row still leave time. A renewal that finds the lease
    gone or someone else's sets ``lease.lost`` and stops renewing it. A Redis
    error does not: the lease may still be ours, and ``release`` is fenced.
    """

    def __init__(self) -> None:
        self._leases: dict[int, Lease] = {}
        self._cond = threading.Condition()
        self._worker = ProcessThread(self._run, "django-apee-lease-renewer")

    def track(self, lease: Lease) -> None:
        interval = renew_every_ms(lease.lease_ms) / 1000
        lease.next_renewal = time.monotonic() + interval
        with self._cond:
            self._worker.ensure()
            self._leases[id(lease)] = lease
            self._cond.notify()

    def untrack(self, lease: Lease) -> None:
        with self._cond:
            self._leases.pop(id(lease), None)

    def held(self) -> int:
        with self._cond:
            return len(self._leases)

    def _run(self) -> None:
        while True:
            with self._cond:
                now = time.monotonic()
                due = [
                    lease
                    for lease in self._leases.values()
                    if lease.next_renewal <= now
                ]
                if not due:
                    upcoming = min(
                        (lease.next_renewal for lease in self._leases.values()),
                        default=now + 1.0,
                    )
                    self._cond.wait(timeout=max(0.001, min(1.0, upcoming - now)))
                    continue
            for lease in due:
                self._renew(lease)

    def _renew(self, lease: Lease) -> None:
        lease.next_renewal = time.monotonic() + renew_every_ms(lease.lease_ms) / 1000
        try:
            ours = scripts.run(
                lease.client,
                "renew",
                keys=[lease.lease_key],
                args=[lease.token, lease.lease_ms],
            )
        except Exception:  # a blip: keep trying; the release is fenced anyway
            logger.debug("django_apee: lease renewal failed", exc_info=True)
            return
        if int(ours):
            lease.renewals += 1
        else:
            lease.lost.set()
            self.untrack(lease)


RENEWER = Renewer()


class WakeHub:
    """Wake-ups for one Redis, over one pub/sub connection per process.

    ``expect(key)`` registers interest *before* the caller looks again (so a
    wake-up that lands in between is not missed), ``wait`` blocks on it, and
    ``done`` unregisters. When the subscription is down, waits simply run to
    their timeout, which the caller sets to the lease's remaining life.
    """

    def __init__(self, connect: Any) -> None:
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
        pubsub = self._connect().pubsub(ignore_subscribe_messages=True)
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


_HUBS: dict[str, WakeHub] = {}
_HUBS_LOCK = threading.Lock()


def wake_hub(name: str, connect: Any) -> WakeHub:
    """The process's WakeHub for the Redis called ``name`` (its URL)."""
    with _HUBS_LOCK:
        hub = _HUBS.get(name)
        if hub is None:
            hub = _HUBS[name] = WakeHub(connect)
        return hub
