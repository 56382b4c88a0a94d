"""Per-request traces of stampede-safe calls and herd decisions.

A debugging aid (the django-debug-toolbar panel, ``contrib/debug_toolbar.py``
reads it): while a ``Recording`` is active in the current context, every
event the engine reports through its ``Events`` sink is also appended to it,
attached to the stampede-safe call it happened in (``call``), or kept as a
loose event of a plain ``get``. The engine's keyed reports
(``Events.decided``: a plain get's herd decision, a stampede-safe caller's
wait for its own process's computation) keep their key: herd decisions as
``Decision`` records, in-process waits on their call. The engine is not
touched: the Django surface builds an alias's sink as ``TracedEvents`` (its
metrics, also recorded) instead of ``AliasMetrics`` when tracing was
switched on (``enable``) before the alias's runtime was built, so a site
without the panel pays nothing on the hit path. Background refreshes run on
pool threads, outside the request's context, and are not recorded.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from django_apee.core.decisions import WAITED_IN_PROCESS
from django_apee.observe.metrics import AliasMetrics

_enabled = False


def enable() -> None:
    """Wrap the Events of every alias runtime built from now on."""
    global _enabled
    _enabled = True


def enabled() -> bool:
    return _enabled


@dataclass
class Call:
    """One stampede-safe call: its key and what the engine did for it."""

    alias: str
    key: str
    steps: list[tuple[str, float | None]] = field(default_factory=list)
    seconds: float = 0.0

    def has(self, name: str) -> bool:
        return any(step == name for step, _ in self.steps)

    @property
    def state(self) -> str:
        """``stale``, ``early``, ``fresh``, or ``miss`` (absent or expired)."""
        if self.has("stale_served"):
            return "stale"
        if self.has("early_refresh"):
            return "early"
        if self.has("hit") or self.has("near_hit"):
            return "fresh"
        return "miss"

    @property
    def outcome(self) -> str:
        """``compute`` (this caller computed), ``hit``, or ``miss`` (it waited
        for another caller's value, or computed without coordination)."""
        if any(step.startswith("computed") for step, _ in self.steps):
            return "compute"
        return "hit" if self.has("hit") or self.has("near_hit") else "miss"

    @property
    def waits(self) -> list[float]:
        """Seconds waited for another process's computation (its lease)."""
        return [value or 0.0 for step, value in self.steps if step == "lease_wait"]

    @property
    def process_waits(self) -> list[float]:
        """Seconds waited for this process's own computation of the key."""
        return [v or 0.0 for step, v in self.steps if step == WAITED_IN_PROCESS]


@dataclass(frozen=True)
class Decision:
    """A plain get's herd-mode decision on one key (``Events.decided``)."""

    alias: str
    key: str
    #: ``early``, ``stale``, ``expired`` or ``absent``.
    state: str
    #: One of ``core.decisions.HERD``.
    decision: str
    #: Seconds the reader waited for another reader's write (0: none).
    waited: float


@dataclass
class Recording:
    """What one request did: its calls, herd decisions, other events."""

    calls: list[Call] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    loose: list[tuple[str, str, float | None]] = field(default_factory=list)


_recording: ContextVar[Recording | None] = ContextVar("apee_recording", default=None)
_call: ContextVar[Call | None] = ContextVar("apee_call", default=None)


def start() -> Recording:
    """Begin recording in the current context; ``stop`` ends it."""
    recording = Recording()
    _recording.set(recording)
    return recording


def stop() -> None:
    _recording.set(None)
    _call.set(None)


@contextmanager
def call(alias: str, key: str) -> Iterator[None]:
    """Attribute the events inside to one stampede-safe call of ``key``."""
    recording = _recording.get()
    if recording is None:
        yield
        return
    record = Call(alias, key)
    token = _call.set(record)
    began = time.perf_counter()
    try:
        yield
    finally:
        record.seconds = time.perf_counter() - began
        _call.reset(token)
        recording.calls.append(record)


def _note(alias: str, step: str, value: float | None) -> None:
    current = _call.get()
    if current is not None:
        current.steps.append((step, value))
        return
    recording = _recording.get()
    if recording is not None:
        recording.loose.append((alias, step, value))


class _Counter:
    def __init__(self, inner: Any, alias: str, step: str) -> None:
        self.inner, self.alias, self.step = inner, alias, step

    def inc(self, amount: float = 1) -> None:
        self.inner.inc(amount)
        if amount:  # lease renewals are counted once per lease, often 0
            _note(self.alias, self.step, None)


class _Histogram:
    def __init__(self, inner: Any, alias: str, step: str) -> None:
        self.inner, self.alias, self.step = inner, alias, step

    def observe(self, value: float) -> None:
        self.inner.observe(value)
        _note(self.alias, self.step, value)


#: Events attribute -> the step it records.
COUNTERS = {
    "hits": "hit",
    "misses": "miss",
    "stale_served": "stale_served",
    "early_refreshes": "early_refresh",
    "herd_misses": "herd_miss",
    "lease_renewals": "lease_renewal",
    "lease_lost": "lease_lost",
    "lease_takeovers": "lease_takeover",
    "redis_errors": "redis_error",
    "near_hits": "near_hit",
}
HISTOGRAMS = {"compute_seconds": "compute_seconds", "lease_wait_seconds": "lease_wait"}


class TracedEvents(AliasMetrics):
    """The alias's metrics sink, which also records each event it counts.

    A subclass, so every counter the metrics gain is still counted (and the
    engine's protocols still hold); those named in ``COUNTERS`` and
    ``HISTOGRAMS`` are also recorded.
    """

    def __init__(self, alias: str) -> None:
        super().__init__(alias)
        for name, step in COUNTERS.items():
            setattr(self, name, _Counter(getattr(self, name), alias, step))
        for name, step in HISTOGRAMS.items():
            setattr(self, name, _Histogram(getattr(self, name), alias, step))

    def computed(self, outcome: str) -> None:
        super().computed(outcome)
        _note(self.alias, f"computed:{outcome}", None)

    def fallback(self, reason: str) -> None:
        super().fallback(reason)
        _note(self.alias, f"fallback:{reason}", None)

    def decided(self, made: str, state: str, decision: str, waited: float) -> None:
        current = _call.get()
        if current is not None and current.key == made:
            current.steps.append((decision, waited))  # an in-process wait
            return
        recording = _recording.get()
        if recording is not None:
            recording.decisions.append(
                Decision(self.alias, made, state, decision, waited)
            )

    def unreadable(self, reason: str) -> None:
        super().unreadable(reason)
        _note(self.alias, f"unreadable:{reason}", None)
