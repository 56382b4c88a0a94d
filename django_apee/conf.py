"""django-apee's OPTIONS: every name, default and rule, parsed once here.

Every knob lives in ``CACHES[alias]["OPTIONS"]`` beside django-redis's own
keys, which pass through untouched. Names do not collide with django-redis's
(``COMPRESSOR`` and ``SERIALIZER`` stay django-redis's, used only to read old
values when ``LEGACY_READS`` is on).

Parsing collects every problem instead of stopping at the first, so
``manage.py check`` reports them all at once (``checks.py`` turns each
:class:`Problem` into a message with its id); the backend raises the first
error at its first use.

Django's own ``RedisCache`` takes lower-case OPTIONS and hands them to
redis-py's connection pool. Swapping it for ApeeCache keeps them working:
``pool_class`` becomes django-redis's ``CONNECTION_POOL_CLASS``,
``parser_class`` its ``PARSER_CLASS``, and every other lower-case key (``db``,
``health_check_interval``...) goes to ``CONNECTION_POOL_KWARGS``. Only
``serializer`` cannot be honoured (the envelope is the format): an error.
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured

from django_apee.core.compression import DEFAULT_MAX_BYTES
from django_apee.core.near import Limits
from django_apee.core.policy import Policy
from django_apee.engine.protocol import Tuning
from django_apee.retry import DEFAULT_REDIS_RETRIES, retry_policy
from django_apee.sentinel import DJANGO_REDIS_FACTORY
from django_apee.sentinel import FACTORY as SENTINEL_FACTORY
from django_apee.store.failover import FailoverRetry

CODECS = ("msgpack", "pickle")
COMPRESSIONS = ("zstd", "lz4", "zlib", "none")
REFRESH_MODES = ("background", "inline")

#: Keys (Django's, before KEY_PREFIX and version) that never get a herd miss:
#: the cache is the only copy of a session, so an early miss would log the
#: user out; a page's cache-header key is rewritten with the page it
#: describes, so a miss on it would only render the page a second time.
HERD_EXCLUDE_DEFAULT = (
    "django.contrib.sessions.cache",
    "django.contrib.sessions.cached_db",
    "views.decorators.cache.cache_header.",
)

#: Socket timeouts applied when the user sets none. redis-py waits forever by
#: default, so a frozen Redis would freeze every request; these bound each
#: command. Set either to ``None`` explicitly to get redis-py's behaviour back.
DEFAULT_SOCKET_CONNECT_TIMEOUT = 1.0
DEFAULT_SOCKET_TIMEOUT = 2.0
DEFAULT_STATS_FLUSH_INTERVAL = 5.0
#: MAX_VALUE_BYTES: the most a stored value may decompress to (32 MiB), and
#: so the most elements it may decode into (a value's pointers alone, 8 bytes
#: an element, fit in the same cap). Whoever can write to Redis otherwise
#: decides how much memory and CPU each get costs. Values are rarely above a
#: megabyte; raise it for bigger ones (it cannot go below 1 KiB).
DEFAULT_MAX_VALUE_BYTES = DEFAULT_MAX_BYTES
MIN_MAX_VALUE_BYTES = 1024

#: Our OPTIONS.
APEE_OPTIONS = frozenset(
    {
        "ALLOW_PICKLE", "BREAKER_COOLDOWN", "BREAKER_THRESHOLD", "CODEC",
        "COLD_MISS_WAIT", "COMPRESSION", "COMPRESS_LEVEL", "COMPRESS_MIN_BYTES",
        "FAILOVER_WAIT", "HERD", "HERD_EXCLUDE", "HOLDER_CHECK", "LEASE_MAX",
        "LEASE_MIN", "LEASE_TIMEOUT", "LEGACY_READS", "LEGACY_READS_UNTIL",
        "MAX_VALUE_BYTES", "METRICS", "NEAR_CACHE", "REDIS_RETRIES", "REFRESH",
        "REFRESH_WORKERS", "REPLICA_READS", "SOFT_TIMEOUT_RATIO",
        "STATS_FLUSH_INTERVAL", "WAIT_TIMEOUT", "XFETCH_BETA",
    }
)  # fmt: skip
#: django-redis's OPTIONS (7.x), passed through to it.
DJANGO_REDIS_OPTIONS = frozenset(
    {
        "CLIENT_CLASS", "CLOSE_CONNECTION", "COMPRESSOR", "CONNECTION_FACTORY",
        "CONNECTION_POOL_CLASS", "CONNECTION_POOL_KWARGS", "IGNORE_EXCEPTIONS",
        "PARSER_CLASS", "PASSWORD", "PICKLE_VERSION", "REDIS_CLIENT_CLASS",
        "REDIS_CLIENT_KWARGS", "REPLICA_READ_ONLY", "SENTINELS",
        "SENTINEL_KWARGS", "SERIALIZER", "SOCKET_CONNECT_TIMEOUT",
        "SOCKET_TIMEOUT", "USERNAME",
    }
)  # fmt: skip
KNOWN_OPTIONS = APEE_OPTIONS | DJANGO_REDIS_OPTIONS
#: Django's RedisCache lower-case OPTIONS with a django-redis name.
DJANGO_RENAMED = {"pool_class": "CONNECTION_POOL_CLASS", "parser_class": "PARSER_CLASS"}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an alias's OPTIONS, as a system check reports it."""

    id: str
    message: str
    hint: str | None = None

    @property
    def is_error(self) -> bool:
        return ".E" in self.id


