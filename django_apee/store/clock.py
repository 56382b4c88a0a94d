"""Redis's clock, read without a round trip: a per-process offset to ``TIME``.

Why
===
A hit used to run a script that returned the value *and* its PTTL, because
the PTTL was the only way to learn an entry's age from Redis's clock. Now
every entry carries the instant it was written, in Redis's clock
(``Meta.written_ms``), and each process keeps its offset to that clock, so a
hit is a plain ``GET``: the age is ``redis_now - written_ms``, computed
locally.

How the offset is measured
==========================
As NTP does, from round trips: read ``T0`` (this process's monotonic clock),
ask Redis ``TIME``, read ``T1``. Redis read its clock somewhere between
``T0`` and ``T1``, so ``redis - (T0 + T1) / 2`` is the offset with an error
of at most half the round trip. Of a few samples in a row the one with the
shortest round trip is kept (the least queueing, the tightest bound). The
error then grows by :data:`DRIFT_PPM` for every second since the sample
(both clocks may be slewed by NTP, up to 500 ppm each), and the offset is
sampled again every :data:`REFRESH_S` seconds, in a short-lived background
thread: only a process's very first read waits for a sample.

The monotonic clock is used locally, not the wall clock, so a step of this
host's wall clock (NTP, an operator) cannot move the estimate; after a
``fork()`` the sample stays valid (the monotonic clock is the machine's),
and a refresh begun in the parent is simply started again in the child.

Why clock skew between app hosts does not matter
================================================
No host ever compares its own clock with another's: every deadline is in
Redis's clock, and each host only needs its own offset *to Redis*, measured
as above. Writers stamp :meth:`RedisClock.earliest_ms` (the earliest Redis
time it can be), readers compare with :meth:`RedisClock.latest_ms` (the
latest), so the age a reader computes is never less than the true age:
errors only send a read to the slower path that asks Redis for the PTTL.
And nothing served by the lean path can be past its hard timeout whatever
the offset: it serves only entries without a grace period, which Redis
deletes at their hard timeout (``PX``).

What it does not cover: a Redis whose own clock jumps (an operator setting
it, a failover to a primary whose clock differs), or a host suspended and
resumed (the monotonic clock stops meanwhile), are wrong until the next
sample, at most :data:`REFRESH_S` later; even then only the soft deadline
is misjudged (a refresh comes late or early), never the hard one.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from django_apee.store.errors import REDIS_ERRORS

if TYPE_CHECKING:
    from redis import Redis

__all__ = ["DRIFT_PPM", "REFRESH_S", "RedisClock", "Sample"]

#: How often the offset is measured again, in seconds.
REFRESH_S = 15.0
#: Round trips per measurement; the shortest one is kept.
SAMPLES = 4
#: How fast the two clocks may drift apart, in parts per million: NTP slews
#: a clock by at most 500 ppm, and both may be slewed, in opposite senses.
DRIFT_PPM = 1000
#: After a failed measurement, the next one is tried this much later at
#: the earliest (a Redis that is away must not cost every read a timeout).
RETRY_S = 1.0


class Sample(NamedTuple):
    """One measurement: Redis time = local monotonic time (ms) + offset_ms."""

    offset_ms: float
    #: Half the round trip of the sample, plus TIME's rounding.
    error_ms: float
    #: The local monotonic time of the sample, in seconds.
    taken: float


def measure(
    client: Redis,
    samples: int = SAMPLES,
    monotonic: Callable[[], float] = time.monotonic,
) -> Sample:
    """Measure the offset from ``samples`` round trips; keep the shortest."""
    best: Sample | None = None
    for _ in range(samples):
        before = monotonic()
        seconds, micros = client.time()
        after = monotonic()
        redis_ms = seconds * 1000 + micros / 1000
        half = (after - before) * 500  # half the round trip, in ms
        sample = Sample(redis_ms - (before + after) * 500, half + 0.001, after)
        if best is None or sample.error_ms < best.error_ms:
            best = sample
    assert best is not None
    return best


class RedisClock:
    """This process's view of one Redis server's clock. Thread-safe.

    ``connect`` returns the client to sample: the primary, whose clock the
    writers stamp entries with (a replica's reader compares with the same
    clock through it).
    """

    def __init__(
        self,
        connect: Callable[[], Redis],
        *,
        refresh_s: float = REFRESH_S,
        samples: int = SAMPLES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connect = connect
        self._refresh_s = refresh_s
        self._samples = samples
        self._monotonic = monotonic
        self._sample: Sample | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        #: The pid of the process whose thread is measuring now; 0: none.
        self._refreshing = 0
        self._retry_at = 0.0

    @property
    def sample(self) -> Sample | None:
        """The measurement in use, or None before the first one succeeded."""
        return self._sample

    def latest_ms(self) -> float | None:
        """The latest Redis time it can be now (ms since the epoch); None if
        Redis's clock could not be measured.

        Every lean hit asks: ``_current`` is written out here, and its
        monotonic reading is the one the answer uses (taken no earlier, so
        the bound stays the latest possible time).
        """
        sample = self._sample
        now = self._monotonic()
        if sample is None:
            sample = self._first()
            if sample is None:
                return None
            now = self._monotonic()
        elif now - sample.taken > self._refresh_s:
            self._refresh_in_background()
        drift = (now - sample.taken) * DRIFT_PPM / 1000
        return now * 1000 + sample.offset_ms + sample.error_ms + drift

    def earliest_ms(self) -> int:
        """The earliest Redis time it can be now, in whole ms; 0 if unknown."""
        sample = self._current()
        if sample is None:
            return 0
        now = self._monotonic()
        drift = (now - sample.taken) * DRIFT_PPM / 1000
        return max(0, int(now * 1000 + sample.offset_ms - sample.error_ms - drift))

    def refresh(self) -> Sample | None:
        """Measure now, in this thread; None (and no change) if Redis failed."""
        try:
            sample = measure(self._connect(), self._samples, self._monotonic)
        except REDIS_ERRORS:
            self._retry_at = self._monotonic() + RETRY_S
            return None
        self._sample = sample
        return sample

    def _current(self) -> Sample | None:
        sample = self._sample
        if sample is None:
            return self._first()
        if self._monotonic() - sample.taken > self._refresh_s:
            self._refresh_in_background()
        return sample

    def _first(self) -> Sample | None:
        """The first measurement: the one time a read waits for one."""
        self._after_fork()
        if self._monotonic() < self._retry_at:
            return None
        with self._lock:
            if self._sample is None:
                self.refresh()
            return self._sample

    def _refresh_in_background(self) -> None:
        self._after_fork()
        pid = os.getpid()
        if self._monotonic() < self._retry_at:
            return
        with self._lock:
            if self._refreshing == pid:
                return
            self._refreshing = pid
        thread = threading.Thread(
            target=self._background, name="django-apee-clock", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down, or out of threads
            self._refreshing = 0

    def _background(self) -> None:
        try:
            self.refresh()
        finally:
            self._refreshing = 0

    def _after_fork(self) -> None:
        """A lock or a refresh inherited from the parent belongs to a thread
        that does not exist here."""
        if self._pid != os.getpid():
            self._pid = os.getpid()
            self._lock = threading.Lock()
            self._refreshing = 0
