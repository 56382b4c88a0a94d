"""Unit tests for ``django_apee.core.envelope``: pure, no Redis, no Django settings."""

from __future__ import annotations

import enum
import hmac
import pickle
import random
import sys
import threading
import zlib
from collections import OrderedDict, namedtuple
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from decimal import Decimal
from typing import Any
from uuid import UUID
from zoneinfo import ZoneInfo

import msgpack
import pytest
import zstandard
from django.utils.safestring import SafeData, SafeString, mark_safe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from django_apee.core import codec, compression, extensions
from django_apee.core.envelope import (
    DECODE_REASONS,
    FORMAT_VERSION,
    MAGIC,
    Decoded,
    DecodeError,
    Envelope,
    Meta,
    UnserializableValueError,
)
from django_apee.core.mac import Macs, bind

try:
    import lz4.frame as lz4_frame
except ImportError:  # pragma: no cover - lz4 is in requirements/test.txt
    lz4_frame = None

needs_lz4 = pytest.mark.skipif(lz4_frame is None, reason="lz4 is not installed")


@pytest.fixture(autouse=True)
def _empty_redis() -> None:
    """Shadow conftest's autouse FLUSHDB: this module needs no Redis at all."""


@pytest.fixture(autouse=True, scope="module")
def _safe_strings() -> Iterator[None]:
    """Hand Django's SafeString to the pure codec, as the backend does."""
    before = codec._safe_string
    codec.register_safe_string(SafeString)
    yield
    # What it was: a backend built earlier in this process registered it.
    codec.register_safe_string(before)


KEY = b"current-signing-key-0123456789ab"
OLD_KEY = b"previous-signing-key-0123456789a"
#: The Redis key every value here is stored under (the MAC binds it).
K = ":1:key"
COMPRESSORS = ["zstd", "lz4", "zlib", "none"]
COMPRESSION_BITS = {"none": 0, "zstd": 1, "lz4": 2, "zlib": 3}
REASONS = {
    "foreign",
    "version",
    "truncated",
    "corrupt",
    "signature",
    "compression",
    "codec_unavailable",
    "too_large",
}

PARIS = ZoneInfo("Europe/Paris")
NEW_YORK = ZoneInfo("America/New_York")
ZONES = [ZoneInfo(key) for key in ("UTC", "Asia/Kolkata", "Australia/Lord_Howe")]
ZONES += [PARIS, NEW_YORK]


def compressor_param(name: str) -> Any:
    marks = [needs_lz4] if name == "lz4" else []
    return pytest.param(name, marks=marks, id=name)


ALL_COMPRESSORS = [compressor_param(name) for name in COMPRESSORS]


def make(**options: Any) -> Envelope:
    options.setdefault("signing_keys", (KEY,))
    return Envelope(**options)


def stored(encoded: bytes | int) -> bytes:
    """What Redis hands back for what ``encode`` returned."""
    if isinstance(encoded, int):
        return str(encoded).encode()
    return encoded


def roundtrip(envelope: Envelope, value: Any, meta: Meta | None = None) -> Decoded:
    return envelope.decode(stored(envelope.encode(value, meta, key=K)), key=K)


def craft(flags: int, body: bytes = b"", version: int = FORMAT_VERSION) -> bytes:
    """Header and body, no MAC: structure the header check refuses, or a
    planted value the MAC check refuses."""
    return MAGIC + bytes((version, flags)) + body


def seal(head: bytes, payload: bytes, key: str = K, signing_key: bytes = KEY) -> bytes:
    """``head`` + its MAC for ``key`` + ``payload``: what ``encode`` would write."""
    return head + Macs([signing_key]).sign(bind(key), head, payload) + payload


def sealed(flags: int, payload: bytes = b"", meta: bytes | None = None) -> bytes:
    """A crafted envelope with a valid MAC, for whatever lies past the MAC."""
    head = MAGIC + bytes((FORMAT_VERSION, flags))
    if meta is not None:
        head += bytes((len(meta),)) + meta
    return seal(head, payload)


def flags_of(data: bytes | int) -> int:
    assert isinstance(data, bytes)
    return data[3]


def codec_of(data: bytes | int) -> int:
    return flags_of(data) & 0x03


def compression_of(data: bytes | int) -> int:
    return (flags_of(data) >> 2) & 0x03


def assert_same(expected: Any, actual: Any) -> None:
    """Equal value AND identical types, all the way down.

    Scalars compare by ``repr`` too: it tells -0.0 from 0.0, NaN payloads,
    Decimal exponents, datetime ``fold`` and the exact tzinfo, and never
    raises (``Decimal('sNaN') == x`` does).
    """
    assert type(actual) is type(expected), (expected, actual)
    kind = type(expected)
    if kind in (list, tuple):
        assert len(actual) == len(expected)
        for left, right in zip(expected, actual, strict=True):
            assert_same(left, right)
    elif kind is dict:
        assert len(actual) == len(expected)
        for (k1, v1), (k2, v2) in zip(expected.items(), actual.items(), strict=True):
            assert_same(k1, k2)
            assert_same(v1, v2)
    elif kind in (set, frozenset):
        assert len(actual) == len(expected)
        by_value = {item: item for item in actual}
        for item in expected:
            assert item in by_value, (item, actual)
            assert_same(item, by_value[item])
    else:
        assert repr(actual) == repr(expected)
        if kind in (datetime, time) and expected.tzinfo is not None:
            assert type(actual.tzinfo) is type(expected.tzinfo)
            if isinstance(expected.tzinfo, ZoneInfo):
                assert actual.tzinfo is expected.tzinfo


# --------------------------------------------------------------------------
# Supported types
# --------------------------------------------------------------------------

