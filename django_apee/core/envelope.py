"""The bytes django-apee stores in Redis: header, metadata, codec, compression, signing.

This module is pure: no Redis, no Django settings, no I/O, no logging. The
backend turns a :class:`DecodeError` into a miss, a counter (``reason``) and a
rate-limited log line; this module only has to be exact, fast on the hit path
and impossible to crash with hostile bytes.

Why a header at all
===================
django-redis stores a bare pickle, so a reader cannot tell a value it wrote
from a value some other client wrote, cannot evolve the format, and must
unpickle whatever is in Redis. Every value written here starts with a two-byte
magic that neither msgpack, pickle, ASCII integers nor the usual compressors
ever start with, so foreign bytes are recognised and reported instead of being
misread.

Wire format, version 1
======================
::

    offset 0-1  MAGIC = b"\\xc1\\xa9"
                0xC1 is the one byte msgpack never emits; pickle starts with
                0x80, raw ints with ASCII digits or "-", zlib 0x78, zstd 0x28,
                lz4 0x04, gzip 0x1f.
    offset 2    FORMAT_VERSION = 1
    offset 3    flags
                  bits 0-1  codec: 0 msgpack, 1 signed pickle, 2-3 reserved
                  bits 2-3  compression: 0 none, 1 zstd, 2 lz4, 3 zlib
                  bit  4    META present
                  bits 5-7  reserved, must be 0
    if META     1 byte n (0..255), then n bytes: a msgpack array of
                non-negative ints [soft_ms, hard_ms, grace_ms, delta_ms, seed].
                Readers take the fields they know, ignore extra trailing
                fields (so a later writer may append fields without a version
                bump) and default missing ones to 0; n == 0 means "all 0".
    if pickle   32 bytes HMAC-SHA256 over (every byte before the signature)
                + (the stored payload bytes after it). The header, the
                metadata and the *compressed* payload are all covered, so the
                signature is checked before anything is decompressed or
                unpickled.
    payload     the codec bytes, compressed if the compression bits say so.

Plain ``int`` values in the signed 64-bit range and without metadata are not
enveloped at all: :meth:`Envelope.encode` returns the int and the backend
stores its ASCII digits, exactly like django-redis, so ``INCR``/``DECR`` stay
atomic and existing counters keep working after swapping backends. Larger ints
go into an envelope (Redis could not ``INCR`` them anyway, and Python refuses
to ``str()`` ints above 4300 digits by default).

Compression is tried when the codec payload is at least ``compress_min_bytes``
long and kept only if the result is strictly smaller. Readers follow the
header, never their own configuration, so a zstd-configured reader reads
values written with zlib or lz4. zstd frames are written with their content
size; a frame that declares more than ``max_decompressed_bytes`` is rejected
before any output buffer is allocated.

msgpack codec and extension types
=================================
Packed with ``use_bin_type=True, strict_types=True`` so that subclasses of
``dict``/``list``/``str``/``int`` (``OrderedDict``, ``IntEnum``, namedtuples,
lazy strings...) are not silently flattened into their base type: they reach
the ``default`` hook, which only accepts the exact types below. Anything else
sends the *whole* value to signed pickle (or raises
:class:`UnserializableValueError` when the fallback is off). Unpacked with
``raw=False, strict_map_key=False``; msgpack arrays come back as ``list``.

The codes are part of the wire format and must never be renumbered.
Multi-byte integers are big-endian.

====  ===================  ===============================================
code  Python type          ext data
====  ===================  ===============================================
 1    tuple                msgpack array of the items (recursive)
 2    set                  msgpack array of the items (recursive)
 3    frozenset            msgpack array of the items (recursive)
 4    naive datetime       DT: >HBBBBBIB year month day hour minute second
                           microsecond fold (12 bytes)
 5    aware datetime       DT + TZ
 6    date                 >HBB year month day
 7    naive time           TM: >BBBIB hour minute second microsecond fold
 8    aware time           TM + TZ
 9    timedelta            >iII days seconds microseconds
10    Decimal              ASCII ``str(d)`` (exact: NaN, sNaN, -0, exponent)
11    UUID                 the 16 bytes
12    SafeString           UTF-8 text; decoded back to ``SafeString``
13    int outside          big-endian two's complement
     [-2**63, 2**64)
14    bytearray            the bytes
====  ===================  ===============================================

msgpack packs ``bytearray`` natively as bin whatever ``strict_types`` says,
so the encoder boxes bytearrays itself (see ``_pack_value``); ``memoryview``
is packed natively as bin and comes back as ``bytes`` (pickle could not store
it at all). A ``msgpack.ExtType`` or ``msgpack.Timestamp`` inside a value is
packed natively by msgpack too; don't cache those.

TZ is one tag byte and its data:

* ``0``: ``datetime.timezone`` created without a name: ``>q`` offset in
  microseconds (offset 0 decodes to the ``timezone.utc`` singleton);
* ``1``: ``datetime.timezone`` with an explicit name: ``>q`` offset in
  microseconds, then the name in UTF-8;
* ``2``: ``zoneinfo.ZoneInfo``: its key in UTF-8 (decoded with
  ``ZoneInfo(key)``, i.e. the process-wide cached instance, like pickle does).

Any other tzinfo (pytz, dateutil, a ``ZoneInfo`` subclass or one loaded from a
file without a key) cannot be carried faithfully, so the value falls back to
pickle.

Choosing the codec
==================
``codec="msgpack"`` (this class's default) is language-neutral and, with the
pickle fallback off, never executes code on read. ``codec="pickle"`` (the
backend's default, see ``options.py``) signs every value: in CPython,
``pickle.loads`` reads the typical cached value (string-heavy dicts, rows of
datetimes and Decimals) 1.5-5x faster than msgpack with Python extension
hooks, at the same size after compression, and a reader that accepts signed
pickle at all is no safer for also accepting msgpack.

Signed pickle
=============
Types msgpack cannot carry (``HttpResponse`` from ``cache_page``, model
instances) are pickled with ``pickle.HIGHEST_PROTOCOL`` and HMAC-SHA256
signed. The keys are used as given; deriving them from ``SECRET_KEY`` and
``SECRET_KEY_FALLBACKS`` (so a leaked cache key is not the Django secret) is
the caller's job. The first key signs, every key verifies, which makes secret
rotation seamless. A reader whose pickle fallback is off does not unpickle
anything, even correctly signed data (reason ``"codec_unavailable"``):
"pickle off" means no pickle in this process, in either direction.

Decoding failures
=================
:meth:`Envelope.decode` raises :class:`DecodeError` and nothing else for any
input; ``reason`` is one of:

``foreign``            no magic and not an ASCII integer
``version``            another format version
``truncated``          shorter than its header says
``corrupt``            reserved bits set, bad metadata, undecodable payload
``signature``          pickle signature does not verify with any key
``compression``        the compressed payload does not decompress cleanly
``codec_unavailable``  reserved codec, compressor library not installed,
                       time zone unknown here, or pickle disabled here
``too_large``          would decompress beyond ``max_decompressed_bytes``
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
import re
import threading
import zlib
from collections.abc import Callable, Sequence
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from gc import get_referents as _get_referents
from itertools import compress
from struct import Struct
from struct import error as struct_error
from typing import Any, NamedTuple, TypeGuard
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgpack
from django.utils.safestring import SafeString

try:
    import zstandard as _zstd
except ImportError:  # pragma: no cover - zstandard is a hard dependency
    _zstd = None  # type: ignore[assignment]

try:
    import lz4.frame as _lz4_frame
except ImportError:  # pragma: no cover - depends on the installed extras
    _lz4_frame = None

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "DecodeError",
    "Decoded",
    "Envelope",
    "Meta",
    "UnserializableValueError",
]

MAGIC = b"\xc1\xa9"
FORMAT_VERSION = 1

# Flag layout (see the module docstring).
CODEC_MSGPACK = 0
CODEC_PICKLE = 1
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_LZ4 = 2
COMPRESSION_ZLIB = 3
_CODEC_MASK = 0x03
_COMPRESSION_SHIFT = 2
_COMPRESSION_MASK = 0x0C
_FLAG_META = 0x10
_RESERVED_MASK = 0xE0

_SIGNATURE_LEN = 32  # HMAC-SHA256 digest size

_COMPRESSORS = {
    "none": COMPRESSION_NONE,
    "zstd": COMPRESSION_ZSTD,
    "lz4": COMPRESSION_LZ4,
    "zlib": COMPRESSION_ZLIB,
}

# Extension type codes: part of the wire format, never renumber.
EXT_TUPLE = 1
EXT_SET = 2
EXT_FROZENSET = 3
EXT_DATETIME = 4
EXT_DATETIME_TZ = 5
EXT_DATE = 6
EXT_TIME = 7
EXT_TIME_TZ = 8
EXT_TIMEDELTA = 9
EXT_DECIMAL = 10
EXT_UUID = 11
EXT_SAFESTRING = 12
EXT_BIGINT = 13
EXT_BYTEARRAY = 14

_TZ_FIXED = 0
_TZ_FIXED_NAMED = 1
_TZ_ZONEINFO = 2
_TZ_FIXED_TAG = bytes((_TZ_FIXED,))
_TZ_FIXED_NAMED_TAG = bytes((_TZ_FIXED_NAMED,))
_TZ_ZONEINFO_TAG = bytes((_TZ_ZONEINFO,))
_ONE_MICROSECOND = timedelta(microseconds=1)

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
_UINT64_LIMIT = 2**64

_DT = Struct(">HBBBBBIB")
_TM = Struct(">BBBIB")
_DATE = Struct(">HBB")
_TD = Struct(">iII")
_TZ_OFFSET = Struct(">q")
_DT_SIZE = _DT.size
_TM_SIZE = _TM.size
_TZ_OFFSET_SIZE = _TZ_OFFSET.size

# Raw ints are stored as their ASCII digits. int() alone is too lenient a test
# (it accepts b" 42", b"4_2", b"+1", b"42\n"), so the exact shape is checked.
_RAW_INT = re.compile(rb"-?[0-9]+")

# tuple/set/frozenset nested deeper than this (each level costs Python frames
# when packing and unpacking) go to pickle instead.
_MAX_EXT_NESTING = 64
# A packer's internal buffer only ever grows; after packing something this big
# the packer is replaced so one huge value does not pin memory in a thread.
_PACKER_RECYCLE_BYTES = 1024 * 1024
# zstd frames without a declared size are read in chunks of this size when we
# need to tell "too large" from "broken".
_PROBE_CHUNK = 256 * 1024

# The only containers (msgpack-native or extension) that can hold a bytearray.
_WALKED = frozenset((list, dict, tuple))

# Every (flags) -> 4-byte header, so encoding concatenates instead of packing.
_HEADERS = tuple(MAGIC + bytes((FORMAT_VERSION, flags)) for flags in range(0x20))


# What packing a supported-looking value can raise when msgpack cannot carry it:
# our default hook (TypeError), str with lone surrogates (UnicodeEncodeError),
# nesting beyond msgpack's or Python's limits. All send the value to pickle.
_MSGPACK_FAILURES = (TypeError, ValueError, OverflowError, RecursionError, struct_error)


class Meta(NamedTuple):
    """Durations stored with an entry, in milliseconds.

    They are durations, not timestamps, so readers combine them with the key's
    PTTL (read in the same round trip) and never depend on the app's clock.
    """

    soft_ms: int = 0
    hard_ms: int = 0
    grace_ms: int = 0
    delta_ms: int = 0
    #: A random draw in [1, 2**32) made when the entry was written; 0: none.
    #: Readers use ``seed / 2**32`` as XFetch's ``rand``, so all of them agree
    #: on when an entry's early refresh is due, whatever the read rate.
    seed: int = 0


class Decoded(NamedTuple):
    """A decoded value and the metadata it was written with (``None`` if none)."""

    value: Any
    meta: Meta | None


#: Every ``DecodeError.reason`` (see the module docstring); metrics label them.
DECODE_REASONS = (
    "foreign",
    "version",
    "truncated",
    "corrupt",
    "signature",
    "compression",
    "codec_unavailable",
    "too_large",
)


class DecodeError(Exception):
    """The stored bytes cannot be turned back into a value.

    The backend treats it as a miss and counts it by ``reason``, so the reason
    set is small and stable; the message is for humans and may change.
    """

    reason: str

    def __init__(self, reason: str, message: str) -> None:
        # Both in args so the exception survives pickling (e.g. across
        # processes in a test runner or a task queue).
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


class UnserializableValueError(TypeError, pickle.PickleError):
    """The value cannot be stored.

    It is a ``TypeError`` (the value's type is the problem) and a
    ``pickle.PickleError``, which is what code written for django-redis
    catches around ``cache.set``.
    """


class _Unsupported(TypeError):
    """Raised by the msgpack ``default`` hook; carries the offending type."""

    def __init__(self, obj: object) -> None:
        super().__init__(f"msgpack cannot carry {_type_name(type(obj))}")
        self.unsupported_type = type(obj)


def _type_name(tp: type) -> str:
    if tp.__module__ == "builtins":
        return tp.__qualname__
    return f"{tp.__module__}.{tp.__qualname__}"


# --------------------------------------------------------------------------
# msgpack encoding
# --------------------------------------------------------------------------


class _ThreadState(threading.local):
    """Per-thread reusable codec objects.

    msgpack ``Packer`` and zstandard (de)compressors must not be used by two
    threads at once, and creating them per call costs more than packing a
    small value. ``packers`` is indexed by nesting depth: packing a tuple's
    items happens inside the ``default`` hook while the outer packer is still
    busy, so each level needs its own.
    """

    def __init__(self) -> None:
        self.packers: list[Any] = []
        self.depth = 0
        self.zstd_decompressor: Any = None
        self.lz4_decompressor: Any = None


_state = _ThreadState()


def _new_packer() -> Any:
    return msgpack.Packer(
        default=_default, use_bin_type=True, strict_types=True, autoreset=True
    )


def _pack(obj: object) -> bytes:
    state = _state
    depth = state.depth
    packers = state.packers
    if depth > _MAX_EXT_NESTING:
        # Decoding recurses through Python once per level; refuse here (the
        # value goes to pickle) rather than write what readers cannot read.
        raise ValueError(f"more than {_MAX_EXT_NESTING} nested tuples/sets")
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


def _encode_tz(tz: tzinfo) -> bytes:
    if type(tz) is timezone:
        # (offset,) or (offset, name): tells an explicit name from the default
        # "UTC+01:00" one, which tzname() cannot.
        args = tz.__getinitargs__()  # type: ignore[attr-defined]
        offset: timedelta = args[0]
        micros = offset // _ONE_MICROSECOND
        if len(args) == 1:
            return _TZ_FIXED_TAG + _TZ_OFFSET.pack(micros)
        name: str = args[1]
        return _TZ_FIXED_NAMED_TAG + _TZ_OFFSET.pack(micros) + name.encode()
    if type(tz) is ZoneInfo and tz.key is not None:
        return _TZ_ZONEINFO_TAG + tz.key.encode()
    raise _Unsupported(tz)


def _enc_tuple(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_TUPLE, _pack(list(obj)))


def _enc_set(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_SET, _pack(list(obj)))


def _enc_frozenset(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_FROZENSET, _pack(list(obj)))


def _enc_datetime(obj: Any) -> msgpack.ExtType:
    fields = _DT.pack(
        obj.year,
        obj.month,
        obj.day,
        obj.hour,
        obj.minute,
        obj.second,
        obj.microsecond,
        obj.fold,
    )
    tz = obj.tzinfo
    if tz is None:
        return msgpack.ExtType(EXT_DATETIME, fields)
    return msgpack.ExtType(EXT_DATETIME_TZ, fields + _encode_tz(tz))


def _enc_date(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_DATE, _DATE.pack(obj.year, obj.month, obj.day))


def _enc_time(obj: Any) -> msgpack.ExtType:
    fields = _TM.pack(obj.hour, obj.minute, obj.second, obj.microsecond, obj.fold)
    tz = obj.tzinfo
    if tz is None:
        return msgpack.ExtType(EXT_TIME, fields)
    return msgpack.ExtType(EXT_TIME_TZ, fields + _encode_tz(tz))


def _enc_timedelta(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(
        EXT_TIMEDELTA, _TD.pack(obj.days, obj.seconds, obj.microseconds)
    )


def _enc_decimal(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_DECIMAL, str(obj).encode("ascii"))


def _enc_uuid(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_UUID, obj.bytes)


def _enc_safestring(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_SAFESTRING, obj.encode("utf-8"))


def _enc_bigint(obj: Any) -> msgpack.ExtType:
    # msgpack only calls default for an exact int when it does not fit 64 bits.
    # One spare bit for the sign: never too short, at most one byte too long.
    return msgpack.ExtType(
        EXT_BIGINT, obj.to_bytes(obj.bit_length() // 8 + 1, "big", signed=True)
    )


class _BytearrayBox:
    """Carries a bytearray past msgpack, which would pack it as plain bin.

    ``strict_types`` does not apply to bytearray (nor memoryview): msgpack
    packs them natively as bin, so they would come back as ``bytes`` and the
    ``default`` hook never sees them. :func:`_pack_value` boxes them instead.
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
    datetime: _enc_datetime,
    date: _enc_date,
    time: _enc_time,
    timedelta: _enc_timedelta,
    Decimal: _enc_decimal,
    UUID: _enc_uuid,
    SafeString: _enc_safestring,
    int: _enc_bigint,
    _BytearrayBox: _enc_bytearray,
}


