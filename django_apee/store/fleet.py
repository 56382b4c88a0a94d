"""Fleet-wide counters: every process's apee counts, summed in Redis.

Prometheus scrapes processes; ``manage.py apee_stats`` wants the fleet. Each
process adds its counts to an in-process tally (an integer add under a lock,
no I/O), and one daemon thread per process sends the tally to Redis in one
script call per alias every ``STATS_FLUSH_INTERVAL`` seconds (default 5) and
at exit. The hit path never waits for Redis on account of these counters.

Layout in Redis, per alias (``P`` is the alias's KEY_PREFIX, ``A`` its name)::

    django_apee:stats:{P:A}             hash: totals since the first flush
    django_apee:stats:{P:A}:m:<minute>  hash: what was flushed during that
                                        minute (Unix minute of Redis's TIME),
                                        expiring after an hour

Both keys share one hash tag, so the script touches one Redis Cluster slot.
On a cluster the counters are spread over ``SHARDS`` such pairs, one hash
tag each, so one primary does not take every flush of the fleet.
The minute is Redis's clock, not the app servers', so skewed hosts still
land in the same bucket: each flush reads ``TIME`` first and passes both
keys to the script (a script must declare every key it writes). Fields are
plain integers (``HINCRBY``):

* ``<counter>`` and ``<counter>:<label>``: ``stampede_hits``,
  ``computes:ok``, ``fallbacks:redis_error``...;
* histograms: ``<name>_count``, ``<name>_sum_us`` (microseconds) and
  ``<name>_le_<bound>``, the observations in the bucket ending at
  ``<bound>`` (not cumulative; ``+Inf`` for the rest).

A flush that fails (Redis away) puts its counts back for the next one; the
tally's size is bounded by the number of series, not by time. A forked child
starts with an empty tally: its parent flushes what the parent counted.

Where an alias's counts go is told by the backend that counts them
(``register``): its own connection, key prefix and flush interval. Counts of
an alias nobody registered wait in the tally until someone does.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.cluster import RedisCluster

from django_apee.core.process import ProcessThread
from django_apee.store import scripts

if TYPE_CHECKING:
    from redis import Redis

logger = logging.getLogger("django_apee")

PREFIX = "django_apee:stats:"
#: How long a per-minute bucket lives: apee_stats looks back a few minutes.
BUCKET_SECONDS = 3600
DEFAULT_INTERVAL = 5.0


#: On Redis Cluster an alias's counters are spread over this many shards,
#: each a totals hash and its minute buckets under a hash tag of its own (so
#: a slot of its own): a process adds to shard ``pid % SHARDS``, and
#: ``apee_stats`` sums them all. On one Redis there is one shard, shard 0,
#: whose keys are the ones above.
SHARDS = 16


def stats_key(key_prefix: str, alias: str, shard: int = 0) -> str:
    """The totals hash of ``alias`` (of one ``shard`` on a cluster); minute
    buckets append ``:m:<minute>``."""
    tag = f"{key_prefix}:{alias}" if shard == 0 else f"{key_prefix}:{alias}:{shard}"
    return f"{PREFIX}{{{tag}}}"


def minute_key(key_prefix: str, alias: str, minute: int, shard: int = 0) -> str:
    return f"{stats_key(key_prefix, alias, shard)}:m:{minute}"


def shards_of(client: Redis) -> range:
    """The shards an alias's counters use on ``client``'s deployment."""
    return range(SHARDS if isinstance(client, RedisCluster) else 1)


def shard_for(client: Redis) -> int:
    """The shard this process adds to: spread over the cluster by pid."""
    return os.getpid() % len(shards_of(client))


class Tally:
    """This process's counts not yet flushed, by (alias, field)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], int] = {}
        self._thread: ProcessThread | None = None
        self.wake = threading.Event()

    def add(self, slot: tuple[str, str], amount: int) -> None:
        with self._lock:
            found = self._pending.get(slot)
            if found is None:
                # First count since the last flush: make sure this process
                # has a flusher (here, not per add: it costs a pid check).
                self._ensure_thread()
                found = 0
            self._pending[slot] = found + amount

    def take(self) -> dict[tuple[str, str], int]:
        with self._lock:
            taken, self._pending = self._pending, {}
        return taken

    def put_back(self, taken: dict[tuple[str, str], int]) -> None:
        with self._lock:
            for slot, amount in taken.items():
                self._pending[slot] = self._pending.get(slot, 0) + amount

    def pending(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._pending)

    def forget(self) -> None:
        """After fork: the counts belong to the parent, which flushes them."""
        self._lock = threading.Lock()
        self._pending = {}

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = ProcessThread(_flush_loop, "django-apee-stats")
        self._thread.ensure()