class _Reader:
    """Reads OPTIONS, recording each problem and answering the default."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.problems: list[Problem] = []

    def fail(self, message: str, check: str = "apee.E001") -> None:
        self.problems.append(Problem(check, f"CACHES OPTIONS{message}"))

    def number(
        self, name: str, default: float, minimum: float, check: str = "apee.E001"
    ) -> float:
        value = self.options.get(name, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or value < minimum
        ):
            self.fail(
                f"[{name!r}] must be a number >= {minimum}, got {value!r}.", check
            )
            return default
        return value

    def positive(self, name: str, default: float, check: str) -> float:
        value = self.options.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            self.fail(
                f"[{name!r}] must be a number of seconds > 0, got {value!r}.", check
            )
            return default
        return float(value)

    def flag(self, name: str, default: bool, check: str = "apee.E001") -> bool:
        value = self.options.get(name, default)
        if not isinstance(value, bool):
            self.fail(f"[{name!r}] must be True or False, got {value!r}.", check)
            return default
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self.options.get(name, default)
        if value not in allowed:
            self.fail(f"[{name!r}] must be one of {allowed}, got {value!r}.")
            return default
        return str(value)

    def prefixes(self, name: str) -> tuple[str, ...]:
        value = self.options.get(name, ())
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(prefix, str) for prefix in value
        ):
            self.fail(
                f"[{name!r}] must be a list of key prefixes (str), got {value!r}."
            )
            return ()
        return tuple(value)


@dataclass(frozen=True)
class ApeeOptions:
    """The parsed OPTIONS of one ApeeCache."""

    client_class: str
    codec: str
    compression: str
    compress_min_bytes: int
    compress_level: int | None
    #: The most a value may decompress to; see DEFAULT_MAX_VALUE_BYTES.
    max_value_bytes: int
    allow_pickle: bool
    #: Read values django-redis or Django's RedisCache pickled, until this
    #: date (inclusive); None: never. See ``legacy_reads_on``.
    legacy_reads_until: datetime.date | None
    metrics: bool
    stats_flush_interval: float
    #: The near cache's bounds; None: off (the default).
    near_cache: Limits | None
    #: Plain reads may go to a replica (REPLICA_READS); else all to the primary.
    replica_reads: bool
    #: What goes to django-redis: its own keys, our defaults, Django's renamed.
    redis_options: dict[str, Any]
    tuning: Tuning
    #: Says what per-process state built from these options depends on.
    fingerprint: str

    @property
    def policy(self) -> Policy:
        return self.tuning.policy

    def legacy_reads_on(self, today: datetime.date) -> bool:
        """Whether values without our header are unpickled on ``today`` (UTC)."""
        until = self.legacy_reads_until
        return until is not None and today <= until

    @classmethod
    def from_params(cls, options: dict[str, Any]) -> ApeeOptions:
        """Parse ``options``; raise ImproperlyConfigured naming the first bad key."""
        parsed, problems = parse(options)
        errors = [problem for problem in problems if problem.is_error]
        if errors:
            raise ImproperlyConfigured(errors[0].message)
        return parsed


def parse(options: dict[str, Any]) -> tuple[ApeeOptions, list[Problem]]:
    """The options (defaults where a value is bad) and every problem found."""
    read = _Reader(options)
    allow_pickle = read.flag("ALLOW_PICKLE", True)
    codec = read.choice("CODEC", "pickle" if allow_pickle else "msgpack", CODECS)
    if codec == "pickle" and not allow_pickle:
        read.fail(
            "['CODEC'] 'pickle' contradicts 'ALLOW_PICKLE': False; use CODEC "
            "'msgpack' (the default when pickle is not allowed)."
        )
        codec = "msgpack"
    level = options.get("COMPRESS_LEVEL")
    if level is not None and (isinstance(level, bool) or not isinstance(level, int)):
        read.fail(f"['COMPRESS_LEVEL'] must be an int or None, got {level!r}.")
        level = None
    parsed = ApeeOptions(
        client_class=options.get("CLIENT_CLASS", "django_redis.client.DefaultClient"),
        codec=codec,
        compression=read.choice("COMPRESSION", "zstd", COMPRESSIONS),
        compress_min_bytes=int(read.number("COMPRESS_MIN_BYTES", 1024, 0)),
        compress_level=level,
        max_value_bytes=int(
            read.number("MAX_VALUE_BYTES", DEFAULT_MAX_VALUE_BYTES, MIN_MAX_VALUE_BYTES)
        ),
        allow_pickle=allow_pickle,
        legacy_reads_until=_legacy_until(read),
        metrics=read.flag("METRICS", True, check="apee.E003"),
        stats_flush_interval=read.positive(
            "STATS_FLUSH_INTERVAL", DEFAULT_STATS_FLUSH_INTERVAL, check="apee.E003"
        ),
        near_cache=_near_cache(read),
        replica_reads=read.flag("REPLICA_READS", False),
        redis_options=_redis_options(options, read),
        tuning=_tuning(read),
        fingerprint=fingerprint(options),
    )
    _unknown(options, read)
    return parsed, read.problems


def utc_today() -> datetime.date:
    """Today in UTC: LEGACY_READS_UNTIL means the same day on every host."""
    return datetime.datetime.now(datetime.timezone.utc).date()


def _legacy_until(read: _Reader) -> datetime.date | None:
    """LEGACY_READS needs an end date: unpickling what anyone may have written
    to Redis must be a migration step, not a setting that outlives it."""
    if not read.flag("LEGACY_READS", False):
        return None
    value = read.options.get("LEGACY_READS_UNTIL")
    if isinstance(value, datetime.datetime):
        return value.date()
    if isinstance(value, datetime.date):
        return value
    try:
        return datetime.date.fromisoformat(str(value))
    except ValueError:
        read.fail(
            "['LEGACY_READS_UNTIL'] must be the date (YYYY-MM-DD) after which "
            f"LEGACY_READS turns itself off, got {value!r}. Reading old pickles "
            "lets whoever can write to Redis run code in your workers; give "
            "the migration an end."
        )
        return None


#: What ``NEAR_CACHE: True`` means.
NEAR_DEFAULTS = Limits()
NEAR_KEYS = {"MAX_ENTRIES": "max_entries", "MAX_BYTES": "max_bytes"}


def _near_cache(read: _Reader) -> Limits | None:
    """NEAR_CACHE: False/absent (off), True (default bounds) or a dict of
    MAX_ENTRIES and MAX_BYTES (ints >= 1; the missing one keeps its default).

    Opt-in because every process then hears every write under the alias's
    KEY_PREFIX (see ``store/tracking.py``). Problems are apee.E006.
    """
    value = read.options.get("NEAR_CACHE", False)
    if value is False or value is None:
        return None
    if value is True:
        return NEAR_DEFAULTS
    if not isinstance(value, dict):
        read.fail(
            f"['NEAR_CACHE'] must be True, False or a dict with MAX_ENTRIES "
            f"and MAX_BYTES, got {value!r}.",
            check="apee.E006",
        )
        return None
    bounds = {}
    for name, bad in ((k, v) for k, v in value.items() if k not in NEAR_KEYS):
        read.fail(
            f"['NEAR_CACHE'][{name!r}] is not a near cache option "
            f"(MAX_ENTRIES, MAX_BYTES), got {bad!r}.",
            check="apee.E006",
        )
    for name, field in NEAR_KEYS.items():
        number = value.get(name, getattr(NEAR_DEFAULTS, field))
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            read.fail(
                f"['NEAR_CACHE'][{name!r}] must be an int >= 1, got {number!r}.",
                check="apee.E006",
            )
            return None
        bounds[field] = number
    return Limits(**bounds)


def fingerprint(options: dict[str, Any]) -> str:
    """A short digest of ``options``: equal options, equal fingerprints."""
    text = repr(sorted((str(k), repr(v)) for k, v in options.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _redis_options(options: dict[str, Any], read: _Reader) -> dict[str, Any]:
    """django-redis's OPTIONS: ours dropped, defaults added, Django's translated."""
    redis_options = {k: v for k, v in options.items() if not k.islower()}
    redis_options.setdefault("SOCKET_CONNECT_TIMEOUT", DEFAULT_SOCKET_CONNECT_TIMEOUT)
    redis_options.setdefault("SOCKET_TIMEOUT", DEFAULT_SOCKET_TIMEOUT)
    pool_kwargs = dict(redis_options.get("CONNECTION_POOL_KWARGS") or {})
    for name, value in options.items():
        if not name.islower():
            continue
        if name == "serializer":
            read.fail(
                "['serializer'] is Django's RedisCache option and cannot apply: "
                "ApeeCache stores its own envelope. Use 'CODEC' (and "
                "'ALLOW_PICKLE') instead.",
                check="apee.E004",
            )
        elif name in DJANGO_RENAMED:
            redis_options.setdefault(DJANGO_RENAMED[name], _dotted(value))
        else:
            pool_kwargs.setdefault(name, value)
    # django-redis drops falsy timeouts, so redis-py's own default would
    # apply; an explicit None must reach the pool to mean "no timeout".
    for option, kwarg in (
        ("SOCKET_TIMEOUT", "socket_timeout"),
        ("SOCKET_CONNECT_TIMEOUT", "socket_connect_timeout"),
    ):
        if redis_options[option] is None:
            pool_kwargs.setdefault(kwarg, None)
    _retry(options, read, redis_options, pool_kwargs)
    if _dotted(redis_options.get("CONNECTION_FACTORY")) == DJANGO_REDIS_FACTORY:
        # Finds a promoted replica at once (``sentinel.py``).
        redis_options["CONNECTION_FACTORY"] = SENTINEL_FACTORY
    if pool_kwargs:
        redis_options["CONNECTION_POOL_KWARGS"] = pool_kwargs
    return redis_options


def _retry(
    options: dict[str, Any],
    read: _Reader,
    redis_options: dict[str, Any],
    pool_kwargs: dict[str, Any],
) -> None:
    """REDIS_RETRIES: redis-py's retry policy on every connection we make.

    A frozen Redis then costs each command at most
    ``(1 + REDIS_RETRIES) * (SOCKET_CONNECT_TIMEOUT + SOCKET_TIMEOUT)``
    (``retry.py`` states the bound and why), whatever redis-py's defaults
    are. A ``retry`` in CONNECTION_POOL_KWARGS (or SENTINEL_KWARGS) is the
    user's own policy and wins; the bound is then theirs to work out. Under
    Sentinel, the connections to the sentinels get it too: redis-py builds
    them as ``Redis(host, port)``, which retries 10 times by default.
    """
    value = options.get("REDIS_RETRIES", DEFAULT_REDIS_RETRIES)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        read.fail(
            f"['REDIS_RETRIES'] must be an int >= 0, got {value!r}: how many "
            "times redis-py re-sends a command that failed or timed out "
            "(negative would mean forever).",
            check="apee.E005",
        )
        value = DEFAULT_REDIS_RETRIES
    # FAILOVER_WAIT: under Sentinel, wait that long for a new primary
    # (``store/failover.py``); the wait bound is then that plus one command's.
    wait = read.number("FAILOVER_WAIT", 0.0, 0)
    if options.get("SENTINELS") and wait:
        pool_kwargs.setdefault("retry", FailoverRetry(value, wait))
    pool_kwargs.setdefault("retry", retry_policy(value))
    if options.get("SENTINELS"):
        given = options.get("SENTINEL_KWARGS")
        # redis-py's Sentinel gives the sentinels the socket_* options of the
        # data connections only when SENTINEL_KWARGS is absent: keep that.
        if given is not None:
            sentinel_kwargs = dict(given)
        else:
            sentinel_kwargs = {
                k: v for k, v in pool_kwargs.items() if k.startswith("socket_")
            }
            for option, kwarg in (
                ("SOCKET_TIMEOUT", "socket_timeout"),
                ("SOCKET_CONNECT_TIMEOUT", "socket_connect_timeout"),
            ):
                if redis_options[option]:  # django-redis drops falsy ones
                    sentinel_kwargs.setdefault(kwarg, redis_options[option])
        sentinel_kwargs.setdefault("retry", retry_policy(value))
        redis_options["SENTINEL_KWARGS"] = sentinel_kwargs


def _dotted(value: Any) -> Any:
    """django-redis imports classes by dotted path; Django also takes the class."""
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return value


def _tuning(read: _Reader) -> Tuning:
    from django.db import connections

    return Tuning(
        policy=_policy(read),
        wait_timeout=read.number("WAIT_TIMEOUT", 10.0, 0.001),
        refresh=read.choice("REFRESH", "background", REFRESH_MODES),
        refresh_workers=int(read.number("REFRESH_WORKERS", 4, 1)),
        breaker_threshold=int(read.number("BREAKER_THRESHOLD", 3, 1)),
        breaker_cooldown=read.number("BREAKER_COOLDOWN", 1.0, 0.001),
        herd=read.flag("HERD", True),
        herd_exclude=HERD_EXCLUDE_DEFAULT + read.prefixes("HERD_EXCLUDE"),
        cold_miss_wait=read.number("COLD_MISS_WAIT", 0.0, 0),
        holder_check=read.number("HOLDER_CHECK", 0.1, 0),
        # A background refresh may open database connections in its pool
        # thread; close them there (close_all acts on this thread's only).
        thread_done=connections.close_all,
    )


def _policy(read: _Reader) -> Policy:
    """The stampede knobs; Policy validates their relations."""
    try:
        return Policy(
            beta=read.number("XFETCH_BETA", 1.0, 0),
            default_lease_ms=int(read.number("LEASE_TIMEOUT", 5.0, 0.001) * 1000),
            min_lease_ms=int(read.number("LEASE_MIN", 0.5, 0.001) * 1000),
            max_lease_ms=int(read.number("LEASE_MAX", 60.0, 0.001) * 1000),
            soft_ratio=read.number("SOFT_TIMEOUT_RATIO", 0.95, 0.001),
        )
    except ValueError as error:
        read.fail(f": {error}")
        return Policy()


def _unknown(options: dict[str, Any], read: _Reader) -> None:
    """A key nobody reads is a typo until proven otherwise: say which it resembles."""
    for name in options:
        if not isinstance(name, str) or name.islower() or name in KNOWN_OPTIONS:
            continue
        close = difflib.get_close_matches(name, sorted(KNOWN_OPTIONS), n=1)
        read.problems.append(
            Problem(
                "apee.W003",
                f"CACHES OPTIONS[{name!r}] is not an option of django-apee or "
                "django-redis, and is ignored.",
                hint=f"Did you mean {close[0]!r}?" if close else None,
            )
        )


def apee_aliases(caches: dict[str, Any]) -> list[str]:
    """The CACHES aliases whose BACKEND is ApeeCache (by dotted path)."""
    return [
        alias
        for alias, config in caches.items()
        if str(config.get("BACKEND", "")).startswith("django_apee.")
    ]
