"""Unit tests for ``django_apee.core.policy``: pure maths, no Redis, no clock."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from django_apee.core.envelope import Meta
from django_apee.core.policy import (
    NO_DEADLINE,
    UNDECIDED,
    WAIT_SLACK_MS,
    Policy,
    State,
    age_ms,
    fresh_until_ms,
    lease_ms,
    measured_delta_ms,
    renew_every_ms,
    soft_timeout_ms,
    state,
    wait_ms,
    xfetch_early,
    xfetch_probability,
    xfetch_rand,
)


@pytest.fixture(autouse=True)
def _empty_redis() -> None:
    """Shadow conftest's autouse FLUSHDB: this module needs no Redis at all."""


POLICY = Policy()
RAND_MAX = math.nextafter(1.0, 0.0)  # the largest float below 1
ORDER = [State.FRESH, State.EARLY, State.STALE, State.GRACE, State.EXPIRED]

ms = st.integers(min_value=0, max_value=10**9)
positive_ms = st.integers(min_value=1, max_value=10**9)
time_left = st.integers(min_value=-(10**9), max_value=10**9)
betas = st.floats(min_value=0.0, max_value=100.0)
rands = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


def pttl_at(meta: Meta, age: int) -> int:
    """The PTTL Redis reports for an entry of ``meta`` that is ``age`` ms old."""
    return meta.hard_ms + meta.grace_ms - age


def state_at(
    meta: Meta, age: int, *, rand: float = 0.0, policy: Policy = POLICY
) -> State:
    return state(meta, pttl_at(meta, age), policy=policy, rand=rand)


# --------------------------------------------------------------------- Policy


