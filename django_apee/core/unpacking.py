"""Unpacking msgpack from Redis without trusting it: :func:`unpack`.

Whoever can write to Redis chooses the bytes a get decodes, so unpacking is
bounded in depth, in the size of each container and in the number of
elements, whatever the bytes declare. It raises; it never crashes the
process nor spends more than the size cap allows.

Depth
=====
Plain arrays and maps are nested by msgpack's C unpacker on a stack of its
own, without recursion; more than :data:`MSGPACK_MAX_NESTING` (1024) of them
in one msgpack document is a ``StackError``, and the packer stops at the
same depth. Tuples and sets are extensions whose data is a msgpack document
of its own, unpacked from the ext hook: that is recursion, through Python
and C. Each depth has its own hook, so the depth is known without shared
state, and a tuple or set nested more than
:data:`~django_apee.core.extensions.MAX_EXT_NESTING` (64, the encoder's
limit) deep is corrupt.

``unpackb`` keeps msgpack's whole unpacking stack (about 40 KiB) on the C
stack: called at every level, 200 nested tuples crashed the main thread
(8 MiB) and 25 a thread with a 1 MiB stack. The first :data:`_UNPACKB_LEVELS`
levels (the common and fast case) use it anyway; deeper ones use
``Unpacker`` objects, whose stack is on the heap (about 1.5 KiB of C stack a
level), so the 64 levels the encoder may write decode in a 256 KiB thread.

Container size
==============
msgpack allocates a container when it reads its header, so ``max_array_len``
and its siblings are bounded by the bytes at hand (each element takes at
least one byte): five bytes cannot make it allocate four billion slots.

Element count
=============
Capping the decompressed bytes is not enough: 32 MiB of msgpack can be 32
million one-byte elements, a 256 MiB list built in most of a second, or 32
million empty dicts, two gigabytes. A payload decompressed under a cap of
``max_bytes`` therefore decodes into at most ``max_bytes // ELEMENT_BYTES``
*units*: one per array item, map key and map value (each costs at least a
pointer, 8 bytes), and :data:`CONTAINER_UNITS` more per array, map, tuple or
set (an empty list or dict already costs 56-64 bytes). The pointers and
container headers of a decoded value then fit in the cap its bytes fit in.

Counting costs a Python call per container, so it is done only when the
payload could exceed the budget: each unit needs a byte of its own, and each
container one of the bytes that can start one, so a payload whose length plus
``CONTAINER_UNITS`` times its container-starting bytes (counted in C, a few
percent of the unpacking time) is within the budget unpacks without hooks.
A container declaring more elements than the budget left is refused at its
header, before anything is allocated. Exceeding the budget is ``too_large``,
like exceeding the byte cap.

Copies
======
msgpack hands an extension's data to the hook as a copy (and an Unpacker
copies it again into its buffer), so a tuple nested in a tuple copies most
of the payload again at every level: 64 levels around a 32 MiB string would
copy four gigabytes. The data of the tuples and sets at one level are
disjoint parts of the payload, so each of the first :data:`_UNPACKB_LEVELS`
levels copies at most the payload; the copies made deeper may add up to
``max_bytes``, beyond which the value is ``too_large``.

What remains: the objects the pointers point to. Strings and numbers are
bounded by the bytes they come from (two bytes and more each); at worst a
value within the caps costs a few times ``max_bytes`` of memory, as a
legitimate value near the cap does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import msgpack

from django_apee.core.extensions import (
    EXT_BYTEARRAY,
    EXT_FROZENSET,
    EXT_SAFESTRING,
    EXT_SET,
    EXT_TUPLE,
    MAX_EXT_NESTING,
    SCALAR_DECODERS,
    _Corrupt,
    safe_string_decoder,
)
from django_apee.core.wire import DecodeError

__all__ = [
    "CONTAINER_UNITS",
    "DECODERS",
    "ELEMENT_BYTES",
    "MSGPACK_MAX_NESTING",
    "unpack",
]

#: msgpack's own nesting limit for arrays and maps within one msgpack
#: document, packing and unpacking alike (``StackError`` beyond).
MSGPACK_MAX_NESTING = 1024
#: A unit of the element budget, in bytes of the size cap (a pointer).
ELEMENT_BYTES = 8
#: The units a container costs besides its elements.
CONTAINER_UNITS = 8
# Extension levels 1 .. this are unpacked with unpackb, deeper ones with
# Unpacker objects (see "Depth").
_UNPACKB_LEVELS = 2
# Deep extension data up to this size reuses a pooled Unpacker (one per depth
# and thread) whose limits are this size; larger data gets one of its own.
_POOLED_EXT_BYTES = 4096
# Bytes that can start a container: fixmap, fixarray, array16/32, map16/32,
# and every extension header (a tuple or set is one).
_CONTAINER_STARTS = bytes(
    [*range(0x80, 0xA0), 0xC7, 0xC8, 0xC9, *range(0xD4, 0xD9), *range(0xDC, 0xE0)]
)
_NOT_CONTAINER_STARTS = bytes(b for b in range(256) if b not in _CONTAINER_STARTS)

_CONTAINERS: dict[int, Callable[[list[Any]], Any]] = {
    EXT_TUPLE: tuple,
    EXT_SET: set,
    EXT_FROZENSET: frozenset,
}
#: Every other extension's decoder, by code. The codec sets the SafeString
#: one (``register_safe_string``).
DECODERS: dict[int, Callable[[bytes], Any]] = {
    **SCALAR_DECODERS,
    EXT_SAFESTRING: safe_string_decoder(None),
    EXT_BYTEARRAY: bytearray,
}

_unpackb = msgpack.unpackb
_Unpacker = msgpack.Unpacker
ExtHook = Callable[[int, bytes], Any]


class _Pools(threading.local):
    """Per-thread Unpackers for deep extension data, by depth."""

    def __init__(self) -> None:
        self.unpackers: dict[int, Any] = {}


_pools = _Pools()


class _Copies(threading.local):
    """Bytes nested extensions may still copy in this thread's unpacking."""

    left = 0


