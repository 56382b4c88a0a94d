"""The MAC every envelope carries, its keys, and why it is this MAC.

Pure: ``hashlib`` and ``hmac`` only. What the MAC covers and where it sits is
the wire format's (:mod:`django_apee.core.wire`); this module computes and
checks it.

The keys
========
:func:`derive_signing_keys` turns ``SECRET_KEY`` and ``SECRET_KEY_FALLBACKS``
into MAC keys, each the SHA-256 of a purpose label and the secret, so that a
key that leaks from here is neither the Django secret nor usable for anything
else Django signs with it. The first key signs, every key verifies: a secret
rotation keeps reading what is cached. The label names format version 2's
MAC; the version-1 label (pickle signatures) is gone with the version-1 reader
(a version-1 value is a miss, never verified).

Why HMAC-SHA256, truncated to 128 bits
======================================
The MAC is on the hit path: every ``get`` verifies one over the stored bytes
(the compressed payload: about 2 KB for each of the three values of
``bench/storage.py``, up to 20 KB uncompressed or incompressible). Keyed
BLAKE2b (``hashlib.blake2b(key=..., digest_size=16 or 32)``, one C object)
and HMAC-SHA256 were measured against each other by ``bench/mac.py``, in µs
per sign + verify (two MACs and a ``compare_digest``: one ``set`` and one
``get``), best of 30 interleaved rounds, on the 2-core AMD EPYC (SHA-NI) the
benchmarks run on, CPython 3.11, OpenSSL 3.0:

=======  ===========  ===========  ===========  ===========
payload  HMAC-SHA256  HMAC-SHA256  BLAKE2b-128  BLAKE2b-256
         ``hmac``     as here
=======  ===========  ===========  ===========  ===========
200 B    3.95         2.62         2.20         2.25
10 KB    18.09        16.47        28.21        28.22
20 KB    31.97        30.44        54.92        55.31
=======  ===========  ===========  ===========  ===========

BLAKE2b has the smaller fixed cost and wins on small values, by 0.2 µs a
MAC. But CPython's BLAKE2b is portable C, while OpenSSL's SHA-256 uses the
CPU's SHA instructions (x86 SHA-NI: every AMD Zen, Intel since Ice Lake;
ARMv8's SHA2 extension), and hashes almost twice as fast from a few KB up.
``hmac.HMAC``'s fixed cost is mostly its Python wrapper (``copy`` and
``digest`` are Python methods); computing the same HMAC from the two SHA-256
states of the padded key, copied per use (RFC 2104, byte for byte what
``hmac`` computes), takes most of it away. Done so, HMAC-SHA256 is about
even with BLAKE2b at the ~2 KB a typical hit verifies, and costs half as
much on the largest values: the worst case of the hit path decides. In the
same run, ``decode()`` of the bytes ``cache.set`` stores took 2.5-6.3 µs
longer with the MAC than without for the three compressed payloads (of
20-123 µs), and 20 µs longer for the 20 KB uncompressed HTML (BLAKE2b: 40).
On a CPU without SHA instructions BLAKE2b would win throughout; changing the
MAC is a format version.

The tag is truncated to 128 bits, as RFC 2104 allows and RFC 4868's
HMAC-SHA-256-128 does: forging one takes 2**128 tries against a Redis that
answers each with a miss, and every value stores 16 bytes less than the full
digest would take.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
from collections.abc import Iterable, Sequence

from django_apee.core.wire import MAC_LEN

__all__ = ["MAC_KEY_LABEL", "Macs", "bind", "derive_signing_keys"]

#: Prefixed to each secret before hashing it into a MAC key, so the key serves
#: this purpose only. Values in Redis are authenticated with keys derived
#: with it: changing it makes every stored value a ``signature`` miss.
MAC_KEY_LABEL = b"django_apee.envelope.v2.mac\x00"

_BLOCK = 64  # SHA-256's block size, which HMAC pads the key to
_IPAD = bytes(byte ^ 0x36 for byte in range(256))
_OPAD = bytes(byte ^ 0x5C for byte in range(256))


def derive_signing_keys(secrets: Iterable[str]) -> list[bytes]:
    """MAC keys for :class:`~django_apee.core.envelope.Envelope` from secrets.

    Derived, not used raw, so the key is specific to this purpose. Give
    ``SECRET_KEY`` first, then ``SECRET_KEY_FALLBACKS``: the first key signs,
    the fallbacks keep a rotation reading what is already cached. Empty
    secrets are skipped.
    """
    return [
        # str() as well: a bytes secret is hashed as its repr.
        hashlib.sha256(MAC_KEY_LABEL + str(secret).encode()).digest()
        for secret in secrets
        if secret
    ]


def bind(key: str) -> bytes:
    """What the MAC covers of a Redis key: its UTF-8 length, then the bytes.

    ``surrogatepass`` keeps this total: a key redis-py could not send is
    still bound to something, and no two keys share it.
    """
    if not isinstance(key, str):
        raise TypeError(f"the Redis key must be a str, not {type(key).__name__}")
    return _bind(str(key))


@functools.lru_cache(maxsize=4096)
def _bind(key: str) -> bytes:
    """``bind``, remembered: a hot key is bound on every read of it."""
    raw = key.encode("utf-8", "surrogatepass")
    return len(raw).to_bytes(4, "big") + raw


class Macs:
    """HMAC-SHA256-128 under one or more keys: the first signs, all verify.

    Immutable and thread-safe: the keyed SHA-256 states are copied per use.
    """

    __slots__ = ("_keys",)

    def __init__(self, keys: Sequence[bytes]) -> None:
        if not keys:
            raise ValueError("at least one MAC key is needed")
        self._keys = tuple(_pads(key) for key in keys)

    def __len__(self) -> int:
        return len(self._keys)

    def sign(self, bound: bytes, head: bytes, payload: bytes) -> bytes:
        """The MAC of ``head`` + ``payload`` stored under the ``bound`` key."""
        return _tag(self._keys[0], bound, head, payload)

    def verify(self, bound: bytes, head: bytes, payload: bytes, tag: bytes) -> bool:
        """Whether ``tag`` is the MAC under any key; constant time per key."""
        for pads in self._keys:
            if hmac.compare_digest(_tag(pads, bound, head, payload), tag):
                return True
        return False


_Pads = tuple["hashlib._Hash", "hashlib._Hash"]


def _pads(key: bytes) -> _Pads:
    """HMAC's inner and outer SHA-256 states for ``key`` (RFC 2104)."""
    if len(key) > _BLOCK:
        key = hashlib.sha256(key).digest()
    key = key.ljust(_BLOCK, b"\x00")
    return hashlib.sha256(key.translate(_IPAD)), hashlib.sha256(key.translate(_OPAD))


def _tag(pads: _Pads, bound: bytes, head: bytes, payload: bytes) -> bytes:
    inner = pads[0].copy()
    inner.update(bound + head)
    inner.update(payload)
    outer = pads[1].copy()
    outer.update(inner.digest())
    return outer.digest()[:MAC_LEN]
