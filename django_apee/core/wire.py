"""The stored byte layout, described once: every reader and writer of it uses this.

The envelope, the stats command and the Lua scripts all look at the same
header; the layout, its numbers and the names of its codecs and compressions
live here so that they cannot drift apart (``tests/unit/test_wire_lua.py`` checks
the literals the Lua scripts have to spell out). This module reads headers and
metadata only: the payload's codec, compression and MAC are elsewhere.

Why a header at all
===================
django-redis stores a bare pickle, so a reader cannot tell a value it wrote
from a value some other client wrote, cannot evolve the format, and must
unpickle whatever is in Redis. Every value written here starts with a two-byte
magic that neither msgpack, pickle, ASCII integers nor the usual compressors
ever start with, so foreign bytes are recognised and reported instead of being
misread.

Wire format, version 2
======================
::

    offset 0-1  MAGIC = b"\\xc1\\xa9"
                0xC1 is the one byte msgpack never emits; pickle starts with
                0x80, raw ints with ASCII digits or "-", zlib 0x78, zstd 0x28,
                lz4 0x04, gzip 0x1f.
    offset 2    FORMAT_VERSION = 2
    offset 3    flags
                  bits 0-1  codec: 0 msgpack, 1 pickle, 2-3 reserved
                  bits 2-3  compression: 0 none, 1 zstd, 2 lz4, 3 zlib
                  bit  4    META present
                  bits 5-7  reserved, must be 0
    if META     1 byte n (0..255), then n bytes: a msgpack array of
                non-negative ints [soft_ms, hard_ms, grace_ms, delta_ms, seed,
                written_ms] (written_ms was appended after version 2 shipped;
                see ``Meta``).
                Readers take the fields they know, ignore extra trailing
                fields (so a later writer may append fields without a version
                bump) and default missing ones to 0; n == 0 means "all 0".
    MAC         16 bytes, every envelope whatever its codec:
                HMAC-SHA256, truncated to 128 bits, over
                    len(K) as 4 bytes big-endian || K
                    || every stored byte before the MAC
                    || the stored payload bytes after it
                where K is the full Redis key the value is stored under
                (``KEY_PREFIX:VERSION:key``, UTF-8). See ``core/mac.py`` for
                the keys and why this MAC.
    payload     the codec bytes, compressed if the compression bits say so.

What the MAC buys
-----------------
Whoever can write to Redis can plant bytes under any key. Every envelope is
authenticated, so planted bytes are a miss (reason ``signature``), not a
value: not a pickle to run, and not a msgpack ``SafeString`` that a template
would print unescaped. And each MAC is bound to its key, so the bytes of
``perms:user:2`` copied onto ``perms:user:1`` are a miss too, not user 2's
permissions served for user 1. The key is length-prefixed, so no (key, bytes)
pair can be shifted into another that verifies. The header, the metadata
and the *compressed* payload are all covered, and the MAC is checked before
anything is decompressed, unpacked or unpickled.

Values in Redis sets and hashes (django-redis's ``sadd``, ``hset`` ...) are
written without a key: their MAC is bound to the empty key. They are
authenticated, but not bound to their collection: a member can be copied
into another set or hash and still verify. (No value key is empty, so a
member never verifies as the value of a key, nor the other way round.)

What the MAC does not cover
---------------------------
*Raw ints* are the one unsigned value (see below): what a forged one can do
is limited to what a counter is.

*Header peeks* are not verified: :func:`peek_meta` and the Lua scripts read
the metadata (an entry's timeouts and grace) without the MAC, to answer
``ttl``, ``has_key`` and ``add`` without reading the value. Forged metadata
can only mistime an entry; the value itself is never served unless its MAC,
which covers the metadata, verifies. Someone who can write to Redis can
expire or delete the key outright anyway.

Version 1 (before every value was authenticated) had the same header and
signed only pickles, with a 32-byte HMAC-SHA256 unbound to the key. Readers
of version 2 do not read it: a version-1 value is a miss (reason
``version``) and the cache refills as entries are recomputed. Accepting it
would accept exactly the unsigned and unbound values version 2 exists to
refuse.

Raw ints
--------
Plain ``int`` values in the signed 64-bit range and without metadata are not
enveloped at all: the backend stores their ASCII digits, exactly like
django-redis, so ``INCR``/``DECR`` stay atomic and existing counters keep
working after swapping backends. Larger ints go into an envelope (Redis could
not ``INCR`` them anyway, and Python refuses to ``str()`` ints above 4300
digits by default).

Raw ints carry no MAC: Redis could not ``INCRBY`` a value that carried one.
That is safe because of what a forged raw int can and cannot be. Only bytes
that are ASCII digits, and nothing else (an optional ``-`` first), decode as
one, and they decode to an ``int``: no code runs, no other type comes back,
no markup reaches a template, no dict of permissions is served. What an
attacker can do with one is set an int-valued entry to another int: a
counter, but also, say, a level or a flag stored as an int. Anyone who can
write to Redis can already do that with ``SET`` or ``INCRBY``, on this cache
as on django-redis, and a MAC could not stop it, since counters are meant to
change in Redis. Planted on a key that holds something else, digits make
its reader get an int where it expected another type: an error in that
caller, not a value it trusts. An int whose integrity matters more than
atomic ``incr`` can be stored wrapped (a one-tuple, a string): then it is an
envelope, authenticated and bound to its key.

Reading only the header
=======================
Questions about an entry's age (``ttl``, ``has_key``, ``add`` over an entry
kept only for its grace) need the metadata, not the value. The longest
header with metadata is 4 + 1 + 255 = 260 bytes (the MAC follows it), so a
``GETRANGE`` of the first :data:`HEADER_PEEK_BYTES` bytes always holds it,
however large the value. What such a peek reads is not authenticated (see
above).

Decoding failures
=================
Decoding raises :class:`DecodeError` and nothing else for any input;
``reason`` is one of:

``foreign``            no magic and not an ASCII integer
``version``            another format version (a value written before an
                       upgrade to version 2)
``truncated``          shorter than its header says
``corrupt``            reserved bits set, bad metadata, undecodable payload
``signature``          the MAC does not verify with any key: tampered,
                       planted, written under another secret, or bound to
                       another Redis key
``compression``        the compressed payload does not decompress cleanly
``codec_unavailable``  reserved codec, compressor library not installed,
                       time zone unknown here, or pickle disabled here
``too_large``          would decompress beyond ``max_decompressed_bytes``,
                       or unpack into more than it allows (see
                       :mod:`django_apee.core.unpacking`)
"""