def test_policy_defaults() -> None:
    p = Policy()
    assert p.beta == 1.0
    assert p.min_lease_ms <= p.default_lease_ms <= p.max_lease_ms
    assert 0 < p.soft_ratio <= 1


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"beta": -0.1}, "beta"),
        ({"beta": math.nan}, "beta"),
        ({"beta": math.inf}, "beta"),
        ({"beta": True}, "beta"),
        ({"min_lease_ms": 0}, "min_lease_ms"),
        ({"min_lease_ms": -5}, "min_lease_ms"),
        ({"min_lease_ms": 1.5}, "min_lease_ms"),
        ({"max_lease_ms": 400}, "max_lease_ms"),
        ({"default_lease_ms": 100}, "default_lease_ms"),
        ({"default_lease_ms": 70_000}, "default_lease_ms"),
        ({"lease_margin_ms": -1}, "lease_margin_ms"),
        ({"lease_factor": 0.5}, "lease_factor"),
        ({"lease_factor": math.nan}, "lease_factor"),
        ({"soft_ratio": 0}, "soft_ratio"),
        ({"soft_ratio": 1.01}, "soft_ratio"),
        ({"soft_ratio": -0.5}, "soft_ratio"),
        ({"soft_ratio": math.nan}, "soft_ratio"),
    ],
)
def test_policy_rejects_bad_knobs(kwargs: dict[str, float], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Policy(**kwargs)  # type: ignore[arg-type]


def test_policy_accepts_edges() -> None:
    Policy(beta=0, soft_ratio=1, lease_factor=1, lease_margin_ms=0)
    Policy(min_lease_ms=1, default_lease_ms=1, max_lease_ms=1)


def test_policy_is_frozen() -> None:
    with pytest.raises(AttributeError):
        POLICY.beta = 2.0  # type: ignore[misc]


# ------------------------------------------------------------- soft timeout


def test_explicit_soft_wins() -> None:
    assert soft_timeout_ms(3_600_000, 3_480_000, POLICY) == 3_480_000
    assert soft_timeout_ms(1000, 1000, POLICY) == 1000  # soft == hard: allowed
    assert soft_timeout_ms(1000, 1, POLICY) == 1


@pytest.mark.parametrize(
    ("hard", "soft"), [(1000, 0), (1000, 1001), (1000, -1), (0, 1), (0, 0)]
)
def test_explicit_soft_out_of_range(hard: int, soft: int) -> None:
    with pytest.raises(ValueError, match="soft_timeout"):
        soft_timeout_ms(hard, soft, POLICY)


def test_soft_rule() -> None:
    assert soft_timeout_ms(300_000, None, POLICY) == 285_000
    assert soft_timeout_ms(10, None, POLICY) == 9
    assert soft_timeout_ms(1, None, POLICY) == 1  # floor(0.95) would be 0
    assert soft_timeout_ms(0, None, POLICY) == 0  # persistent: no soft either
    assert soft_timeout_ms(1000, None, Policy(soft_ratio=1.0)) == 1000
    assert soft_timeout_ms(1000, None, Policy(soft_ratio=0.5)) == 500


def test_soft_rejects_negative_hard() -> None:
    with pytest.raises(ValueError, match="hard_ms"):
        soft_timeout_ms(-1, None, POLICY)


@given(hard=positive_ms, ratio=st.floats(min_value=1e-9, max_value=1.0))
def test_soft_rule_in_range(hard: int, ratio: float) -> None:
    soft = soft_timeout_ms(hard, None, Policy(soft_ratio=ratio))
    assert 1 <= soft <= hard


# --------------------------------------------------------------------- age


def test_age_from_pttl() -> None:
    meta = Meta(soft_ms=900, hard_ms=1000, grace_ms=500, delta_ms=10)
    assert age_ms(meta, 1500) == 0
    assert age_ms(meta, 1000) == 500
    assert age_ms(meta, 0) == 1500


def test_age_unknown() -> None:
    meta = Meta(soft_ms=900, hard_ms=1000)
    assert age_ms(None, 500) is None  # no meta: raw int, legacy value
    assert age_ms(meta, -1) is None  # no expiry on the key
    assert age_ms(Meta(), 500) is None  # hard 0: persistent entry


def test_age_never_negative() -> None:
    # touch() extended the key beyond hard + grace without rewriting the meta.
    assert age_ms(Meta(soft_ms=900, hard_ms=1000), 5000) == 0


@pytest.mark.parametrize("pttl", [-2, -3, -(10**9)])
def test_age_rejects_missing_key(pttl: int) -> None:
    with pytest.raises(ValueError, match="pttl_ms"):
        age_ms(Meta(hard_ms=1000), pttl)


@pytest.mark.parametrize("field", Meta._fields)
def test_age_rejects_negative_meta(field: str) -> None:
    meta = Meta(soft_ms=900, hard_ms=1000, grace_ms=10, delta_ms=5)._replace(
        **{field: -1}
    )
    with pytest.raises(ValueError, match=f"meta.{field}"):
        age_ms(meta, 100)


# ------------------------------------------------------------------- state

META = Meta(soft_ms=600, hard_ms=1000, grace_ms=200, delta_ms=0)


@pytest.mark.parametrize(
    ("age", "expected"),
    [
        (0, State.FRESH),
        (599, State.FRESH),  # soft - 1; delta 0: never early
        (600, State.STALE),  # soft
        (999, State.STALE),  # hard - 1
        (1000, State.GRACE),  # hard
        (1199, State.GRACE),  # hard + grace - 1
        (1200, State.EXPIRED),  # hard + grace: PTTL 0, last millisecond
    ],
)
def test_state_boundaries(age: int, expected: State) -> None:
    assert state_at(META, age, rand=RAND_MAX) is expected


@pytest.mark.parametrize(
    ("age", "expected"),
    [(599, State.FRESH), (600, State.STALE), (999, State.STALE), (1000, State.EXPIRED)],
)
def test_state_without_grace(age: int, expected: State) -> None:
    meta = META._replace(grace_ms=0)
    assert state_at(meta, age) is expected


@pytest.mark.parametrize(
    ("age", "expected"),
    [(999, State.FRESH), (1000, State.GRACE), (1199, State.GRACE)],
)
def test_state_soft_equals_hard(age: int, expected: State) -> None:
    # No stale window: fresh straight to past-hard.
    assert state_at(META._replace(soft_ms=1000), age) is expected


def test_state_soft_missing_uses_rule() -> None:
    meta = Meta(soft_ms=0, hard_ms=1000, grace_ms=0, delta_ms=0)
    assert state_at(meta, 949) is State.FRESH
    assert state_at(meta, 950) is State.STALE
    assert state_at(meta, 950, policy=Policy(soft_ratio=1.0)) is State.FRESH


def test_state_soft_rule_leaves_room_for_a_known_compute() -> None:
    # 5 % of 1 s is 50 ms; a 100 ms compute needs 2 x 100 ms of stale window.
    meta = Meta(soft_ms=0, hard_ms=1000, grace_ms=0, delta_ms=100)
    assert state_at(meta, 799, rand=0.0) is State.FRESH
    assert state_at(meta, 800, rand=0.0) is State.STALE
    # ...but never more than half the timeout, however slow the compute.
    slow = meta._replace(delta_ms=10_000)
    assert state_at(slow, 499, rand=0.0) is State.FRESH
    assert state_at(slow, 500, rand=0.0) is State.STALE
    # An explicit soft timeout is the writer's word: no room is added.
    explicit = meta._replace(soft_ms=990)
    assert state_at(explicit, 989, rand=0.0) is State.FRESH


@given(
    hard=st.integers(min_value=1, max_value=10**9),
    delta=st.integers(min_value=0, max_value=10**9),
    ratio=st.floats(min_value=0.001, max_value=1.0),
)
def test_state_soft_rule_window_bounds(hard: int, delta: int, ratio: float) -> None:
    policy = Policy(soft_ratio=ratio)
    meta = Meta(soft_ms=0, hard_ms=hard, grace_ms=0, delta_ms=delta)
    rule = soft_timeout_ms(hard, None, policy)
    first_stale = next(
        age
        for age in sorted({0, hard // 2, max(0, hard - 2 * delta), rule, hard})
        if state(meta, hard - age, policy=policy, rand=0.0) is not State.FRESH
    )
    # Never later than the plain rule, never earlier than half the timeout
    # (unless the rule itself says so).
    assert first_stale <= rule
    assert first_stale >= min(rule, hard // 2)


def test_state_soft_above_hard_is_clamped() -> None:
    meta = Meta(soft_ms=5000, hard_ms=1000, grace_ms=0, delta_ms=0)
    assert state_at(meta, 999) is State.FRESH
    assert state_at(meta, 1000) is State.EXPIRED


@given(pttl=st.integers(min_value=-1, max_value=10**9), rand=rands)
def test_state_persistent_always_fresh(pttl: int, rand: float) -> None:
    huge_delta = Meta(soft_ms=0, hard_ms=0, grace_ms=0, delta_ms=10**9)
    assert state(huge_delta, pttl, policy=POLICY, rand=rand) is State.FRESH
    assert state(None, pttl, policy=POLICY, rand=rand) is State.FRESH
    persisted = Meta(soft_ms=1, hard_ms=2, grace_ms=0, delta_ms=10**9)
    assert state(persisted, -1, policy=POLICY, rand=rand) is State.FRESH


def test_state_negative_age_is_fresh() -> None:
    assert state(META, 10**6, policy=POLICY, rand=0.5) is State.FRESH


def test_state_rand_bounds() -> None:
    meta = Meta(soft_ms=600, hard_ms=1000, grace_ms=0, delta_ms=100)
    # rand 0: the exponential draw is 0, never early while time is left.
    assert state_at(meta, 599, rand=0.0) is State.FRESH
    # rand at its top: draw ~36.7, early up to ~3.67 s before soft with
    # delta 100 -- here everywhere before soft.
    assert state_at(meta, 0, rand=RAND_MAX) is State.EARLY
    assert state_at(meta, 599, rand=RAND_MAX) is State.EARLY


def test_state_delta_zero_never_early() -> None:
    meta = Meta(soft_ms=600, hard_ms=1000, grace_ms=0, delta_ms=0)
    assert state_at(meta, 599, rand=RAND_MAX) is State.FRESH


def test_state_beta_zero_never_early() -> None:
    meta = Meta(soft_ms=600, hard_ms=1000, grace_ms=0, delta_ms=10**6)
    assert state_at(meta, 599, rand=RAND_MAX, policy=Policy(beta=0)) is State.FRESH


@pytest.mark.parametrize("rand", [1.0, -0.0001, 1.5, math.nan, math.inf])
def test_state_rejects_bad_rand(rand: float) -> None:
    with pytest.raises(ValueError, match="rand"):
        state(META, 500, policy=POLICY, rand=rand)


def test_state_rejects_bad_pttl() -> None:
    with pytest.raises(ValueError, match="pttl_ms"):
        state(META, -2, policy=POLICY, rand=0.5)


def test_servable() -> None:
    assert [s.servable for s in ORDER] == [True, True, True, False, False]


metas = st.builds(
    lambda hard, soft_frac, grace, delta: Meta(
        soft_ms=max(1, int(hard * soft_frac)),
        hard_ms=hard,
        grace_ms=grace,
        delta_ms=delta,
    ),
    hard=st.integers(min_value=1, max_value=10**7),
    soft_frac=st.floats(min_value=0.0, max_value=1.0),
    grace=st.integers(min_value=0, max_value=10**7),
    delta=st.integers(min_value=0, max_value=10**6),
)


@given(meta=metas, a=ms, b=ms, rand=rands, beta=betas)
def test_state_never_moves_backwards(
    meta: Meta, a: int, b: int, rand: float, beta: float
) -> None:
    """For one rand, an older entry is never in an earlier state."""
    end = meta.hard_ms + meta.grace_ms
    young, old = sorted((a % (end + 1), b % (end + 1)))
    policy = Policy(beta=beta)
    s_young = state_at(meta, young, rand=rand, policy=policy)
    s_old = state_at(meta, old, rand=rand, policy=policy)
    assert ORDER.index(s_young) <= ORDER.index(s_old)


@given(meta=metas, age=ms, rand=rands, beta=betas)
def test_state_agrees_with_xfetch(
    meta: Meta, age: int, rand: float, beta: float
) -> None:
    age %= meta.soft_ms
    got = state_at(meta, age, rand=rand, policy=Policy(beta=beta))
    early = xfetch_early(meta.delta_ms, meta.soft_ms - age, beta, rand)
    assert got is (State.EARLY if early else State.FRESH)


# ------------------------------------------------------------------ XFetch


def test_xfetch_formula() -> None:
    # -ln(1 - 0.5) = ln 2 ~= 0.693: with delta 100, early iff 69.3 >= left.
    assert xfetch_early(100, 69, 1.0, 0.5)
    assert not xfetch_early(100, 70, 1.0, 0.5)
    assert xfetch_early(100, 138, 2.0, 0.5)
    assert not xfetch_early(100, 139, 2.0, 0.5)


@given(delta=ms, left=st.integers(max_value=0), beta=betas, rand=rands)
def test_xfetch_always_due_at_or_past_soft(
    delta: int, left: int, beta: float, rand: float
) -> None:
    assert xfetch_early(delta, left, beta, rand)
    assert xfetch_probability(delta, left, beta) == 1.0


@given(delta=ms, left=positive_ms, rand=rands)
def test_xfetch_beta_zero_never_early(delta: int, left: int, rand: float) -> None:
    assert not xfetch_early(delta, left, 0.0, rand)
    assert xfetch_probability(delta, left, 0.0) == 0.0


@given(left=positive_ms, beta=betas, rand=rands)
def test_xfetch_delta_zero_never_early(left: int, beta: float, rand: float) -> None:
    assert not xfetch_early(0, left, beta, rand)


@given(delta=ms, left=positive_ms, beta=betas)
def test_xfetch_rand_zero_never_early(delta: int, left: int, beta: float) -> None:
    assert not xfetch_early(delta, left, beta, 0.0)


@given(
    delta=st.integers(min_value=1, max_value=10**6),
    beta=st.floats(min_value=0.01, max_value=100.0),
    extra=st.floats(min_value=0.0, max_value=1e3),
)
def test_xfetch_never_early_far_from_soft(
    delta: int, beta: float, extra: float
) -> None:
    """More than ~37 compute-times left: not even the luckiest rand goes early."""
    left = math.ceil(delta * beta * (40 + extra))
    assert not xfetch_early(delta, left, beta, RAND_MAX)
    assert xfetch_probability(delta, left, beta) < 1e-17


@given(
    delta=st.integers(min_value=1, max_value=10**6),
    beta=st.floats(min_value=0.01, max_value=100.0),
)
def test_xfetch_luckiest_rand_reaches_36_compute_times(delta: int, beta: float) -> None:
    left = math.floor(delta * beta * 36)
    assert xfetch_early(delta, left, beta, RAND_MAX)


@given(delta=ms, a=time_left, b=time_left, beta=betas, rand=rands)
def test_xfetch_monotonic_in_time_left(
    delta: int, a: int, b: int, beta: float, rand: float
) -> None:
    near, far = sorted((a, b))
    if xfetch_early(delta, far, beta, rand):
        assert xfetch_early(delta, near, beta, rand)
    assert xfetch_probability(delta, near, beta) >= xfetch_probability(delta, far, beta)


@given(a=ms, b=ms, left=time_left, beta=betas, rand=rands)
def test_xfetch_monotonic_in_delta(
    a: int, b: int, left: int, beta: float, rand: float
) -> None:
    small, big = sorted((a, b))
    if xfetch_early(small, left, beta, rand):
        assert xfetch_early(big, left, beta, rand)


@given(delta=ms, left=time_left, a=betas, b=betas, rand=rands)
def test_xfetch_monotonic_in_beta(
    delta: int, left: int, a: float, b: float, rand: float
) -> None:
    small, big = sorted((a, b))
    if xfetch_early(delta, left, small, rand):
        assert xfetch_early(delta, left, big, rand)


@given(delta=ms, left=time_left, beta=betas, a=rands, b=rands)
def test_xfetch_monotonic_in_rand(
    delta: int, left: int, beta: float, a: float, b: float
) -> None:
    small, big = sorted((a, b))
    if xfetch_early(delta, left, beta, small):
        assert xfetch_early(delta, left, beta, big)


@settings(max_examples=50)
@given(
    delta=st.integers(min_value=1, max_value=10_000),
    beta=st.floats(min_value=0.1, max_value=10.0),
    left_over_scale=st.floats(min_value=0.0, max_value=6.0),
)
def test_xfetch_probability_matches_uniform_rand(
    delta: int, beta: float, left_over_scale: float
) -> None:
    """Over a uniform grid of rands, the early fraction is exp(-left/scale)."""
    left = max(1, round(delta * beta * left_over_scale))
    n = 4000
    early = sum(xfetch_early(delta, left, beta, (i + 0.5) / n) for i in range(n))
    assert abs(early / n - xfetch_probability(delta, left, beta)) <= 1.5 / n


def test_xfetch_probability_rises_as_soft_nears() -> None:
    probs = [xfetch_probability(200, left, 1.0) for left in range(2000, 0, -50)]
    assert probs == sorted(probs)
    assert len(set(probs)) == len(probs)  # strictly rising
    assert xfetch_probability(200, 200, 1.0) == pytest.approx(math.exp(-1))


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((-1, 10, 1.0, 0.5), "delta_ms"),
        ((10, 10, -1.0, 0.5), "beta"),
        ((10, 10, math.nan, 0.5), "beta"),
        ((10, 10, 1.0, 1.0), "rand"),
        ((10, 10, 1.0, -0.5), "rand"),
    ],
)
def test_xfetch_rejects_bad_input(
    args: tuple[int, int, float, float], name: str
) -> None:
    with pytest.raises(ValueError, match=name):
        xfetch_early(*args)


def test_xfetch_probability_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="delta_ms"):
        xfetch_probability(-1, 10, 1.0)
    with pytest.raises(ValueError, match="beta"):
        xfetch_probability(10, 10, -1.0)


# -------------------------------------------- XFetch on a simulated hot key


def simulate(
    *, soft: int, delta: int, every: int, trials: int, seed: int
) -> tuple[list[int | None], list[int]]:
    """Read one key every ``every`` ms from age 0 until soft, ``trials`` times.

    Returns, per trial, how long before soft the first early trigger came
    (``None`` if none did) and how many reads were picked in total (what a
    fleet without a lease would compute).
    """
    rng = random.Random(seed)
    meta = Meta(soft_ms=soft, hard_ms=soft + 1000, grace_ms=0, delta_ms=delta)
    leads: list[int | None] = []
    counts: list[int] = []
    for _ in range(trials):
        first: int | None = None
        count = 0
        for age in range(0, soft, every):
            got = state_at(meta, age, rand=rng.random())
            if got is State.EARLY:
                count += 1
                if first is None:
                    first = soft - age
            else:
                assert got is State.FRESH
        leads.append(first)
        counts.append(count)
    return leads, counts


def analytic(*, soft: int, delta: int, every: int) -> tuple[float, float, float]:
    """Exact P(some trigger), P(first trigger >= delta before soft), E[triggers]."""
    lefts = [soft - age for age in range(0, soft, every)]
    probs = [xfetch_probability(delta, left, 1.0) for left in lefts]
    p_none = math.prod(1 - p for p in probs)
    p_none_in_time = math.prod(
        1 - p for left, p in zip(lefts, probs, strict=True) if left >= delta
    )
    return 1 - p_none, 1 - p_none_in_time, sum(probs)


def test_simulated_hot_key_refreshes_before_soft() -> None:
    """Reads every 10 ms, a 200 ms compute: someone starts in time, ~always.

    With read rate r and compute time D, the first trigger comes about
    D * (ln(r * D) + 0.577) before soft (a Gumbel law): ~700 ms here, so the
    refresh is done before anyone sees the entry stale.
    """
    soft, delta, every, trials = 3000, 200, 10, 1000
    leads, counts = simulate(
        soft=soft, delta=delta, every=every, trials=trials, seed=20150901
    )
    p_any, p_in_time, expected = analytic(soft=soft, delta=delta, every=every)
    assert p_any > 1 - 1e-9
    assert p_in_time > 0.999
    assert all(lead is not None for lead in leads)
    in_time = sum(1 for lead in leads if lead is not None and lead >= delta)
    assert in_time / trials > 0.99
    mean_lead = sum(lead for lead in leads if lead is not None) / trials
    assert 500 < mean_lead < 950, mean_lead
    # Without a lease ~r*D = 20 readers would each compute: the lease is what
    # turns that into one. The simulated count follows the analytic sum.
    assert sum(counts) / trials == pytest.approx(expected, rel=0.05)
    assert 15 < expected < 25


def test_simulated_cold_key_rarely_refreshes_early() -> None:
    """Reads every second, a 200 ms compute: XFetch stays out of the way.

    Early refresh would mostly be wasted here; the stale window (not XFetch)
    is what triggers the refresh, with no rate-specific tuning.
    """
    soft, delta, every, trials = 60_000, 200, 1000, 2000
    leads, counts = simulate(soft=soft, delta=delta, every=every, trials=trials, seed=7)
    p_any, _, expected = analytic(soft=soft, delta=delta, every=every)
    assert p_any < 0.01
    assert sum(1 for lead in leads if lead is not None) / trials < 0.03
    assert sum(counts) / trials < 0.03
    assert expected < 0.01


def test_simulated_first_trigger_earlier_with_higher_beta() -> None:
    rng = random.Random(3)
    draws = [rng.random() for _ in range(300)]

    def first_lead(beta: float, offset: int) -> int:
        for i, age in enumerate(range(0, 3000, 10)):
            if xfetch_early(200, 3000 - age, beta, draws[(i + offset) % 300]):
                return 3000 - age
        return 0

    for offset in range(0, 300, 7):
        assert first_lead(2.0, offset) >= first_lead(1.0, offset)
        assert first_lead(1.0, offset) >= first_lead(0.5, offset)


# ------------------------------------------------------------------- lease


def test_lease_formula() -> None:
    assert lease_ms(1000, POLICY) == 2250  # 1000 * 2 + 250
    assert lease_ms(1, POLICY) == 500  # floor
    assert lease_ms(10**6, POLICY) == 60_000  # ceiling
    assert lease_ms(333, Policy(lease_factor=1.5, lease_margin_ms=0)) == 500
    assert lease_ms(1001, Policy(lease_factor=1.5, lease_margin_ms=0)) == 1502


def test_lease_unknown_delta_uses_default() -> None:
    assert lease_ms(None, POLICY) == 5000
    assert lease_ms(0, POLICY) == 5000  # 0 on the wire: not measured
    assert lease_ms(None, Policy(default_lease_ms=800)) == 800


@pytest.mark.parametrize("delta", [-1, -1000])
def test_lease_rejects_negative_delta(delta: int) -> None:
    with pytest.raises(ValueError, match="delta_ms"):
        lease_ms(delta, POLICY)


policies = st.builds(
    lambda lo, span, factor, margin: Policy(
        min_lease_ms=lo,
        max_lease_ms=lo + span,
        default_lease_ms=lo,
        lease_factor=factor,
        lease_margin_ms=margin,
    ),
    lo=st.integers(min_value=1, max_value=10**6),
    span=st.integers(min_value=0, max_value=10**7),
    factor=st.floats(min_value=1.0, max_value=20.0),
    margin=st.integers(min_value=0, max_value=10**4),
)


@given(policy=policies, a=st.none() | ms, b=positive_ms, c=positive_ms)
def test_lease_clamped_and_monotonic(
    policy: Policy, a: int | None, b: int, c: int
) -> None:
    assert policy.min_lease_ms <= lease_ms(a, policy) <= policy.max_lease_ms
    small, big = sorted((b, c))
    assert lease_ms(small, policy) <= lease_ms(big, policy)


@given(policy=policies, delta=positive_ms)
def test_lease_covers_factor_times_delta_when_it_can(
    policy: Policy, delta: int
) -> None:
    wanted = delta * policy.lease_factor
    if wanted + policy.lease_margin_ms <= policy.max_lease_ms:
        assert lease_ms(delta, policy) >= wanted


# ------------------------------------------------------------------- renew


@given(lease=st.integers(min_value=1, max_value=10**9))
def test_renew_interval(lease: int) -> None:
    every = renew_every_ms(lease)
    assert 1 <= every <= lease / 2 or lease == 1
    if lease >= 3:
        assert every < lease / 2
    if lease >= 4:
        # Two renewals may be missed; the third still lands before expiry.
        assert 3 * every < lease


def test_renew_examples() -> None:
    assert renew_every_ms(500) == 125
    assert renew_every_ms(5000) == 1250
    assert renew_every_ms(1) == 1


@pytest.mark.parametrize("lease", [0, -1])
def test_renew_rejects_bad_lease(lease: int) -> None:
    with pytest.raises(ValueError, match="lease_ms"):
        renew_every_ms(lease)


# -------------------------------------------------------------------- wait


def test_wait_examples() -> None:
    assert wait_ms(1000, 10_000) == 1000 + WAIT_SLACK_MS
    assert wait_ms(1000, 300) == 300  # the budget wins
    assert wait_ms(0, 300) == WAIT_SLACK_MS  # lease about to expire: no spin
    assert wait_ms(1000, 0) == 0  # budget spent
    assert wait_ms(-2, 300) == 0  # no lease: look or take over now
    assert wait_ms(-1, 300) == 300  # lease without expiry: only the budget


@given(pttl=st.integers(min_value=-2, max_value=10**9), budget=ms)
def test_wait_within_budget(pttl: int, budget: int) -> None:
    got = wait_ms(pttl, budget)
    assert 0 <= got <= budget
    if pttl >= 0:
        assert got == min(budget, pttl + WAIT_SLACK_MS)


@pytest.mark.parametrize(
    ("args", "name"), [((-3, 100), "lease_pttl_ms"), ((100, -1), "wait_timeout_ms")]
)
def test_wait_rejects_bad_input(args: tuple[int, int], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        wait_ms(*args)


# ------------------------------------------------------------ measured delta


def test_measured_delta() -> None:
    assert measured_delta_ms(0.0) == 1  # 0 would mean "not measured"
    assert measured_delta_ms(0.0004) == 1
    assert measured_delta_ms(0.2) == 200
    assert measured_delta_ms(1.2341) == 1235


@pytest.mark.parametrize("elapsed", [-0.001, math.nan, math.inf])
def test_measured_delta_rejects_bad_input(elapsed: float) -> None:
    with pytest.raises(ValueError, match="elapsed_s"):
        measured_delta_ms(elapsed)


# -- fresh_until_ms: the lean hit path's decision ---------------------------------

WRITTEN = 1_764_000_000_000  # a Redis TIME in ms


@given(
    soft=st.integers(0, 10**7),
    hard=st.integers(1, 10**7),
    delta=st.integers(0, 10**6),
    seed=st.integers(1, 2**32 - 1),
    age=st.integers(0, 2 * 10**7),
    beta=betas,
)
def test_fresh_until_agrees_with_state_by_pttl(
    soft: int, hard: int, delta: int, seed: int, age: int, beta: float
) -> None:
    """Whatever the lean path calls fresh, the PTTL path calls FRESH too."""
    meta = Meta(min(soft, hard), hard, 0, delta, seed, WRITTEN)
    rules = Policy(beta=beta)
    until = fresh_until_ms(meta, rules)
    pttl = hard - age  # as the key's PTTL would say at that age
    if pttl <= 0:
        assert WRITTEN + age >= until  # past hard: never fresh by the envelope
        return
    rand = xfetch_rand(meta, 0.5)
    by_pttl = state(meta, pttl, policy=rules, rand=rand)
    if WRITTEN + age < until:
        assert by_pttl is State.FRESH
    elif by_pttl is State.FRESH:
        # Only float rounding at the very boundary may disagree (and the
        # lean path then asks the PTTL: never wrong, only slower).
        assert WRITTEN + age - until < 1


def test_fresh_until_without_a_deadline() -> None:
    assert fresh_until_ms(None, POLICY) == NO_DEADLINE
    assert fresh_until_ms(Meta(written_ms=WRITTEN), POLICY) == NO_DEADLINE


@pytest.mark.parametrize(
    "meta",
    [
        Meta(900, 1000),  # written before written_ms existed
        Meta(900, 1000, 500, 0, 1, WRITTEN),  # a grace period: Redis keeps it
        Meta(900, 1000, 0, 50, 0, WRITTEN),  # a compute time but no draw
    ],
)
def test_fresh_until_undecided(meta: Meta) -> None:
    assert fresh_until_ms(meta, POLICY) == UNDECIDED


def test_fresh_until_plain_set_entry_uses_the_soft_rule() -> None:
    meta = Meta(hard_ms=10_000, written_ms=WRITTEN)
    assert fresh_until_ms(meta, POLICY) == WRITTEN + 9_500


def test_fresh_until_leaves_xfetch_its_margin() -> None:
    meta = Meta(9_000, 10_000, 0, 1_000, 2**31, WRITTEN)  # rand 0.5
    assert fresh_until_ms(meta, POLICY) == pytest.approx(
        WRITTEN + 9_000 - 1_000 * math.log(2)
    )
    assert fresh_until_ms(meta, Policy(beta=0)) == WRITTEN + 9_000