SUPPORTED_VALUES: list[tuple[str, Any]] = [
    ("none", None),
    ("true", True),
    ("false", False),
    ("zero", 0),
    ("int64-max", 2**63 - 1),
    ("uint64", 2**63),
    ("uint64-max", 2**64 - 1),
    ("int-2**64", 2**64),
    ("int64-min-1", -(2**63) - 1),
    ("huge-int", 7**300),
    ("huge-negative-int", -(7**300)),
    ("float", 1.5),
    ("negative-zero", -0.0),
    ("nan", float("nan")),
    ("inf", float("-inf")),
    ("str", "héllo wörld ✓"),
    ("empty-str", ""),
    ("bytes", b"\x00\xff\xc1"),
    ("bytearray", bytearray(b"\x00mutable")),
    ("empty-bytearray", bytearray()),
    ("list", [1, "a", None]),
    ("tuple", (1, "a", None)),
    ("empty-tuple", ()),
    ("set", {1, "a", (2, 3)}),
    ("empty-set", set()),
    ("frozenset", frozenset({1, frozenset({2})})),
    ("dict", {"a": 1, 2: "b", None: [], 1.5: {}}),
    ("naive-datetime", datetime(2024, 2, 29, 23, 59, 59, 999_999)),
    ("naive-datetime-fold", datetime(2021, 11, 7, 1, 30, fold=1)),
    ("datetime-min", datetime.min),
    ("datetime-max", datetime.max),
    ("utc-datetime", datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=timezone.utc)),
    (
        "fixed-offset-datetime",
        datetime(2024, 1, 2, tzinfo=timezone(timedelta(hours=-3, minutes=-30))),
    ),
    (
        "named-offset-datetime",
        datetime(2024, 1, 2, tzinfo=timezone(timedelta(hours=5), "Yekaterinburg")),
    ),
    (
        "named-utc-datetime",
        datetime(2024, 1, 2, tzinfo=timezone(timedelta(0), "UTC")),
    ),
    (
        "microsecond-offset-datetime",
        datetime(2024, 1, 2, tzinfo=timezone(timedelta(hours=1, microseconds=7))),
    ),
    ("zoneinfo-datetime", datetime(2024, 7, 14, 12, tzinfo=PARIS)),
    ("zoneinfo-datetime-fold", datetime(2021, 11, 7, 1, 30, tzinfo=NEW_YORK, fold=1)),
    ("date", date(2024, 2, 29)),
    ("date-min", date.min),
    ("date-max", date.max),
    ("time", time(23, 59, 59, 999_999)),
    ("time-fold", time(1, 30, fold=1)),
    ("aware-time", time(12, 0, tzinfo=timezone(timedelta(hours=2)))),
    ("zoneinfo-time", time(12, 0, tzinfo=PARIS, fold=1)),
    ("timedelta", timedelta(days=-3, seconds=5, microseconds=7)),
    ("timedelta-min", timedelta.min),
    ("timedelta-max", timedelta.max),
    ("decimal", Decimal("1234.5678")),
    ("decimal-exponent", Decimal("-0.00E+5")),
    ("decimal-nan", Decimal("NaN")),
    ("decimal-snan-payload", Decimal("-sNaN123")),
    ("decimal-inf", Decimal("-Infinity")),
    ("decimal-precision", Decimal("3.14159265358979323846264338327950288419716939")),
    ("uuid", UUID("12345678-1234-5678-1234-567812345678")),
    ("safestring", mark_safe("<b>bold</b>")),
    (
        "nested",
        {
            (1, "k"): {frozenset({(2, (3,))}), (4, 5)},
            "list": [(1, [2, (3, {4})]), {"deep": ((),)}],
            "when": [datetime(2020, 1, 1, tzinfo=PARIS), date(2020, 1, 1)],
            "safe": [mark_safe("<i>x</i>"), "plain"],
            "bytes-like": [b"b", bytearray(b"ba"), (bytearray(b"in tuple"),)],
            "numbers": [Decimal("1.10"), 2**70, -0.0, UUID(int=1)],
        },
    ),
    ("deep-lists", [[[[[[[[[[[[[[["deep"]]]]]]]]]]]]]]]),
]


@pytest.mark.parametrize(
    "value", [pytest.param(v, id=name) for name, v in SUPPORTED_VALUES]
)
@pytest.mark.parametrize("compressor", ALL_COMPRESSORS)
def test_supported_values_roundtrip_with_msgpack(value: Any, compressor: str) -> None:
    envelope = make(compressor=compressor, compress_min_bytes=0)
    encoded = envelope.encode(value, key=K)
    if isinstance(encoded, bytes):
        assert codec_of(encoded) == 0, "supported types must not need pickle"
    decoded = envelope.decode(stored(encoded), key=K)
    assert decoded.meta is None
    assert_same(value, decoded.value)


def test_safestring_stays_safe_and_plain_str_stays_plain() -> None:
    envelope = make()
    value = {"fragment": mark_safe("<p>hi</p>"), "text": "<p>hi</p>"}
    decoded = envelope.decode(stored(envelope.encode(value, key=K)), key=K).value
    assert type(decoded["fragment"]) is SafeString
    assert isinstance(decoded["fragment"], SafeData)
    assert type(decoded["text"]) is str


def test_aware_datetimes_keep_their_tzinfo_object() -> None:
    envelope = make()
    value = datetime(2024, 3, 31, 2, 30, tzinfo=PARIS)
    assert roundtrip(envelope, value).value.tzinfo is PARIS
    utc = roundtrip(envelope, datetime(2024, 1, 1, tzinfo=timezone.utc)).value
    assert utc.tzinfo is timezone.utc
    named = roundtrip(
        envelope, datetime(2024, 1, 1, tzinfo=timezone(timedelta(0), "Z"))
    )
    assert named.value.tzname() == "Z"


@pytest.mark.parametrize(
    "value",
    [
        bytearray(b"top"),
        [bytearray(b"in list")],
        {1: {"deep": [[(bytearray(b"in tuple in lists"),)]]}},
        {(1, 2): bytearray(), "bytes": b"stay bytes"},
        ({"a": bytearray(b"\xc4\xc5\xc6")}, b"bytes"),
    ],
)
def test_bytearrays_stay_bytearrays_wherever_they_are(value: Any) -> None:
    # msgpack packs bytearray natively as bin (bytes), default never sees it.
    decoded = roundtrip(make(compressor="none"), value).value
    assert_same(value, decoded)


