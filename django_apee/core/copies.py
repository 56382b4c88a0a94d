"""Independent copies of a kept value, made faster than unpickling it again.

The near cache must hand every reader its own object: a caller that appends
to the list it got must not change what the next caller gets. Unpickling
the stored payload on each read guarantees that, and costs most of a near
hit for a large value (100 ``values()`` rows: ~48 µs of ``pickle.loads``).
For the shapes cached most, a copy made of C-level shallow copies is
exactly as independent and cheaper (those rows: ~6 µs; a 10 KB JSON-like
dict of 78 items with a list each: about half of ``pickle.loads``):

- immutable scalars (exact types only: str, bytes, int, float, bool, None,
  Decimal, date, time, datetime, timedelta, UUID) and tuples or frozensets
  of them are shared, as nobody can change them;
- lists and dicts (exact types) of those, nested up to ``MAX_DEPTH``, are
  copied with ``copy()``, and only the items that are containers again are
  replaced by their own copies.

:func:`copier` looks at a value once (when it is kept) and returns the
function that copies it, with an estimate of the memory the value holds;
any other shape (a subclass such as ``defaultdict``, a model instance, a
set, one container reached twice, which pickle would keep shared) gets
None, and the near cache unpickles it per read as before. The kept value is
never handed out, so the shape found stays true.
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

#: The most items (all containers' together) and the deepest nesting a
#: copier is made for; past either the value is unpickled per read.
MAX_ITEMS = 100_000
MAX_DEPTH = 16
#: What a copy step of one container is charged (its closure and tuple).
STEP_BYTES = 200

#: How a container is copied, given the kept one; None: shared as it is.
Step = Callable[[Any], Any] | None


class _Unsupported(Exception):
    """The value has a shape :func:`copier` does not copy."""


class _Walk:
    """One look at a value: items seen, bytes estimated, containers met."""

    def __init__(self) -> None:
        self.items = 0
        self.size = 0
        self.seen: set[int] = set()

    def scalar(self, value: Any) -> None:
        if type(value) not in IMMUTABLE:
            raise _Unsupported
        self.size += sys.getsizeof(value)

    def container(self, value: Any, depth: int) -> None:
        if depth > MAX_DEPTH or id(value) in self.seen:
            raise _Unsupported
        self.seen.add(id(value))
        self.items += len(value)
        if self.items > MAX_ITEMS:
            raise _Unsupported
        self.size += sys.getsizeof(value)

    def key(self, key: Any) -> None:
        """Dict keys: rows share theirs, so each object is counted once."""
        if type(key) not in IMMUTABLE:
            raise _Unsupported
        if id(key) not in self.seen:
            self.seen.add(id(key))
            self.size += sys.getsizeof(key)


def copier(value: Any) -> tuple[Callable[[], Any], int] | None:
    """``(copy, size)``: a function returning an independent copy of
    ``value``, and an estimate of the bytes ``value`` holds; None for a
    shape not listed in the module's docstring."""
    walk = _Walk()
    try:
        step = _step(value, walk, 0)
    except _Unsupported:
        return None
    if step is None:
        return (lambda: value), walk.size
    return (lambda: step(value)), walk.size


def _step(value: Any, walk: _Walk, depth: int) -> Step:
    kind = type(value)
    if kind in IMMUTABLE:
        walk.size += sys.getsizeof(value)
        return None
    if kind is tuple or kind is frozenset:
        walk.container(value, depth)
        for item in value:
            walk.scalar(item)
        return None
    if kind is list:
        walk.container(value, depth)
        steps = [_step(item, walk, depth + 1) for item in value]
        if steps and all(step is _shallow for step in steps):
            return _copies  # rows: a list of flat dicts or lists
        if steps and None not in steps:
            walk.size += STEP_BYTES
            return _each(tuple(steps))  # type: ignore[arg-type]
        at = tuple((i, step) for i, step in enumerate(steps) if step is not None)
        return _copy_with(at, walk)
    if kind is dict:
        walk.container(value, depth)
        deep = []
        for key, item in value.items():
            walk.key(key)
            step = _step(item, walk, depth + 1)
            if step is not None:
                deep.append((key, step))
        return _copy_with(tuple(deep), walk)
    raise _Unsupported


def _copy_with(deep: tuple[tuple[Any, Callable[[Any], Any]], ...], walk: _Walk) -> Step:
    """A list's or dict's copy: ``copy()``, then the items at ``deep``'s
    indexes or keys replaced by their own copies."""
    if not deep:
        return _shallow
    walk.size += STEP_BYTES

    def copy(kept: Any) -> Any:
        made = kept.copy()
        for at, step in deep:
            made[at] = step(kept[at])
        return made

    return copy


def _shallow(kept: Any) -> Any:
    return kept.copy()


def _each(steps: tuple[Callable[[Any], Any], ...]) -> Callable[[Any], Any]:
    """A list each of whose items is copied by its own step."""

    def copy(kept: list[Any]) -> list[Any]:
        return [step(item) for step, item in zip(steps, kept, strict=True)]

    return copy


def _copies(kept: list[Any]) -> list[Any]:
    return [item.copy() for item in kept]
