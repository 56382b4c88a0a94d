"""Client operations that change a stored value in place, and Redis errors.

``incr``/``decr`` and ``incr_version`` read and write the same entry; they
keep what django-redis keeps (raw ints stay atomic in Redis) and what it
loses (a stored ``None``, the envelope's timing metadata). Mixed into
``client.ApeeClientMixin``, which supplies ``make_key``, ``encode`` and
``decode``. Every envelope is bound to its Redis key (``core/wire.py``): a
value moved to another key is re-bound, and one read or written back is
given its key.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from django_redis.exceptions import ConnectionInterrupted
from django_redis.util import CacheKey
from redis.exceptions import ResponseError

from django_apee.core.envelope import DecodeError
from django_apee.core.keys import LEASE, companion
from django_apee.store import scripts
from django_apee.store.errors import REDIS_ERRORS

if TYPE_CHECKING:
    from collections.abc import Iterator

    from redis import Redis

    from django_apee.cache import ApeeCache


@contextlib.contextmanager
def interrupted(client: Any) -> Iterator[None]:
    """Redis errors as django-redis's ConnectionInterrupted.

    ``IGNORE_EXCEPTIONS`` acts on that exception: with it on, a method whose
    Redis is away returns its default instead of raising.
    """
    try:
        yield
    except REDIS_ERRORS as error:
        raise ConnectionInterrupted(connection=client) from error


def revoke(client: Any, made: str, channel: str) -> Any:
    """Delete a value and its lease in one step, waking its waiters
    (``lua/delete.lua``); ``client`` may be a pipeline."""
    keys, args = revoke_call(made, channel)
    return scripts.run(client, "delete", keys=keys, args=args)


def revoke_call(made: str, channel: str) -> tuple[list[str], list[str]]:
    """``lua/delete.lua``'s KEYS and ARGV for revoking ``made`` (the async
    methods send the same call on their loop's client)."""
    return [made, companion(made, LEASE)], [channel]


class ClientParts:
    """What the client mixins use of ``ApeeClientMixin`` and django-redis's
    client, for the type checker (empty at run time)."""

    _backend: ApeeCache

    if TYPE_CHECKING:

        def make_key(
            self, key: Any, version: int | None = None, prefix: str | None = None
        ) -> CacheKey: ...

        def get_client(self, write: bool = True) -> Redis: ...

        @property
        def wake_channel(self) -> str: ...


class InPlaceMixin(ClientParts):
    """incr/decr and incr_version on django-apee's stored values."""

    if TYPE_CHECKING:  # supplied by ApeeClientMixin

        def encode(self, value: Any, *, key: str = ...) -> bytes | int: ...

        def decode(self, value: bytes | int | str, *, key: str = ...) -> Any: ...

    def incr_version(
        self,
        key: Any,
        delta: int = 1,
        version: int | None = None,
        client: Redis | None = None,
    ) -> int:
        """Move a value to ``version + delta``, keeping its bytes and its TTL.

        django-redis decodes and re-encodes, and refuses a stored ``None``;
        copying the stored bytes keeps ``None``, raw ints and the envelope's
        timing metadata exactly. Only the MAC changes: the envelope is
        re-bound to the new key (``Envelope.rebind``, which checks the old
        MAC and decodes nothing). A value that does not verify is as good
        as absent, as ``get`` would find it.
        """
        if version is None:
            version = self._backend.version
        original = key.original_key() if isinstance(key, CacheKey) else key
        old = self.make_key(original, version=version)
        new = self.make_key(original, version=version + delta)
        if client is None:
            client = self.get_client(write=True)
        raw, px = self._read_with_px(old, client)
        if raw is None:
            raise ValueError(f"Key '{original}' not found")
        try:
            raw = self._backend.envelope.rebind(raw, old, new)
        except DecodeError as error:
            # What django-redis or Django wrote is read as it was (LEGACY_READS).
            if not (error.reason == "foreign" and self._backend.legacy_reads):
                self._backend.report_decode_error(error)
                raise ValueError(f"Key '{original}' not found") from None
        # Both ends revoke their lease, as set and delete do: a computation
        # in flight on the old key must not write it back once it has moved,
        # nor one on the new key overwrite what was moved there.
        channel = self.wake_channel
        with interrupted(client):
            pipeline = client.pipeline(transaction=False)
            scripts.run(
                pipeline,
                "set",
                keys=[new, companion(new, LEASE)],
                args=[raw, "" if px is None else px, "", channel],
            )
            revoke(pipeline, old, channel)
            pipeline.execute()
        return version + delta

    @staticmethod
    def _read_with_px(made: CacheKey, client: Redis) -> tuple[bytes | None, int | None]:
        """Read stored bytes and the TTL to write them back with (None: none)."""
        with interrupted(client):
            pipeline = client.pipeline(transaction=False)
            pipeline.get(made)
            pipeline.pttl(made)
            raw, pttl = pipeline.execute()
        return raw, (pttl if pttl > 0 else None)

    def _incr(
        self,
        key: Any,
        delta: int = 1,
        version: int | None = None,
        client: Redis | None = None,
        ignore_key_check: bool = False,
    ) -> Any:
        """Add atomically in Redis when the value is a raw int.

        Anything else (an int inside an envelope, one past 64 bits) is read,
        added in Python and written back with its remaining TTL, as
        django-redis does; a non-number raises TypeError, a missing key
        ValueError.
        """
        made = self.make_key(key, version=version)
        if client is None:
            client = self.get_client(write=True)
        try:
            result = scripts.run(
                client, "incr", keys=[made], args=[delta, int(ignore_key_check)]
            )
        except ResponseError:
            return self._incr_in_python(made, delta, client)
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error
        if result is None:
            raise ValueError(f"Key '{key}' not found")
        return int(result)

    def _incr_in_python(self, made: CacheKey, delta: int, client: Redis) -> Any:
        raw, px = self._read_with_px(made, client)
        if raw is None:
            raise ValueError(f"Key '{made.original_key()}' not found")
        try:
            value = self.decode(raw, key=made) + delta
        except DecodeError:
            raise ValueError(f"Key '{made.original_key()}' not found") from None
        with interrupted(client):
            client.set(made, self.encode(value, key=made), px=px)
        return value