def _default(obj: object) -> msgpack.ExtType:
    encoder = _ENCODERS.get(type(obj))
    if encoder is None:
        raise _Unsupported(obj)
    return encoder(obj)


def _pack_value(value: object) -> bytes:
    """Pack a whole value, keeping bytearrays bytearrays.

    Finding a bytearray means walking the value, which costs more than packing
    it; but a bytearray can only be in the value if the packed bytes contain a
    bin marker (0xc4-0xc6), so the walk only runs then. The walk batches one
    nesting level per ``gc.get_referents`` call (C speed) and only descends into
    list, dict and tuple: a set, frozenset or dict key cannot hold a bytearray
    (unhashable). It runs after a successful pack, so the value is acyclic.
    """
    out = _pack(value)
    # msgpack bin8/bin16/bin32 markers; ``in`` is a memchr, a regex class is
    # fifty times slower.
    if (b"\xc4" in out or b"\xc5" in out or b"\xc6" in out) and _has_bytearray(value):
        out = _pack(_box_bytearrays(value))
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
# msgpack decoding
# --------------------------------------------------------------------------


class _Corrupt(Exception):
    """Internal: an extension payload is malformed."""


_unpackb = msgpack.unpackb


def _unpack(data: bytes) -> Any:
    return _unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)


def _unpack_list(data: bytes) -> list[Any]:
    items = _unpack(data)
    if type(items) is not list:
        raise _Corrupt("container extension does not hold an array")
    return items


