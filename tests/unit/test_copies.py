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
SHAPES = st.one_of(
    SCALARS,
    st.lists(SCALARS, max_size=20),
    st.tuples(SCALARS, SCALARS),
    st.dictionaries(KEYS, SCALARS, max_size=20),
    ROWS,
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
        value["added"] = "added"


@given(SHAPES)
def test_each_copy_equals_the_value_and_changing_it_changes_no_other(value: Any) -> None:
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
        [[1, 2]],
        {"a": [1]},
        [{"a": [1]}],
        [{"a": 1}, [2]],
        ({"a": 1},),
        {"a": object()},
        bytearray(b"x"),
        {1, 2},
    ],
    ids=repr,
)
def test_other_shapes_have_no_copier(value: Any) -> None:
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
