"""What the engine needs from the layers around it, and nothing more.

The engine decides and coordinates; it does not know Django, the cache
backend, or Prometheus. The Django surface hands it:

* a :class:`Store`: the primary Redis connection and the entry codec (the
  backend's envelope, with its error counting and legacy reads), which binds
  every entry to its Redis key;
* a :class:`Tuning`: the knobs, parsed once from OPTIONS;
* an :class:`Events` sink: where every decision is counted (the metrics of
  ``observe/metrics.py`` satisfy it; tests may pass their own).

So each engine class can be built and tested against a real Redis without a
Django cache alias, and the surface above can change without touching it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from django_apee.core.policy import Policy

if TYPE_CHECKING:
    from redis import Redis

    from django_apee.core.envelope import Meta


class Store(Protocol):
    """Redis and the codec, as the engine uses them."""

    def connection(self) -> Redis:
        """The primary: leases, fenced writes and wake-ups never go to a replica."""

    def near_hit(self, made: str) -> Any:
        """The value of ``made`` fresh in process memory (a near cache, where
        the alias has one; counted there), or MISSING."""

    def read(self, connection: Redis, made: str) -> Any:
        """The bytes stored under ``made`` (None: absent), by ``GET``; a near
        cache keeps what it finds fresh."""

    def decode_entry(self, made: str, raw: bytes) -> tuple[Any, Meta | None] | None:
        """Value and metadata of the bytes stored under ``made``; None (already
        counted) if unreadable, or not ``made``'s (the MAC binds them to it)."""

    def encode_entry(self, made: str, value: Any, meta: Meta) -> bytes:
        """The bytes to store under ``made`` for ``value`` written with ``meta``."""


class Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class Histogram(Protocol):
    def observe(self, value: float) -> None: ...


class Events(Protocol):
    """Where the engine counts what it did (one alias)."""

    hits: Counter
    misses: Counter
    stale_served: Counter
    early_refreshes: Counter
    herd_misses: Counter
    lease_renewals: Counter
    lease_lost: Counter
    #: Leases taken over from a holder whose Redis client was gone.
    lease_takeovers: Counter
    redis_errors: Counter
    compute_seconds: Histogram
    lease_wait_seconds: Histogram

    def computed(self, outcome: str) -> None:
        """A computation under a lease ended: ``ok`` or ``error``."""

    def fallback(self, reason: str) -> None:
        """A value was computed (or a wait given up) without coordination."""

    def decided(self, made: str, state: str, decision: str, waited: float) -> None:
        """What was done with one key, for a per-request trace.

        A herd-mode decision of a plain get on ``made`` (its entry's
        ``state``: ``early``, ``stale``, ``expired`` or ``absent``; what
        ``decision`` the reader got: ``core.decisions.HERD``), or
        ``core.decisions.WAITED_IN_PROCESS``: a stampede-safe caller waited
        ``waited`` seconds for the computation another thread of its process
        ran. The counters above cannot say which key; a debugging tool
        (``observe/trace.py``) records this, the metrics sink ignores it.
        Never reported for a fresh hit: the hit path pays nothing for it.
        """


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Tuning:
    """The engine's knobs for one alias (see ``conf.py`` for their OPTIONS)."""

    policy: Policy = field(default_factory=Policy)
    #: The longest any caller waits for another's computation, in seconds.
    wait_timeout: float = 10.0
    #: ``background`` or ``inline``: who recomputes a servable value.
    refresh: str = "background"
    refresh_workers: int = 4
    breaker_threshold: int = 3
    breaker_cooldown: float = 1.0
    #: Herd mode: a plain get past the soft timeout may miss for one reader.
    herd: bool = True
    herd_exclude: tuple[str, ...] = ()
    #: Seconds a plain get of an absent key waits for its first reader.
    cold_miss_wait: float = 0.0
    #: Seconds between a waiter's looks at whether the lease holder's Redis
    #: client still exists (``core/takeover.py``); 0: never look.
    holder_check: float = 0.1
    #: Run at the end of a background refresh thread's work (the Django
    #: surface closes the thread's database connections there).
    thread_done: Callable[[], None] = _nothing
