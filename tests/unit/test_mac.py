"""Every envelope authenticated and bound to its Redis key (format version 2).

Pure: no Redis, no Django settings. The attacks these tests stand for, on a
real cache, are in ``tests/redis/test_planted_values.py``.
"""

from __future__ import annotations

import hashlib
import hmac
import pickle
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from django.utils.safestring import SafeString

from django_apee.core import codec, compression
from django_apee.core import envelope as envelope_module
from django_apee.core.envelope import (
    FORMAT_VERSION,
    MAGIC,
    MEMBER_KEY,
    Decoded,
    DecodeError,
    Envelope,
    Meta,
)
from django_apee.core.mac import Macs, bind, derive_signing_keys
from django_apee.core.wire import MAC_LEN, describe

NEW, OLD = derive_signing_keys(["the new secret", "the old secret"])
USER_1 = "app:1:perms:user:1"
USER_2 = "app:1:perms:user:2"


@pytest.fixture(autouse=True)
def _empty_redis() -> None:
    """Shadow conftest's autouse FLUSHDB: this module needs no Redis at all."""


@pytest.fixture(autouse=True, scope="module")
def _safe_strings() -> Iterator[None]:
    before = codec._safe_string
    codec.register_safe_string(SafeString)
    yield
    # What it was: a backend built earlier in this process registered it.
    codec.register_safe_string(before)


def make(*keys: bytes, **options: Any) -> Envelope:
    return Envelope(signing_keys=keys or (NEW,), **options)


def encoded(
    envelope: Envelope, value: Any, key: str, meta: Meta | None = None
) -> bytes:
    data = envelope.encode(value, meta, key=key)
    assert isinstance(data, bytes)
    return data


def reason(envelope: Envelope, data: bytes, key: str) -> str:
    with pytest.raises(DecodeError) as info:
        envelope.decode(data, key=key)
    return info.value.reason


CASES = [
    pytest.param({}, {"is_admin": True}, None, id="msgpack"),
    pytest.param({}, {"is_admin": True}, Meta(1, 2, 3, 4, 5), id="msgpack-meta"),
    pytest.param({}, {"rows": ["x" * 50] * 100}, None, id="msgpack-zstd"),
    pytest.param({"codec": "pickle"}, {"is_admin": True}, None, id="pickle"),
    pytest.param({"codec": "pickle"}, ["y" * 50] * 100, Meta(1, 2), id="pickle-zstd"),
    pytest.param({}, SafeString("<b>ok</b>"), None, id="safestring"),
    pytest.param({}, 2**70, None, id="big-int"),
]


# -- what the MAC is -----------------------------------------------------------------


@pytest.mark.parametrize(("options", "value", "meta"), CASES)
def test_the_mac_is_hmac_sha256_128_over_the_key_and_every_byte(
    options: dict[str, Any], value: Any, meta: Meta | None
) -> None:
    data = encoded(make(**options), value, USER_1, meta)
    header = describe(data)
    assert header is not None
    at = header.header_len - MAC_LEN
    head, tag, payload = data[:at], data[at : header.header_len], data[at + MAC_LEN :]
    key = USER_1.encode()
    message = len(key).to_bytes(4, "big") + key + head + payload
    assert tag == hmac.new(NEW, message, hashlib.sha256).digest()[:16]


def test_the_key_is_length_prefixed_so_nothing_shifts() -> None:
    # Without the length, (":1:ab", head) and (":1:a", "b" + head) would be
    # the same MAC input.
    head = MAGIC + bytes((FORMAT_VERSION, 0))
    assert bind(":1:ab") + head != bind(":1:a") + b"b" + head
    macs = Macs([NEW])
    assert macs.sign(bind(":1:ab"), head, b"\xa1x") != macs.sign(
        bind(":1:a"), b"b" + head, b"\xa1x"
    )
    assert bind("") == bytes(4)
    assert bind("é") == b"\x00\x00\x00\x02\xc3\xa9"
    assert bind("\udfff")  # a key redis-py could not send is still bound


@pytest.mark.parametrize("key", [b":1:k", None, 1])
def test_the_key_is_a_str(key: Any) -> None:
    envelope = make()
    data = encoded(envelope, "x", ":1:k")
    for call in (
        lambda: envelope.encode("x", key=key),
        lambda: envelope.decode(data, key=key),
        lambda: envelope.open(data, key=key),
        lambda: envelope.rebind(data, ":1:k", key),
    ):
        with pytest.raises(TypeError, match="str"):
            call()


# -- bound to the key ----------------------------------------------------------------


