"""Client operations that invalidate an entry, each revoking its lease.

A computation in flight holds the entry's lease, and its write is fenced by
that lease (``lua/release.lua``, ``lua/set.lua``): it lands only if the
lease is still its own. So every operation that invalidates an entry, or
sets its timeout, also deletes the lease in the same atomic step, and the
slower computation's value (read from the data as it was before) is dropped
instead of written back over the change. Waiters are woken to look again.

* ``delete``, ``delete_many``, ``delete_pattern``, ``touch``/``expire``/
  ``pexpire`` with a timeout of 0 or less, ``expire_at``/``pexpire_at`` in
  the past: the value and the lease go (``lua/delete.lua``).
* ``touch``/``expire``/``pexpire`` with a positive timeout, ``expire_at``/
  ``pexpire_at`` in the future, ``persist``: the lease goes when the
  entry's timeout changed (``lua/retime.lua``), so a compute does not undo
  the timeout just set with its own.
* ``clear`` empties the database, leases included: their holders' fenced
  writes find no lease and write nothing.

Mixed into ``client.ApeeClientMixin``, which supplies ``make_key`` and the
wake-up channel.
"""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING, Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT

from django_apee.client_inplace import ClientParts, interrupted, revoke, revoke_call
from django_apee.core import to_milliseconds
from django_apee.core.keys import LEASE, companion, companion_patterns, owner
from django_apee.store import scripts

if TYPE_CHECKING:
    from collections.abc import Iterable

    from redis import Redis


#: How many keys one ``delete_pattern`` pipeline carries.
PATTERN_BATCH = 512


