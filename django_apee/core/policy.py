"""The freshness maths of one cache entry: state, XFetch, lease and wait lengths.

This module is pure, in the spirit of dogpile.cache's ``lock.py``: no Redis,
no clock, no randomness of its own, no logging. Every input is a number the
caller read from Redis or drew from its own RNG, so the whole algorithm is
unit-tested without a server and without sleeping, and a reader's decision is
reproducible from the numbers it saw.

Time without clocks
===================
An entry is stored with ``PX = hard_ms + grace_ms`` and carries its durations
in the envelope's :class:`~django_apee.core.envelope.Meta`, and when it was
written in Redis's clock. A hit is judged by :func:`fresh_until_ms` and a
local estimate of Redis's time (``store/clock.py``); anything it cannot call
``FRESH`` is read again with the key's ``PTTL``, atomically, and then
``age_ms = hard_ms + grace_ms - pttl_ms``. Either way the age is measured by
the Redis server's clock, never by comparing app servers' clocks (the
article's ``Date.now()`` flaw), so clock skew across the fleet cannot matter.

The life of an entry
====================
With S = soft, H = hard and E = grace (``stale_if_error``)::

    age:   0 ........... S ........... H ........... H+E
    state: FRESH / EARLY | STALE       | GRACE       | EXPIRED

``FRESH``    serve; nobody recomputes.
``EARLY``    serve; this reader was picked by XFetch to refresh before S (it
             still has to win the lease).
``STALE``    serve (the value is younger than H, so Django's promise holds);
             the reader that wins the lease refreshes.
``GRACE``    past H: a miss. The old value is served only if the recompute
             raises (opt-in ``stale_if_error``).
``EXPIRED``  age >= H + E: a miss, nothing to fall back on. Redis deletes the
             key at this age, but ``PTTL`` can still answer 0 in the very last
             millisecond, and with E = 0 that millisecond must not be mistaken
             for a grace period nobody asked for. So this fifth state exists
             instead of folding it into ``GRACE``.

Edge cases, decided once here:

* Persistent entries (Django ``timeout=None``: ``hard_ms == 0`` in the meta or
  ``PTTL == -1``) and values without meta (raw ints, legacy django-redis
  values) are always ``FRESH`` and never refreshed early: there is no deadline
  to refresh *before*, and inventing one would recompute values the user asked
  to keep until deleted.
* ``soft == hard`` is allowed and means no stale window: the entry goes from
  fresh (or early) straight to past-hard.
* A ``PTTL`` larger than ``hard + grace`` (e.g. a ``touch()`` that extended the
  key without rewriting its meta) gives a negative age, read as 0: the entry
  is as fresh as it can be, which is what the extension asked for.
* A delta of 0 means "not measured" (the envelope defaults missing fields to
  0); writers record a real sub-millisecond compute as 1 with
  :func:`measured_delta_ms`. Unknown delta: never early, default lease.
* Negative durations, ``PTTL`` below -1, ``rand`` outside ``[0, 1)``: these are
  caller bugs, not data, so they raise ``ValueError`` with a message naming
  the argument.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from django_apee.core.envelope import Meta

__all__ = [
    "WAIT_SLACK_MS",
    "Policy",
    "State",
    "age_ms",
    "fresh_until_ms",
    "lease_ms",
    "measured_delta_ms",
    "renew_every_ms",
    "soft_timeout_ms",
    "state",
    "wait_ms",
    "xfetch_early",
    "xfetch_probability",
]

#: Added to a lease's remaining PTTL before a waiter gives up on the holder.
#: Redis expires a key once its clock is strictly past the deadline, and the
#: PTTL a waiter read is already one round trip old, so waking exactly at
#: PTTL could find the dead holder's lease still there and spin. A few
#: milliseconds covers both, and stays far inside the bench target of
#: "lease length + 50 ms" to recover from a killed holder.
WAIT_SLACK_MS = 5


class State(enum.Enum):
    """Where an entry is in its life; see the module docstring."""

    FRESH = "fresh"
    EARLY = "early"
    STALE = "stale"
    GRACE = "grace"
    EXPIRED = "expired"

    @property
    def servable(self) -> bool:
        """True when readers get the value without any recompute outcome."""
        return self in _SERVABLE


_SERVABLE = frozenset({State.FRESH, State.EARLY, State.STALE})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def _require_ms(name: str, value: int, minimum: int = 0) -> None:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} (ms), got {value!r}.")


def _require_rand(rand: float) -> None:
    # ``not 0 <= rand < 1`` is also true for NaN.
    if not _is_real(rand) or not 0.0 <= rand < 1.0:
        raise ValueError(f"rand must be a float in [0, 1), got {rand!r}.")


def _require_beta(beta: float) -> None:
    if not _is_real(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}.")


@dataclass(frozen=True)
class Policy:
    """Per-cache knobs of the freshness maths, validated on construction.

    A bad knob is a configuration error: it raises ``ValueError`` when the
    cache is built, not on the first unlucky request.
    """

    #: XFetch's beta. 1 is the value Vattani et al. analyse as optimal; > 1
    #: refreshes earlier (more time to spare, more refreshes), 0 disables
    #: early refresh (the stale window alone then triggers it).
    beta: float = 1.0
    #: Lease length when no delta is known yet (first compute, or an entry
    #: whose compute was never measured). Generous, because a too-short lease
    #: only costs renewals while a holder that dies is rare.
    default_lease_ms: int = 5000
    #: Floor of the adaptive lease: the renewer must be able to extend it
    #: despite a scheduling hiccup or a slow round trip.
    min_lease_ms: int = 500
    #: Ceiling of the adaptive lease: a dead holder blocks its key for at
    #: most this long, however slow the compute usually is (the renewer keeps
    #: a live holder's lease going beyond it).
    max_lease_ms: int = 60_000
    #: lease = clamp(delta * lease_factor + lease_margin_ms): a compute that
    #: runs up to ``lease_factor`` times its usual duration needs no renewal
    #: to stay covered.
    lease_factor: float = 2.0
    lease_margin_ms: int = 250
    #: Soft timeout of entries written without one (plain ``cache.set``,
    #: ``{% cache %}``, ``cache_page``, sessions), as a fraction of the hard
    #: timeout; see :func:`soft_timeout_ms`. 1.0 means no stale window.
    soft_ratio: float = 0.95

    def __post_init__(self) -> None:
        _require_beta(self.beta)
        _require_ms("min_lease_ms", self.min_lease_ms, 1)
        _require_ms("max_lease_ms", self.max_lease_ms, self.min_lease_ms)
        _require_ms("lease_margin_ms", self.lease_margin_ms)
        _require_ms("default_lease_ms", self.default_lease_ms, self.min_lease_ms)
        if self.default_lease_ms > self.max_lease_ms:
            raise ValueError(
                f"default_lease_ms ({self.default_lease_ms}) must lie within "
                f"[min_lease_ms, max_lease_ms] = "
                f"[{self.min_lease_ms}, {self.max_lease_ms}]."
            )
        if not _is_real(self.lease_factor) or self.lease_factor < 1:
            raise ValueError(
                "lease_factor must be a finite number >= 1 (a lease shorter than "
                f"the compute it guards is always renewed), got {self.lease_factor!r}."
            )
        if not _is_real(self.soft_ratio) or not 0 < self.soft_ratio <= 1:
            raise ValueError(
                f"soft_ratio must be a number in (0, 1], got {self.soft_ratio!r}."
            )


def soft_timeout_ms(hard_ms: int, soft_ms: int | None, policy: Policy) -> int:
    """The soft timeout to store with an entry whose hard timeout is ``hard_ms``.

    An explicit ``soft_ms`` wins and must satisfy ``0 < soft_ms <= hard_ms``
    (a soft timeout past the hard one would promise serving values Django
    already considers expired). ``hard_ms == 0`` is a persistent entry: it has
    no soft timeout either, so the answer is 0 and an explicit soft is an
    error.

    ``soft_ms=None`` applies the rule ``floor(hard_ms * soft_ratio)``, at
    least 1. Why a ratio of 0.95 by default:

    * Entries written by plain ``cache.set`` come from code that promised
      nothing about staleness, only "not older than the timeout", so any soft
      timeout below it keeps Django's contract.
    * A ratio scales with the timeout (a fixed offset would be all of a 2 s
      timeout and nothing of a day), and it bounds the cost: a hot key is
      refreshed about every 0.95 H plus one compute instead of every H
      (measured: 1.03 computes per timeout window at a 2 s timeout and a
      0.1 s compute; 0.9 gave 1.12), while one reader gets 5 % of the timeout
      to recompute with everybody else still served. Cold keys cost nothing
      extra: refreshes are only ever triggered by reads. Keys read less often
      than once per 5 % of their timeout gain from a lower ratio.
    * Such entries usually carry no delta, so XFetch cannot pick an early
      moment for them; the stale window is what keeps them off the
      expired-and-waiting path.
    """
    _require_ms("hard_ms", hard_ms)
    if soft_ms is not None:
        if not _is_int(soft_ms) or not 0 < soft_ms <= hard_ms:
            raise ValueError(
                f"soft_timeout ({soft_ms!r} ms) must satisfy "
                f"0 < soft_timeout <= timeout ({hard_ms} ms)."
            )
        return soft_ms
    if hard_ms == 0:
        return 0
    return min(hard_ms, max(1, math.floor(hard_ms * policy.soft_ratio)))


def _effective_soft_ms(meta: Meta, policy: Policy) -> int:
    """The soft timeout a reader uses: the stored one, repaired if absent.

    A stored 0 means the writer recorded none (the envelope's default for a
    missing field, and what plain ``set`` stores), so the rule applies --
    with room for the compute when its duration is known: the stale window
    is at least ``lease_factor * delta`` (as long as a lease covers without
    renewal) but never more than half the timeout. A window shorter than the
    compute would let the entry expire while its one refresher still works,
    and every reader in that gap would miss. A stored soft above hard never
    comes from this package's writers; it is read as "no stale window", the
    closest thing to what it says that keeps the hard promise.
    """
    if meta.soft_ms == 0:
        hard = meta.hard_ms  # soft_timeout_ms's rule; callers checked the meta
        soft = min(hard, max(1, math.floor(hard * policy.soft_ratio))) if hard else 0
        if meta.delta_ms:
            room = math.ceil(meta.delta_ms * policy.lease_factor)
            soft = min(soft, max(meta.hard_ms // 2, meta.hard_ms - room))
        return max(1, soft) if meta.hard_ms else soft
    return min(meta.soft_ms, meta.hard_ms)


def _require_meta(meta: Meta) -> None:
    for name, value in zip(Meta._fields, meta, strict=True):
        _require_ms(f"meta.{name}", value)


def _require_pttl(pttl_ms: int) -> None:
    if not _is_int(pttl_ms) or pttl_ms < -1:
        raise ValueError(
            f"pttl_ms must be an int >= -1, got {pttl_ms!r}. (-2 means the key "
            "does not exist: read the value and its PTTL atomically.)"
        )


def age_ms(meta: Meta | None, pttl_ms: int) -> int | None:
    """How old the entry is by Redis's clock, or ``None`` if that is unknowable.

    ``None`` when there is no meta, when the meta says the entry is persistent
    (``hard_ms == 0``) or when the key has no expiry (``pttl_ms == -1``: it was
    written persistent, or someone ran ``PERSIST`` on it). A ``PTTL`` larger
    than the stored ``hard + grace`` gives age 0, never a negative age.
    """
    _require_pttl(pttl_ms)
    if meta is None:
        return None
    _require_meta(meta)
    if meta.hard_ms == 0 or pttl_ms == -1:
        return None
    return max(0, meta.hard_ms + meta.grace_ms - pttl_ms)


def state(meta: Meta | None, pttl_ms: int, *, policy: Policy, rand: float) -> State:
    """Classify an entry read with ``meta`` and ``pttl_ms`` in one round trip.

    ``rand`` is a uniform draw in ``[0, 1)`` from the caller's RNG, used only
    to decide ``EARLY`` (see :func:`xfetch_early`); a fixed ``rand`` makes the
    answer deterministic, and the answer never moves backwards as the entry
    ages (``FRESH`` < ``EARLY`` < ``STALE`` < ``GRACE`` < ``EXPIRED``).
    """
    _require_rand(rand)
    age = age_ms(meta, pttl_ms)
    if age is None or meta is None:
        return State.FRESH
    hard = meta.hard_ms
    if age >= hard + meta.grace_ms:
        return State.EXPIRED
    if age >= hard:
        return State.GRACE
    soft = _effective_soft_ms(meta, policy)
    if age >= soft:
        return State.STALE
    # Everything is validated by now (policy on construction): skip the
    # public function's checks on the hit path.
    if _early(meta.delta_ms, soft - age, policy.beta, rand):
        return State.EARLY
    return State.FRESH


def xfetch_early(
    delta_ms: int, time_left_to_soft_ms: int, beta: float, rand: float
) -> bool:
    """XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015): refresh now?

    True iff ``delta * beta * -ln(1 - rand) >= time_left``. Each read draws an
    exponential variable scaled by how long the recompute takes, so the
    chance of refreshing, ``exp(-time_left / (delta * beta))``, climbs
    smoothly as the soft deadline nears, reaching 1/e one compute-time
    before it (beta 1). With frequent reads someone almost surely starts in time to
    finish before the deadline, with rare reads almost nobody refreshes
    needlessly, and no knob depends on the request rate (unlike the article's
    fixed 15 % in a fixed window).

    Decided cases, all following from the formula:

    * ``time_left <= 0``: True. The deadline has passed; the entry is due,
      not early, whatever beta, delta and rand are.
    * ``beta == 0`` or ``delta == 0`` (unknown delta): False while
      ``time_left > 0``: no basis for going early.
    * ``rand == 0``: False while ``time_left > 0`` (the exponential draw is 0).
    * ``rand`` just below 1: the draw is at most ``-ln(2**-53) ~= 36.7``, so
      a read with more than ~37 compute-times left is never early, for any
      float ``rand`` (the exact probability there is below ``exp(-37)``).

    ``1 - rand`` is computed as ``log1p(-rand)`` so that ``rand`` near 0 keeps
    its precision and ``rand`` near 1 cannot reach ``log(0)``.
    """
    _require_ms("delta_ms", delta_ms)
    _require_beta(beta)
    _require_rand(rand)
    return _early(delta_ms, time_left_to_soft_ms, beta, rand)


def _early(delta_ms: int, time_left_ms: int, beta: float, rand: float) -> bool:
    if time_left_ms <= 0:
        return True
    scale = delta_ms * beta
    if scale <= 0 or rand == 0.0:
        return False
    return scale * -math.log1p(-rand) >= time_left_ms


def xfetch_probability(delta_ms: int, time_left_to_soft_ms: int, beta: float) -> float:
    """The probability that one read refreshes early (what ``xfetch_early``
    returns True for, over a uniform ``rand``): ``exp(-time_left / (delta *
    beta))``, 1 once the deadline is reached, 0 with no delta or beta 0.

    For reports (``apee_stats --key``) and tests; the hit path uses
    :func:`xfetch_early`, which needs no ``exp``.
    """
    _require_ms("delta_ms", delta_ms)
    _require_beta(beta)
    if time_left_to_soft_ms <= 0:
        return 1.0
    scale = delta_ms * beta
    if scale <= 0:
        return 0.0
    return math.exp(-time_left_to_soft_ms / scale)


#: Entries store their XFetch draw as an int in [1, SEED_RANGE); 0 means none.
SEED_RANGE = 2**32


def xfetch_rand(meta: Meta | None, draw: float) -> float:
    """XFetch's ``rand`` for a read of an entry: its stored draw, else ``draw``.

    XFetch as published draws anew on every read, so the more reads, the
    earlier the first one fires: with thousands of reads a second a hot key
    is recomputed several compute-times early, every time (we measured 1.5
    computes per timeout window). A lease already makes sure only one caller
    recomputes, so the per-read draw buys nothing; one draw per entry, made
    when it is written, keeps XFetch's spread across entries (those written
    together do not all refresh together) with an early margin of
    ``delta * beta * -ln(1 - rand)`` that no longer grows with the read rate.
    Entries without a draw (written by hand, or by a plain ``set`` whose
    compute time nobody measured) use ``draw``, the caller's fresh draw.
    """
    if meta is not None and meta.seed:
        return meta.seed / SEED_RANGE
    return draw


#: :func:`fresh_until_ms`: fresh for ever; only the PTTL can tell.
NO_DEADLINE, UNDECIDED = math.inf, -math.inf


def fresh_until_ms(meta: Meta | None, policy: Policy) -> float:
    """Until when (Redis's clock, ms since the epoch) the entry is ``FRESH``
    by its envelope alone: ``written_ms + soft - early``, ``early`` being
    XFetch's margin for the stored draw (:func:`xfetch_early` solved for the
    age). A read whose latest possible Redis time (``store/clock.py``) is
    before it is a hit without the PTTL: :func:`state` would say ``FRESH``.

    :data:`NO_DEADLINE` if always fresh (no meta, persistent);
    :data:`UNDECIDED` if only the PTTL can tell: no ``written_ms`` (older
    entries), a grace period (Redis keeps those past their hard timeout;
    without one Redis deletes the entry at it, so the lean path never
    serves past it whatever the clocks), or a compute time without a
    stored draw. No validation: ``unpack_meta`` checked the fields.
    """
    if meta is None or meta.hard_ms == 0:
        return NO_DEADLINE
    if meta.written_ms == 0 or meta.grace_ms:
        return UNDECIDED
    soft = _effective_soft_ms(meta, policy)
    scale = meta.delta_ms * policy.beta
    if scale <= 0:
        return meta.written_ms + soft
    if not meta.seed:
        return UNDECIDED
    return meta.written_ms + soft - scale * -math.log1p(-meta.seed / SEED_RANGE)


def measured_delta_ms(elapsed_s: float) -> int:
    """The delta to store for a compute that took ``elapsed_s`` seconds.

    Rounded up and at least 1, because 0 on the wire means "not measured":
    XFetch would then never go early for it and the lease would fall back to
    the default.
    """
    if not _is_real(elapsed_s) or elapsed_s < 0:
        raise ValueError(f"elapsed_s must be a finite number >= 0, got {elapsed_s!r}.")
    return max(1, math.ceil(elapsed_s * 1000))


def lease_ms(delta_ms: int | None, policy: Policy) -> int:
    """How long a new lease lasts: ``clamp(ceil(delta * factor) + margin)``.

    Adaptive, so the usual compute finishes well inside its first lease (a
    compute that takes up to ``lease_factor`` times its usual duration is
    still covered without renewal) while a holder that dies blocks its key
    for about two compute-times, not for a fixed worst case. The clamp keeps
    tiny computes from getting leases the renewer cannot keep up with and
    slow ones from blocking for minutes after a crash; a live holder beyond
    ``max_lease_ms`` is kept alive by renewal, not by a longer lease.

    ``None`` or 0 (not measured, e.g. the first compute) gives
    ``default_lease_ms``. Non-decreasing in any measured delta (>= 1).
    """
    if delta_ms is None or delta_ms == 0:
        return policy.default_lease_ms
    _require_ms("delta_ms", delta_ms)
    wanted = math.ceil(delta_ms * policy.lease_factor) + policy.lease_margin_ms
    return min(policy.max_lease_ms, max(policy.min_lease_ms, wanted))


def renew_every_ms(lease_ms: int) -> int:
    """How often the renewer extends a lease of ``lease_ms``: a quarter of it.

    Each renewal resets the lease to its full length. Renewing every quarter
    means two consecutive renewals can be lost (a Redis blip, a GC pause, a
    busy renewer thread) and the third still lands with a quarter of the
    lease to spare; at a third, the third renewal would race the expiry.
    At least 1 ms.
    """
    _require_ms("lease_ms", lease_ms, 1)
    return max(1, lease_ms // 4)


def wait_ms(lease_pttl_ms: int, wait_timeout_ms: int) -> int:
    """How long a waiter may block on the current lease holder.

    ``min(lease_pttl + WAIT_SLACK_MS, wait_timeout)``, where ``wait_timeout``
    is what is left of the caller's wait budget. A wake-up normally ends the
    wait much earlier; this bound is for a holder that died and will never
    send one: its lease runs out, and the waiter then tries to take the lease
    itself. A live holder renews its lease, so the waiter that times out
    re-reads the PTTL and waits again, within its budget.

    ``lease_pttl_ms == -2`` (no lease: the holder finished or its lease
    expired) gives 0: go and look at the value, or take the lease, now.
    ``-1`` (a lease without expiry, which this package never writes) gives
    the whole budget: nothing better is known, and the budget still bounds
    it. Never negative, never above the budget.
    """
    if not _is_int(lease_pttl_ms) or lease_pttl_ms < -2:
        raise ValueError(f"lease_pttl_ms must be an int >= -2, got {lease_pttl_ms!r}.")
    _require_ms("wait_timeout_ms", wait_timeout_ms)
    if lease_pttl_ms == -2:
        return 0
    if lease_pttl_ms == -1:
        return wait_timeout_ms
    return min(lease_pttl_ms + WAIT_SLACK_MS, wait_timeout_ms)
