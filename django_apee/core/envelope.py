"""Values to the bytes django-apee stores in Redis and back: :class:`Envelope`.

This module is pure: no Redis, no Django settings, no I/O, no logging. The
backend turns a :class:`DecodeError` into a miss, a counter (``reason``) and a
rate-limited log line; the envelope only has to be exact, fast on the hit path
and impossible to crash with hostile bytes. The byte layout is described in
:mod:`django_apee.core.wire`, the msgpack codec in
:mod:`django_apee.core.codec`, compression in
:mod:`django_apee.core.compression`, the MAC in :mod:`django_apee.core.mac`;
here they are put together.

Every value is bound to its key
===============================
``encode``, ``decode``, ``open`` take the full Redis key the bytes are stored
under (``key=``, a ``str``: the made key, ``KEY_PREFIX:VERSION:key``), and
every envelope carries a MAC over that key and all its bytes, whatever the
codec. Bytes planted in Redis, or copied there from another key, do not
verify: ``decode`` raises :class:`DecodeError` ``"signature"`` before it
decompresses, unpacks or unpickles anything. Moving a value to another key
(``incr_version``) goes through :meth:`Envelope.rebind`, which checks the old
MAC and writes the new one without decoding the payload.

Members of Redis sets and hashes are encoded without a key (django-redis's
``sadd``, ``hset`` ...): their MAC is bound to the empty key, ``key=""``. They
are authenticated, not bound to their collection.

Raw ints (ASCII digits, so that ``INCR`` works) are the one unsigned value;
``core/wire.py`` says why that is safe.

Choosing the codec
==================
``codec="msgpack"`` (this class's default) is language-neutral and, with the
pickle fallback off, never executes code on read. ``codec="pickle"`` (the
backend's default when pickle is allowed) pickles every value: in CPython,
``pickle.loads`` reads the typical cached value (string-heavy dicts, rows of
datetimes and Decimals) 1.5-5x faster than msgpack with Python extension
hooks, at the same size after compression, and a reader that accepts
authenticated pickle at all is no safer for also accepting msgpack.

With ``codec="msgpack"``, anything msgpack cannot carry exactly sends the
*whole* value to pickle (or raises :class:`UnserializableValueError` when the
fallback is off).

Pickle
======
Types msgpack cannot carry (``HttpResponse`` from ``cache_page``, model
instances) are pickled with ``pickle.HIGHEST_PROTOCOL``. The MAC keys are
used as given; :func:`derive_signing_keys` turns ``SECRET_KEY`` and
``SECRET_KEY_FALLBACKS`` into keys (so a leaked cache key is not the Django
secret). The first key signs, every key verifies, which makes secret
rotation seamless. A reader whose pickle fallback is off does not unpickle
anything, even correctly authenticated data (reason ``"codec_unavailable"``):
"pickle off" means no pickle in this process, in either direction.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeVar

from django_apee.core import compression
from django_apee.core.codec import MSGPACK_FAILURES, pack, pack_value, unpack
from django_apee.core.extensions import Unsupported, type_name
from django_apee.core.mac import MAC_KEY_LABEL, Macs, bind, derive_signing_keys
from django_apee.core.opened import OpenedMemo
from django_apee.core.wire import (
    CODEC_MASK,
    CODEC_MSGPACK,
    CODEC_PICKLE,
    COMPRESSION_LZ4,
    COMPRESSION_MASK,
    COMPRESSION_NONE,
    COMPRESSION_SHIFT,
    COMPRESSION_ZLIB,
    COMPRESSION_ZSTD,
    COMPRESSIONS,
    DECODE_REASONS,
    FLAG_META,
    FORMAT_VERSION,
    MAC_LEN,
    MAGIC,
    META_START,
    RAW_INT,
    Decoded,
    DecodeError,
    Meta,
    UnserializableValueError,
    is_raw_int,
    peek_meta,
    read_header,
    unpack_meta,
)

__all__ = [
    "CODEC_MSGPACK",
    "CODEC_PICKLE",
    "COMPRESSION_LZ4",
    "COMPRESSION_NONE",
    "COMPRESSION_ZLIB",
    "COMPRESSION_ZSTD",
    "DECODE_REASONS",
    "FORMAT_VERSION",
    "MAC_KEY_LABEL",
    "MAGIC",
    "MEMBER_KEY",
    "DecodeError",
    "Decoded",
    "Envelope",
    "Meta",
    "Opened",
    "UnserializableValueError",
    "derive_signing_keys",
    "is_raw_int",
    "peek_meta",
]

#: The key set and hash members are bound to: they are stored without one.
MEMBER_KEY = ""

_UINT64_LIMIT = 2**64


class Opened(NamedTuple):
    """An envelope checked and unwrapped, its payload not yet decoded."""

    #: ``CODEC_MSGPACK`` or ``CODEC_PICKLE``.
    codec: int
    meta: Meta | None
    #: The codec's bytes, decompressed.
    payload: bytes


# Every (flags) -> 4-byte header, so encoding concatenates instead of packing.
_HEADERS = tuple(MAGIC + bytes((FORMAT_VERSION, flags)) for flags in range(0x20))


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
        max_decompressed_bytes: int = compression.DEFAULT_MAX_BYTES,
    ) -> None:
        if codec not in ("msgpack", "pickle"):
            raise ValueError(f"unknown codec {codec!r}; choose 'msgpack' or 'pickle'")
        if codec == "pickle" and not pickle_fallback:
            raise ValueError("the pickle codec needs pickle_fallback=True")
        if compressor not in COMPRESSIONS:
            raise ValueError(
                f"unknown compressor {compressor!r}; choose one of "
                + ", ".join(repr(name) for name in COMPRESSIONS)
            )
        compression.check_available(compressor)
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
        if not keys:
            raise ValueError(
                "the envelope needs at least one signing key: every value is "
                "authenticated, or whoever can write to Redis chooses what is "
                "served (derive_signing_keys() makes them from SECRET_KEY)"
            )

        self.codec = codec
        self.compressor = compressor
        self.compress_min_bytes = compress_min_bytes
        self.compress_level = compress_level
        self.pickle_fallback = bool(pickle_fallback)
        self.max_decompressed_bytes = max_decompressed_bytes
        self._macs = Macs(keys)
        #: What opening each hot entry's bytes gave (``core/opened.py``).
        self._opened = OpenedMemo()
        self._compression_bits = COMPRESSIONS[compressor]
        self._compress: Callable[[bytes], bytes] | None = compression.make_compressor(
            compressor, compress_level
        )
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

    # ---------------------------------------------------------------- encode

    def encode(self, value: Any, meta: Meta | None = None, *, key: str) -> bytes | int:
        """What to store under ``key`` for ``value``: an int, or envelope bytes.

        The envelope's MAC binds the bytes to ``key``, the full Redis key.
        With ``codec="msgpack"`` msgpack is tried first; only when it cannot
        carry the value does the whole value go to pickle (or fail with
        :class:`UnserializableValueError` when the fallback is off). With
        ``codec="pickle"`` every value is pickled.
        """
        bound = bind(key)
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
                payload = pack_value(value)
                codec = CODEC_MSGPACK
            except MSGPACK_FAILURES as exc:
                payload = self._pickle(value, exc)
                codec = CODEC_PICKLE

        flags = codec
        opened = payload
        if self._compress is not None and len(payload) >= self.compress_min_bytes:
            compressed = self._compress(payload)
            if len(compressed) < len(payload):
                payload = compressed
                flags |= self._compression_bits << COMPRESSION_SHIFT

        if meta is None:
            prefix = _HEADERS[flags]
        else:
            prefix = (
                _HEADERS[flags | FLAG_META] + bytes((len(packed_meta),)) + packed_meta
            )
        data = prefix + self._macs.sign(bound, prefix, payload) + payload
        # What this process writes it often reads next: opened already.
        self._opened.put(data, key, codec, meta, opened)
        return data

    def _pickle(self, value: Any, cause: Exception | None) -> bytes:
        value_type = type_name(type(value))
        if not self.pickle_fallback and cause is not None:
            what = (
                type_name(cause.unsupported_type)
                if isinstance(cause, Unsupported)
                else str(cause)
            )
            raise UnserializableValueError(
                f"cannot cache a value of type {value_type}: msgpack cannot carry "
                f"it ({what}) and the pickle fallback is off; set OPTIONS "
                '"ALLOW_PICKLE": True to store such values with pickle, '
                "or convert them to plain types"
            ) from cause
        try:
            return pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception as exc:
            raise UnserializableValueError(
                f"cannot cache a value of type {value_type}: neither msgpack nor "
                f"pickle can serialize it ({exc})"
            ) from exc

    # ---------------------------------------------------------------- decode

    def decode(self, data: bytes, *, key: str) -> Decoded:
        """Turn bytes stored under ``key`` back into ``Decoded(value, meta)``.

        Raises :class:`DecodeError` and nothing else, whatever ``data``
        holds; bytes whose MAC is not ``key``'s are ``"signature"``.
        """
        if type(data) is not bytes:
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise DecodeError(
                    "foreign", f"expected bytes, got {type_name(type(data))}"
                )
            data = bytes(data)
        opened = self._opened.get(data, key)
        if opened is None:
            bound = bind(key)
            if not data.startswith(MAGIC):
                return _raw_int(data)
            codec, meta, payload = _guarded(self._open, data, bound)
            self._opened.put(data, key, codec, meta, payload)
        else:
            _key, codec, meta, payload = opened
        # load() written out: this is every hit's path, and each call layer
        # costs a hit ~0.3 µs.
        try:
            if codec == CODEC_PICKLE:
                return Decoded(pickle.loads(payload), meta)
            return Decoded(unpack(payload, self.max_decompressed_bytes), meta)
        except DecodeError:
            raise
        except Exception as exc:
            raise _corrupt(exc) from None

    def open(self, data: bytes, *, key: str) -> Opened:
        """Check and unwrap an envelope without turning its payload into a value.

        The MAC is verified and the payload decompressed (within the size
        cap), exactly as ``decode`` would, but nothing is unpickled or
        unpacked: ``apee_stats --key`` describes a value this way. Raises
        :class:`DecodeError` (also for raw ints and foreign bytes).
        """
        bound = bind(key)
        if not isinstance(data, bytes) or not data.startswith(MAGIC):
            raise DecodeError("foreign", "not a django-apee envelope (no magic)")
        return Opened(*_guarded(self._open, data, bound))

    def load(self, codec: int, payload: bytes) -> Any:
        """The value in a payload ``open`` verified and decompressed.

        The near cache keeps opened payloads and loads one per read, so no
        two callers share a mutable value.
        """
        if codec == CODEC_PICKLE:
            return pickle.loads(payload)
        return unpack(payload, self.max_decompressed_bytes)

    def _open(self, data: bytes, bound: bytes) -> tuple[int, Meta | None, bytes]:
        """(codec, meta, the codec's bytes): verified, decompressed."""
        flags, pos, payload = self._verified(data, bound)
        codec = flags & CODEC_MASK
        if codec == CODEC_PICKLE and not self.pickle_fallback:
            raise DecodeError(
                "codec_unavailable",
                "pickled value, but pickle is disabled on this reader",
            )
        meta = unpack_meta(data[META_START:pos]) if flags & FLAG_META else None

        bits = (flags & COMPRESSION_MASK) >> COMPRESSION_SHIFT
        if bits:
            payload = compression.decompress(bits, payload, self.max_decompressed_bytes)

        if not payload:
            raise DecodeError("truncated", "payload is empty")
        return codec, meta, payload

    def _verified(self, data: bytes, bound: bytes) -> tuple[int, int, bytes]:
        """(flags, where the MAC starts, the stored payload) of an envelope
        whose MAC verifies for the ``bound`` key; nothing else is looked at
        before that but the header's structure."""
        flags, pos = read_header(data)
        end = pos + MAC_LEN
        if len(data) < end:
            raise DecodeError("truncated", "the MAC is incomplete")
        payload = data[end:]
        if not self._macs.verify(bound, data[:pos], payload, data[pos:end]):
            raise DecodeError(
                "signature",
                "the MAC does not verify with any signing key for this Redis key "
                "(tampered, written under another SECRET_KEY, or copied from "
                "another key)",
            )
        return flags, pos, payload

    # ---------------------------------------------------------------- move

    def rebind(self, data: bytes, old_key: str, new_key: str) -> bytes:
        """The bytes ``data`` stored under ``old_key``, bound to ``new_key``.

        For moving a value between keys (``incr_version``) without decoding
        it: the old MAC is verified, the new one written; the header, the
        metadata and the payload are kept byte for byte (nothing is
        decompressed, unpacked or unpickled). A raw int is returned as it is.
        Raises :class:`DecodeError` (``"signature"`` when ``data`` is not
        ``old_key``'s), and nothing else.
        """
        old, new = bind(old_key), bind(new_key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError("foreign", f"expected bytes, got {type_name(type(data))}")
        data = bytes(data)
        if not data.startswith(MAGIC):
            if RAW_INT.fullmatch(data) is not None:
                return data
            raise DecodeError("foreign", "not a django-apee value (no magic)")
        _flags, pos, payload = self._verified(data, old)
        head = data[:pos]
        return head + self._macs.sign(new, head, payload) + payload


T = TypeVar("T")


def _guarded(step: Callable[[bytes, bytes], T], data: bytes, bound: bytes) -> T:
    """Run a decoding step on bytes stored under the ``bound`` key: anything but
    DecodeError is corrupt."""
    try:
        return step(data, bound)
    except DecodeError:
        raise
    except Exception as exc:
        raise _corrupt(exc) from None


def _raw_int(data: bytes) -> Decoded:
    """Bytes without the magic: a raw int (unsigned by design, INCR must work
    on it: see core/wire.py), or not ours."""
    if RAW_INT.fullmatch(data) is not None:
        try:
            return Decoded(int(data), None)
        except ValueError:  # more digits than int() allows
            raise DecodeError("corrupt", "raw integer is too long") from None
    raise DecodeError("foreign", "not a django-apee value (no magic)")


def _corrupt(exc: Exception) -> DecodeError:
    return DecodeError("corrupt", f"undecodable payload: {type(exc).__name__}: {exc}")


def _pack_meta(meta: Meta) -> bytes:
    for field in meta:
        if type(field) is not int or not 0 <= field < _UINT64_LIMIT:
            raise ValueError(f"meta fields must be ints in [0, 2**64), got {meta!r}")
    return pack(list(meta))