from __future__ import annotations

import functools
import pickle
import re
from typing import Any, NamedTuple, TypeGuard

import msgpack

__all__ = [
    "CODECS",
    "CODEC_NAMES",
    "COMPRESSIONS",
    "COMPRESSION_NAMES",
    "DECODE_REASONS",
    "FORMAT_VERSION",
    "HEADER_PEEK_BYTES",
    "MAGIC",
    "DecodeError",
    "Decoded",
    "Header",
    "Meta",
    "UnserializableValueError",
    "describe",
    "is_raw_int",
    "peek_meta",
]

MAGIC = b"\xc1\xa9"
FORMAT_VERSION = 2

# Byte offsets (see the module docstring).
VERSION_AT = 2
FLAGS_AT = 3
HEADER_LEN = 4
META_LEN_AT = 4
META_START = 5
MAX_META_LEN = 255
#: The MAC after the header and metadata: HMAC-SHA256 truncated to 128 bits.
MAC_LEN = 16

#: Enough leading bytes to read the header and the longest metadata (the MAC
#: comes after it). That is ``META_START + MAX_META_LEN`` = 260; the readers
#: have always asked for one byte more (``GETRANGE key 0 260``, both ends
#: inclusive), which costs nothing and is kept so that no reader changes.
#: Ask Redis for bytes ``0 .. HEADER_PEEK_BYTES - 1``.
HEADER_PEEK_BYTES = META_START + MAX_META_LEN + 1

