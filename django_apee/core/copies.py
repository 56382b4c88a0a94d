"""Independent copies of a kept value, made faster than unpickling it again.

The near cache must hand every reader its own object: a caller that appends
to the list it got must not change what the next caller gets. Unpickling
the stored payload on each read guarantees that, and costs most of a near
hit for a large value (100 ``values()`` rows: ~48 µs of ``pickle.loads``).
For the shapes cached most, a copy made by C-level shallow copies is
exactly as independent and several times cheaper (those rows: ~6 µs):

- an immutable scalar (exact types only: str, bytes, int, float, bool,
  None, Decimal, date, time, datetime, timedelta, UUID) or a tuple or
  frozenset of them is shared, as nobody can change it;
- a list or a dict whose items are such scalars is copied with ``copy()``;
- a list of such dicts (a queryset's ``values()``) gets a new list of
  ``copy()``\\ s.

:func:`copier` looks at a value once (when it is kept) and returns the
function that copies it, with the value's estimated size in memory; any
other shape (subclasses included: a ``defaultdict``, a model instance, a
nested structure) gets None, and the near cache unpickles it per read as
before. The kept value is never handed out, so the shape found stays true.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from uuid import UUID

#: Types whose instances cannot be changed (exact types: a subclass may add
#: mutable attributes).
IMMUTABLE = frozenset(
    {type(None), bool, int, float, str, bytes, Decimal, date, time, datetime}
    | {timedelta, UUID}
)

#: The most items a copier looks at: past it, the value is unpickled per read
#: (looking costs one pass at keep time, bounded by this).
MAX_ITEMS = 100_000


def copier(value: Any) -> tuple[Callable[[], Any], int] | None:
    """``(copy, size)``: a function returning an independent copy of
    ``value`` and an estimate of the bytes ``value`` holds; None for a shape
    not listed in the module's docstring."""
    kind = type(value)
    if kind in IMMUTABLE:
        return (lambda: value), sys.getsizeof(value)
    if kind is tuple or kind is frozenset:
        size = _scalars_size(value)
        return None if size is None else ((lambda: value), size)
    if kind is dict:
        size = _dict_size(value)
        return None if size is None else (value.copy, size)
    if kind is list:
        size = _scalars_size(value)
        if size is not None:
            return value.copy, size
        return _rows(value)
    return None


def _rows(rows: list[Any]) -> tuple[Callable[[], Any], int] | None:
    """A list of flat dicts: a new list of their copies."""
    size = sys.getsizeof(rows)
    if len(rows) > MAX_ITEMS:
        return None
    keys: set[int] = set()  # the rows share their keys: counted once
    for row in rows:
        if type(row) is not dict:
            return None
        found = _dict_size(row, keys)
        if found is None:
            return None
        size += found
    return (lambda: [row.copy() for row in rows]), size


def _scalars_size(items: Any) -> int | None:
    """The size of a list, tuple or frozenset of immutable scalars, or None."""
    if len(items) > MAX_ITEMS:
        return None
    size = sys.getsizeof(items)
    for item in items:
        if type(item) not in IMMUTABLE:
            return None
        size += sys.getsizeof(item)
    return size


def _dict_size(items: dict[Any, Any], keys: set[int] | None = None) -> int | None:
    """The size of a dict whose keys and values are immutable scalars, or
    None; ``keys``: the ids of keys already counted."""
    if len(items) > MAX_ITEMS:
        return None
    size = sys.getsizeof(items)
    for key, item in items.items():
        if type(key) not in IMMUTABLE or type(item) not in IMMUTABLE:
            return None
        size += sys.getsizeof(item)
        if keys is None:
            size += sys.getsizeof(key)
        elif id(key) not in keys:
            keys.add(id(key))
            size += sys.getsizeof(key)
    return size
