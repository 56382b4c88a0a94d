"""Compressing payloads, and decompressing them without trusting their sizes.

Compression is tried when the codec payload is at least ``compress_min_bytes``
long and kept only if the result is strictly smaller (the envelope decides).
Readers follow the header, never their own configuration, so a
zstd-configured reader reads values written with zlib or lz4.

Whoever can write to Redis can store a small payload that expands to
gigabytes, so every decompressor here stops at ``limit`` bytes and says
``too_large`` rather than allocating more. zstd frames are written with their
content size; a frame that declares more than the limit is rejected before
any output buffer is allocated.
"""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from typing import Any

from django_apee.core.wire import COMPRESSION_LZ4, COMPRESSION_ZSTD, DecodeError

try:
    import zstandard as _zstd
except ImportError:  # pragma: no cover - zstandard is a hard dependency
    _zstd = None  # type: ignore[assignment]

try:
    import lz4.frame as _lz4_frame
except ImportError:  # pragma: no cover - depends on the installed extras
    _lz4_frame = None

__all__ = ["DEFAULT_MAX_BYTES", "check_available", "decompress", "make_compressor"]

#: The default cap on a decompressed payload (OPTIONS ``MAX_VALUE_BYTES``).
#: Cached values are rarely above a megabyte; 32 MiB leaves room for big
#: ones while bounding what one get of hostile bytes can cost: the payload,
#: and what :mod:`django_apee.core.unpacking` lets it decode into (4 Mi
#: elements, a container counting as 8).
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

# Frames without a declared size are read in chunks of this size when we need
# to tell "too large" from "broken" (zstd) or to measure them (lz4).
_PROBE_CHUNK = 256 * 1024


class _Decompressors(threading.local):
    """Per-thread reusable decompressors: not thread-safe, costly to create."""

    def __init__(self) -> None:
        self.zstd: Any = None
        self.lz4: Any = None


_state = _Decompressors()


def check_available(name: str) -> None:
    """Raise ``ValueError`` if the library behind compression ``name`` is missing."""
    if name == "zstd" and _zstd is None:
        raise ValueError(
            "the zstd compressor needs the 'zstandard' package: pip install zstandard"
        )
    if name == "lz4" and _lz4_frame is None:
        raise ValueError(
            "the lz4 compressor needs the 'lz4' package: pip install django-apee[lz4]"
        )


# --------------------------------------------------------------------------
# Compressing
# --------------------------------------------------------------------------


class _Compressors(threading.local):
    def __init__(self) -> None:
        self.zstd: Any = None


def make_compressor(name: str, level: int | None) -> Callable[[bytes], bytes] | None:
    """A thread-safe compress function for compression ``name``; None for "none".

    ``level`` None means each library's default. An invalid level only
    fails when the function is first called.
    """
    if name == "zstd":
        zstd_level = 3 if level is None else level
        local = _Compressors()

        def compress_zstd(data: bytes) -> bytes:
            cctx = local.zstd
            if cctx is None:
                cctx = local.zstd = _zstd.ZstdCompressor(level=zstd_level)
            out: bytes = cctx.compress(data)
            return out

        return compress_zstd
    if name == "lz4":
        lz4_level = 0 if level is None else level

        def compress_lz4(data: bytes) -> bytes:
            # lz4.frame.compress makes its own context: thread-safe.
            out: bytes = _lz4_frame.compress(
                data, compression_level=lz4_level, store_size=True
            )
            return out

        return compress_lz4
    if name == "zlib":
        zlib_level = -1 if level is None else level

        def compress_zlib(data: bytes) -> bytes:
            return zlib.compress(data, zlib_level)

        return compress_zlib
    return None


# --------------------------------------------------------------------------
# Decompressing
# --------------------------------------------------------------------------


def decompress(compression: int, payload: bytes, limit: int) -> bytes:
    """``payload`` decompressed by the compression the header's bits name.

    ``compression`` is a non-zero value of
    :data:`~django_apee.core.wire.COMPRESSIONS`. A payload that does not
    decompress cleanly, would exceed ``limit`` bytes or needs a library that
    is not installed raises :class:`~django_apee.core.wire.DecodeError`
    (``compression``, ``too_large``, ``codec_unavailable``).
    """
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


def _too_large(limit: int) -> DecodeError:
    return DecodeError("too_large", f"payload decompresses to more than {limit} bytes")


def _zstd_decompressor() -> Any:
    dctx = _state.zstd
    if dctx is None:
        dctx = _state.zstd = _zstd.ZstdDecompressor()
    return dctx


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
    # Frames are written with their content size: one that declares more
    # than the limit is refused before anything is allocated, and one that
    # declares none (we never write such) is measured in bounded chunks
    # first, since decompressing it up to the limit would cost twice that.
    try:
        declared = _lz4_frame.get_frame_info(payload)["content_size"]
    except Exception as exc:
        raise DecodeError("compression", f"lz4: {exc}") from None
    if declared > limit or (not declared and _lz4_exceeds(payload, limit)):
        raise _too_large(limit)
    dctx = _state.lz4
    if dctx is None:
        dctx = _state.lz4 = _lz4_frame.LZ4FrameDecompressor()
    try:
        out: bytes = dctx.decompress(payload, max_length=limit + 1)
        if len(out) > limit:
            raise _too_large(limit)
        if not dctx.eof:
            raise DecodeError("compression", "lz4 frame is incomplete")
        if dctx.unused_data:
            raise DecodeError("compression", "trailing bytes after the lz4 frame")
    except DecodeError:
        _drop_lz4()
        raise
    except Exception as exc:
        _drop_lz4()
        raise DecodeError("compression", f"lz4: {exc}") from None
    dctx.reset()
    return out


def _lz4_exceeds(payload: bytes, limit: int) -> bool:
    """Whether a frame without a declared size produces more than ``limit``."""
    total = 0
    try:
        dctx = _lz4_frame.LZ4FrameDecompressor()
        total += len(dctx.decompress(payload, max_length=_PROBE_CHUNK))
        while total <= limit and not dctx.eof:
            chunk = dctx.decompress(b"", max_length=_PROBE_CHUNK)
            if not chunk:
                break
            total += len(chunk)
    except Exception:
        return False  # broken: the decompression proper says how
    return total > limit


def _drop_lz4() -> None:
    """Forget this thread's lz4 decompressor after a failure.

    ``reset()`` does not recover one stopped mid-frame (over the limit,
    broken): every later frame in the thread failed with ``frameSize_wrong``.
    """
    _state.lz4 = None


def _decompress_zlib(payload: bytes, limit: int) -> bytes:
    # zlib declares no size. Asking for up to limit + 1 bytes at once made
    # CPython gather the output in blocks and join them: twice the limit in
    # memory just to say "too large". In chunks, refusing costs the limit.
    dobj = zlib.decompressobj()
    chunks: list[bytes] = []
    total = 0
    data = payload
    try:
        while not dobj.eof:
            chunk = dobj.decompress(data, _PROBE_CHUNK)
            data = dobj.unconsumed_tail
            if not chunk and not data:
                break
            total += len(chunk)
            if total > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except zlib.error as exc:
        raise DecodeError("compression", f"zlib: {exc}") from None
    if not dobj.eof:
        raise DecodeError("compression", "zlib stream is incomplete")
    if dobj.unused_data:
        raise DecodeError("compression", "trailing bytes after the zlib stream")
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