def test_bytes_without_bytearrays_are_untouched() -> None:
    value = {"a": [b"\xc4", (b"x" * 70_000,)], "b": 19.99}
    encoded = make(compressor="none").encode(value, key=K)
    assert encoded == seal(MAGIC + bytes((FORMAT_VERSION, 0)), codec.pack(value))


def test_tuple_nesting_beyond_the_limit_goes_to_pickle() -> None:
    envelope = make()
    shallow: Any = ()
    for _ in range(63):
        shallow = (shallow,)
    deep = (shallow,)
    assert codec_of(envelope.encode(shallow, key=K)) == 0
    assert codec_of(envelope.encode(deep, key=K)) == 1
    assert_same(deep, roundtrip(envelope, deep).value)
    assert codec._state.depth == 0


def nested_lists(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


def test_list_nesting_beyond_msgpack_limit_goes_to_pickle() -> None:
    envelope = make()
    assert codec_of(envelope.encode(nested_lists(1000), key=K)) == 0
    value = nested_lists(1100)  # msgpack stops at 1024 levels
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(10_000)  # pickling and == recurse once per level
    try:
        try:
            pickle.loads(pickle.dumps(value, pickle.HIGHEST_PROTOCOL))
        except RecursionError:
            # Python 3.12 bounds C recursion on its own: pickle cannot either.
            with pytest.raises(UnserializableValueError):
                envelope.encode(value, key=K)
            return
        encoded = envelope.encode(value, key=K)
        assert codec_of(encoded) == 1
        assert envelope.decode(stored(encoded), key=K).value == value
    finally:
        sys.setrecursionlimit(limit)


def test_too_deep_for_pickle_too_is_unserializable() -> None:
    with pytest.raises(UnserializableValueError) as info:
        make().encode(nested_lists(50_000), key=K)
    assert isinstance(info.value.__cause__, RecursionError)


def test_large_values_recycle_the_packer() -> None:
    envelope = make(compressor="none")
    big = ["x" * 1000] * 2000
    assert roundtrip(envelope, big).value == big
    assert roundtrip(envelope, ("small",)).value == ("small",)


def test_concurrent_use_from_threads() -> None:
    envelope = make(compress_min_bytes=0)
    values = [
        {"n": n, "t": (n, {n}), "s": "x" * (n * 50), "d": Decimal(n)} for n in range(64)
    ]

    def work(n: int) -> None:
        for _ in range(50):
            value = values[(n * 7 + _) % len(values)]
            assert_same(value, roundtrip(envelope, value).value)

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(work, range(16)))


# --------------------------------------------------------------------------
# Raw ints
# --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, 1, -1, 42, 2**63 - 1, -(2**63)])
def test_plain_ints_are_stored_raw(value: int) -> None:
    envelope = make()
    encoded = envelope.encode(value, key=K)
    assert type(encoded) is int
    assert encoded == value
    assert envelope.decode(str(value).encode(), key=K) == Decoded(value, None)


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**100])
def test_ints_beyond_64_bits_are_enveloped(value: int) -> None:
    envelope = make()
    encoded = envelope.encode(value, key=K)
    assert isinstance(encoded, bytes)
    assert encoded.startswith(MAGIC)
    assert envelope.decode(encoded, key=K) == Decoded(value, None)


class Colour(enum.IntEnum):
    RED = 1


def test_bool_and_int_subclasses_are_not_raw() -> None:
    envelope = make()
    for value in (True, False):
        encoded = envelope.encode(value, key=K)
        assert isinstance(encoded, bytes)
        assert codec_of(encoded) == 0
        assert envelope.decode(encoded, key=K).value is value
    encoded = envelope.encode(Colour.RED, key=K)
    assert isinstance(encoded, bytes)
    assert codec_of(encoded) == 1
    assert envelope.decode(encoded, key=K).value is Colour.RED


def test_int_with_meta_is_enveloped() -> None:
    envelope = make()
    encoded = envelope.encode(5, Meta(1, 2, 3, 4), key=K)
    assert isinstance(encoded, bytes)
    assert envelope.decode(encoded, key=K) == Decoded(5, Meta(1, 2, 3, 4))


@pytest.mark.parametrize(
    "raw", [b"0", b"-0", b"007", b"-9223372036854775808", b"123456789012345678901234"]
)
def test_raw_digit_strings_decode_as_ints(raw: bytes) -> None:
    decoded = make().decode(raw, key=K)
    assert decoded == Decoded(int(raw), None)
    assert type(decoded.value) is int


@pytest.mark.parametrize(
    "raw",
    [b"", b"-", b" 42", b"42 ", b"4_2", b"+1", b"42\n", b"1.5", b"0x1f", b"\xd9\xa3"],
)
def test_almost_ints_are_foreign(raw: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        make().decode(raw, key=K)
    assert info.value.reason == "foreign"


@pytest.mark.skipif(
    not hasattr(sys, "get_int_max_str_digits"), reason="no int digit limit"
)
def test_raw_int_beyond_the_digit_limit_is_corrupt() -> None:
    with pytest.raises(DecodeError) as info:
        make().decode(b"1" * (sys.get_int_max_str_digits() + 1), key=K)
    assert info.value.reason == "corrupt"


# --------------------------------------------------------------------------
# Metadata
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "meta",
    [
        Meta(),
        Meta(1, 2, 3, 4),
        Meta(soft_ms=300_000, hard_ms=360_000, delta_ms=17),
        Meta(2**64 - 1, 2**32, 127, 128),
    ],
)
@pytest.mark.parametrize("value", ["text", {"a": (1,)}, None])
def test_meta_roundtrip(meta: Meta, value: Any) -> None:
    envelope = make()
    encoded = envelope.encode(value, meta, key=K)
    assert isinstance(encoded, bytes)
    assert flags_of(encoded) & 0x10
    decoded = envelope.decode(encoded, key=K)
    assert decoded.meta == meta
    assert type(decoded.meta) is Meta
    assert_same(value, decoded.value)


