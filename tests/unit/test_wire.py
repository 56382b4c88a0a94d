"""The core's public pieces around the envelope: the description of stored
bytes, the signing-key derivation, and the SafeString hand-in.

Pure: no Redis, no Django settings.
"""

from __future__ import annotations

import msgpack
import pytest
from django.utils.safestring import SafeString

from django_apee.core.codec import register_safe_string
from django_apee.core.envelope import DecodeError, Envelope, derive_signing_keys
from django_apee.core.wire import (
    CODEC_NAMES,
    CODECS,
    COMPRESSION_NAMES,
    COMPRESSIONS,
    FORMAT_VERSION,
    HEADER_PEEK_BYTES,
    MAGIC,
    MAX_META_LEN,
    Header,
    Meta,
    describe,
    peek_meta,
)

KEY = b"current-signing-key-0123456789ab"
META = Meta(soft_ms=1000, hard_ms=5000, grace_ms=300, delta_ms=20, seed=7)


@pytest.fixture(autouse=True)
def _empty_redis() -> None:
    """Shadow conftest's autouse FLUSHDB: this module needs no Redis at all."""


def test_name_tables_match_the_flag_bits() -> None:
    assert CODECS == {"msgpack": 0, "pickle": 1}
    assert COMPRESSIONS == {"none": 0, "zstd": 1, "lz4": 2, "zlib": 3}
    assert {number: name for name, number in CODECS.items()} == CODEC_NAMES
    assert {number: name for name, number in COMPRESSIONS.items()} == (
        COMPRESSION_NAMES
    )


@pytest.mark.parametrize("codec", ["msgpack", "pickle"])
@pytest.mark.parametrize("compressor", ["zstd", "zlib", "none"])
@pytest.mark.parametrize("meta", [None, META])
def test_describe_says_what_was_written(
    codec: str, compressor: str, meta: Meta | None
) -> None:
    envelope = Envelope(
        codec=codec, compressor=compressor, compress_min_bytes=0, signing_keys=[KEY]
    )
    data = envelope.encode({"rows": ["x" * 40] * 20}, meta)
    assert isinstance(data, bytes)
    header = describe(data)
    assert header is not None
    assert header.version == FORMAT_VERSION
    assert header.codec == codec
    assert header.compression == compressor
    assert header.meta == meta
    assert header.has_meta is (meta is not None)
    assert header.signed is (codec == "pickle")
    meta_end = 4 if meta is None else 5 + data[4]
    assert header.header_len == meta_end + (32 if codec == "pickle" else 0)
    assert header.payload_len == len(data) - header.header_len


def test_describe_reads_a_header_peek() -> None:
    envelope = Envelope(codec="pickle", signing_keys=[KEY])
    data = envelope.encode("v" * 100_000, META)
    assert isinstance(data, bytes)
    whole, peeked = describe(data), describe(data[:HEADER_PEEK_BYTES])
    assert whole is not None
    assert peeked is not None
    assert peeked._replace(payload_len=0) == whole._replace(payload_len=0)
    assert peeked.meta == META == peek_meta(data[:HEADER_PEEK_BYTES])


def test_the_longest_metadata_fits_in_a_peek() -> None:
    # Readers ignore trailing fields, so metadata may be as long as its
    # length byte allows: 4 header bytes + 1 length byte + 255.
    meta = msgpack.packb([1, 2, 3, 4, 5] + [0] * 247)
    assert len(meta) == MAX_META_LEN
    payload = msgpack.packb("x" * 2000)
    data = MAGIC + bytes((FORMAT_VERSION, 0x10, len(meta))) + meta + payload
    assert Envelope(pickle_fallback=False).decode(data).meta == Meta(1, 2, 3, 4, 5)
    header = describe(data[:HEADER_PEEK_BYTES])
    assert header is not None
    assert header.meta == Meta(1, 2, 3, 4, 5)
    assert header.header_len == 4 + 1 + MAX_META_LEN
    assert peek_meta(data[:HEADER_PEEK_BYTES]) == Meta(1, 2, 3, 4, 5)
    assert describe(data[: 4 + 1 + MAX_META_LEN - 1]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"42",
        b"-7",
        b"hello",
        MAGIC,
        MAGIC + b"\x02\x00\xa1x",  # another format version
        MAGIC + b"\x01",  # cut inside the header
        MAGIC + b"\x01\x20\xa1x",  # reserved flag bit
        MAGIC + b"\x01\x02\xa1x",  # reserved codec
        MAGIC + b"\x01\x10",  # metadata length missing
        MAGIC + b"\x01\x10\x05\x95",  # metadata cut off
        MAGIC + b"\x01\x10\x01\xc1",  # metadata not msgpack
        MAGIC + b"\x01\x10\x01\xa1",  # metadata not an array
    ],
)
def test_describe_returns_none_for_what_it_cannot_read(data: bytes) -> None:
    assert describe(data) is None


@pytest.mark.parametrize("data", [None, 42, "text", [1, 2], object()])
def test_describe_never_raises(data: object) -> None:
    assert describe(data) is None  # type: ignore[arg-type]


def test_describe_takes_other_bytes_like_objects() -> None:
    data = Envelope(pickle_fallback=False).encode("value", META)
    assert isinstance(data, bytes)
    expected = describe(data)
    assert expected == Header(
        version=FORMAT_VERSION,
        codec="msgpack",
        compression="none",
        meta=META,
        header_len=5 + data[4],
        payload_len=len(data) - 5 - data[4],
    )
    assert describe(bytearray(data)) == expected
    assert describe(memoryview(data)) == expected


def test_signing_keys_are_derived_as_they_always_were() -> None:
    # Values in Redis are signed with these keys: they must never change.
    assert [key.hex() for key in derive_signing_keys(["secret", "", "old-secret"])] == [
        "79e7685ca7f8f0d016d0bf5a81401efe099e6a0009a730cd1c5645de7129364c",
        "03eafaadcf82f565fadb474899e5e8978b45acb6a9b4d21ec09adfc9066a14ad",
    ]
    assert derive_signing_keys([]) == []


def test_derived_keys_rotate() -> None:
    new, old = derive_signing_keys(["new", "old"])
    stored = Envelope(codec="pickle", signing_keys=[old]).encode("x")
    assert Envelope(codec="pickle", signing_keys=[new, old]).decode(stored).value == "x"


def test_safe_strings_need_the_type_handed_in() -> None:
    # The core does not import Django: the backend hands SafeString in.
    envelope = Envelope(signing_keys=[KEY])
    fragment = SafeString("<b>bold</b>")
    register_safe_string(None)
    written_without = envelope.encode(fragment)
    register_safe_string(SafeString)
    try:
        written_with = envelope.encode(fragment)
    finally:
        register_safe_string(None)
    assert isinstance(written_without, bytes)
    assert isinstance(written_with, bytes)
    header_without, header_with = describe(written_without), describe(written_with)
    assert header_without is not None
    assert header_with is not None
    assert header_without.codec == "pickle"
    assert header_with.codec == "msgpack"
    with pytest.raises(DecodeError) as info:
        envelope.decode(written_with)
    assert info.value.reason == "codec_unavailable"
    assert type(envelope.decode(written_without).value) is SafeString
