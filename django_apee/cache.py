"""ApeeCache: the Django cache backend.

A swap-in for ``django_redis.cache.RedisCache`` (and Django's own
``RedisCache``): same LOCATION forms, same OPTIONS, same extra methods, on
django-redis's pools and clients. What changes is what sits in Redis (a
versioned, compressed envelope, authenticated and bound to its key, see
``core/wire.py``) and that the places where django-redis departs from Django's
cache contract follow Django.

Constructing the backend never talks to Redis: Django builds every backend
during ``manage.py check``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from django.conf import settings
from django.core.cache.backends.base import DEFAULT_TIMEOUT
from django.core.exceptions import ImproperlyConfigured
from django.utils.safestring import SafeString
from django_redis.cache import RedisCache, omit_exception
from django_redis.exceptions import ConnectionInterrupted

from django_apee import runtime
from django_apee.cache_async import AsyncCacheMixin
from django_apee.client import client_class
from django_apee.client_near import near_client
from django_apee.conf import ApeeOptions, utc_today
from django_apee.core import MISSING
from django_apee.core.codec import register_safe_string
from django_apee.core.envelope import DecodeError, Envelope, derive_signing_keys
from django_apee.engine.stampede import Call, make_spec
from django_apee.observe import trace
from django_apee.observe.logs import RateLimitedLog
from django_apee.store.errors import REDIS_ERRORS

logger = logging.getLogger("django_apee")

# Template fragments must come back safe: the msgpack codec carries Django's
# SafeString as an extension type, and the core (which knows no Django) is
# told the class here.
register_safe_string(SafeString)

#: One limiter for the process: Django builds a backend per thread, and a
#: corrupt hot key is read by all of them.
DECODE_LOG = RateLimitedLog(logger, per_seconds=60.0)
#: Once per process and alias (a day is longer than any process should run
#: without being told again).
LEGACY_LOG = RateLimitedLog(logger, per_seconds=86_400.0)


def signing_keys() -> list[bytes]:
    """The envelope's MAC keys: SECRET_KEY's first, then its fallbacks'.

    Every value is authenticated, whatever the codec. The fallbacks let a
    SECRET_KEY rotation keep reading what is already cached.
    """
    return derive_signing_keys(
        [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", ())]
    )


class ApeeCache(AsyncCacheMixin, RedisCache):  # type: ignore[misc]
    """A stampede-proof Redis cache backend built on django-redis."""

    def __init__(self, server: str, params: dict[str, Any]) -> None:
        params = dict(params)
        self.user_options: dict[str, Any] = params.get("OPTIONS") or {}
        #: Bad OPTIONS, kept to be raised by the first use. Django builds every
        #: backend before its system checks run (``manage.py check``), so
        #: raising here would hide apee.E001/E002, which say the same thing
        #: in the check's own report; a backend is built on first use anyway.
        self.config_error: ImproperlyConfigured | None = None
        try:
            self.options = ApeeOptions.from_params(self.user_options)
            client_cls = client_class(self.options.client_class)
        except (ImproperlyConfigured, ImportError) as error:
            self.config_error = ImproperlyConfigured(str(error))
            self.options = ApeeOptions.from_params({})
            client_cls = client_class(self.options.client_class)
        if self.options.near_cache is not None:
            client_cls = near_client(client_cls)
        params["OPTIONS"] = self.options.redis_options
        super().__init__(server, params)
        self._client_cls = client_cls
        self._envelope: Envelope | None = None
        self._alias: str | None = None
        self.legacy_reads = self.options.legacy_reads_on(utc_today())

    @property
    def client(self) -> Any:
        """django-redis's client; every cache operation goes through it."""
        if self.config_error is not None:
            raise self.config_error
        return super().client

    @property
    def envelope(self) -> Envelope:
        """The codec, built on first use (SECRET_KEY may be set late in tests)."""
        if self._envelope is None:
            self._envelope = Envelope(
                codec=self.options.codec,
                compressor=self.options.compression,
                compress_min_bytes=self.options.compress_min_bytes,
                compress_level=self.options.compress_level,
                pickle_fallback=self.options.allow_pickle,
                signing_keys=signing_keys(),
                max_decompressed_bytes=self.options.max_value_bytes,
            )
        return self._envelope

    @property
    def runtime(self) -> runtime.Runtime:
        """This process's engine for the alias (see ``runtime.py``)."""
        if self.config_error is not None:
            raise self.config_error
        return runtime.runtime_of(self)

    @property
    def alias(self) -> str:
        """This backend's name in ``CACHES``, for metric labels and logs."""
        if self._alias is None:
            self._alias = runtime.alias_of(self)
        return self._alias

    def report_decode_error(self, error: DecodeError) -> None:
        """Count an unreadable value and log it, at most once a minute a reason."""
        self.runtime.events.unreadable(error.reason)
        DECODE_LOG.warning(
            f"{self.alias}:{error.reason}",
            "django_apee: unreadable cache value treated as a miss (%s): %s",
            error.reason,
            error,
        )

    def report_legacy_read(self) -> None:
        """Count a value read through LEGACY_READS; warn once per process."""
        self.runtime.events.unreadable("legacy")
        LEGACY_LOG.warning(
            f"{self.alias}:legacy",
            "django_apee: LEGACY_READS is on for cache %r until %s: values "
            "without django-apee's header are unpickled, so whoever can write "
            "to this Redis can run code in this process. Turn it off once "
            "old entries have expired.",
            self.alias,
            self.options.legacy_reads_until,
        )

    # -- where django-redis departs from Django's contract --------------------

    def delete_many(self, keys: Any, version: int | None = None) -> None:
        """Delete keys; return None as Django's contract says (not a count)."""
        self._delete_many(keys, version=version)

    @omit_exception  # type: ignore[untyped-decorator]
    def _delete_many(self, keys: Any, version: int | None = None) -> int:
        return int(self.client.delete_many(keys, version=version))

    def set_many(
        self,
        data: dict[Any, Any],
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> list[Any]:
        """Set many keys; return the keys that were not stored.

        With IGNORE_EXCEPTIONS and Redis away that is every key, so a caller
        that checks the list learns the truth.
        """
        failed = self._set_many(data, timeout=timeout, version=version)
        return list(data) if failed is None else failed

    @omit_exception  # type: ignore[untyped-decorator]
    def _set_many(self, data: dict[Any, Any], **kwargs: Any) -> list[Any]:
        result: list[Any] = self.client.set_many(data, **kwargs)
        return result

    # -- stampede-safe computation ---------------------------------------------

    def get_or_set_stampede_safe(
        self,
        key: Any,
        default: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        *,
        soft_timeout: float | None = None,
        stale_if_error: float | None = None,
        version: int | None = None,
    ) -> Any:
        """Return the cached value of ``key``, computing it once fleet-wide.

        ``default`` is a zero-argument callable (or a plain value, as in
        ``get_or_set``). ``timeout`` is Django's: nothing older is ever
        served. Past ``soft_timeout`` (default: ``SOFT_TIMEOUT_RATIO`` of
        ``timeout``) the value is still served while one caller refreshes it;
        XFetch may start that refresh a little earlier. With
        ``stale_if_error=E`` a value up to E seconds past ``timeout`` is
        returned if recomputing it raises. Redis being down or slow never
        raises here: the value is computed locally, still coalesced per
        process.
        """
        compute, call = self.stampede_call(
            key, default, timeout, soft_timeout, stale_if_error, version
        )
        if call is None:
            # Django's get_or_set returns a value already cached, and only a
            # computed one is not stored (a timeout of 0 or less stores nothing).
            try:
                found = self.client.get(key, MISSING, version=version)
            except (ConnectionInterrupted, *REDIS_ERRORS):
                found = MISSING
            return compute() if found is MISSING else found
        if trace.enabled():  # a debugging tool records this request's calls
            with trace.call(self.alias, str(call.made)):
                return self.runtime.coordinator.get_or_set(call)
        return self.runtime.coordinator.get_or_set(call)

    def stampede_call(
        self,
        key: Any,
        default: Any,
        timeout: float | None,
        soft_timeout: float | None,
        stale_if_error: float | None,
        version: int | None,
        constant: Callable[[Any], Callable[[], Any]] = lambda value: lambda: value,
    ) -> tuple[Callable[[], Any], Call | None]:
        """The compute and the engine's call for ``get_or_set_stampede_safe``'s
        arguments; no call when ``timeout`` stores nothing (0 or less).

        ``constant(value)``: the compute of a ``default`` that is a value,
        not a callable.
        """
        if timeout is DEFAULT_TIMEOUT:
            timeout = self.default_timeout
        compute = default if callable(default) else constant(default)
        if timeout is not None and timeout <= 0:
            return compute, None
        made = self.client.make_key(key, version=version)  # Django's key checks
        spec = make_spec(timeout, soft_timeout, stale_if_error, self.options.policy)
        return compute, Call(made, compute, spec)

    def get_or_set(
        self,
        key: Any,
        default: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
    ) -> Any:
        """Django's ``get_or_set``, on the stampede-safe path."""
        return self.get_or_set_stampede_safe(key, default, timeout, version=version)