def test_meta_roundtrip_with_pickle_and_compression() -> None:
    envelope = make(compress_min_bytes=0)
    value = OrderedDict(a="x" * 5000)
    encoded = envelope.encode(value, Meta(5, 6, 7, 8), key=K)
    assert codec_of(encoded) == 1
    assert compression_of(encoded) == 1
    assert envelope.decode(encoded, key=K) == Decoded(value, Meta(5, 6, 7, 8))


@pytest.mark.parametrize(
    "meta",
    [Meta(-1), Meta(True), Meta(1.5), Meta(2**64), Meta("1")],  # type: ignore[arg-type]
)
def test_invalid_meta_is_refused(meta: Meta) -> None:
    with pytest.raises(ValueError, match="meta"):
        make().encode("x", meta, key=K)


def with_meta(meta_bytes: bytes, payload: bytes = b"\xa1x") -> bytes:
    return sealed(0x10, payload, meta=meta_bytes)


def test_meta_extra_trailing_fields_are_ignored() -> None:
    data = with_meta(msgpack.packb([1, 2, 3, 4, 5, 6, "future", [7]]))
    assert make().decode(data, key=K) == Decoded("x", Meta(1, 2, 3, 4, 5, 6))


def test_meta_written_before_written_ms_existed_reads_as_zero() -> None:
    """Version 2 shipped with five fields; written_ms was appended later."""
    data = with_meta(msgpack.packb([1, 2, 3, 4, 5]))
    assert make().decode(data, key=K).meta == Meta(1, 2, 3, 4, 5, written_ms=0)
    assert Meta._fields[5] == "written_ms"


def test_meta_missing_fields_default_to_zero() -> None:
    assert make().decode(with_meta(msgpack.packb([7, 8])), key=K) == Decoded(
        "x", Meta(7, 8)
    )
    assert make().decode(with_meta(msgpack.packb([])), key=K) == Decoded("x", Meta())
    assert make().decode(with_meta(b""), key=K) == Decoded("x", Meta())


@pytest.mark.parametrize(
    "meta_bytes",
    [
        msgpack.packb({"soft": 1}),
        msgpack.packb([1, -2]),
        msgpack.packb([1, True]),
        msgpack.packb([1.5]),
        msgpack.packb([1]) + b"\x00",
        b"\xc1",
        b"\x94\x01",
    ],
)
def test_bad_meta_is_corrupt(meta_bytes: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        make().decode(with_meta(meta_bytes), key=K)
    assert info.value.reason in {"corrupt", "truncated"}


# --------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------


@pytest.mark.parametrize("compressor", ALL_COMPRESSORS)
def test_compression_bits_follow_the_compressor(compressor: str) -> None:
    envelope = make(compressor=compressor)
    value = "compressible " * 500
    encoded = envelope.encode(value, key=K)
    assert compression_of(encoded) == COMPRESSION_BITS[compressor]
    if compressor != "none":
        assert len(encoded) < len(value)
    assert envelope.decode(encoded, key=K).value == value


@pytest.mark.parametrize("compressor", ["zstd", compressor_param("lz4"), "zlib"])
def test_compression_threshold(compressor: str) -> None:
    value = b"a" * 1000  # msgpack bin16: 3 header bytes + 1000
    at_threshold = make(compressor=compressor, compress_min_bytes=1003)
    above_threshold = make(compressor=compressor, compress_min_bytes=1004)
    assert (
        compression_of(at_threshold.encode(value, key=K))
        == COMPRESSION_BITS[compressor]
    )
    assert compression_of(above_threshold.encode(value, key=K)) == 0
    assert compression_of(make(compressor=compressor).encode(b"a" * 100, key=K)) == 0


@pytest.mark.parametrize("compressor", ["zstd", compressor_param("lz4"), "zlib"])
def test_compression_is_kept_only_when_smaller(compressor: str) -> None:
    envelope = make(compressor=compressor, compress_min_bytes=0)
    noise = random.Random(7).randbytes(4096)
    for value in (noise, b"ab", "x"):
        encoded = envelope.encode(value, key=K)
        assert compression_of(encoded) == 0
        assert envelope.decode(encoded, key=K).value == value


@pytest.mark.parametrize("writer", ALL_COMPRESSORS)
@pytest.mark.parametrize("reader", ALL_COMPRESSORS)
def test_readers_follow_the_header_not_their_config(writer: str, reader: str) -> None:
    value = {"rows": [(i, f"row {i}", Decimal(i) / 4) for i in range(200)]}
    encoded = make(compressor=writer, compress_min_bytes=0).encode(value, key=K)
    assert compression_of(encoded) == COMPRESSION_BITS[writer]
    assert_same(value, make(compressor=reader).decode(encoded, key=K).value)


@pytest.mark.parametrize(
    ("compressor", "level"),
    [("zstd", 19), ("zstd", -5), pytest.param("lz4", 9, marks=needs_lz4), ("zlib", 1)],
)
def test_compress_level(compressor: str, level: int) -> None:
    envelope = make(compressor=compressor, compress_level=level, compress_min_bytes=0)
    value = "level " * 1000
    assert roundtrip(envelope, value).value == value


def test_invalid_compress_level_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="compress_level"):
        make(compressor="zlib", compress_level=42)


@pytest.mark.parametrize("compressor", ["zstd", compressor_param("lz4"), "zlib"])
def test_decompressed_size_limit_is_inclusive(compressor: str) -> None:
    value = b"\x00" * 200_000
    payload_size = len(msgpack.packb(value))
    encoded = make(compressor=compressor, compress_min_bytes=0).encode(value, key=K)
    assert compression_of(encoded) == COMPRESSION_BITS[compressor]
    assert (
        make(max_decompressed_bytes=payload_size).decode(encoded, key=K).value == value
    )
    with pytest.raises(DecodeError) as info:
        make(max_decompressed_bytes=payload_size - 1).decode(encoded, key=K)
    assert info.value.reason == "too_large"


