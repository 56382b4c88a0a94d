"""The literals set.lua spells out agree with the format in ``core/wire.py``.

Lua cannot import Python constants, so set.lua repeats the header layout it
needs to read an entry's grace period. Each literal is found in the script
and compared with the value derived from the Python side; a change to either
that the other does not follow fails here. Lua strings and offsets are
1-based with inclusive ends; Python's are 0-based.
"""

from __future__ import annotations

import re
from importlib.resources import files

import msgpack
import pytest

from django_apee.core.envelope import Envelope
from django_apee.core.wire import (
    FLAG_META,
    FLAGS_AT,
    FORMAT_VERSION,
    HEADER_PEEK_BYTES,
    MAC_LEN,
    MAGIC,
    MAX_META_LEN,
    META_LEN_AT,
    META_START,
    VERSION_AT,
    Meta,
    describe,
)

SET_LUA = files("django_apee.store").joinpath("lua/set.lua").read_text()


@pytest.fixture(autouse=True)
def _empty_redis() -> None:
    """Shadow conftest's autouse FLUSHDB: this module needs no Redis at all."""


def lua_string(data: bytes) -> str:
    """How a Lua source writes ``data`` as a string literal: decimal escapes."""
    return '"' + "".join(f"\\{byte}" for byte in data) + '"'


def the_one(pattern: str) -> tuple[str, ...]:
    """The groups of the single place ``pattern`` matches in set.lua."""
    found = re.findall(pattern, SET_LUA)
    assert len(found) == 1, f"{pattern!r} matches set.lua {len(found)} times"
    groups = found[0]
    return groups if isinstance(groups, tuple) else (groups,)


def test_reads_enough_bytes_for_the_header_and_metadata() -> None:
    (end,) = the_one(r'"GETRANGE", KEYS\[1\], 0, (\d+)\)')
    assert int(end) == HEADER_PEEK_BYTES - 1  # GETRANGE's end is inclusive


def test_recognises_magic_and_version() -> None:
    length, literal = the_one(r'string\.sub\(head, 1, (\d+)\) == ("(?:\\\d+)+")')
    assert len(MAGIC) == VERSION_AT  # the version byte follows the magic
    expected = MAGIC + bytes((FORMAT_VERSION,))
    assert int(length) == len(expected)
    assert literal == lua_string(expected)


def test_needs_the_metadata_length_byte() -> None:
    (least,) = the_one(r"string\.len\(head\) >= (\d+)")
    assert int(least) == META_LEN_AT + 1


def test_tests_the_meta_flag() -> None:
    position, mask = the_one(r"bit\.band\(string\.byte\(head, (\d+)\), (\d+)\)")
    assert int(position) == FLAGS_AT + 1
    assert int(mask) == FLAG_META


def test_unpacks_the_metadata_where_it_is() -> None:
    first, offset, length_at = the_one(
        r"string\.sub\(head, (\d+), (\d+) \+ string\.byte\(head, (\d+)\)\)"
    )
    assert int(length_at) == META_LEN_AT + 1
    assert int(first) == META_START + 1
    # Inclusive end: the n metadata bytes are META_START .. META_START + n - 1.
    assert int(offset) == META_START


def test_reads_grace_from_its_field() -> None:
    (index,) = the_one(r"tonumber\(meta\[(\d+)\]\)")
    assert int(index) == Meta._fields.index("grace_ms") + 1


def test_the_literals_are_what_the_envelope_writes() -> None:
    """Not only the constants: a value really encoded has the version byte
    set.lua looks for, and its metadata where set.lua reads it (the MAC
    follows the metadata, so it moves no offset set.lua uses)."""
    meta = Meta(soft_ms=1, hard_ms=2, grace_ms=3_000, delta_ms=4, seed=5)
    envelope = Envelope(signing_keys=[b"lua-literals"])
    data = envelope.encode({"a": "b" * 5000}, meta, key=":1:lua")
    assert isinstance(data, bytes)
    (length, literal) = the_one(r'string\.sub\(head, 1, (\d+)\) == ("(?:\\\d+)+")')
    assert lua_string(data[: int(length)]) == literal
    assert data[VERSION_AT] == FORMAT_VERSION == 2
    assert data[FLAGS_AT] & FLAG_META
    end = META_START + data[META_LEN_AT]
    assert msgpack.unpackb(data[META_START:end])[2] == meta.grace_ms
    header = describe(data)
    assert header is not None
    assert header.header_len == end + MAC_LEN
    assert end <= META_START + MAX_META_LEN < HEADER_PEEK_BYTES