_copies = _Copies()


def _copied_too_much(data: bytes, copies_made: int) -> None:
    """Charge a nested tuple's or set's data, copied so many times, to the
    copy budget."""
    copies = _copies
    copies.left -= copies_made * len(data)
    if copies.left < 0:
        raise DecodeError(
            "too_large", "nested tuples/sets copy more bytes than the size cap"
        )


class _Count:
    """The unit budget of one unpacking, and the msgpack hooks that count it."""

    __slots__ = ("budget", "list_hook", "object_hook", "remaining")

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.remaining = budget
        # Bound once: msgpack calls them for every array and map.
        self.list_hook = self.count_list
        self.object_hook = self.count_map

    def too_many(self) -> DecodeError:
        return DecodeError(
            "too_large",
            f"payload unpacks to more than {self.budget} elements "
            f"({ELEMENT_BYTES} bytes each, {CONTAINER_UNITS} a container) "
            "against the size cap",
        )

    def count_list(self, items: list[Any]) -> list[Any]:
        self.remaining -= len(items) + CONTAINER_UNITS
        if self.remaining < 0:
            raise self.too_many()
        return items

    def count_map(self, items: dict[Any, Any]) -> dict[Any, Any]:
        self.remaining -= 2 * len(items) + CONTAINER_UNITS
        if self.remaining < 0:
            raise self.too_many()
        return items

    def limit(self, size: int) -> int:
        """Elements one container of a ``size``-byte document may declare."""
        return max(0, min(size, self.remaining))


def _ext_hooks(count: _Count | None) -> Callable[[int], ExtHook]:
    """The ext hook of each depth: ``at(d)`` sees extensions inside d tuples.

    Made on first use: a counted unpacking makes its own (most values have no
    tuple or set at all); the shared ones are all made at import.
    """
    hooks: list[ExtHook] = []
    pool: dict[int, Any] = {}

    def unpack_deep(data: bytes, depth: int) -> Any:
        size = len(data)
        unpackers = _pools.unpackers if count is None else pool
        if size > _POOLED_EXT_BYTES:
            unpacker = _unpacker(at(depth), size, count)
        else:
            # Taken out while in use: one that fails holds half a value and
            # is dropped, not put back.
            unpacker = unpackers.pop(depth, None) or _unpacker(
                at(depth), _POOLED_EXT_BYTES, count
            )
        start = unpacker.tell()
        unpacker.feed(data)
        value = unpacker.unpack()
        if unpacker.tell() - start != size:
            raise _Corrupt("extension data has trailing bytes")
        if size <= _POOLED_EXT_BYTES:
            unpackers[depth] = unpacker
        return value

    def make(depth: int) -> ExtHook:
        inner = depth + 1

        def hook(code: int, data: bytes) -> Any:
            container = _CONTAINERS.get(code)
            if container is None:
                decoder = DECODERS.get(code)
                if decoder is None:
                    raise _Corrupt(f"unknown msgpack extension type {code}")
                return decoder(data)
            if inner > MAX_EXT_NESTING:
                # The encoder never writes deeper; each level is recursion.
                raise _Corrupt(f"tuples/sets nested more than {MAX_EXT_NESTING} deep")
            if inner > _UNPACKB_LEVELS:
                # Copied for the hook, and again into the Unpacker's buffer.
                _copied_too_much(data, 2)
                items = unpack_deep(data, inner)
            elif count is None:
                ext = hooks[inner] if len(hooks) > inner else at(inner)
                items = _unpackb(data, ext_hook=ext, raw=False, strict_map_key=False)
            else:
                limit = count.limit(len(data))
                items = _unpackb(
                    data,
                    ext_hook=at(inner),
                    raw=False,
                    strict_map_key=False,
                    list_hook=count.list_hook,
                    object_hook=count.object_hook,
                    max_array_len=limit,
                    max_map_len=limit // 2,
                )
            if type(items) is not list:
                raise _Corrupt("container extension does not hold an array")
            return container(items)

        return hook

    def at(depth: int) -> ExtHook:
        while len(hooks) <= depth:
            hooks.append(make(len(hooks)))
        return hooks[depth]

    return at