def test_zstd_frame_without_content_size_respects_the_limit() -> None:
    payload = msgpack.packb(b"\x00" * 200_000)
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(payload)
    assert zstandard.frame_content_size(frame) == -1
    data = sealed(0x04, frame)
    assert make(max_decompressed_bytes=len(payload)).decode(data, key=K).value == (
        b"\x00" * 200_000
    )
    with pytest.raises(DecodeError) as info:
        make(max_decompressed_bytes=len(payload) - 1).decode(data, key=K)
    assert info.value.reason == "too_large"
    with pytest.raises(DecodeError) as info:
        make().decode(sealed(0x04, frame[:-3]), key=K)
    assert info.value.reason == "compression"


def test_lz4_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    encoded = (
        make(compressor="lz4", compress_min_bytes=0).encode("lz4 " * 100, key=K)
        if lz4_frame is not None
        else sealed(0x08, b"\x04\x22\x4d\x18")
    )
    monkeypatch.setattr(compression, "_lz4_frame", None)
    with pytest.raises(ValueError, match=r"pip install django-apee\[lz4\]"):
        make(compressor="lz4")
    with pytest.raises(DecodeError) as info:
        make().decode(encoded, key=K)
    assert info.value.reason == "codec_unavailable"


# --------------------------------------------------------------------------
# Pickle fallback and signing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Point:
    x: int
    y: int


Pair = namedtuple("Pair", "left right")


class Label(str):
    pass


class FixedZone(tzinfo):
    """A tzinfo that is neither ``datetime.timezone`` nor ``ZoneInfo``."""

    def __init__(self, minutes: int = 90) -> None:
        self.minutes = minutes

    def utcoffset(self, dt: datetime | None) -> timedelta:
        return timedelta(minutes=self.minutes)

    def dst(self, dt: datetime | None) -> timedelta:
        return timedelta(0)

    def tzname(self, dt: datetime | None) -> str:
        return "FIXED"

    def __reduce__(self) -> tuple[Any, ...]:
        return (FixedZone, (self.minutes,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FixedZone) and other.minutes == self.minutes

    def __hash__(self) -> int:
        return self.minutes


def foreign_tz() -> tzinfo:
    try:
        import pytz  # type: ignore[import-untyped]
    except ImportError:
        return FixedZone()
    return pytz.timezone("Europe/Paris")  # type: ignore[no-any-return]


PICKLED_VALUES: list[tuple[str, Any]] = [
    ("instance", Point(1, 2)),
    ("instance-in-container", {"points": [Point(1, 2), (Point(3, 4),)]}),
    ("namedtuple", Pair(1, (2,))),
    ("ordereddict", OrderedDict(b=1, a=2)),
    ("str-subclass", Label("x")),
    ("intenum", Colour.RED),
    ("complex", 1 + 2j),
    ("lone-surrogate", "\ud800"),
    ("foreign-tzinfo", datetime(2024, 1, 1, 12, tzinfo=FixedZone())),
    ("foreign-tzinfo-time", time(12, tzinfo=FixedZone(30))),
    ("pytz-or-custom-tzinfo", [datetime(2024, 1, 1, tzinfo=foreign_tz())]),
    ("zoneinfo-subclass-free-key-none", [ZoneInfo.no_cache("UTC")]),
]


@pytest.mark.parametrize(
    "value", [pytest.param(v, id=name) for name, v in PICKLED_VALUES]
)
def test_unsupported_values_fall_back_to_signed_pickle(value: Any) -> None:
    envelope = make()
    encoded = envelope.encode(value, key=K)
    assert codec_of(encoded) == 1
    decoded = envelope.decode(encoded, key=K).value
    assert type(decoded) is type(value)
    # ZoneInfo.no_cache() instances only equal themselves; their repr is exact.
    assert decoded == value or repr(decoded) == repr(value)


def test_foreign_tzinfo_roundtrips_through_pickle() -> None:
    value = datetime(2024, 1, 1, 12, tzinfo=foreign_tz())
    decoded = roundtrip(make(), value).value
    assert decoded == value
    assert type(decoded.tzinfo) is type(value.tzinfo)
    assert decoded.utcoffset() == value.utcoffset()


UNPICKLED: list[str] = []


def _unpickled(tag: str, padding: str = "") -> None:
    UNPICKLED.append(tag)


class Evil:
    """Unpickling it records that it happened, i.e. what an attacker wants."""

    def __init__(self, padding: str = "") -> None:
        self.padding = padding

    def __reduce__(self) -> tuple[Any, ...]:
        return (_unpickled, ("evil", self.padding))


def tampered(data: bytes, index: int, mask: int) -> bytes:
    changed = bytearray(data)
    changed[index] ^= mask
    return bytes(changed)


@pytest.mark.parametrize(
    ("meta", "padding"),
    [(None, ""), (Meta(1, 2, 3, 4), ""), (None, "compress me " * 200)],
    ids=["plain", "meta", "compressed"],
)
def test_tampered_pickles_are_never_unpickled(meta: Meta | None, padding: str) -> None:
    envelope = make(compress_min_bytes=64)
    encoded = envelope.encode(Evil(padding), meta, key=K)
    assert isinstance(encoded, bytes)
    assert codec_of(encoded) == 1
    assert compression_of(encoded) == (1 if padding else 0)
    header_len = 4 + (1 + encoded[4] if meta else 0)
    UNPICKLED.clear()
    for index in range(len(encoded)):
        for mask in (0x01, 0x02, 0x04, 0x10, 0x20, 0x80, 0xFF):
            with pytest.raises(DecodeError) as info:
                envelope.decode(tampered(encoded, index, mask), key=K)
            reason = info.value.reason
            if index >= header_len:  # signature, meta content or payload
                assert reason == "signature", (index, mask, reason)
            else:  # magic, version, flags, meta length: the structure changes
                # (a codec bit flipped to msgpack skips the signature, and then
                # fails to decompress or parse the signature bytes)
                assert reason in REASONS, reason
    for cut in range(len(encoded)):
        with pytest.raises(DecodeError) as info:
            envelope.decode(encoded[:cut], key=K)
        assert info.value.reason in {"foreign", "truncated", "signature"}
    with pytest.raises(DecodeError) as info:
        envelope.decode(encoded + b"\x00", key=K)
    assert info.value.reason == "signature"
    assert UNPICKLED == []
    # The untouched value is the one that does get unpickled.
    envelope.decode(encoded, key=K)
    assert UNPICKLED == ["evil"]
    UNPICKLED.clear()


def test_signature_is_checked_with_compare_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[int] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(len(a))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    stored = make().encode(Point(1, 2), key=K)
    make().decode(stored, key=K)  # a reader that did not write it checks
    assert calls == [16]


def test_wrong_key_is_a_signature_failure() -> None:
    encoded = make(signing_keys=[OLD_KEY]).encode(Evil(), key=K)
    UNPICKLED.clear()
    with pytest.raises(DecodeError) as info:
        make(signing_keys=[KEY]).decode(encoded, key=K)
    assert info.value.reason == "signature"
    assert UNPICKLED == []


def test_key_rotation() -> None:
    old_writer = make(signing_keys=[OLD_KEY])
    rotated = make(signing_keys=[KEY, OLD_KEY])
    value = Point(3, 4)
    from_old = old_writer.encode(value, key=K)
    assert rotated.decode(from_old, key=K).value == value
    from_new = rotated.encode(value, key=K)
    assert make(signing_keys=[KEY]).decode(from_new, key=K).value == value
    with pytest.raises(DecodeError) as info:
        old_writer.decode(from_new, key=K)
    assert info.value.reason == "signature"


def test_a_reader_without_pickle_unpickles_nothing() -> None:
    encoded = make().encode(Evil(), key=K)
    UNPICKLED.clear()
    for reader in (
        Envelope(pickle_fallback=False, signing_keys=[KEY]),
        make(pickle_fallback=False),
    ):
        with pytest.raises(DecodeError) as info:
            reader.decode(encoded, key=K)
        assert info.value.reason == "codec_unavailable"
    assert UNPICKLED == []


@pytest.mark.parametrize(
    "value",
    [Point(1, 2), [1, {"a": OrderedDict()}], Colour.RED, Label("x"), "\udfff"],
)
def test_pickle_off_raises_unserializable(value: Any) -> None:
    envelope = make(pickle_fallback=False)
    with pytest.raises(UnserializableValueError) as info:
        envelope.encode(value, key=K)
    error = info.value
    assert isinstance(error, TypeError)
    assert isinstance(error, pickle.PickleError)
    message = str(error)
    assert type(value).__qualname__ in message
    assert '"ALLOW_PICKLE": True' in message
    assert error.__cause__ is not None
    assert codec._state.depth == 0
    # The envelope is still usable afterwards.
    assert envelope.decode(envelope.encode(((1,), {2}), key=K), key=K).value == (
        (1,),
        {2},
    )


def test_pickle_off_names_the_nested_culprit() -> None:
    with pytest.raises(UnserializableValueError, match="Point"):
        make(pickle_fallback=False).encode({"a": [Point(1, 2)]}, key=K)


def test_unpicklable_values_raise_unserializable_with_the_cause() -> None:
    lock = threading.Lock()
    with pytest.raises(UnserializableValueError) as info:
        make().encode({"lock": lock}, key=K)
    assert isinstance(info.value, TypeError)
    assert isinstance(info.value, pickle.PickleError)
    assert info.value.__cause__ is not None
    assert "dict" in str(info.value)


# --------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"compressor": "brotli"}, "unknown compressor"),
        ({"signing_keys": ()}, "signing key"),
        ({"signing_keys": (b"",)}, "non-empty bytes"),
        ({"signing_keys": ("text",)}, "non-empty bytes"),
        ({"signing_keys": b"one key"}, "sequence"),
        ({"compress_min_bytes": -1}, "compress_min_bytes"),
        ({"max_decompressed_bytes": 0}, "max_decompressed_bytes"),
        ({"compress_level": "9"}, "compress_level"),
    ],
)
def test_invalid_options(options: dict[str, Any], match: str) -> None:
    options.setdefault("signing_keys", (KEY,))
    with pytest.raises(ValueError, match=match):
        Envelope(**options)