def _decode_tz(data: bytes) -> tzinfo:
    tag = data[0]
    if tag == _TZ_ZONEINFO:
        key = data[1:].decode("utf-8")
        try:
            return ZoneInfo(key)
        except ZoneInfoNotFoundError:
            raise DecodeError(
                "codec_unavailable", f"time zone {key!r} is not available here"
            ) from None
    if tag in (_TZ_FIXED, _TZ_FIXED_NAMED):
        (micros,) = _TZ_OFFSET.unpack_from(data, 1)
        offset = timedelta(microseconds=micros)
        if tag == _TZ_FIXED:
            if len(data) != 1 + _TZ_OFFSET_SIZE:
                raise _Corrupt("trailing bytes after a fixed offset")
            return timezone(offset)
        return timezone(offset, data[1 + _TZ_OFFSET_SIZE :].decode("utf-8"))
    raise _Corrupt(f"unknown time zone tag {tag}")


def _dec_tuple(data: bytes) -> Any:
    return tuple(_unpack_list(data))


def _dec_set(data: bytes) -> Any:
    return set(_unpack_list(data))


def _dec_frozenset(data: bytes) -> Any:
    return frozenset(_unpack_list(data))


def _dec_datetime(data: bytes) -> Any:
    y, mo, d, h, mi, s, us, fold = _DT.unpack(data)
    return datetime(y, mo, d, h, mi, s, us, fold=fold)


