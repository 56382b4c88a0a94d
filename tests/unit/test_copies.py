"""The near cache's copies (``core/copies.py``): equal, independent, or none."""

from __future__ import annotations

import pickle
from collections import OrderedDict
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from django_apee.core.copies import copier

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.decimals(allow_nan=False, allow_infinity=False),
    st.datetimes(timezones=st.just(timezone.utc)),
)
KEYS = st.one_of(st.text(max_size=10), st.integers())
ROWS = st.lists(st.dictionaries(KEYS, SCALARS, max_size=8), max_size=20)
SHAPES = st.recursive(
    st.one_of(SCALARS, st.tuples(SCALARS, SCALARS)),
    lambda inner: st.one_of(
        st.lists(inner, max_size=6), st.dictionaries(KEYS, inner, max_size=6)
    ),
    max_leaves=40,
)


@pytest.fixture(autouse=True)
def _empty_redis() -> None:
    """Shadow conftest's autouse FLUSHDB: this module needs no Redis at all."""


def _mutate(value: Any) -> None:
    """Change every mutable part a caller could change."""
    if type(value) is list:
        for item in value:
            _mutate(item)
        value.append("added")
    elif type(value) is dict:
        for item in value.values():
            _mutate(item)
        value["added"] = "added"


@given(SHAPES)
def test_each_copy_equals_the_value_and_changing_it_changes_no_other(
    value: Any,
) -> None:
    kept = pickle.loads(pickle.dumps(value))
    found = copier(kept)
    assert found is not None
    copy, size = found
    assert size > 0
    first = copy()
    assert first == value
    _mutate(first)
    assert copy() == value
    assert kept == value


@pytest.mark.parametrize(
    "value",
    [
        OrderedDict(a=1),
        [OrderedDict(a=1)],
        {"a": {1, 2}},
        ({"a": 1},),
        (1, [2]),
        {"a": object()},
        bytearray(b"x"),
        {1, 2},
    ],
    ids=repr,
)
def test_other_shapes_have_no_copier(value: Any) -> None:
    assert copier(value) is None


def test_a_container_reached_twice_has_no_copier() -> None:
    """pickle keeps it shared in what it loads; a copier would not."""
    shared = [1, 2]
    assert copier({"a": shared, "b": shared}) is None


def test_nesting_deeper_than_the_bound_has_no_copier() -> None:
    value: Any = 1
    for _ in range(40):
        value = [value]
    assert copier(value) is None


def test_rows_share_their_keys_in_the_estimate() -> None:
    row = {f"column_{n}": Decimal(n) for n in range(10)}
    rows = [dict(row, at=datetime(2026, 1, 1)) for _ in range(100)]
    found = copier(rows)
    assert found is not None
    one = copier([rows[0]])
    assert one is not None
    # 100 rows hold less than 100 times one row: the keys are counted once.
    assert found[1] < 100 * one[1]