def test_every_envelope_needs_a_key_pickle_or_not() -> None:
    for options in ({}, {"pickle_fallback": False}, {"codec": "pickle"}):
        with pytest.raises(ValueError, match="signing key"):
            Envelope(**options)  # type: ignore[arg-type]
    envelope = make(pickle_fallback=False)
    assert envelope.decode(envelope.encode("x", key=K), key=K).value == "x"
    assert "KEY" not in repr(make())
    assert "current-signing" not in repr(make())


# --------------------------------------------------------------------------
# Every DecodeError reason, from crafted input
# --------------------------------------------------------------------------


def _ext(code: int, data: bytes) -> bytes:
    return sealed(0x00, msgpack.packb(msgpack.ExtType(code, data)))


def _pickle_with_broken_zstd() -> bytes:
    return sealed(0x01 | 0x04, b"\x28\xb5\x2f\xfd" + b"not zstd at all")


def _version_1_signed_pickle() -> bytes:
    # What version 1 wrote for a pickle: a 32-byte HMAC-SHA256, no key bound.
    head = MAGIC + b"\x01\x01"
    payload = pickle.dumps("x")
    return head + hmac.new(KEY, head + payload, "sha256").digest() + payload


BIG = b"\x00" * (2 * 1024 * 1024)
NOON = extensions._DT.pack(2024, 1, 1, 12, 0, 0, 0, 0)
CRAFTED: list[tuple[str, str, bytes]] = [
    ("foreign", "empty", b""),
    ("foreign", "text", b"hello"),
    ("foreign", "pickle", pickle.dumps("x")),
    ("foreign", "msgpack", msgpack.packb({"a": 1})),
    ("foreign", "half-magic", b"\xc1"),
    ("foreign", "spaced-int", b" 42"),
    ("version", "v0", craft(0x00, b"\xa1x", version=0)),
    ("version", "v1-msgpack", craft(0x00, b"\xa1x", version=1)),
    ("version", "v1-signed-pickle", _version_1_signed_pickle()),
    ("version", "v3", craft(0x00, bytes(16) + b"\xa1x", version=3)),
    ("version", "v3-short", MAGIC + b"\x03"),
    ("truncated", "magic-only", MAGIC),
    ("truncated", "no-flags", MAGIC + bytes((FORMAT_VERSION,))),
    ("truncated", "no-mac", craft(0x00)),
    ("truncated", "no-meta-length", craft(0x10)),
    ("truncated", "short-meta", craft(0x10, b"\x05\x94\x01")),
    ("truncated", "short-mac", craft(0x01, b"\x00" * 15)),
    ("truncated", "no-payload", sealed(0x00)),
    ("corrupt", "reserved-bit-5", craft(0x20, b"\xa1x")),
    ("corrupt", "reserved-bit-7", craft(0x80, b"\xa1x")),
    ("corrupt", "never-used-byte", sealed(0x00, b"\xc1")),
    ("corrupt", "incomplete-msgpack", sealed(0x00, b"\x92\x01")),
    ("corrupt", "trailing-msgpack", sealed(0x00, b"\x01\x02")),
    ("corrupt", "unknown-ext", _ext(99, b"")),
    ("corrupt", "timestamp-ext-bad-length", sealed(0x00, b"\xd4\xff\x00")),
    ("corrupt", "bad-datetime", _ext(4, bytes(12))),
    ("corrupt", "short-date", _ext(6, b"\x07")),
    ("corrupt", "bad-fold", _ext(7, b"\x01\x02\x03\x00\x00\x00\x00\x02")),
    ("corrupt", "tuple-of-non-array", _ext(1, msgpack.packb("abc"))),
    ("corrupt", "unhashable-set-item", _ext(2, msgpack.packb([[1]]))),
    ("corrupt", "bad-safestring-utf8", _ext(12, b"\xff")),
    ("corrupt", "bad-decimal", _ext(10, b"\xff")),
    ("corrupt", "bad-uuid", _ext(11, b"short")),
    ("corrupt", "bad-tz-tag", _ext(5, NOON + b"\x09")),
    ("corrupt", "no-tz-tag", _ext(5, NOON)),
    ("corrupt", "fixed-tz-trailing", _ext(5, NOON + b"\x00" + bytes(8) + b"!")),
    (
        "corrupt",
        "fixed-tz-24h",
        _ext(5, NOON + b"\x00" + (86400 * 10**6).to_bytes(8, "big")),
    ),
    ("corrupt", "bad-zone-key", _ext(5, NOON + b"\x02../etc")),
    ("corrupt", "meta-not-array", with_meta(msgpack.packb("meta"))),
    ("corrupt", "pickle-garbage-but-signed", sealed(0x01, b"\x80\x05junk")),
    ("signature", "garbage-mac", craft(0x01, b"\x00" * 16 + pickle.dumps("x"))),
    ("signature", "unsigned-msgpack", craft(0x00, b"\x00" * 16 + b"\xa1x")),
    (
        "signature",
        "unsigned-safestring",
        craft(0x00, b"\x00" * 16 + msgpack.packb(msgpack.ExtType(12, b"<script>"))),
    ),
    ("signature", "another-redis-key", seal(craft(0x00), b"\xa1x", key=":1:other")),
    ("signature", "another-secret", seal(craft(0x00), b"\xa1x", signing_key=OLD_KEY)),
    ("signature", "member-as-value", seal(craft(0x00), b"\xa1x", key="")),
    ("compression", "zstd-garbage", sealed(0x04, b"definitely not zstd")),
    (
        "compression",
        "zstd-trailing",
        sealed(0x04, zstandard.compress(b"\xa1x") + b"!"),
    ),
    ("compression", "zlib-garbage", sealed(0x0C, b"definitely not zlib")),
    (
        "compression",
        "zlib-truncated",
        sealed(0x0C, zlib.compress(msgpack.packb("x" * 99))[:-4]),
    ),
    ("compression", "zlib-trailing", sealed(0x0C, zlib.compress(b"\xa1x") + b"!")),
    ("compression", "lz4-garbage", sealed(0x08, b"definitely not lz4")),
    ("compression", "signed-pickle-broken-zstd", _pickle_with_broken_zstd()),
    ("codec_unavailable", "codec-2", craft(0x02, b"\xa1x")),
    ("codec_unavailable", "codec-3", craft(0x03, b"\xa1x")),
    (
        "codec_unavailable",
        "unknown-zone",
        _ext(5, NOON + b"\x02Atlantis/Capital"),
    ),
    ("too_large", "zstd", sealed(0x04, zstandard.compress(BIG))),
    ("too_large", "zlib", sealed(0x0C, zlib.compress(BIG))),
]
if lz4_frame is not None:
    CRAFTED += [
        (
            "compression",
            "lz4-truncated",
            sealed(0x08, lz4_frame.compress(b"\xa1x" * 50)[:-3]),
        ),
        (
            "compression",
            "lz4-trailing",
            sealed(0x08, lz4_frame.compress(b"\xa1x") + b"!"),
        ),
        ("too_large", "lz4", sealed(0x08, lz4_frame.compress(BIG))),
    ]