def _dec_datetime_tz(data: bytes) -> Any:
    y, mo, d, h, mi, s, us, fold = _DT.unpack_from(data)
    return datetime(
        y, mo, d, h, mi, s, us, tzinfo=_decode_tz(data[_DT_SIZE:]), fold=fold
    )


def _dec_date(data: bytes) -> Any:
    return date(*_DATE.unpack(data))


def _dec_time(data: bytes) -> Any:
    h, mi, s, us, fold = _TM.unpack(data)
    return time(h, mi, s, us, fold=fold)


def _dec_time_tz(data: bytes) -> Any:
    h, mi, s, us, fold = _TM.unpack_from(data)
    return time(h, mi, s, us, tzinfo=_decode_tz(data[_TM_SIZE:]), fold=fold)


def _dec_timedelta(data: bytes) -> Any:
    days, seconds, micros = _TD.unpack(data)
    return timedelta(days=days, seconds=seconds, microseconds=micros)


def _dec_decimal(data: bytes) -> Any:
    # Constructing from a string is exact (never rounded to the context), and
    # the ASCII check stops Decimal() from accepting non-ASCII digits.
    return Decimal(data.decode("ascii"))


def _dec_uuid(data: bytes) -> Any:
    return UUID(bytes=data)


def _dec_safestring(data: bytes) -> Any:
    return SafeString(data.decode("utf-8"))


