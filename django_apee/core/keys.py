"""Where the parts of one cache entry live in Redis.

An entry is the value key plus, while someone recomputes it, a lease key; the
``wake`` kind names a slot-local companion that is never stored (for
slot-local wake-up channels). The value key is exactly django-redis's key
(``KEY_PREFIX:VERSION:key`` through ``KEY_FUNCTION``), so swapping the backend
in finds the keys and raw integers that are already there.

The companion keys must hash to the value key's Redis Cluster slot, so that one
Lua script may touch all of them. Redis hashes only the *hash tag* of a key
when it has one: the text between the first ``{`` and the first ``}`` after it,
if that text is not empty; otherwise the whole key. So:

* the value key has a hash tag ``T``: companions are ``{T}|apee:<kind>|<key>``;
* it has none and contains no ``}``: companions are ``{<key>}|apee:<kind>``,
  whose tag is the whole value key;
* it has none but contains a ``}`` (or is empty): no companion can carry the
  whole key as a tag. Companions are ``apee:<kind>|<key>``; fine on a single Redis or
  Sentinel, and ``same_slot`` is False so the backend can refuse it on Cluster.

Companions start with ``{`` or ``apee:``, so django-redis patterns such as
``keys("*")`` (``prefix:version:*``) never list them.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

LEASE = "lease"
WAKE = "wake"

_HOST = socket.gethostname().replace(":", "_")


def hash_tag(key: str) -> str | None:
    """Return the part of ``key`` that Redis Cluster hashes, if it is a tag."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end < 0 or end == start + 1:
        return None
    return key[start + 1 : end]


def companion(value_key: str, kind: str) -> str:
    """Name the ``kind`` key (``lease``, ``wake``) that belongs to ``value_key``."""
    tag = hash_tag(value_key)
    if tag is not None:
        return f"{{{tag}}}|apee:{kind}|{value_key}"
    if value_key and "}" not in value_key:
        return f"{{{value_key}}}|apee:{kind}"
    return f"apee:{kind}|{value_key}"


def companion_patterns(value_pattern: str, kind: str) -> list[str]:
    """SCAN patterns that find the ``kind`` companions of the value keys
    matching ``value_pattern`` (Redis glob), one per form of ``companion``."""
    return [
        f"{{{value_pattern}}}|apee:{kind}",
        f"{{*}}|apee:{kind}|{value_pattern}",
        f"apee:{kind}|{value_pattern}",
    ]


def owner(companion_key: str, kind: str) -> str | None:
    """The value key whose ``kind`` companion is ``companion_key``, or None."""
    tagged = f"}}|apee:{kind}|"
    if companion_key.startswith("{") and tagged in companion_key:
        value_key = companion_key.split(tagged, 1)[1]
    elif companion_key.startswith("{") and companion_key.endswith(f"}}|apee:{kind}"):
        value_key = companion_key[1 : -len(f"}}|apee:{kind}")]
    elif companion_key.startswith(f"apee:{kind}|"):
        value_key = companion_key[len(f"apee:{kind}|") :]
    else:
        return None
    return value_key if companion(value_key, kind) == companion_key else None


def slot_channel(value_key: str, name: str) -> str:
    """A pub/sub channel in ``value_key``'s slot: its companions' hash tag,
    ``|``, ``name`` (sharded pub/sub on Redis Cluster; the Lua scripts that
    end a lease build the same name from the lease key)."""
    lease = companion(value_key, LEASE)
    return f"{lease[: lease.index('}') + 1]}|{name}"


def same_slot(value_key: str) -> bool:
    """Tell whether ``companion(value_key, …)`` shares the value key's slot."""
    return hash_tag(value_key) is not None or bool(value_key and "}" not in value_key)


def lease_token(holder_id: int | None = None) -> str:
    """A lease's token: who holds it and since when, then 64 random bits.

    Only equality matters to the lease scripts; the readable part lets
    ``apee_stats`` name a lease's holder (host and pid) and its age. The time
    is the holder's clock, so an age is only as good as the hosts' clock sync.

    ``holder_id`` is the Redis ``CLIENT ID`` of the holder process's identity
    connection (``store/holder.py``), appended as ``@<id>``: a waiter that
    finds no such client on the server knows the holder's process is gone
    and may take the lease over at once (``lease_holder_id``).
    """
    token = f"{_HOST}:{os.getpid()}:{int(time.time() * 1000)}:{secrets.token_hex(8)}"
    return token if holder_id is None else f"{token}@{holder_id}"


def parse_lease_token(token: str) -> tuple[str, int, int] | None:
    """``(host, pid, acquired_unix_ms)`` of a token, None if not one of ours."""
    parts = token.rsplit(":", 3)
    if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return parts[0], int(parts[1]), int(parts[2])


def lease_holder_id(token: str | bytes | None) -> int | None:
    """The Redis client id a lease token names (``lease_token``), or None.

    None for tokens without one (written by a version that did not record
    it, or by a holder whose identity connection was unavailable): for
    those, only the lease's expiry ends a dead holder's claim.
    """
    if token is None:
        return None
    text = token.decode("ascii", "replace") if isinstance(token, bytes) else token
    head, at, tail = text.rpartition("@")
    if not at or not head or not tail.isdigit() or len(tail) > 20:
        return None
    return int(tail)
