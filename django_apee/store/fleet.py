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
The minute is Redis's clock, not the app servers', so skewed hosts still
land in the same bucket. Fields are plain integers (``HINCRBY``):

* ``<counter>`` and ``<counter>:<label>``: ``stampede_hits``,
  ``computes:ok``, ``fallbacks:redis_error``...;
* histograms: ``<name>_count``, ``<name>_sum_us`` (microseconds) and
  ``<name>_le_<bound>``, the observations in the bucket ending at
  ``<bound>`` (not cumulative; ``+Inf`` for the rest).

A flush that fails (Redis away) puts its counts back for the next one; the
tally's size is bounded by the number of series, not by time. A forked child
starts with an empty tally: its parent flushes what the parent counted.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from django_apee.store import scripts

if TYPE_CHECKING:
    from django_apee.store.lease import ProcessThread

logger = logging.getLogger("django_apee")

PREFIX = "django_apee:stats:"
#: How long a per-minute bucket lives: apee_stats looks back a few minutes.
BUCKET_SECONDS = 3600
DEFAULT_INTERVAL = 5.0


def stats_key(key_prefix: str, alias: str) -> str:
    """The totals hash of ``alias``; minute buckets append ``:m:<minute>``."""
    return f"{PREFIX}{{{key_prefix}:{alias}}}"


def minute_key(key_prefix: str, alias: str, minute: int) -> str:
    return f"{stats_key(key_prefix, alias)}:m:{minute}"


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
            from django_apee.store.lease import ProcessThread  # lease imports client

            self._thread = ProcessThread(_flush_loop, "django-apee-stats")
        self._thread.ensure()


TALLY = Tally()


def flush() -> int:
    """Send this process's counts to Redis now; return the aliases flushed.

    Never raises: an alias whose Redis cannot be reached keeps its counts for
    the next flush.
    """
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


def _send(alias: str, fields: dict[str, int]) -> bool:
    backend = _backend(alias)
    if backend is None:
        return False  # not an ApeeCache alias (any more): nowhere to count
    client = backend.client.get_client(write=True)
    args: list[Any] = [BUCKET_SECONDS]
    for field, amount in sorted(fields.items()):
        args += [field, amount]
    scripts.run(client, "stats", keys=[stats_key(backend.key_prefix, alias)], args=args)
    return True


def _backend(alias: str) -> Any:
    from django.conf import settings
    from django.core.cache import caches

    from django_apee.cache import ApeeCache

    if alias not in settings.CACHES:
        return None
    backend = caches[alias]
    return backend if isinstance(backend, ApeeCache) else None


def interval(alias: str) -> float:
    """The alias's ``STATS_FLUSH_INTERVAL`` (seconds), else the default."""
    from django.conf import settings

    options = (settings.CACHES.get(alias) or {}).get("OPTIONS") or {}
    value = options.get("STATS_FLUSH_INTERVAL", DEFAULT_INTERVAL)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return DEFAULT_INTERVAL  # the system check reports it
    return float(value)


def _flush_loop() -> None:
    while True:
        aliases = {alias for alias, _ in TALLY.pending()}
        try:
            wait = min((interval(a) for a in aliases), default=DEFAULT_INTERVAL)
        except Exception:  # settings not ready yet
            wait = DEFAULT_INTERVAL
        TALLY.wake.wait(wait)
        TALLY.wake.clear()
        flush()


def _flush_at_exit() -> None:
    with contextlib.suppress(Exception):  # teardown: nothing to report to
        flush()


atexit.register(_flush_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=TALLY.forget)