def _dec_bigint(data: bytes) -> Any:
    return int.from_bytes(data, "big", signed=True)


def _dec_bytearray(data: bytes) -> Any:
    return bytearray(data)


_DECODERS: dict[int, Callable[[bytes], Any]] = {
    EXT_TUPLE: _dec_tuple,
    EXT_SET: _dec_set,
    EXT_FROZENSET: _dec_frozenset,
    EXT_DATETIME: _dec_datetime,
    EXT_DATETIME_TZ: _dec_datetime_tz,
    EXT_DATE: _dec_date,
    EXT_TIME: _dec_time,
    EXT_TIME_TZ: _dec_time_tz,
    EXT_TIMEDELTA: _dec_timedelta,
    EXT_DECIMAL: _dec_decimal,
    EXT_UUID: _dec_uuid,
    EXT_SAFESTRING: _dec_safestring,
    EXT_BIGINT: _dec_bigint,
    EXT_BYTEARRAY: _dec_bytearray,
}


def _ext_hook(code: int, data: bytes) -> Any:
    decoder = _DECODERS.get(code)
    if decoder is None:
        raise _Corrupt(f"unknown msgpack extension type {code}")
    return decoder(data)


# --------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------


def _zstd_decompressor() -> Any:
    dctx = _state.zstd_decompressor
    if dctx is None:
        dctx = _state.zstd_decompressor = _zstd.ZstdDecompressor()
    return dctx


def _too_large(limit: int) -> DecodeError:
    return DecodeError("too_large", f"payload decompresses to more than {limit} bytes")


def _decompress_zstd(payload: bytes, limit: int) -> bytes:
    try:
        size = _zstd.frame_content_size(payload)
    except _zstd.ZstdError as exc:
        raise DecodeError("compression", f"invalid zstd frame: {exc}") from None
    if size > limit:
        raise _too_large(limit)
    dctx = _zstd_decompressor()
    if size >= 0:
        # The declared size (<= limit) is what zstandard allocates, and it
        # fails if the frame does not produce exactly that many bytes.
        try:
            out: bytes = dctx.decompress(payload, allow_extra_data=False)
        except _zstd.ZstdError as exc:
            raise DecodeError("compression", f"zstd: {exc}") from None
        return out
    # No declared size (we never write such frames): let zstandard cap the
    # output; on failure, find out whether it was the cap or a broken frame.
    try:
        out = dctx.decompress(payload, max_output_size=limit, allow_extra_data=False)
    except _zstd.ZstdError as exc:
        if _zstd_exceeds(dctx, payload, limit):
            raise _too_large(limit) from None
        raise DecodeError("compression", f"zstd: {exc}") from None
    return out