# Flag bits.
CODEC_MASK = 0x03
COMPRESSION_SHIFT = 2
COMPRESSION_MASK = 0x0C
FLAG_META = 0x10
RESERVED_MASK = 0xE0

CODEC_MSGPACK = 0
CODEC_PICKLE = 1
COMPRESSION_NONE = 0
COMPRESSION_ZSTD = 1
COMPRESSION_LZ4 = 2
COMPRESSION_ZLIB = 3

#: The codecs by the name configuration and reports use; values are flag bits.
CODECS = {"msgpack": CODEC_MSGPACK, "pickle": CODEC_PICKLE}
#: The compressions by name; values are the (unshifted) compression bits.
COMPRESSIONS = {
    "none": COMPRESSION_NONE,
    "zstd": COMPRESSION_ZSTD,
    "lz4": COMPRESSION_LZ4,
    "zlib": COMPRESSION_ZLIB,
}
CODEC_NAMES = {number: name for name, number in CODECS.items()}
COMPRESSION_NAMES = {number: name for name, number in COMPRESSIONS.items()}

# Raw ints are stored as their ASCII digits. int() alone is too lenient a test
# (it accepts b" 42", b"4_2", b"+1", b"42\n"), so the exact shape is checked.
RAW_INT = re.compile(rb"-?[0-9]+")
_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1


class Meta(NamedTuple):
    """Durations stored with an entry, in milliseconds, and when it was written.

    The durations can be combined with the key's PTTL (read in the same round
    trip), which depends on no clock but Redis's. ``written_ms`` is the
    instant the entry was encoded *in Redis's clock* (milliseconds since the
    Unix epoch, as Redis ``TIME`` counts them), as a lower bound: the
    writer's estimate of Redis's time minus that estimate's error (see
    ``store/clock.py``). With it a reader knows the entry's soft and hard
    deadlines from the value alone, so a hit can be a plain ``GET``
    (:func:`django_apee.core.policy.fresh_until_ms`). 0 means not recorded
    (entries written before the field existed, or by a writer without a
    sample of Redis's clock): readers then use the PTTL. It was appended to
    the array without a version bump: older readers ignore it.
    """

    soft_ms: int = 0
    hard_ms: int = 0
    grace_ms: int = 0
    delta_ms: int = 0
    #: A random draw in [1, 2**32) made when the entry was written; 0: none.
    #: Readers use ``seed / 2**32`` as XFetch's ``rand``, so all of them agree
    #: on when an entry's early refresh is due, whatever the read rate.
    seed: int = 0
    #: When the entry was written, in Redis's clock (ms since the epoch), a
    #: lower bound; 0: not recorded.
    written_ms: int = 0


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


class Header(NamedTuple):
    """What the header of stored bytes says, read without touching the payload.

    For reports and tools; decoding does not need it.
    """

    version: int
    #: A name from :data:`CODECS`.
    codec: str
    #: A name from :data:`COMPRESSIONS`.
    compression: str
    meta: Meta | None
    #: Bytes before the payload: header, metadata and MAC.
    header_len: int
    #: Bytes after ``header_len``: the (compressed) payload, or as much of it
    #: as the given bytes held when they were only a prefix.
    payload_len: int

    @property
    def has_meta(self) -> bool:
        return self.meta is not None

    @property
    def signed(self) -> bool:
        """Every envelope of format version 2 carries a MAC, whatever its codec."""
        return True