def _unpacker(ext_hook: ExtHook, size: int, count: _Count | None) -> Any:
    """An Unpacker for documents up to ``size`` bytes, counting or not."""
    limit = size if count is None else count.limit(size)
    hooks: dict[str, Any] = (
        {}
        if count is None
        else {"list_hook": count.list_hook, "object_hook": count.object_hook}
    )
    return _Unpacker(
        None,
        ext_hook=ext_hook,
        raw=False,
        strict_map_key=False,
        max_buffer_size=size,
        max_str_len=size,
        max_bin_len=size,
        max_ext_len=size,
        max_array_len=limit,
        max_map_len=limit // 2,
        **hooks,
    )


_plain_hook_at = _ext_hooks(None)
# Every depth's hook made up front: the threads share them, and making them
# on first use could race (two hooks for one depth, the next one off by one).
_plain_hook_at(MAX_EXT_NESTING)
_top_hook = _plain_hook_at(0)


def unpack(data: bytes, max_bytes: int | None = None) -> Any:
    """The value packed in ``data``, within the budget of ``max_bytes``.

    ``max_bytes`` is the size cap ``data`` was decompressed under (see
    "Element count"); None: no budget, only what ``data``'s length bounds
    (one container's elements, the copies). Any exception means the bytes
    are not a value this codec wrote (the envelope reports it as
    ``corrupt``), except :class:`~django_apee.core.wire.DecodeError`: a time
    zone or a type not available here (``codec_unavailable``), or more than
    the cap allows (``too_large``).
    """
    size = len(data)
    if max_bytes is None:
        budget = None
        _copies.left = size * MAX_EXT_NESTING
    else:
        budget = max_bytes // ELEMENT_BYTES
        _copies.left = max_bytes
    try:
        if (
            budget is None
            or size * (1 + CONTAINER_UNITS) <= budget
            or _within(data, budget)
        ):
            return _unpackb(
                data,
                ext_hook=_top_hook,
                raw=False,
                strict_map_key=False,
                max_str_len=size,
                max_bin_len=size,
                max_ext_len=size,
                max_array_len=size,
                max_map_len=size // 2,
            )
        return _unpack_counted(data, budget)
    except msgpack.StackError:
        raise _Corrupt(
            f"arrays/maps nested more than {MSGPACK_MAX_NESTING} deep"
        ) from None


def _within(data: bytes, budget: int) -> bool:
    """Whether ``data`` cannot hold more units than ``budget``, counting none.

    Each unit takes a byte of its own, and each container's units one of the
    bytes that can start a container.
    """
    size = len(data)
    if size > budget:
        return False
    starts = len(data.translate(None, _NOT_CONTAINER_STARTS))
    return size + CONTAINER_UNITS * starts <= budget


def _unpack_counted(data: bytes, budget: int) -> Any:
    size = len(data)
    count = _Count(budget)
    limit = count.limit(size)
    try:
        return _unpackb(
            data,
            ext_hook=_ext_hooks(count)(0),
            raw=False,
            strict_map_key=False,
            max_str_len=size,
            max_bin_len=size,
            max_ext_len=size,
            list_hook=count.list_hook,
            object_hook=count.object_hook,
            max_array_len=limit,
            max_map_len=limit // 2,
        )
    except ValueError as exc:
        # A container declaring more elements than the budget has left.
        if "exceeds max_array_len" in str(exc) or "exceeds max_map_len" in str(exc):
            raise count.too_many() from None
        raise