def _zstd_exceeds(dctx: Any, payload: bytes, limit: int) -> bool:
    """Whether a frame without a declared size produces more than ``limit`` bytes.

    Reads in bounded chunks and stops as soon as the limit is passed, so the
    probe itself never holds more than one chunk.
    """
    total = 0
    try:
        reader = dctx.stream_reader(payload)
        while total <= limit:
            chunk = reader.read(_PROBE_CHUNK)
            if not chunk:
                break
            total += len(chunk)
    except Exception:
        return False
    return total > limit


def _decompress_lz4(payload: bytes, limit: int) -> bytes:
    dctx = _state.lz4_decompressor
    if dctx is None:
        dctx = _state.lz4_decompressor = _lz4_frame.LZ4FrameDecompressor()
    try:
        out: bytes = dctx.decompress(payload, max_length=limit + 1)
        if len(out) > limit:
            raise _too_large(limit)
        if not dctx.eof:
            raise DecodeError("compression", "lz4 frame is incomplete")
        if dctx.unused_data:
            raise DecodeError("compression", "trailing bytes after the lz4 frame")
        return out
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError("compression", f"lz4: {exc}") from None
    finally:
        dctx.reset()


def _decompress_zlib(payload: bytes, limit: int) -> bytes:
    dobj = zlib.decompressobj()
    try:
        out = dobj.decompress(payload, limit + 1)
    except zlib.error as exc:
        raise DecodeError("compression", f"zlib: {exc}") from None
    if len(out) > limit:
        raise _too_large(limit)
    if not dobj.eof:
        raise DecodeError("compression", "zlib stream is incomplete")
    if dobj.unused_data:
        raise DecodeError("compression", "trailing bytes after the zlib stream")
    return out


# --------------------------------------------------------------------------
# The envelope
# --------------------------------------------------------------------------


class _CompressorState(threading.local):
    def __init__(self) -> None:
        self.zstd_compressor: Any = None


