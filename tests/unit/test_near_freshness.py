"""store/near.py's fresh_left_ms agrees with policy.state, the one rule."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from django_apee.core import policy
from django_apee.core.wire import Meta
from django_apee.store.near import FOREVER, fresh_left_ms

RULES = policy.Policy()


@st.composite
def entries(draw: st.DrawFn) -> tuple[Meta, int]:
    hard = draw(st.integers(1, 10**7))
    meta = Meta(
        soft_ms=draw(st.one_of(st.just(0), st.integers(1, hard))),
        hard_ms=hard,
        grace_ms=draw(st.one_of(st.just(0), st.integers(1, 10**6))),
        delta_ms=draw(st.one_of(st.just(0), st.integers(1, 10**5))),
        seed=draw(st.one_of(st.just(0), st.integers(1, policy.SEED_RANGE - 1))),
    )
    pttl = draw(st.integers(0, meta.hard_ms + meta.grace_ms))
    return meta, pttl


def is_fresh(meta: Meta, pttl: int) -> bool:
    rand = policy.xfetch_rand(meta, 0.5)
    return policy.state(meta, pttl, policy=RULES, rand=rand) is policy.State.FRESH


@settings(max_examples=500, deadline=None)
@given(entries(), st.integers(0, 10**7))
def test_fresh_exactly_while_state_says_fresh(
    entry: tuple[Meta, int], later: int
) -> None:
    """Served from memory ``later`` ms after the read only if a Redis read
    then (PTTL ``later`` ms smaller) would say FRESH; and up to that point."""
    meta, pttl = entry
    left = fresh_left_ms(meta, pttl, RULES)
    if meta.seed == 0 and meta.delta_ms:
        assert left == 0  # drawn per read: Redis reads decide
        return
    assert left <= pttl
    if pttl - later < 0:
        assert later >= left
        return
    fresh_then = is_fresh(meta, pttl - later)
    # Floats and XFetch's log round: allow one millisecond at the edge.
    if later < math.floor(left) - 1:
        assert fresh_then
    if later >= math.ceil(left) + 1:
        assert not fresh_then


def test_persistent_and_meta_less_entries_are_fresh_for_their_ttl() -> None:
    assert fresh_left_ms(None, -1, RULES) == FOREVER
    assert fresh_left_ms(None, 500, RULES) == 500
    assert fresh_left_ms(Meta(hard_ms=0), 500, RULES) == 500


def test_a_draw_per_read_is_left_to_redis() -> None:
    assert fresh_left_ms(Meta(hard_ms=60_000, delta_ms=100), 60_000, RULES) == 0
