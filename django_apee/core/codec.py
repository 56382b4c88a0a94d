"""msgpack packing and unpacking of whole values, with the extension types.

msgpack is the language-neutral codec, and with the pickle fallback off it
never executes code on read. Packing a value must either reproduce it exactly
or fail, so that the envelope can send the whole value to pickle instead;
this module is where "exactly" is enforced. Either way the envelope
authenticates the packed bytes with a MAC bound to the value's key
(:mod:`django_apee.core.mac`, :mod:`django_apee.core.wire`): neither codec
reads bytes whose MAC does not verify.

Packed with ``use_bin_type=True, strict_types=True`` so that subclasses of
``dict``/``list``/``str``/``int`` (``OrderedDict``, ``IntEnum``, namedtuples,
lazy strings...) are not silently flattened into their base type: they reach
the ``default`` hook, which only accepts the exact types listed in
:mod:`django_apee.core.extensions`. Anything else raises one of
:data:`MSGPACK_FAILURES`. Unpacked with ``raw=False, strict_map_key=False``;
msgpack arrays come back as ``list``. :func:`unpack` is
:mod:`django_apee.core.unpacking`'s: bounded in depth, container size and
element count whatever the bytes say.

msgpack packs ``bytearray`` natively as bin whatever ``strict_types`` says,
so the encoder boxes bytearrays itself (see :func:`pack_value`); ``memoryview``
is packed natively as bin and comes back as ``bytes`` (pickle could not store
it at all). A ``msgpack.ExtType`` or ``msgpack.Timestamp`` inside a value is
packed natively by msgpack too; don't cache those.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from gc import get_referents as _get_referents
from itertools import compress
from struct import error as struct_error
from typing import Any

import msgpack

from django_apee.core import unpacking
from django_apee.core.extensions import (
    EXT_BYTEARRAY,
    EXT_FROZENSET,
    EXT_SAFESTRING,
    EXT_SET,
    EXT_TUPLE,
    MAX_EXT_NESTING,
    SCALAR_ENCODERS,
    Unsupported,
    encode_safe_string,
    safe_string_decoder,
)
from django_apee.core.unpacking import unpack

__all__ = ["MSGPACK_FAILURES", "pack", "pack_value", "register_safe_string", "unpack"]

# A packer's internal buffer only ever grows; after packing something this big
# the packer is replaced so one huge value does not pin memory in a thread.
_PACKER_RECYCLE_BYTES = 1024 * 1024

# The only containers (msgpack-native or extension) that can hold a bytearray.
_WALKED = frozenset((list, dict, tuple))

#: What packing a supported-looking value can raise when msgpack cannot carry
#: it: the ``default`` hook (TypeError), str with lone surrogates
#: (UnicodeEncodeError), nesting beyond msgpack's or Python's limits. All send
#: the value to pickle.
MSGPACK_FAILURES = (TypeError, ValueError, OverflowError, RecursionError, struct_error)


# --------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------


class _ThreadState(threading.local):
    """Per-thread reusable packers.

    A msgpack ``Packer`` must not be used by two threads at once, and creating
    one per call costs more than packing a small value. ``packers`` is indexed
    by nesting depth: packing a tuple's items happens inside the ``default``
    hook while the outer packer is still busy, so each level needs its own.
    """

    def __init__(self) -> None:
        self.packers: list[Any] = []
        self.depth = 0


_state = _ThreadState()


def _new_packer() -> Any:
    return msgpack.Packer(
        default=_default, use_bin_type=True, strict_types=True, autoreset=True
    )


def pack(obj: object) -> bytes:
    """msgpack bytes of ``obj``; raises one of :data:`MSGPACK_FAILURES`."""
    state = _state
    depth = state.depth
    packers = state.packers
    if depth > MAX_EXT_NESTING:
        # Decoding recurses through Python once per level; refuse here (the
        # value goes to pickle) rather than write what readers cannot read.
        raise ValueError(f"more than {MAX_EXT_NESTING} nested tuples/sets")
    if depth == len(packers):
        packers.append(_new_packer())
    state.depth = depth + 1
    try:
        out: bytes = packers[depth].pack(obj)
    finally:
        state.depth = depth
    if len(out) > _PACKER_RECYCLE_BYTES:
        packers[depth] = _new_packer()
    return out


def _enc_tuple(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_TUPLE, pack(list(obj)))


def _enc_set(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_SET, pack(list(obj)))


def _enc_frozenset(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_FROZENSET, pack(list(obj)))


class _BytearrayBox:
    """Carries a bytearray past msgpack, which would pack it as plain bin.

    ``strict_types`` does not apply to bytearray (nor memoryview): msgpack
    packs them natively as bin, so they would come back as ``bytes`` and the
    ``default`` hook never sees them. :func:`pack_value` boxes them instead.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytearray) -> None:
        self.data = data