def is_raw_int(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is stored as a bare int (so INCRBY works on it)."""
    return type(value) is int and _INT64_MIN <= value <= _INT64_MAX


def read_header(data: bytes) -> tuple[int, int]:
    """The flags and where the metadata ends, for bytes that start with MAGIC.

    Checks what the header alone can tell; the MAC and payload after the
    returned offset are the caller's. Raises :class:`DecodeError`.
    """
    size = len(data)
    if size < HEADER_LEN:
        if size == VERSION_AT + 1 and data[VERSION_AT] != FORMAT_VERSION:
            raise _version_error(data[VERSION_AT])
        raise DecodeError("truncated", "header is incomplete")
    if data[VERSION_AT] != FORMAT_VERSION:
        raise _version_error(data[VERSION_AT])
    flags = data[FLAGS_AT]
    if flags & RESERVED_MASK:
        raise DecodeError("corrupt", f"reserved flag bits set: 0x{flags:02x}")
    if flags & CODEC_MASK > CODEC_PICKLE:
        raise DecodeError("codec_unavailable", f"unknown codec {flags & CODEC_MASK}")
    if not flags & FLAG_META:
        return flags, HEADER_LEN
    if size < META_START:
        raise DecodeError("truncated", "metadata length is missing")
    end = META_START + data[META_LEN_AT]
    if size < end:
        raise DecodeError("truncated", "metadata is incomplete")
    return flags, end


def _version_error(version: int) -> DecodeError:
    return DecodeError(
        "version", f"format version {version}, this reader knows {FORMAT_VERSION}"
    )


def unpack_meta(raw: bytes) -> Meta:
    """The metadata array; raises :class:`DecodeError` ``corrupt``.

    Remembered by its bytes (the same for every read of one entry: they
    hold its write time), so an entry's metadata is unpacked and validated
    once, not on every hit. Errors are not remembered; the memory is
    bounded (at most 4096 arrays of at most 255 bytes).
    """
    return _unpack_meta(bytes(raw))


@functools.lru_cache(maxsize=4096)
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


def describe(data: bytes) -> Header | None:
    """What the header of ``data`` says, or None if it is not a readable header.

    None for raw ints, foreign bytes, other format versions, and headers that
    decoding would reject (reserved bits, unknown codec, cut-off or corrupt
    metadata). Never raises. ``data`` may be a prefix of the stored value (see
    :data:`HEADER_PEEK_BYTES`): everything but ``payload_len`` is then exact.
    """
    if isinstance(data, memoryview):
        data = data.tobytes()
    if not isinstance(data, (bytes, bytearray)) or not data.startswith(MAGIC):
        return None
    try:
        flags, meta_end = read_header(data)
        meta = unpack_meta(data[META_START:meta_end]) if flags & FLAG_META else None
    except DecodeError:
        return None
    codec = flags & CODEC_MASK
    header_len = meta_end + MAC_LEN
    return Header(
        version=data[VERSION_AT],
        codec=CODEC_NAMES[codec],
        compression=COMPRESSION_NAMES[(flags & COMPRESSION_MASK) >> COMPRESSION_SHIFT],
        meta=meta,
        header_len=header_len,
        payload_len=max(0, len(data) - header_len),
    )


def peek_meta(data: bytes) -> Meta | None:
    """The timing metadata of stored bytes, without decoding the payload.

    For questions about an entry's age (``ttl``, ``has_key``) that must not
    pay for decompressing or unpickling the value. None when the bytes carry
    no metadata or are not a readable envelope header. The metadata is not
    authenticated here (the MAC covers the whole value): use it for timing
    questions only, never to decide what to serve. Only the metadata bit
    of the flags is looked at: unlike :func:`describe`, reserved bits or an
    unknown codec do not hide the metadata.
    """
    if (
        len(data) < META_START
        or not data.startswith(MAGIC)
        or data[VERSION_AT] != FORMAT_VERSION
    ):
        return None
    if not data[FLAGS_AT] & FLAG_META:
        return None
    end = META_START + data[META_LEN_AT]
    if len(data) < end:
        return None
    try:
        return unpack_meta(data[META_START:end])
    except DecodeError:
        return None
