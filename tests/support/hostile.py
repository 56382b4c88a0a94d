"""Hostile stored bytes: deep nesting, compression bombs, damaged envelopes.

Whoever can write to Redis can store anything under a key; these are the
shapes the decoding tests throw at ``Envelope.decode`` and ``cache.get``.
Most of them the encoder refuses to write, so they are built here byte by
byte, in time linear in their depth (a 100,000-level nesting is one join).

Only msgpack, the compressors and the standard library are imported, so the
bytes can be built in the test process and handed to children running
another checkout of the package.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import zlib
from collections.abc import Sequence
from typing import Any

import zstandard

try:
    import lz4.frame as lz4_frame
except ImportError:  # pragma: no cover - depends on the installed extras
    lz4_frame = None

#: The version-2 header's first three bytes (magic, version).
HEADER = b"\xc1\xa9\x02"
#: Every envelope carries a MAC over its Redis key and its bytes
#: (``core/wire.py``). The envelopes built here get a valid one, under this
#: MAC key and bound to this Redis key: what they test is what lies past the
#: MAC, i.e. what a writer holding the key could store. Read them with
#: ``Envelope(signing_keys=[SIGNING_KEY])`` and ``key=KEY``.
SIGNING_KEY = b"django-apee-hostile-tests-mac-key"
KEY = ":1:hostile"
MAC_LEN = 16
COMPRESSION_BITS = {"none": 0, "zstd": 1, "lz4": 2, "zlib": 3}
EXT_CODES = {"tuple": 1, "set": 2, "frozenset": 3}
PLAIN = ("list", "map")
KINDS = PLAIN + tuple(EXT_CODES)
#: What the decoder allows (see django_apee.core.codec, "Unpacking"): tuples
#: and sets nested this deep, and this many arrays/maps in one msgpack
#: document (msgpack's own stack).
MAX_EXT_NESTING = 64
MSGPACK_MAX_NESTING = 1024
#: The nil every bomb is made of: one byte, one element.
NIL = b"\xc0"

Layers = Sequence[tuple[str, int]]


def envelope(
    payload: bytes,
    compression: str = "none",
    *,
    key: str = KEY,
    signing_key: bytes = SIGNING_KEY,
) -> bytes:
    """A version-2 msgpack envelope without metadata around ``payload``, with
    the MAC ``signing_key`` gives it for the Redis key ``key``: HMAC-SHA256,
    cut to 16 bytes, over the key's UTF-8 length (4 bytes, big-endian), the
    key, the header and the payload."""
    head = HEADER + bytes((COMPRESSION_BITS[compression] << 2,))
    return head + _mac(key, signing_key, head, payload) + payload


def reseal(data: bytes, key: str = KEY, signing_key: bytes = SIGNING_KEY) -> bytes:
    """``data`` with the MAC an envelope without metadata carries for ``key``
    under ``signing_key``: hostile bytes as a writer holding the MAC key would
    store them under that key, so that what lies past the MAC is what gets
    tested. Bytes without this format's header, or too short to hold a MAC,
    are returned as they are."""
    if not data.startswith(HEADER) or len(data) < len(HEADER) + 1 + MAC_LEN:
        return data
    head, payload = data[: len(HEADER) + 1], data[len(HEADER) + 1 + MAC_LEN :]
    return head + _mac(key, signing_key, head, payload) + payload


def _mac(key: str, signing_key: bytes, head: bytes, payload: bytes) -> bytes:
    bound = key.encode()
    message = len(bound).to_bytes(4, "big") + bound + head + payload
    return hmac.new(signing_key, message, hashlib.sha256).digest()[:MAC_LEN]


def ext_header(code: int, size: int) -> bytes:
    fixed = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}
    if size in fixed:
        return bytes((fixed[size], code))
    if size < 2**8:
        return bytes((0xC7, size, code))
    if size < 2**16:
        return b"\xc8" + size.to_bytes(2, "big") + bytes((code,))
    return b"\xc9" + size.to_bytes(4, "big") + bytes((code,))


def array_header(count: int) -> bytes:
    if count < 16:
        return bytes((0x90 | count,))
    if count < 2**16:
        return b"\xdc" + count.to_bytes(2, "big")
    return b"\xdd" + count.to_bytes(4, "big")


def nested(layers: Layers, leaf: bytes = NIL) -> bytes:
    """msgpack bytes of ``leaf`` inside ``layers``, outermost first.

    Each layer is a run ``(kind, count)``: ``list`` is a one-item array,
    ``map`` is ``{"k": inner}``, ``tuple``/``set``/``frozenset`` are
    extensions 1/2/3 whose data is a one-item array.
    """
    prefixes: list[bytes] = []
    size = len(leaf)
    for kind, count in reversed(layers):
        for _ in range(count):
            if kind == "list":
                prefix = b"\x91"
            elif kind == "map":
                prefix = b"\x81\xa1k"
            else:
                prefix = ext_header(EXT_CODES[kind], size + 1) + b"\x91"
            prefixes.append(prefix)
            size += len(prefix)
    prefixes.reverse()
    return b"".join(prefixes) + leaf


def depths(layers: Layers) -> tuple[int, int]:
    """(tuples/sets nested, the most arrays/maps in one msgpack document).

    An extension's data is a document of its own, starting with the
    one-item array that holds the next layer.
    """
    ext = 0
    longest = run = 0
    for kind, count in layers:
        if count <= 0:
            continue
        if kind in PLAIN:
            run += count
        else:
            ext += count
            longest = max(longest, run)
            run = 1
    return ext, max(longest, run)


def hashable_inside(layers: Layers) -> bool:
    """Whether every set/frozenset layer holds something hashable."""
    below = True  # the leaf, nil
    for kind, count in reversed(layers):
        if count <= 0:
            continue
        if kind in ("set", "frozenset") and not below:
            return False
        if kind == "set" and count > 1:
            return False  # the second set holds the first
        below = kind == "frozenset" or (kind == "tuple" and below)
    return True


def well_formed(layers: Layers) -> bool:
    """Whether ``nested(layers)`` is within the depth caps and hashable."""
    ext, plain = depths(layers)
    return (
        ext <= MAX_EXT_NESTING
        and plain <= MSGPACK_MAX_NESTING
        and hashable_inside(layers)
    )


def units(layers: Layers) -> int:
    """The element budget ``nested(layers)`` spends: 1 an item, 8 a container.

    Every layer is one container holding one item, two for a map.
    """
    return sum(count * (10 if kind == "map" else 9) for kind, count in layers)


def ext_copies(layers: Layers) -> int:
    """Bytes of extension data charged to the copy budget.

    The first two levels are free (each copies at most the payload); deeper
    ones are copied twice (into an Unpacker's buffer too).
    """
    sizes: list[int] = []
    size = len(NIL)
    for kind, count in reversed(layers):
        for _ in range(count):
            if kind == "list":
                size += 1
            elif kind == "map":
                size += 3
            else:
                sizes.append(size + 1)
                size += len(ext_header(EXT_CODES[kind], size + 1)) + 1
    sizes.reverse()  # outermost first
    return 2 * sum(sizes[2:])


def outcome(layers: Layers, max_bytes: int) -> set[str]:
    """What decoding ``nested(layers)`` under ``max_bytes`` may give.

    ``{"ok"}``, or the reasons it may fail with (``corrupt`` for depth or an
    unhashable set, ``too_large`` for the budgets; either when both apply).
    """
    reasons = set()
    if not well_formed(layers):
        reasons.add("corrupt")
    if units(layers) > max_bytes // 8 or ext_copies(layers) > max_bytes:
        reasons.add("too_large")
    return reasons or {"ok"}


def matches(value: Any, layers: Layers) -> bool:
    """Whether ``value`` has the shape of ``layers`` around nil, walked without
    recursion (the value may be 60,000 levels deep)."""
    types = {
        "list": list,
        "map": dict,
        "tuple": tuple,
        "set": set,
        "frozenset": frozenset,
    }
    for kind, count in layers:
        for _ in range(count):
            if type(value) is not types[kind] or len(value) != 1:
                return False
            value = value["k"] if kind == "map" else next(iter(value))
    return value is None


def depth_of(value: Any) -> int:
    """How deep a one-path nesting of containers is, without recursion."""
    depth = 0
    while isinstance(value, (list, tuple, set, frozenset, dict)) and len(value) == 1:
        value = next(iter(value.values() if isinstance(value, dict) else value))
        depth += 1
    return depth


# -- compression bombs -----------------------------------------------------------


def flat_elements(count: int, element: bytes = NIL) -> bytes:
    """One array of ``count`` copies of ``element`` (one msgpack object)."""
    return array_header(count) + element * count


def small_arrays(count: int, width: int = 15) -> bytes:
    """An array of ``count`` arrays of ``width`` nils: many small containers."""
    return array_header(count) + (array_header(width) + NIL * width) * count


def compress(data: bytes, how: str) -> bytes:
    """``data`` compressed the way ``how`` says.

    ``zstd`` declares the content size in the frame header, as the encoder
    does; ``zstd-nosize`` does not (the reader must stop by itself);
    ``lz4``/``lz4-nosize`` likewise; ``zlib`` never declares it.
    """
    if how == "zstd":
        return zstandard.ZstdCompressor(level=3).compress(data)
    if how == "zstd-nosize":
        return zstandard.ZstdCompressor(level=3, write_content_size=False).compress(
            data
        )
    if how in ("lz4", "lz4-nosize"):
        assert lz4_frame is not None, "lz4 is not installed"
        out: bytes = lz4_frame.compress(data, store_size=how == "lz4")
        return out
    if how == "zlib":
        return zlib.compress(data, 9)
    raise ValueError(how)


def bomb(data: bytes, how: str) -> bytes:
    """An envelope whose payload is ``data`` compressed by ``how``."""
    return envelope(compress(data, how), how.split("-")[0])


def issue_bomb() -> bytes:
    """The bomb from the report: ~1 KB stored, a list of 2**25 nils."""
    return bomb(flat_elements(2**25), "zstd")


# -- damaged envelopes -------------------------------------------------------------


def truncated(valid: bytes, seed: int) -> bytes:
    """``valid`` cut at a point ``seed`` chooses (never whole, never empty)."""
    return valid[: random.Random(seed).randrange(1, len(valid))]


def flipped(valid: bytes, seed: int, flips: int = 3) -> bytes:
    """``valid`` with ``flips`` bytes XORed with non-zero masks ``seed`` chooses."""
    rng = random.Random(seed)
    changed = bytearray(valid)
    for _ in range(flips):
        changed[rng.randrange(len(changed))] ^= rng.randrange(1, 256)
    return bytes(changed)