@pytest.mark.parametrize(
    ("reason", "data"),
    [
        pytest.param(reason, data, id=f"{reason}-{name}")
        for reason, name, data in CRAFTED
    ],
)
def test_every_reason_is_reachable(reason: str, data: bytes) -> None:
    with pytest.raises(DecodeError) as info:
        make(max_decompressed_bytes=1024 * 1024).decode(data, key=K)
    assert info.value.reason == reason, str(info.value)
    assert str(info.value)


def test_every_reason_is_covered() -> None:
    assert {reason for reason, _, _ in CRAFTED} == REASONS


def test_decode_error_is_picklable_and_readable() -> None:
    error = DecodeError("truncated", "header is incomplete")
    copy = pickle.loads(pickle.dumps(error))
    assert copy.reason == "truncated"
    assert str(copy) == "header is incomplete"


def test_decode_accepts_bytes_likes_and_rejects_the_rest() -> None:
    envelope = make()
    encoded = envelope.encode(("x",), key=K)
    assert isinstance(encoded, bytes)
    assert envelope.decode(bytearray(encoded), key=K).value == ("x",)
    assert envelope.decode(memoryview(encoded), key=K).value == ("x",)  # type: ignore[arg-type]
    for junk in ("text", None, 42):
        with pytest.raises(DecodeError):
            envelope.decode(junk, key=K)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Property tests
