"""The django-redis client with django-apee's envelope and Django's contract.

ApeeCache keeps django-redis's connection factory, pools, replica routing and
Sentinel support by *deriving* from the configured ``CLIENT_CLASS``
(``DefaultClient``, ``SentinelClient`` or a subclass of either): this mixin is
put in front of it. It changes only what bytes go in and out, and the few
places where django-redis departs from Django's documented cache contract.
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string
from django_redis.client import DefaultClient
from django_redis.exceptions import ConnectionInterrupted
from django_redis.util import CacheKey
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from django_apee import scripts
from django_apee.envelope import DecodeError, Meta

if TYPE_CHECKING:
    from collections.abc import Iterable

    from redis import Redis

    from django_apee.cache import ApeeCache

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ResponseError, OSError)
_MISSING = object()


def to_milliseconds(timeout: float) -> int:
    """Convert a positive timeout in seconds to whole milliseconds.

    A positive timeout shorter than a millisecond still stores the value for a
    millisecond: Django promises that only ``timeout <= 0`` expires at once.
    """
    return max(1, math.ceil(timeout * 1000))


class ApeeClientMixin:
    """Envelope encoding and Django's semantics on top of a django-redis client."""

    _backend: ApeeCache

    # -- bytes in, bytes out -------------------------------------------------

    def encode(self, value: Any, *, allow_int: bool = True) -> bytes | int:
        encoded = self._backend.envelope.encode(value)
        if isinstance(encoded, int) and not allow_int:
            # Sorted-set members must be bytes; an empty Meta forces them.
            return self._backend.envelope.encode(value, Meta())
        return encoded

    def decode(self, value: bytes | int | str) -> Any:
        """Decode stored bytes; a value nobody can read raises DecodeError.

        ``get`` and ``get_many`` turn that into a counted miss. Other readers
        (set and hash members) raise it, naming the reason.
        """
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            value = value.encode()
        try:
            return self._backend.envelope.decode(value).value
        except DecodeError as error:
            if error.reason == "foreign" and self._backend.legacy_reads:
                legacy = self._decode_legacy(value)
                if legacy is not _MISSING:
                    return legacy
            self._backend.report_decode_error(error)
            raise

    def _decode_legacy(self, value: bytes) -> Any:
        """Read a value django-redis or Django's RedisCache wrote (migration)."""
        try:
            return super().decode(value)  # type: ignore[misc]
        except Exception:  # any failure is a miss
            return _MISSING

    # -- keys -----------------------------------------------------------------

    def make_key(
        self, key: Any, version: int | None = None, prefix: str | None = None
    ) -> CacheKey:
        """django-redis's key, plus Django's key warnings (memcached limits)."""
        if isinstance(key, CacheKey):
            return key
        made: CacheKey = super().make_key(key, version=version, prefix=prefix)  # type: ignore[misc]
        self._backend.validate_key(made)
        return made

    # -- Django's contract ------------------------------------------------------

    def get(
        self,
        key: Any,
        default: Any = None,
        version: int | None = None,
        client: Redis | None = None,
    ) -> Any:
        try:
            return super().get(key, default=default, version=version, client=client)  # type: ignore[misc]
        except DecodeError:
            return default

    def get_many(
        self,
        keys: Iterable[Any],
        version: int | None = None,
        client: Redis | None = None,
    ) -> dict[Any, Any]:
        if client is None:
            client = self.get_client(write=False)  # type: ignore[attr-defined]
        by_made_key = {self.make_key(key, version=version): key for key in keys}
        if not by_made_key:
            return {}
        try:
            raw_values = client.mget(list(by_made_key))
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error
        found = {}
        for made_key, raw in zip(by_made_key, raw_values, strict=True):
            if raw is None:
                continue
            try:
                found[by_made_key[made_key]] = self.decode(raw)
            except DecodeError:
                continue
        return found

    def set(
        self,
        key: Any,
        value: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        client: Redis | None = None,
        nx: bool = False,
        xx: bool = False,
    ) -> bool:
        """Store ``value``, with Django's meaning of every timeout.

        ``None`` never expires; ``0`` or less expires at once (the old value is
        removed, and ``add`` reports whether the key was absent); a float keeps
        millisecond precision.
        """
        if timeout is DEFAULT_TIMEOUT:
            timeout = self._backend.default_timeout
        if timeout is not None and timeout <= 0:
            return self._expire_now(key, version, client, nx=nx, xx=xx)
        made = self.make_key(key, version=version)
        encoded = self.encode(value)
        px = None if timeout is None else to_milliseconds(timeout)
        if client is None:
            client = self.get_client(write=True)  # type: ignore[attr-defined]
        try:
            return bool(client.set(made, encoded, px=px, nx=nx, xx=xx))
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error

    def _expire_now(
        self, key: Any, version: int | None, client: Redis | None, *, nx: bool, xx: bool
    ) -> bool:
        made = self.make_key(key, version=version)
        if client is None:
            client = self.get_client(write=True)  # type: ignore[attr-defined]
        try:
            if nx:
                # add() with timeout 0: true when the key was absent; store nothing.
                return not client.exists(made)
            deleted = bool(client.delete(made))
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error
        return deleted if xx else True

    def touch(
        self,
        key: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        client: Redis | None = None,
    ) -> bool:
        """Give a key a new timeout, with the same rounding as ``set``."""
        if timeout is DEFAULT_TIMEOUT:
            timeout = self._backend.default_timeout
        made = self.make_key(key, version=version)
        if client is None:
            client = self.get_client(write=True)  # type: ignore[attr-defined]
        try:
            if timeout is None:
                return bool(client.persist(made))
            px = to_milliseconds(timeout) if timeout > 0 else 0
            return bool(client.pexpire(made, px))
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error

    def set_many(
        self,
        data: dict[Any, Any],
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        client: Redis | None = None,
    ) -> list[Any]:
        """Set every pair in one round trip; return the keys that failed (none).

        Django's contract is a list of failed keys; Redis either takes the
        whole pipeline or raises.
        """
        if client is None:
            client = self.get_client(write=True)  # type: ignore[attr-defined]
        try:
            pipeline = client.pipeline(transaction=False)
            for key, value in data.items():
                self.set(key, value, timeout, version=version, client=pipeline)
            pipeline.execute()
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error
        return []

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
            client = self.get_client(write=True)  # type: ignore[attr-defined]
        try:
            return int(client.delete(*made))
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error

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
        timing metadata exactly.
        """
        if version is None:
            version = self._backend.version
        original = key.original_key() if isinstance(key, CacheKey) else key
        old = self.make_key(original, version=version)
        new = self.make_key(original, version=version + delta)
        if client is None:
            client = self.get_client(write=True)  # type: ignore[attr-defined]
        raw, px = self._read_with_px(old, client)
        if raw is None:
            raise ValueError(f"Key '{original}' not found")
        try:
            pipeline = client.pipeline(transaction=False)
            pipeline.set(new, raw, px=px)
            pipeline.delete(old)
            pipeline.execute()
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error
        return version + delta

    @staticmethod
    def _read_with_px(made: CacheKey, client: Redis) -> tuple[bytes | None, int | None]:
        """Read stored bytes and the TTL to write them back with (None: none)."""
        try:
            pipeline = client.pipeline(transaction=False)
            pipeline.get(made)
            pipeline.pttl(made)
            raw, pttl = pipeline.execute()
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error
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
            client = self.get_client(write=True)  # type: ignore[attr-defined]
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
            value = self.decode(raw) + delta
        except DecodeError:
            raise ValueError(f"Key '{made.original_key()}' not found") from None
        try:
            client.set(made, self.encode(value), px=px)
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error
        return value


@functools.cache
def client_class(path: str) -> type[DefaultClient]:
    """Put ApeeClientMixin in front of the configured django-redis client.

    HerdClient and ShardClient are refused: Herd wraps values in its own
    envelope, and Shard places a key's companions (lease, wake-up) on other
    servers than its value.
    """
    base = import_string(path)
    if not (isinstance(base, type) and issubclass(base, DefaultClient)):
        raise ImproperlyConfigured(
            f"CLIENT_CLASS {path!r} is not a django-redis DefaultClient subclass."
        )
    refused = {"HerdClient", "ShardClient"}
    if any(klass.__name__ in refused for klass in base.__mro__):
        raise ImproperlyConfigured(
            f"CLIENT_CLASS {path!r} is not supported by django_apee: use "
            "django_redis.client.DefaultClient or SentinelClient. Stampede "
            "protection replaces HerdClient; sharding is not supported yet."
        )
    if issubclass(base, ApeeClientMixin):
        return base
    return type(f"Apee{base.__name__}", (ApeeClientMixin, base), {})
