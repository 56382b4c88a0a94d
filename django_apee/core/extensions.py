"""The msgpack extension types: which Python types have one, and their bytes.

msgpack alone would turn a tuple into a list and could not carry a datetime or
a Decimal at all; these types are common in cached values, so each gets an
extension code of its own rather than sending the value to pickle. The codes
and the data layouts are part of the stored format: a value written today must
read back in every later release, so codes are never renumbered and layouts
never change. The containers (tuple, set, frozenset, bytearray) need the
packer itself and are encoded in :mod:`django_apee.core.codec`; every other
type is encoded and decoded here.

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
                           (Django's, handed in: see below)
13    int outside          big-endian two's complement
     [-2**63, 2**64)
14    bytearray            the bytes
====  ===================  ===============================================

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

The core does not import Django, so Django's ``SafeString`` (what templates
and ``mark_safe`` return, common in cached fragments) is handed in by the
backend with :func:`django_apee.core.codec.register_safe_string`. Until then a
``SafeString`` is a ``str`` subclass like any other (it goes to pickle), and
extension 12 reads as ``codec_unavailable``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from struct import Struct
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgpack

from django_apee.core.wire import DecodeError

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

#: tuple/set/frozenset nested deeper than this (each level costs Python and C
#: frames when packing and unpacking) go to pickle instead, and read back as
#: corrupt.
MAX_EXT_NESTING = 64

_TZ_FIXED = 0
_TZ_FIXED_NAMED = 1
_TZ_ZONEINFO = 2
_TZ_FIXED_TAG = bytes((_TZ_FIXED,))
_TZ_FIXED_NAMED_TAG = bytes((_TZ_FIXED_NAMED,))
_TZ_ZONEINFO_TAG = bytes((_TZ_ZONEINFO,))
_ONE_MICROSECOND = timedelta(microseconds=1)

_DT = Struct(">HBBBBBIB")
_TM = Struct(">BBBIB")
_DATE = Struct(">HBB")
_TD = Struct(">iII")
_TZ_OFFSET = Struct(">q")
_DT_SIZE = _DT.size
_TM_SIZE = _TM.size
_TZ_OFFSET_SIZE = _TZ_OFFSET.size


class Unsupported(TypeError):
    """Raised by the msgpack ``default`` hook; carries the offending type."""

    def __init__(self, obj: object) -> None:
        super().__init__(f"msgpack cannot carry {type_name(type(obj))}")
        self.unsupported_type = type(obj)


class _Corrupt(Exception):
    """An extension payload is malformed (decoding turns it into ``corrupt``).

    Shared with the codec only. Its name shows in the ``DecodeError`` message
    ("undecodable payload: _Corrupt: ..."), hence the underscore is kept.
    """


def type_name(tp: type) -> str:
    if tp.__module__ == "builtins":
        return tp.__qualname__
    return f"{tp.__module__}.{tp.__qualname__}"


# --------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------


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
    raise Unsupported(tz)


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


def encode_safe_string(obj: Any) -> msgpack.ExtType:
    return msgpack.ExtType(EXT_SAFESTRING, obj.encode("utf-8"))


def _enc_bigint(obj: Any) -> msgpack.ExtType:
    # msgpack only calls default for an exact int when it does not fit 64 bits.
    # One spare bit for the sign: never too short, at most one byte too long.
    return msgpack.ExtType(
        EXT_BIGINT, obj.to_bytes(obj.bit_length() // 8 + 1, "big", signed=True)
    )


#: Exact types only: a subclass is not the type (and would lose its identity).
SCALAR_ENCODERS: dict[type, Callable[[Any], msgpack.ExtType]] = {
    datetime: _enc_datetime,
    date: _enc_date,
    time: _enc_time,
    timedelta: _enc_timedelta,
    Decimal: _enc_decimal,
    UUID: _enc_uuid,
    int: _enc_bigint,
}


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


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


def safe_string_decoder(cls: type[str] | None) -> Callable[[bytes], Any]:
    """How extension 12 reads back: as ``cls``, or not at all without one."""
    if cls is None:

        def unavailable(data: bytes) -> Any:
            raise DecodeError(
                "codec_unavailable", "a SafeString, but no SafeString type here"
            )

        return unavailable

    def decode(data: bytes) -> Any:
        return cls(data.decode("utf-8"))

    return decode


def _dec_bigint(data: bytes) -> Any:
    return int.from_bytes(data, "big", signed=True)


SCALAR_DECODERS: dict[int, Callable[[bytes], Any]] = {
    EXT_DATETIME: _dec_datetime,
    EXT_DATETIME_TZ: _dec_datetime_tz,
    EXT_DATE: _dec_date,
    EXT_TIME: _dec_time,
    EXT_TIME_TZ: _dec_time_tz,
    EXT_TIMEDELTA: _dec_timedelta,
    EXT_DECIMAL: _dec_decimal,
    EXT_UUID: _dec_uuid,
    EXT_BIGINT: _dec_bigint,
}