# --------------------------------------------------------------------------

MAX_OFFSET = timedelta(hours=24) - timedelta(microseconds=1)
offsets = st.timedeltas(min_value=-MAX_OFFSET, max_value=MAX_OFFSET)
timezones = st.one_of(
    st.just(timezone.utc),
    st.builds(timezone, offsets),
    st.builds(timezone, offsets, st.text(max_size=8)),
    st.sampled_from(ZONES),
)
datetimes = st.builds(
    lambda dt, fold: dt.replace(fold=fold),
    st.datetimes(
        min_value=datetime(2, 1, 1),
        max_value=datetime(9998, 12, 31),
        timezones=st.none() | timezones,
    ),
    st.integers(0, 1),
)
times = st.builds(
    lambda t, fold: t.replace(fold=fold),
    st.times(timezones=st.none() | timezones),
    st.integers(0, 1),
)

hashable_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**130), max_value=2**130),
    st.floats(allow_nan=False),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.text(max_size=20).map(SafeString),
    datetimes,
    st.dates(),
    times,
    st.timedeltas(),
    st.decimals(allow_nan=False),
    st.uuids(),
)
scalars = st.one_of(
    hashable_scalars,
    st.floats(),
    st.decimals(),
    st.binary(max_size=20).map(bytearray),
)
hashables = st.recursive(
    hashable_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(tuple), st.frozensets(inner, max_size=3)
    ),
    max_leaves=6,
)
values = st.recursive(
    st.one_of(
        scalars, st.sets(hashables, max_size=3), st.frozensets(hashables, max_size=3)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(hashables, inner, max_size=4),
    ),
    max_leaves=10,
)
pickle_only = st.one_of(
    st.builds(Point, st.integers(), st.integers()),
    st.builds(Pair, st.integers(), st.text(max_size=5)),
    st.builds(
        lambda d: OrderedDict(d),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=3),
    ),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    value=values,
    compressor=st.sampled_from(
        ["zstd", "zlib", "none"] + (["lz4"] if lz4_frame else [])
    ),
    threshold=st.sampled_from([0, 16, 1024]),
    meta=st.none() | st.builds(Meta, *[st.integers(0, 2**64 - 1)] * len(Meta._fields)),
)
def test_property_roundtrip(
    value: Any, compressor: str, threshold: int, meta: Meta | None
) -> None:
    envelope = make(compressor=compressor, compress_min_bytes=threshold)
    encoded = envelope.encode(value, meta, key=K)
    if isinstance(encoded, bytes):
        assert codec_of(encoded) == 0, "supported types must stay msgpack"
    decoded = envelope.decode(stored(encoded), key=K)
    assert decoded.meta == meta
    assert_same(value, decoded.value)


FUZZ_ENVELOPES = [
    make(compressor=name, compress_min_bytes=threshold, max_decompressed_bytes=1 << 20)
    for name in ["zstd", "zlib", "none"] + (["lz4"] if lz4_frame is not None else [])
    for threshold in (0, 64)
]


def _decode_or_decode_error(envelope: Envelope, data: bytes) -> None:
    """Decode may succeed (a flip can land on another valid value) or fail.

    Failing with anything but DecodeError fails the test, since it escapes.
    """
    reason = None
    try:
        envelope.decode(data, key=K)
    except DecodeError as error:
        reason = error.reason
    assert reason is None or reason in REASONS


@settings(
    max_examples=10_000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    value=st.one_of(values, pickle_only),
    envelope=st.sampled_from(FUZZ_ENVELOPES),
    meta=st.none() | st.builds(Meta, *[st.integers(0, 2**40)] * len(Meta._fields)),
    noise=st.binary(max_size=64),
    data=st.data(),
)
def test_fuzz_decode_raises_only_decode_error(
    value: Any, envelope: Envelope, meta: Meta | None, noise: bytes, data: Any
) -> None:
    # Random bytes, bare and behind a valid-looking header.
    _decode_or_decode_error(envelope, noise)
    _decode_or_decode_error(envelope, MAGIC + noise)
    _decode_or_decode_error(envelope, MAGIC + bytes((FORMAT_VERSION,)) + noise)

    encoded = stored(envelope.encode(value, meta, key=K))
    decoded = envelope.decode(encoded, key=K)
    assert decoded.meta == meta
    if isinstance(value, (Point, Pair, OrderedDict)):
        assert decoded.value == value
        assert type(decoded.value) is type(value)
    else:
        assert_same(value, decoded.value)

    cut = data.draw(st.integers(0, max(len(encoded) - 1, 0)), label="truncate at")
    _decode_or_decode_error(envelope, encoded[:cut])

    flips = data.draw(
        st.lists(
            st.tuples(st.integers(0, len(encoded) - 1), st.integers(1, 255)),
            min_size=1,
            max_size=4,
        ),
        label="flips",
    )
    changed = bytearray(encoded)
    for index, mask in flips:
        changed[index] ^= mask
    _decode_or_decode_error(envelope, bytes(changed))


def test_every_reason_is_exported_for_the_metrics() -> None:
    assert set(DECODE_REASONS) == REASONS
    assert len(DECODE_REASONS) == len(REASONS)
