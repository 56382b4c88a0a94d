"""django-apee's OPTIONS: names, defaults, validation (pure).

Every knob lives in ``CACHES[alias]["OPTIONS"]`` beside django-redis's own
keys, which pass through untouched. Names do not collide with django-redis's
(``COMPRESSOR`` and ``SERIALIZER`` stay django-redis's, used only to read old
values when ``LEGACY_READS`` is on).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from django_apee.core.policy import Policy

CODECS = ("msgpack", "pickle")
COMPRESSIONS = ("zstd", "lz4", "zlib", "none")
REFRESH_MODES = ("background", "inline")

#: Socket timeouts applied when the user sets none. redis-py waits forever by
#: default, so a frozen Redis would freeze every request; these bound each
#: command. Set either to ``None`` explicitly to get redis-py's behaviour back.
#: Keys (Django's, before KEY_PREFIX and version) that never get a herd miss:
#: the cache is the only copy of a session, so an early miss would log the
#: user out; a page's cache-header key is rewritten with the page it
#: describes, so a miss on it would only render the page a second time.
HERD_EXCLUDE_DEFAULT = (
    "django.contrib.sessions.cache",
    "django.contrib.sessions.cached_db",
    "views.decorators.cache.cache_header.",
)

DEFAULT_SOCKET_CONNECT_TIMEOUT = 1.0
DEFAULT_SOCKET_TIMEOUT = 2.0


def _number(
    options: dict[str, Any], name: str, default: float, minimum: float
) -> float:
    value = options.get(name, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value < minimum
    ):
        raise ImproperlyConfigured(
            f"CACHES OPTIONS[{name!r}] must be a number >= {minimum}, got {value!r}."
        )
    return value


def _flag(options: dict[str, Any], name: str, default: bool) -> bool:
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise ImproperlyConfigured(
            f"CACHES OPTIONS[{name!r}] must be True or False, got {value!r}."
        )
    return value


@dataclass(frozen=True)
class ApeeOptions:
    """The parsed OPTIONS of one ApeeCache."""

    client_class: str
    codec: str
    compression: str
    compress_min_bytes: int
    compress_level: int | None
    allow_pickle: bool
    legacy_reads: bool
    redis_options: dict[str, Any]
    policy: Policy
    wait_timeout: float
    refresh: str
    refresh_workers: int
    breaker_threshold: int
    breaker_cooldown: float
    herd: bool
    herd_exclude: tuple[str, ...]
    cold_miss_wait: float

    @classmethod
    def from_params(cls, options: dict[str, Any]) -> ApeeOptions:
        """Validate ``options``; raise ImproperlyConfigured naming the bad key."""
        allow_pickle = _flag(options, "ALLOW_PICKLE", True)
        codec = options.get("CODEC", "pickle" if allow_pickle else "msgpack")
        if codec not in CODECS:
            raise ImproperlyConfigured(
                f"CACHES OPTIONS['CODEC'] must be one of {CODECS}, got {codec!r}."
            )
        if codec == "pickle" and not allow_pickle:
            raise ImproperlyConfigured(
                "CACHES OPTIONS['CODEC'] 'pickle' contradicts 'ALLOW_PICKLE': False; "
                "use CODEC 'msgpack' (the default when pickle is not allowed)."
            )
        compression = options.get("COMPRESSION", "zstd")
        if compression not in COMPRESSIONS:
            raise ImproperlyConfigured(
                f"CACHES OPTIONS['COMPRESSION'] must be one of {COMPRESSIONS}, "
                f"got {compression!r}."
            )
        level = options.get("COMPRESS_LEVEL")
        if level is not None and (
            isinstance(level, bool) or not isinstance(level, int)
        ):
            raise ImproperlyConfigured(
                "CACHES OPTIONS['COMPRESS_LEVEL'] must be an int or None, "
                f"got {level!r}."
            )
        redis_options = dict(options)
        redis_options.setdefault(
            "SOCKET_CONNECT_TIMEOUT", DEFAULT_SOCKET_CONNECT_TIMEOUT
        )
        redis_options.setdefault("SOCKET_TIMEOUT", DEFAULT_SOCKET_TIMEOUT)
        # django-redis drops falsy timeouts, so redis-py's own default would
        # apply; an explicit None must reach the pool to mean "no timeout".
        pool_kwargs = dict(redis_options.get("CONNECTION_POOL_KWARGS") or {})
        for option, kwarg in (
            ("SOCKET_TIMEOUT", "socket_timeout"),
            ("SOCKET_CONNECT_TIMEOUT", "socket_connect_timeout"),
        ):
            if redis_options[option] is None:
                pool_kwargs.setdefault(kwarg, None)
        if pool_kwargs:
            redis_options["CONNECTION_POOL_KWARGS"] = pool_kwargs
        return cls(
            client_class=options.get(
                "CLIENT_CLASS", "django_redis.client.DefaultClient"
            ),
            codec=codec,
            compression=compression,
            compress_min_bytes=int(_number(options, "COMPRESS_MIN_BYTES", 1024, 0)),
            compress_level=level,
            allow_pickle=allow_pickle,
            legacy_reads=_flag(options, "LEGACY_READS", False),
            redis_options=redis_options,
            policy=_policy(options),
            wait_timeout=_number(options, "WAIT_TIMEOUT", 10.0, 0.001),
            refresh=_choice(options, "REFRESH", "background", REFRESH_MODES),
            refresh_workers=int(_number(options, "REFRESH_WORKERS", 4, 1)),
            breaker_threshold=int(_number(options, "BREAKER_THRESHOLD", 3, 1)),
            breaker_cooldown=_number(options, "BREAKER_COOLDOWN", 1.0, 0.001),
            herd=_flag(options, "HERD", True),
            herd_exclude=HERD_EXCLUDE_DEFAULT + _prefixes(options, "HERD_EXCLUDE"),
            cold_miss_wait=_number(options, "COLD_MISS_WAIT", 0.0, 0),
        )


def _prefixes(options: dict[str, Any], name: str) -> tuple[str, ...]:
    value = options.get(name, ())
    if not isinstance(value, (list, tuple)) or not all(
        isinstance(prefix, str) for prefix in value
    ):
        raise ImproperlyConfigured(
            f"CACHES OPTIONS[{name!r}] must be a list of key prefixes (str), "
            f"got {value!r}."
        )
    return tuple(value)


def _choice(
    options: dict[str, Any], name: str, default: str, allowed: tuple[str, ...]
) -> str:
    value = options.get(name, default)
    if value not in allowed:
        raise ImproperlyConfigured(
            f"CACHES OPTIONS[{name!r}] must be one of {allowed}, got {value!r}."
        )
    return str(value)


def _policy(options: dict[str, Any]) -> Policy:
    """The stampede knobs; Policy validates their relations."""
    try:
        return Policy(
            beta=_number(options, "XFETCH_BETA", 1.0, 0),
            default_lease_ms=int(_number(options, "LEASE_TIMEOUT", 5.0, 0.001) * 1000),
            min_lease_ms=int(_number(options, "LEASE_MIN", 0.5, 0.001) * 1000),
            max_lease_ms=int(_number(options, "LEASE_MAX", 60.0, 0.001) * 1000),
            soft_ratio=_number(options, "SOFT_TIMEOUT_RATIO", 0.95, 0.001),
        )
    except ValueError as error:
        raise ImproperlyConfigured(f"CACHES OPTIONS: {error}") from error
