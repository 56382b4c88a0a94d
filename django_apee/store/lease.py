"""The lease: who recomputes an entry, and how everyone else learns it landed.

* ``acquire`` takes an entry's lease (``SET NX PX`` with a random token) and
  reads the value in the same round trip; given the token of a holder found
  dead (``holder.py``), it takes that lease over, compare-and-swap.
* ``Renewer`` is one thread per process that extends every lease held in that
  process with an owner-checked ``PEXPIRE``, so a long computation keeps its
  lease without a thread per lease, and a lost lease is noticed, not revived.
  Renewals go over the process's identity connection, the one whose client
  id the lease names: it is kept busy, and so alive, by them.
* ``release`` is the fenced end: write only if the lease is still ours, free
  it and publish a wake-up, atomically (``lua/release.lua``).

Wake-ups (``wake.py``) tell waiters when a lease ends. The decisions live in
``core/policy.py``; the engine (``engine/``) composes them.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from django_apee.core import keys
from django_apee.core.policy import renew_every_ms
from django_apee.core.process import ProcessThread
from django_apee.store import scripts

if TYPE_CHECKING:
    from redis import Redis

    from django_apee.store.holder import Identity

logger = logging.getLogger("django_apee")


@dataclass
class Lease:
    """A lease this process holds on one entry."""

    client: Redis
    value_key: str
    lease_key: str
    token: str
    lease_ms: int
    #: The wake-up channel its release publishes on (``wake.wake_channel``).
    channel: str
    lost: threading.Event = field(default_factory=threading.Event)
    renewals: int = 0
    next_renewal: float = 0.0
    #: The process identity whose client id the token names; renewals run
    #: on its connection. None: renewals use ``client``.
    identity: Identity | None = None


@dataclass(frozen=True)
class Attempt:
    """What one acquire round trip found."""

    lease: Lease | None
    lease_pttl_ms: int
    raw: bytes | None
    pttl_ms: int
    #: The current holder's token when the lease was not taken (it names the
    #: holder's client id), else None.
    holder: str | None = None
    #: The lease was taken over from a holder found dead.
    took_over: bool = False


def read(client: Redis, value_key: str) -> tuple[bytes | None, int]:
    """Read a value and its PTTL atomically (one round trip)."""
    return read_reply(scripts.run(client, "read", keys=[value_key], args=[]))


def read_reply(reply: Any) -> tuple[bytes | None, int]:
    """``lua/read.lua``'s reply as (value or None, PTTL)."""
    raw, pttl = reply
    return (raw or None), int(pttl)


@dataclass(frozen=True)
class AcquireCall:
    """One ``lua/acquire.lua`` call, built before it is sent (sync or async)."""

    value_key: str
    lease_key: str
    token: str
    lease_ms: int
    channel: str
    dead: str | None
    identity: Identity | None

    @property
    def keys(self) -> list[str]:
        return [self.value_key, self.lease_key]

    @property
    def args(self) -> list[object]:
        return [self.token, self.lease_ms, self.dead or ""]

    def attempt(self, client: Any, reply: Any) -> Attempt:
        """What the script's ``reply`` says; a taken lease is released
        through ``client``."""
        held, lease_pttl, raw, pttl = reply[:4]
        holder = reply[4] if len(reply) > 4 else None
        taken = Lease(
            client,
            self.value_key,
            self.lease_key,
            self.token,
            self.lease_ms,
            self.channel,
            identity=self.identity,
        )
        if isinstance(holder, bytes):
            holder = holder.decode("utf-8", "replace")
        return Attempt(
            taken if int(held) else None,
            int(lease_pttl),
            raw or None,
            int(pttl),
            holder or None,
            int(held) == 2,
        )


def acquire_call(
    value_key: str,
    lease_ms: int,
    *,
    channel: str,
    holder_id: int | None,
    identity: Identity | None = None,
    dead: str | None = None,
) -> AcquireCall:
    """The call that takes ``value_key``'s lease (see ``acquire``).

    ``holder_id``: the client id the token names (None: nobody, and the
    renewals run on the lease's own client).
    """
    return AcquireCall(
        value_key,
        keys.companion(value_key, keys.LEASE),
        keys.lease_token(holder_id),
        lease_ms,
        channel,
        dead,
        identity if holder_id is not None else None,
    )


def acquire(
    client: Redis,
    value_key: str,
    lease_ms: int,
    *,
    channel: str,
    identity: Identity | None = None,
    dead: str | None = None,
) -> Attempt:
    """Try to take the lease of ``value_key``; read the value meanwhile.

    ``channel`` is where the lease's release wakes its waiters: the wake-up
    channel of the alias's KEY_PREFIX, the one its waiters listen on.
    ``identity``: the token names its client id, so waiters can tell when
    this process is gone. ``dead``: the token of a holder whose client is
    gone; the lease is taken over if it is still that one.
    """
    holder_id = identity.client_id() if identity is not None else None
    call = acquire_call(
        value_key,
        lease_ms,
        channel=channel,
        holder_id=holder_id,
        identity=identity,
        dead=dead,
    )
    reply = scripts.run(client, "acquire", keys=call.keys, args=call.args)
    return call.attempt(client, reply)


def release_args(lease: Lease, payload: bytes | None, px: int | None) -> list[object]:
    """``lua/release.lua``'s ARGV for ending ``lease`` (see ``release``)."""
    return [
        lease.token,
        lease.channel,
        "1" if payload is not None else "0",
        payload if payload is not None else b"",
        "" if px is None else px,
    ]


def release(lease: Lease, payload: bytes | None, px: int | None) -> bool:
    """Store ``payload`` (None: store nothing) only if ``lease`` is still ours.

    Frees the lease and wakes waiters either way. Returns whether the lease
    was still ours; False means someone newer owns the entry, or it was
    invalidated, and nothing was written.
    """
    result = scripts.run(
        lease.client,
        "release",
        keys=[lease.value_key, lease.lease_key],
        args=release_args(lease, payload, px),
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
            client = (
                lease.identity.client() if lease.identity is not None else lease.client
            )
            ours = scripts.run(
                client,
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
