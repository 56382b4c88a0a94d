"""The memo of opened envelopes (``core/opened.py``) and the envelope's use of it."""

from __future__ import annotations

import pytest

from django_apee.core.envelope import DecodeError, Envelope
from django_apee.core.opened import OpenedMemo

KEY = b"k" * 32


@pytest.fixture(autouse=True)
def _empty_redis() -> None:
    """Shadow conftest's autouse FLUSHDB: this module needs no Redis at all."""


def test_equal_bytes_under_another_key_are_not_remembered_for_it() -> None:
    memo = OpenedMemo()
    memo.put(b"stored", "a", 1, None, b"payload")
    assert memo.get(b"stored", "a") == ("a", 1, None, b"payload")
    assert memo.get(b"stored", "b") is None
    assert memo.get(b"other", "a") is None


def test_an_uncompressed_payload_is_a_view_of_the_stored_bytes() -> None:
    memo = OpenedMemo()
    memo.put(b"head+payload", "a", 1, None, b"payload")
    found = memo.get(b"head+payload", "a")
    assert found is not None
    assert isinstance(found[3], memoryview)
    assert bytes(found[3]) == b"payload"
    assert memo.size == len(b"head+payload") + 1


def test_bounds_hold_and_a_full_memo_starts_again() -> None:
    memo = OpenedMemo(max_entries=3, max_bytes=1000, max_entry_bytes=100)
    memo.put(b"x" * 200, "big", 1, None, b"x")
    assert len(memo) == 0  # larger than one entry may be
    for n in range(3):
        memo.put(bytes([n]) * 10, "k", 1, None, b"p" * 20)
    assert len(memo) == 3
    memo.put(b"\xff" * 10, "k", 1, None, b"p" * 20)
    assert len(memo) == 1
    assert memo.get(b"\xff" * 10, "k") is not None
    for n in range(40):
        memo.put(bytes([n]) * 10, str(n), 1, None, b"p" * 60)
        assert memo.size <= 1000
        assert len(memo) <= 3


def test_the_envelope_opens_a_hot_value_once_and_still_gives_copies() -> None:
    envelope = Envelope(signing_keys=[KEY], compress_min_bytes=10)
    stored = envelope.encode({"rows": list(range(100))}, key="a")
    assert isinstance(stored, bytes)
    envelope._opened.clear()  # as in a process that did not write it
    first = envelope.decode(stored, key="a").value
    assert len(envelope._opened) == 1
    second = envelope.decode(bytes(bytearray(stored)), key="a").value
    assert first == second
    assert first is not second  # each read its own object
    assert len(envelope._opened) == 1


def test_what_this_process_writes_is_opened_already() -> None:
    envelope = Envelope(signing_keys=[KEY], compress_min_bytes=10)
    value = {"rows": list(range(100))}
    stored = envelope.encode(value, key="a")
    assert isinstance(stored, bytes)
    assert len(envelope._opened) == 1
    assert envelope.decode(bytes(bytearray(stored)), key="a").value == value
    # Another process (another envelope with the same keys) opens it itself.
    other = Envelope(signing_keys=[KEY], compress_min_bytes=10)
    assert other.decode(stored, key="a").value == value


def test_remembered_bytes_do_not_verify_under_another_key() -> None:
    envelope = Envelope(signing_keys=[KEY])
    stored = envelope.encode("secret", key="a")
    assert isinstance(stored, bytes)
    assert envelope.decode(stored, key="a").value == "secret"
    with pytest.raises(DecodeError) as info:
        envelope.decode(stored, key="b")
    assert info.value.reason == "signature"


def test_bytes_that_do_not_verify_are_not_remembered() -> None:
    envelope = Envelope(signing_keys=[KEY])
    stored = envelope.encode("value", key="a")
    assert isinstance(stored, bytes)
    tampered = stored[:-1] + bytes([stored[-1] ^ 1])
    envelope._opened.clear()  # what encode put there
    for _ in range(2):
        with pytest.raises(DecodeError):
            envelope.decode(tampered, key="a")
    assert len(envelope._opened) == 0