def _enc_bytearray(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_BYTEARRAY, bytes(obj.data))


# Exact types only: a subclass is not the type (and would lose its identity).
_ENCODERS: dict[type, Callable[[Any], msgpack.ExtType]] = {
    tuple: _enc_tuple,
    set: _enc_set,
    frozenset: _enc_frozenset,
    **SCALAR_ENCODERS,
    _BytearrayBox: _enc_bytearray,
}


def _default(obj: object) -> msgpack.ExtType:
    encoder = _ENCODERS.get(type(obj))
    if encoder is None:
        raise Unsupported(obj)
    return encoder(obj)


def pack_value(value: object) -> bytes:
    """Pack a whole value, keeping bytearrays bytearrays.

    Finding a bytearray means walking the value, which costs more than packing
    it; but a bytearray can only be in the value if the packed bytes contain a
    bin marker (0xc4-0xc6), so the walk only runs then. The walk batches one
    nesting level per ``gc.get_referents`` call (C speed) and only descends into
    list, dict and tuple: a set, frozenset or dict key cannot hold a bytearray
    (unhashable). It runs after a successful pack, so the value is acyclic.
    """
    out = pack(value)
    # msgpack bin8/bin16/bin32 markers; ``in`` is a memchr, a regex class is
    # fifty times slower.
    if (b"\xc4" in out or b"\xc5" in out or b"\xc6" in out) and _has_bytearray(value):
        out = pack(_box_bytearrays(value))
    return out


def _has_bytearray(value: object) -> bool:
    if type(value) is bytearray:
        return True
    if type(value) not in _WALKED:
        return False
    level: list[Any] = [value]
    while level:
        refs = _get_referents(*level)
        types = list(map(type, refs))
        if bytearray in types:
            return True
        level = list(compress(refs, map(_WALKED.__contains__, types)))
    return False


def _box_bytearrays(obj: Any) -> Any:
    tp = type(obj)
    if tp is bytearray:
        return _BytearrayBox(obj)
    if tp is list:
        return [_box_bytearrays(item) for item in obj]
    if tp is tuple:
        return tuple([_box_bytearrays(item) for item in obj])
    if tp is dict:
        return {key: _box_bytearrays(item) for key, item in obj.items()}
    return obj


# --------------------------------------------------------------------------
# Django's SafeString, handed in
# --------------------------------------------------------------------------

_safe_string: type[str] | None = None


def register_safe_string(cls: type[str] | None) -> None:
    """Carry ``cls``, Django's ``SafeString``, as extension 12 from now on.

    The core does not import Django, so the backend hands the class in once,
    before it encodes or decodes anything; until then a ``SafeString`` goes to
    pickle and extension 12 reads as ``codec_unavailable``. Exactly ``cls``
    is carried, not its subclasses. ``None`` takes it back (for tests).
    """
    global _safe_string
    if _safe_string is not None:
        del _ENCODERS[_safe_string]
    _safe_string = cls
    if cls is not None:
        _ENCODERS[cls] = encode_safe_string
    unpacking.DECODERS[EXT_SAFESTRING] = safe_string_decoder(cls)