def is_raw_int(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is stored as a bare int (so INCRBY works on it)."""
    return type(value) is int and _INT64_MIN <= value <= _INT64_MAX


class Envelope:
    """Encodes values to the stored bytes and back; one per cache alias.

    Instances are immutable after construction and safe to share between
    threads (the non-thread-safe codec objects live in thread-locals).
    """

    def __init__(
        self,
        *,
        codec: str = "msgpack",
        compressor: str = "zstd",
        compress_min_bytes: int = 1024,
        compress_level: int | None = None,
        pickle_fallback: bool = True,
        signing_keys: Sequence[bytes] = (),
        max_decompressed_bytes: int = 512 * 1024 * 1024,
    ) -> None:
        if codec not in ("msgpack", "pickle"):
            raise ValueError(f"unknown codec {codec!r}; choose 'msgpack' or 'pickle'")
        if codec == "pickle" and not pickle_fallback:
            raise ValueError("the pickle codec needs pickle_fallback=True")
        if compressor not in _COMPRESSORS:
            raise ValueError(
                f"unknown compressor {compressor!r}; choose one of "
                + ", ".join(repr(name) for name in _COMPRESSORS)
            )
        if compressor == "zstd" and _zstd is None:
            raise ValueError(
                "the zstd compressor needs the 'zstandard' package: "
                "pip install zstandard"
            )
        if compressor == "lz4" and _lz4_frame is None:
            raise ValueError(
                "the lz4 compressor needs the 'lz4' package: "
                "pip install django-apee[lz4]"
            )
        if type(compress_min_bytes) is not int or compress_min_bytes < 0:
            raise ValueError(
                f"compress_min_bytes must be an int >= 0, not {compress_min_bytes!r}"
            )
        if compress_level is not None and type(compress_level) is not int:
            raise ValueError(
                f"compress_level must be an int or None, not {compress_level!r}"
            )
        if type(max_decompressed_bytes) is not int or max_decompressed_bytes < 1:
            raise ValueError(
                "max_decompressed_bytes must be an int >= 1, "
                f"not {max_decompressed_bytes!r}"
            )
        if isinstance(signing_keys, (bytes, str)):
            raise ValueError(
                "signing_keys must be a sequence of keys, not a single key"
            )
        keys = tuple(signing_keys)
        for key in keys:
            if not isinstance(key, bytes) or not key:
                raise ValueError("every signing key must be non-empty bytes")
        if pickle_fallback and not keys:
            raise ValueError(
                "pickle_fallback needs at least one signing key: unsigned pickle "
                "in a shared Redis is remote code execution for whoever can "
                "write to it"
            )

        self.codec = codec
        self.compressor = compressor
        self.compress_min_bytes = compress_min_bytes
        self.compress_level = compress_level
        self.pickle_fallback = bool(pickle_fallback)
        self.max_decompressed_bytes = max_decompressed_bytes
        # Keyed HMAC objects are copied per use: cheaper than re-keying.
        self._macs = tuple(hmac.new(key, digestmod=hashlib.sha256) for key in keys)
        self._compression_bits = _COMPRESSORS[compressor]
        self._local = _CompressorState()
        self._compress: Callable[[bytes], bytes] | None = self._make_compress()
        if self._compress is not None:
            try:
                self._compress(b"django-apee " * 16)
            except Exception as exc:
                raise ValueError(
                    f"compress_level {compress_level!r} is invalid for "
                    f"{compressor}: {exc}"
                ) from exc

    def __repr__(self) -> str:
        return (
            f"Envelope(compressor={self.compressor!r}, "
            f"compress_min_bytes={self.compress_min_bytes}, "
            f"compress_level={self.compress_level!r}, "
            f"pickle_fallback={self.pickle_fallback}, "
            f"signing_keys=<{len(self._macs)} keys>, "
            f"max_decompressed_bytes={self.max_decompressed_bytes})"
        )

    def _make_compress(self) -> Callable[[bytes], bytes] | None:
        level = self.compress_level
        if self.compressor == "zstd":
            zstd_level = 3 if level is None else level
            local = self._local

            def compress_zstd(data: bytes) -> bytes:
                cctx = local.zstd_compressor
                if cctx is None:
                    cctx = local.zstd_compressor = _zstd.ZstdCompressor(
                        level=zstd_level
                    )
                out: bytes = cctx.compress(data)
                return out

            return compress_zstd
        if self.compressor == "lz4":
            lz4_level = 0 if level is None else level

            def compress_lz4(data: bytes) -> bytes:
                # lz4.frame.compress makes its own context: thread-safe.
                out: bytes = _lz4_frame.compress(
                    data, compression_level=lz4_level, store_size=True
                )
                return out

            return compress_lz4
        if self.compressor == "zlib":
            zlib_level = -1 if level is None else level

            def compress_zlib(data: bytes) -> bytes:
                return zlib.compress(data, zlib_level)

            return compress_zlib
        return None

    # ---------------------------------------------------------------- encode

    def encode(self, value: Any, meta: Meta | None = None) -> bytes | int:
        """Return what to store for ``value``: the int itself, or envelope bytes.

        With ``codec="msgpack"`` msgpack is tried first; only when it cannot
        carry the value does the whole value go to signed pickle (or fail
        with :class:`UnserializableValueError` when the fallback is off).
        With ``codec="pickle"`` every value is signed pickle.
        """
        if meta is None:
            if is_raw_int(value):
                return value
            packed_meta = b""
        else:
            packed_meta = _pack_meta(meta)

        if self.codec == "pickle":
            payload = self._pickle(value, None)
            codec = CODEC_PICKLE
        else:
            try:
                payload = _pack_value(value)
                codec = CODEC_MSGPACK
            except _MSGPACK_FAILURES as exc:
                payload = self._pickle(value, exc)
                codec = CODEC_PICKLE

        flags = codec
        if self._compress is not None and len(payload) >= self.compress_min_bytes:
            compressed = self._compress(payload)
            if len(compressed) < len(payload):
                payload = compressed
                flags |= self._compression_bits << _COMPRESSION_SHIFT

        if meta is None:
            prefix = _HEADERS[flags]
        else:
            prefix = (
                _HEADERS[flags | _FLAG_META] + bytes((len(packed_meta),)) + packed_meta
            )

        if codec == CODEC_PICKLE:
            return prefix + self._sign(prefix, payload) + payload
        return prefix + payload

    def _pickle(self, value: Any, cause: Exception | None) -> bytes:
        type_name = _type_name(type(value))
        if not self.pickle_fallback and cause is not None:
            what = (
                _type_name(cause.unsupported_type)
                if isinstance(cause, _Unsupported)
                else str(cause)
            )
            raise UnserializableValueError(
                f"cannot cache a value of type {type_name}: msgpack cannot carry "
                f"it ({what}) and the pickle fallback is off; set OPTIONS "
                '"ALLOW_PICKLE": True to store such values with signed pickle, '
                "or convert them to plain types"
            ) from cause
        try:
            return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise UnserializableValueError(
                f"cannot cache a value of type {type_name}: neither msgpack nor "
                f"pickle can serialize it ({exc})"
            ) from exc

    def _sign(self, prefix: bytes, payload: bytes) -> bytes:
        mac = self._macs[0].copy()
        mac.update(prefix)
        mac.update(payload)
        return mac.digest()

    # ---------------------------------------------------------------- decode

    def decode(self, data: bytes) -> Decoded:
        """Turn stored bytes back into ``Decoded(value, meta)``.

        Raises :class:`DecodeError` and nothing else, whatever the input.
        """
        if type(data) is not bytes:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise DecodeError(
                    "foreign", f"expected bytes, got {_type_name(type(data))}"
                )
            data = bytes(data)
        if not data.startswith(MAGIC):
            if _RAW_INT.fullmatch(data) is not None:
                try:
                    return Decoded(int(data), None)
                except ValueError:  # more digits than int() allows
                    raise DecodeError("corrupt", "raw integer is too long") from None
            raise DecodeError("foreign", "not a django-apee value (no magic)")
        try:
            return self._decode(data)
        except DecodeError:
            raise
        except Exception as exc:
            raise DecodeError(
                "corrupt", f"undecodable payload: {type(exc).__name__}: {exc}"
            ) from None

    def _decode(self, data: bytes) -> Decoded:
        size = len(data)
        if size < 4:
            if size == 3 and data[2] != FORMAT_VERSION:
                raise DecodeError(
                    "version",
                    f"format version {data[2]}, this reader knows {FORMAT_VERSION}",
                )
            raise DecodeError("truncated", "header is incomplete")
        if data[2] != FORMAT_VERSION:
            raise DecodeError(
                "version",
                f"format version {data[2]}, this reader knows {FORMAT_VERSION}",
            )
        flags = data[3]
        if flags & _RESERVED_MASK:
            raise DecodeError("corrupt", f"reserved flag bits set: 0x{flags:02x}")
        codec = flags & _CODEC_MASK
        if codec > CODEC_PICKLE:
            raise DecodeError("codec_unavailable", f"unknown codec {codec}")

        pos = 4
        meta_bytes = b""
        if flags & _FLAG_META:
            if size < 5:
                raise DecodeError("truncated", "metadata length is missing")
            pos = 5 + data[4]
            if size < pos:
                raise DecodeError("truncated", "metadata is incomplete")
            meta_bytes = data[5:pos]

        if codec == CODEC_PICKLE:
            if not self.pickle_fallback:
                raise DecodeError(
                    "codec_unavailable",
                    "pickled value, but pickle is disabled on this reader",
                )
            end = pos + _SIGNATURE_LEN
            if size < end:
                raise DecodeError("truncated", "signature is incomplete")
            payload = data[end:]
            # Before anything else touches the payload.
            if not self._verify(data[:pos], payload, data[pos:end]):
                raise DecodeError(
                    "signature", "pickle signature does not verify with any signing key"
                )
        else:
            payload = data[pos:]

        meta = _unpack_meta(meta_bytes) if flags & _FLAG_META else None

        compression = (flags & _COMPRESSION_MASK) >> _COMPRESSION_SHIFT
        if compression:
            payload = self._decompress(compression, payload)

        if not payload:
            raise DecodeError("truncated", "payload is empty")
        if codec == CODEC_PICKLE:
            return Decoded(pickle.loads(payload), meta)
        return Decoded(
            _unpackb(payload, ext_hook=_ext_hook, raw=False, strict_map_key=False),
            meta,
        )

    def _verify(self, prefix: bytes, payload: bytes, signature: bytes) -> bool:
        for base in self._macs:
            mac = base.copy()
            mac.update(prefix)
            mac.update(payload)
            if hmac.compare_digest(mac.digest(), signature):
                return True
        return False

    def _decompress(self, compression: int, payload: bytes) -> bytes:
        limit = self.max_decompressed_bytes
        if compression == COMPRESSION_ZSTD:
            if _zstd is None:
                raise DecodeError(
                    "codec_unavailable",
                    "zstd payload, but 'zstandard' is not installed",
                )
            return _decompress_zstd(payload, limit)
        if compression == COMPRESSION_LZ4:
            if _lz4_frame is None:
                raise DecodeError(
                    "codec_unavailable", "lz4 payload, but 'lz4' is not installed"
                )
            return _decompress_lz4(payload, limit)
        return _decompress_zlib(payload, limit)


def _pack_meta(meta: Meta) -> bytes:
    for field in meta:
        if type(field) is not int or not 0 <= field < _UINT64_LIMIT:
            raise ValueError(f"meta fields must be ints in [0, 2**64), got {meta!r}")
    return _pack(list(meta))


def _unpack_meta(raw: bytes) -> Meta:
    if not raw:
        return Meta()
    try:
        fields = msgpack.unpackb(raw, raw=False, strict_map_key=False)
    except Exception as exc:
        raise DecodeError("corrupt", f"metadata is not msgpack: {exc}") from None
    if type(fields) is not list:
        raise DecodeError("corrupt", "metadata is not an array")
    known = fields[: len(Meta._fields)]
    for field in known:
        if type(field) is not int or field < 0:
            raise DecodeError(
                "corrupt", f"metadata field {field!r} is not a non-negative int"
            )
    return Meta(*known)


def peek_meta(data: bytes) -> Meta | None:
    """The timing metadata of stored bytes, without decoding the payload.

    For questions about an entry's age (``ttl``, ``has_key``) that must not
    pay for decompressing or unpickling the value. None when the bytes carry
    no metadata or are not a readable envelope header.
    """
    if len(data) < 5 or not data.startswith(MAGIC) or data[2] != FORMAT_VERSION:
        return None
    if not data[3] & _FLAG_META:
        return None
    end = 5 + data[4]
    if len(data) < end:
        return None
    try:
        return _unpack_meta(data[5:end])
    except DecodeError:
        return None
