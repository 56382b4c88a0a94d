"""The core's public pieces around the envelope: the description of stored
bytes, the MAC-key derivation, and the SafeString hand-in.

Pure: no Redis, no Django settings.
"""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from django.utils.safestring import SafeString

from django_apee.core import codec
from django_apee.core.codec import register_safe_string
from django_apee.core.envelope import DecodeError, Envelope, derive_signing_keys
from django_apee.core.mac import Macs, bind
from django_apee.core.wire import (
    CODEC_NAMES,
    CODECS,
    COMPRESSION_NAMES,
    COMPRESSIONS,
    FORMAT_VERSION,
    HEADER_PEEK_BYTES,
    MAC_LEN,
    MAGIC,
    MAX_META_LEN,
    Header,
    Meta,
    describe,
    peek_meta,
)

KEY = b"current-signing-key-0123456789ab"
#: The Redis key the values here are stored under.
K = ":1:wire"
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
    data = envelope.encode({"rows": ["x" * 40] * 20}, meta, key=K)
    assert isinstance(data, bytes)
    header = describe(data)
    assert header is not None
    assert header.version == FORMAT_VERSION
    assert header.codec == codec
    assert header.compression == compressor
    assert header.meta == meta
    assert header.has_meta is (meta is not None)
    assert header.signed is True  # every codec: the MAC is the format's
    meta_end = 4 if meta is None else 5 + data[4]
    assert header.header_len == meta_end + MAC_LEN == meta_end + 16
    assert header.payload_len == len(data) - header.header_len


def test_describe_reads_a_header_peek() -> None:
    envelope = Envelope(codec="pickle", signing_keys=[KEY])
    data = envelope.encode("v" * 100_000, META, key=K)
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
    head = MAGIC + bytes((FORMAT_VERSION, 0x10, len(meta))) + meta
    data = head + Macs([KEY]).sign(bind(K), head, payload) + payload
    reader = Envelope(pickle_fallback=False, signing_keys=[KEY])
    assert reader.decode(data, key=K).meta == Meta(1, 2, 3, 4, 5)
    header = describe(data[:HEADER_PEEK_BYTES])
    assert header is not None
    assert header.meta == Meta(1, 2, 3, 4, 5)
    assert header.header_len == 4 + 1 + MAX_META_LEN + MAC_LEN
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
        MAGIC + b"\x03\x00" + bytes(16) + b"\xa1x",  # a later format version
        MAGIC + b"\x01\x00\xa1x",  # version 1, before every value had a MAC
        MAGIC + b"\x01\x10\x01\x90\xa1x",  # version 1 with metadata
        MAGIC + b"\x02",  # cut inside the header
        MAGIC + b"\x02\x20" + bytes(16) + b"\xa1x",  # reserved flag bit
        MAGIC + b"\x02\x02" + bytes(16) + b"\xa1x",  # reserved codec
        MAGIC + b"\x02\x10",  # metadata length missing
        MAGIC + b"\x02\x10\x05\x95",  # metadata cut off
        MAGIC + b"\x02\x10\x01\xc1",  # metadata not msgpack
        MAGIC + b"\x02\x10\x01\xa1",  # metadata not an array
    ],
)
def test_describe_returns_none_for_what_it_cannot_read(data: bytes) -> None:
    assert describe(data) is None


@pytest.mark.parametrize("data", [None, 42, "text", [1, 2], object()])
def test_describe_never_raises(data: object) -> None:
    assert describe(data) is None  # type: ignore[arg-type]


def test_describe_takes_other_bytes_like_objects() -> None:
    envelope = Envelope(pickle_fallback=False, signing_keys=[KEY])
    data = envelope.encode("value", META, key=K)
    assert isinstance(data, bytes)
    expected = describe(data)
    assert expected == Header(
        version=FORMAT_VERSION,
        codec="msgpack",
        compression="none",
        meta=META,
        header_len=5 + data[4] + MAC_LEN,
        payload_len=len(data) - 5 - data[4] - MAC_LEN,
    )
    assert describe(bytearray(data)) == expected
    assert describe(memoryview(data)) == expected


def test_mac_keys_are_derived_as_they_always_were() -> None:
    # Values in Redis carry MACs under these keys: they must never change
    # (within format version 2).
    assert [key.hex() for key in derive_signing_keys(["secret", "", "old-secret"])] == [
        "804a69da6ba9a8f1cfda69674f2e2cbc31ba85b42c5a5cd9794fafef5c0c931f",
        "98a5cc6bdd536d5ed915fcf658acccd9de5d71ea70a5230a61ec2fb2e359561e",
    ]
    assert derive_signing_keys([]) == []


def test_mac_keys_have_their_own_purpose() -> None:
    # Not the version-1 pickle-signing keys, and not the secret itself.
    (key,) = derive_signing_keys(["secret"])
    assert key != hashlib.sha256(b"django_apee.envelope.pickle\x00secret").digest()
    assert b"secret" not in key


def test_derived_keys_rotate() -> None:
    new, old = derive_signing_keys(["new", "old"])
    stored = Envelope(codec="pickle", signing_keys=[old]).encode("x", key=K)
    rotated = Envelope(codec="pickle", signing_keys=[new, old])
    assert rotated.decode(stored, key=K).value == "x"


def test_safe_strings_need_the_type_handed_in() -> None:
    # The core does not import Django: the backend hands SafeString in.
    envelope = Envelope(signing_keys=[KEY])
    fragment = SafeString("<b>bold</b>")
    before = codec._safe_string  # a backend built earlier registered it
    register_safe_string(None)
    try:
        written_without = envelope.encode(fragment, key=K)
        register_safe_string(SafeString)
        written_with = envelope.encode(fragment, key=K)
        register_safe_string(None)
        with pytest.raises(DecodeError) as info:
            envelope.decode(written_with, key=K)
        decoded_without = envelope.decode(written_without, key=K).value
    finally:
        register_safe_string(before)
    assert isinstance(written_without, bytes)
    assert isinstance(written_with, bytes)
    header_without, header_with = describe(written_without), describe(written_with)
    assert header_without is not None
    assert header_with is not None
    assert header_without.codec == "pickle"
    assert header_with.codec == "msgpack"
    assert info.value.reason == "codec_unavailable"
    assert type(decoded_without) is SafeString