TALLY = Tally()

#: Called before each flush takes the tally: counts kept elsewhere until then
#: (``observe.metrics.settle``) join it.
_BEFORE_FLUSH: list[Callable[[], None]] = []


def before_flush(hook: Callable[[], None]) -> None:
    """Run ``hook`` before every flush (it must not raise)."""
    _BEFORE_FLUSH.append(hook)


def flush() -> int:
    """Send this process's counts to Redis now; return the aliases flushed.

    Never raises: an alias whose Redis cannot be reached keeps its counts for
    the next flush.
    """
    for hook in _BEFORE_FLUSH:
        hook()
    by_alias: dict[str, dict[str, int]] = {}
    for (alias, field), amount in TALLY.take().items():
        if amount:
            by_alias.setdefault(alias, {})[field] = amount
    flushed = 0
    for alias, fields in by_alias.items():
        try:
            sent = _send(alias, fields)
        except Exception:  # Redis down, settings gone: keep for the next flush
            logger.debug("django_apee: stats flush for %s failed", alias, exc_info=True)
            sent = False
            TALLY.put_back({(alias, field): n for field, n in fields.items()})
        flushed += sent
    return flushed


@dataclass(frozen=True)
class Sink:
    """Where one alias's counts go: its Redis, key prefix and flush interval."""

    connect: Callable[[], Redis]
    key_prefix: str
    interval: float = DEFAULT_INTERVAL


_SINKS: dict[str, Sink] = {}


def register(alias: str, sink: Sink) -> None:
    """Send ``alias``'s counts to ``sink`` from now on (the latest one wins)."""
    _SINKS[alias] = sink


def sink_of(alias: str) -> Sink | None:
    """Where ``alias``'s counts go, if a backend said so."""
    return _SINKS.get(alias)


def _send(alias: str, fields: dict[str, int]) -> bool:
    sink = _SINKS.get(alias)
    if sink is None:
        raise LookupError(f"no fleet sink registered for {alias!r}")
    client = sink.connect()
    # Redis's clock, read first so the script is told every key it writes
    # (one more round trip per flush interval, never on the hit path).
    now, _ = client.time()
    args: list[Any] = [BUCKET_SECONDS, now]
    for field, amount in sorted(fields.items()):
        args += [field, amount]
    keys = stats_keys(sink.key_prefix, alias, now, shard_for(client))
    scripts.run(client, "stats", keys=keys, args=args)
    return True


def stats_keys(
    key_prefix: str, alias: str, unix_seconds: int, shard: int = 0
) -> list[str]:
    """The keys one flush writes at ``unix_seconds``: totals, then the minute."""
    minute = int(unix_seconds) // 60
    return [
        stats_key(key_prefix, alias, shard),
        minute_key(key_prefix, alias, minute, shard),
    ]


def interval(alias: str) -> float:
    """The alias's ``STATS_FLUSH_INTERVAL`` (seconds), else the default."""
    sink = _SINKS.get(alias)
    return DEFAULT_INTERVAL if sink is None else sink.interval


def _flush_loop() -> None:
    while True:
        # Registered aliases too: right after a flush nothing is pending,
        # and waiting the default 5 s then would ignore a shorter interval.
        aliases = {alias for alias, _ in TALLY.pending()} | set(_SINKS)
        wait = min((interval(a) for a in aliases), default=DEFAULT_INTERVAL)
        TALLY.wake.wait(wait)
        TALLY.wake.clear()
        flush()


def _flush_at_exit() -> None:
    with contextlib.suppress(Exception):  # teardown: nothing to report to
        flush()


atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=TALLY.forget)