@pytest.mark.parametrize(("options", "value", "meta"), CASES)
def test_bytes_copied_onto_another_key_are_a_signature_miss(
    options: dict[str, Any], value: Any, meta: Meta | None
) -> None:
    envelope = make(**options)
    user_2 = encoded(envelope, value, USER_2, meta)
    assert envelope.decode(user_2, key=USER_2) == Decoded(value, meta)
    assert reason(envelope, user_2, USER_1) == "signature"
    with pytest.raises(DecodeError) as info:
        envelope.open(user_2, key=USER_1)
    assert info.value.reason == "signature"
    # Another version of the same key is another key.
    assert reason(envelope, user_2, "app:2:perms:user:2") == "signature"


def test_members_are_bound_to_the_empty_key() -> None:
    envelope = make()
    member = encoded(envelope, ("a", 1), MEMBER_KEY)
    assert envelope.decode(member, key="").value == ("a", 1)
    # Authenticated (not plantable), but not a value of any key, nor the
    # other way round.
    assert reason(envelope, member, USER_1) == "signature"
    assert reason(envelope, encoded(envelope, ("a", 1), USER_1), "") == "signature"
    planted = MAGIC + bytes((FORMAT_VERSION, 0)) + bytes(16) + b"\xa1x"
    assert reason(envelope, planted, "") == "signature"


def test_planted_unsigned_values_are_a_signature_miss_for_every_codec() -> None:
    envelope = make()
    script = msgpack.packb(msgpack.ExtType(12, b"<script>alert(1)</script>"))
    head = MAGIC + bytes((FORMAT_VERSION, 0))
    for payload in (script, msgpack.packb("<script>"), msgpack.packb({"a": 1})):
        for tag in (bytes(16), b"\xff" * 16):
            assert reason(envelope, head + tag + payload, USER_1) == "signature"
    pickled = MAGIC + bytes((FORMAT_VERSION, 1)) + bytes(16) + pickle.dumps("x")
    assert reason(envelope, pickled, USER_1) == "signature"


# -- keys: the first signs, all verify -----------------------------------------------


def test_the_first_key_signs_and_every_key_verifies() -> None:
    rotated = make(NEW, OLD)
    written = encoded(rotated, {"a": 1}, USER_1)
    assert make(NEW).decode(written, key=USER_1).value == {"a": 1}
    assert reason(make(OLD), written, USER_1) == "signature"

    before_rotation = encoded(make(OLD), {"a": 1}, USER_1)
    assert rotated.decode(before_rotation, key=USER_1).value == {"a": 1}
    assert reason(make(NEW), before_rotation, USER_1) == "signature"
    # A fallback key's value is still bound to its key.
    assert reason(rotated, before_rotation, USER_2) == "signature"


def test_a_fallback_key_is_tried_only_after_the_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    rotated = make(NEW, OLD)
    # Written by another process (its writer would have it opened already).
    rotated.decode(encoded(make(NEW, OLD), "x", USER_1), key=USER_1)
    assert len(calls) == 1
    calls.clear()
    rotated.decode(encoded(make(OLD), "x", USER_1), key=USER_1)
    assert len(calls) == 2
    assert all(len(tag) == MAC_LEN for tag in calls)


# -- nothing is touched before the MAC -----------------------------------------------