class InvalidateMixin(ClientParts):
    """delete*, touch, expire*, persist: each revokes the entry's lease."""

    if TYPE_CHECKING:  # supplied by django-redis's client

        def make_pattern(
            self, pattern: str, version: int | None = None, prefix: str | None = None
        ) -> str: ...

    # -- value and lease go ----------------------------------------------------

    def delete(
        self,
        key: Any,
        version: int | None = None,
        prefix: str | None = None,
        client: Redis | None = None,
    ) -> int:
        """Delete a value and revoke any lease on it (see ``lua/delete.lua``)."""
        made = self.make_key(key, version=version, prefix=prefix)
        if client is None:
            client = self.get_client(write=True)
        with interrupted(client):
            return int(revoke(client, made, self.wake_channel))

    def delete_many(
        self,
        keys: Iterable[Any],
        version: int | None = None,
        client: Redis | None = None,
    ) -> int:
        made = [self.make_key(key, version=version) for key in keys]
        if not made:
            return 0
        if client is None:
            client = self.get_client(write=True)
        with interrupted(client):
            return self._revoke_all(client, made)

    def delete_pattern(
        self,
        pattern: str,
        version: int | None = None,
        prefix: str | None = None,
        client: Redis | None = None,
        itersize: int | None = None,
    ) -> int:
        """Delete every key matching ``pattern``, revoking each one's lease.

        Leases are found apart (``keys.companion_patterns``): a key being
        computed for the first time has a lease and no value yet. Companion
        keys start with ``{`` or ``apee:``, so the value pattern, which
        starts with KEY_PREFIX and the version, never lists them. Returns
        the number of values deleted.
        """
        if client is None:
            client = self.get_client(write=True)
        pattern = self.make_pattern(pattern, version=version, prefix=prefix)
        with interrupted(client):
            found = {_text(key) for key in client.scan_iter(pattern, itersize)}
            for lease_pattern in companion_patterns(pattern, LEASE):
                for lease in client.scan_iter(lease_pattern, itersize):
                    if (value_key := owner(_text(lease), LEASE)) is not None:
                        found.add(value_key)
            made = sorted(found)
            return sum(
                self._revoke_all(client, made[start : start + PATTERN_BATCH])
                for start in range(0, len(made), PATTERN_BATCH)
            )

    def _expire_now(
        self, key: Any, version: int | None, client: Redis | None, *, nx: bool, xx: bool
    ) -> bool:
        """``set``/``add`` with a timeout of 0 or less: nothing is stored, the
        old value and any lease go (``add`` only reports whether it was
        absent)."""
        made = self.make_key(key, version=version)
        if client is None:
            client = self.get_client(write=True)
        herd = self._backend.runtime.herd
        if (won := herd.claim(made)) is not None:
            herd.release_quietly(won.lease)  # the write that would end it is none
        with interrupted(client):
            if nx:
                # add() with timeout 0: true when the key was absent; store nothing.
                return not client.exists(made)
            deleted = bool(revoke(client, made, self.wake_channel))
        return deleted if xx else True

    def _revoke_all(self, client: Redis, made: list[Any]) -> int:
        pipeline = client.pipeline(transaction=False)
        for one in made:
            revoke(pipeline, one, self.wake_channel)
        return sum(int(n) for n in pipeline.execute())

    # -- the timeout changes ----------------------------------------------------

    def touch(
        self,
        key: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        client: Redis | None = None,
    ) -> bool:
        """Give a key a new timeout, with the same rounding as ``set``.

        0 or less deletes it, as ``set`` would; either way a computation in
        flight will not write over the change.
        """
        return self._expire_in(key, timeout, version, client)

    def expire(
        self,
        key: Any,
        timeout: Any,
        version: int | None = None,
        client: Redis | None = None,
    ) -> bool:
        """django-redis's ``expire`` (seconds, or a timedelta); see ``touch``."""
        if isinstance(timeout, datetime.timedelta):
            timeout = timeout.total_seconds()
        return self._expire_in(key, timeout, version, client)

    def _expire_in(
        self, key: Any, timeout: Any, version: int | None, client: Redis | None
    ) -> bool:
        """``touch`` and ``expire``: seconds from now, DEFAULT_TIMEOUT or
        None (never expires)."""
        return self._retime(key, version, client, *self.touch_command(timeout))

    def touch_command(self, timeout: Any) -> tuple[str, int]:
        """What ``touch(timeout)`` asks ``lua/retime.lua`` for: ``PEXPIRE``
        in milliseconds (DEFAULT_TIMEOUT: the alias's), or ``PERSIST``."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self._backend.default_timeout
        if timeout is None:
            return "PERSIST", 0
        return "PEXPIRE", _ms(timeout)

    def pexpire(
        self,
        key: Any,
        timeout: Any,
        version: int | None = None,
        client: Redis | None = None,
    ) -> bool:
        """django-redis's ``pexpire`` (milliseconds, or a timedelta)."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self._backend.default_timeout * 1000
        if isinstance(timeout, datetime.timedelta):
            timeout = timeout.total_seconds() * 1000
        return self._retime(key, version, client, "PEXPIRE", int(timeout))

    def expire_at(
        self,
        key: Any,
        when: Any,
        version: int | None = None,
        client: Redis | None = None,
    ) -> bool:
        """django-redis's ``expire_at``: Unix seconds or a datetime."""
        if not isinstance(when, datetime.datetime):
            when = when * 1000
        return self.pexpire_at(key, when, version=version, client=client)

    def pexpire_at(
        self,
        key: Any,
        when: Any,
        version: int | None = None,
        client: Redis | None = None,
    ) -> bool:
        """django-redis's ``pexpire_at``: Unix milliseconds or a datetime."""
        if isinstance(when, datetime.datetime):
            when = when.timestamp() * 1000
        return self._retime(key, version, client, "PEXPIREAT", int(when))

    def persist(
        self,
        key: Any,
        version: int | None = None,
        client: Redis | None = None,
    ) -> bool:
        """Make a key never expire; a computation in flight is not stored."""
        return self._retime(key, version, client, "PERSIST", 0)

    def _retime(
        self,
        key: Any,
        version: int | None,
        client: Redis | None,
        command: str,
        ms: int,
    ) -> bool:
        made = self.make_key(key, version=version)
        if client is None:
            client = self.get_client(write=True)
        name, keys, args = retime_call(made, command, ms, self.wake_channel)
        with interrupted(client):
            return bool(scripts.run(client, name, keys=keys, args=args))


def retime_call(
    made: str, command: str, ms: int, channel: str
) -> tuple[str, list[str], list[Any]]:
    """The script, KEYS and ARGV that give ``made`` a new timeout: a
    ``PEXPIRE`` of 0 or less deletes it (``lua/delete.lua``), anything else
    is ``lua/retime.lua``; either way its lease is revoked."""
    if command == "PEXPIRE" and ms <= 0:
        return "delete", *revoke_call(made, channel)
    return "retime", [made, companion(made, LEASE)], [command, ms, channel]


def _ms(timeout: float) -> int:
    """Django's rounding (``to_milliseconds``) for a positive timeout; 0 for
    one of 0 or less, which expires at once."""
    return to_milliseconds(timeout) if timeout > 0 else 0


def _text(key: bytes | str) -> str:
    return key.decode() if isinstance(key, bytes) else key