def test_nothing_is_decompressed_unpacked_or_unpickled_before_the_mac(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    touched: list[str] = []

    def spy(name: str, real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            touched.append(name)
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(
        compression, "decompress", spy("decompress", compression.decompress)
    )
    monkeypatch.setattr(envelope_module, "unpack", spy("unpack", codec.unpack))
    monkeypatch.setattr(envelope_module, "unpack_meta", spy("meta", lambda b: Meta()))
    monkeypatch.setattr(pickle, "loads", spy("unpickle", pickle.loads))
    envelope = make(compress_min_bytes=0)
    for options in ({}, {"codec": "pickle"}):
        writer = make(compress_min_bytes=0, **options)
        data = encoded(writer, {"x": "y" * 500}, USER_2, Meta(1, 2))
        assert reason(envelope, data, USER_1) == "signature"
        for index in range(len(data)):
            changed = bytearray(data)
            changed[index] ^= 0x40
            with pytest.raises(DecodeError):
                envelope.decode(bytes(changed), key=USER_2)
    assert touched == []
    envelope.decode(data, key=USER_2)
    assert touched == ["meta", "decompress", "unpickle"]


# -- version 1 -----------------------------------------------------------------------


V1_PICKLE_LABEL = b"django_apee.envelope.pickle\x00"


def version_1(codec_bits: int, payload: bytes, meta: bytes | None = None) -> bytes:
    """A value as version 1 wrote it: msgpack bare, pickle with a 32-byte
    HMAC-SHA256 (under version 1's key for the same secret), no key bound."""
    head = MAGIC + bytes((1, codec_bits | (0x10 if meta is not None else 0)))
    if meta is not None:
        head += bytes((len(meta),)) + meta
    if codec_bits == 1:
        key = hashlib.sha256(V1_PICKLE_LABEL + b"the new secret").digest()
        return head + hmac.new(key, head + payload, hashlib.sha256).digest() + payload
    return head + payload


class Evil:
    ran: bool = False

    def __reduce__(self) -> tuple[Any, ...]:
        return (setattr, (Evil, "ran", True))


@pytest.mark.parametrize(
    "data",
    [
        version_1(0, msgpack.packb({"a": 1})),
        version_1(0, msgpack.packb("x"), meta=msgpack.packb([1, 2, 3, 4, 5])),
        version_1(1, pickle.dumps(Evil())),
    ],
    ids=["msgpack", "msgpack-meta", "signed-pickle"],
)
def test_version_1_values_are_a_version_miss(data: bytes) -> None:
    envelope = make()
    assert reason(envelope, data, USER_1) == "version"
    with pytest.raises(DecodeError) as info:
        envelope.open(data, key=USER_1)
    assert info.value.reason == "version"
    with pytest.raises(DecodeError) as info:
        envelope.rebind(data, USER_1, USER_2)
    assert info.value.reason == "version"
    assert describe(data) is None
    assert Evil.ran is False


# -- rebind --------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "value", "meta"), CASES)
def test_rebind_moves_a_value_to_another_key(
    options: dict[str, Any], value: Any, meta: Meta | None
) -> None:
    envelope = make(**options)
    old = encoded(envelope, value, "app:1:k", meta)
    new = envelope.rebind(old, "app:1:k", "app:2:k")
    assert envelope.decode(new, key="app:2:k") == Decoded(value, meta)
    assert reason(envelope, new, "app:1:k") == "signature"
    # Only the MAC changed: header, metadata and payload are the same bytes.
    header = describe(old)
    assert header is not None
    at = header.header_len - MAC_LEN
    assert new[:at] == old[:at]
    assert new[header.header_len :] == old[header.header_len :]
    assert new[at : header.header_len] != old[at : header.header_len]
    # And they are what encoding the value for the new key writes.
    assert new == encoded(envelope, value, "app:2:k", meta)


def test_rebind_verifies_the_old_mac_and_decodes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pickled = encoded(make(codec="pickle"), Evil(), "app:1:k")
    # A reader with pickle off can still move a pickle: nothing is unpickled.
    no_pickle = make(pickle_fallback=False)
    monkeypatch.setattr(compression, "decompress", None)  # would raise if called
    moved = no_pickle.rebind(pickled, "app:1:k", "app:2:k")
    assert Evil.ran is False
    assert reason(no_pickle, moved, "app:2:k") == "codec_unavailable"

    for bad, key, expected in [
        (pickled, "app:9:k", "signature"),  # not app:9:k's
        (pickled[:-1], "app:1:k", "signature"),
        (pickled[:10], "app:1:k", "truncated"),
        (b"\x80\x05junk", "app:1:k", "foreign"),
    ]:
        with pytest.raises(DecodeError) as info:
            no_pickle.rebind(bad, key, "app:2:k")
        assert info.value.reason == expected
    with pytest.raises(DecodeError) as info:
        no_pickle.rebind("text", "app:1:k", "app:2:k")  # type: ignore[arg-type]
    assert info.value.reason == "foreign"


def test_rebind_under_a_fallback_key_signs_with_the_first() -> None:
    old = encoded(make(OLD), "x", "app:1:k")
    moved = make(NEW, OLD).rebind(old, "app:1:k", "app:2:k")
    assert make(NEW).decode(moved, key="app:2:k").value == "x"


# -- raw ints: the one unsigned value ------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 42, 2**63 - 1, -(2**63)])
def test_raw_ints_carry_no_mac_and_read_under_any_key(value: int) -> None:
    envelope = make()
    assert envelope.encode(value, key=USER_1) == value
    digits = str(value).encode()
    for key in (USER_1, USER_2, ""):
        assert envelope.decode(digits, key=key) == Decoded(value, None)
        assert envelope.rebind(digits, key, USER_1) == digits
    # An int is all digits decode to: no other type, no markup, no code.
    assert type(envelope.decode(digits, key=USER_1).value) is int


def test_ints_with_meta_or_beyond_64_bits_are_enveloped_and_bound() -> None:
    envelope = make()
    for value, meta in ((5, Meta(1)), (2**64, None)):
        data = encoded(envelope, value, USER_1, meta)
        assert data.startswith(MAGIC)
        assert reason(envelope, data, USER_2) == "signature"
