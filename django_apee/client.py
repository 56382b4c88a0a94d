"""The django-redis client with django-apee's envelope and Django's contract.

ApeeCache keeps django-redis's connection factory, pools, replica routing and
Sentinel support by *deriving* from the configured ``CLIENT_CLASS``
(``DefaultClient``, ``SentinelClient`` or a subclass of either): this mixin is
put in front of it. It changes only what bytes go in and out, and the few
places where django-redis departs from Django's documented cache contract.
"""

from __future__ import annotations

import contextlib
import functools
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from django.core.cache.backends.base import (
    DEFAULT_TIMEOUT,
    MEMCACHE_MAX_KEY_LENGTH,
    BaseCache,
)
from django.core.exceptions import ImproperlyConfigured
from django.utils.module_loading import import_string
from django_redis.client import DefaultClient
from django_redis.exceptions import CompressorError
from django_redis.serializers.pickle import PickleSerializer
from django_redis.util import CacheKey
from redis.client import Pipeline

from django_apee.client_inplace import InPlaceMixin, interrupted
from django_apee.client_invalidate import InvalidateMixin
from django_apee.client_read import GET_CHUNK, ReadMixin
from django_apee.client_routing import RoutingMixin
from django_apee.core import MISSING, policy, to_milliseconds
from django_apee.core.envelope import (
    MEMBER_KEY,
    DecodeError,
    Meta,
    is_raw_int,
    peek_meta,
)
from django_apee.core.keys import LEASE, companion
from django_apee.core.wire import HEADER_PEEK_BYTES
from django_apee.store import scripts
from django_apee.store.wake import wake_channel

if TYPE_CHECKING:
    from redis import Redis

    from django_apee.cache import ApeeCache
    from django_apee.engine.herd import Claim
    from django_apee.store import lease


#: What Django's key warnings look for besides length: memcached refuses
#: control characters, space and DEL (``memcache_key_warnings``).
_MEMCACHED_BAD_CHARS = re.compile(r"[\x00-\x20\x7f]")

#: The most made keys one client remembers (``make_key``); past it they are
#: all forgotten (making one again costs ~0.6 µs).
MADE_KEYS_LIMIT = 4096

#: The largest stored value LEGACY_READS tries to decode.
LEGACY_MAX_BYTES = 8 * 1024 * 1024


__all__ = ["GET_CHUNK", "ApeeClientMixin", "client_class"]


def _is_pickle(data: bytes) -> bool:
    """A pickle as django-redis and Django write them: protocol 2 to 5."""
    return len(data) > 2 and data[0] == 0x80 and 2 <= data[1] <= 5


class ApeeClientMixin(ReadMixin, RoutingMixin, InvalidateMixin, InPlaceMixin):
    """Envelope encoding and Django's semantics on top of a django-redis client."""

    _backend: ApeeCache
    #: ``make_key``'s made keys by key (default version and prefix).
    _made_keys: dict[str, CacheKey] | None = None

    # -- bytes in, bytes out -------------------------------------------------

    def encode(
        self,
        value: Any,
        *,
        allow_int: bool = True,
        meta: Meta | None = None,
        key: str = MEMBER_KEY,
    ) -> bytes | int:
        """Bytes to store under ``key`` for ``value``, or the int itself (INCR
        works on it).

        ``key`` is the full Redis key (the made key) the envelope's MAC binds
        the bytes to. django-redis encodes set and hash members without one:
        they are bound to the empty key (authenticated, not bound to their
        collection). ``meta`` (timings) goes into the envelope; a bare int
        carries none. Sorted-set members must be bytes (``allow_int=False``):
        an empty Meta forces the envelope.
        """
        envelope = self._backend.envelope
        if is_raw_int(value):
            return value if allow_int else envelope.encode(value, Meta(), key=key)
        return envelope.encode(value, meta, key=key)

    def decode(self, value: bytes | int | str, *, key: str = MEMBER_KEY) -> Any:
        """Decode bytes stored under ``key``; a value nobody can read raises
        DecodeError.

        ``get`` and ``get_many`` turn that into a counted miss. Other readers
        (set and hash members, read without a key) raise it, naming the
        reason.
        """
        if isinstance(value, int):
            return value
        return self._decode_with_meta(value, key)[0]

    def decode_entry(
        self, made: str, raw: bytes | str
    ) -> tuple[Any, Meta | None] | None:
        """Value and timing metadata of the entry stored under ``made``; None
        (counted) if unreadable."""
        try:
            return self._decode_with_meta(raw, made)
        except DecodeError:
            return None

    def _decode_with_meta(
        self, value: bytes | str, key: str
    ) -> tuple[Any, Meta | None]:
        if isinstance(value, str):
            value = value.encode()
        try:
            decoded = self._backend.envelope.decode(value, key=key)
        except DecodeError as error:
            if error.reason == "foreign" and self._backend.legacy_reads:
                legacy = self._decode_legacy(value)
                if legacy is not MISSING:
                    return legacy, None
            self._backend.report_decode_error(error)
            raise
        return decoded.value, decoded.meta

    def _decode_legacy(self, value: bytes) -> Any:
        """Read a value django-redis or Django's RedisCache wrote (migration).

        Only what could be such a value is tried: at most ``LEGACY_MAX_BYTES``
        stored, and with a pickle serializer, a pickle of protocol 2 to 5
        once decompressed. Each value read this way is counted (reason
        ``legacy``); the first one per process logs a warning.
        """
        if len(value) > LEGACY_MAX_BYTES:
            return MISSING
        try:
            data = value
            with contextlib.suppress(CompressorError):
                data = self._compressor.decompress(value)  # type: ignore[attr-defined]
            serializer = self._serializer  # type: ignore[attr-defined]
            if isinstance(serializer, PickleSerializer) and not _is_pickle(data):
                return MISSING
            found = serializer.loads(data)
        except Exception:  # any failure is a miss
            return MISSING
        self._backend.report_legacy_read()
        return found

    # -- keys -----------------------------------------------------------------

    def make_key(
        self, key: Any, version: int | None = None, prefix: str | None = None
    ) -> CacheKey:
        """django-redis's key, plus Django's key warnings (memcached limits).

        A str key with the backend's own version and prefix is made once and
        remembered (at most ``MADE_KEYS_LIMIT`` of them): ``KEY_FUNCTION``,
        ``KEY_PREFIX`` and ``VERSION`` are fixed for a backend, and making
        one was a sixth of a hit's own cost. A key Django would warn about is
        never remembered, so it warns on every use, as Django does.

        Django's ``validate_key`` runs only for a key it would warn about (the
        same two tests, done here without its generator), or when the
        backend's ``validate_key`` is not Django's own: on every read, the
        check that finds nothing was a tenth of django-apee's own cost.
        """
        if isinstance(key, CacheKey):
            return key
        made_keys = None
        if version is None and prefix is None and type(key) is str:
            made_keys = self._made_keys
            if made_keys is None:
                made_keys = self._made_keys = {}
            found = made_keys.get(key)
            if found is not None:
                return found
        made: CacheKey = super().make_key(key, version=version, prefix=prefix)
        backend = self._backend
        if (
            len(made) > MEMCACHE_MAX_KEY_LENGTH
            or _MEMCACHED_BAD_CHARS.search(made) is not None
            or getattr(backend.validate_key, "__func__", None)
            is not BaseCache.validate_key
        ):
            backend.validate_key(made)
        elif made_keys is not None:
            if len(made_keys) >= MADE_KEYS_LIMIT:
                made_keys.clear()
            made_keys[key] = made
        return made

    # -- Django's contract ------------------------------------------------------

    @property
    def wake_channel(self) -> str:
        """Where this alias's lease ends are announced (its KEY_PREFIX's)."""
        return wake_channel(self._backend.key_prefix)

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
        if client is None:
            client = self.get_client(write=True)
        call = self.set_call(
            made, value, px_of(timeout), "NX" if nx else "XX" if xx else ""
        )
        with interrupted(client):
            stored = scripts.run(client, call.name, keys=call.keys, args=call.args)
        if isinstance(client, Pipeline):
            return True  # set_many and callers' pipelines: the answer comes later
        return self.set_stored(call, stored)

    def set_call(
        self,
        made: str,
        value: Any,
        px: int | None,
        mode: str = "",
        release: Callable[[lease.Lease], None] | None = None,
    ) -> SetCall:
        """The script call that stores ``value`` under ``made`` (``set``,
        ``add``, ``set_many`` and their async twins send it).

        A plain write is ``lua/set.lua`` (``mode``: NX, XX or ""). A key
        whose lease a reader of this process won from a get (herd mode) gets
        the fenced ``lua/herd_set.lua`` instead, ``add`` and ``set`` alike:
        that reader was told the key was absent; the time since it won is
        the compute time XFetch and leases learn. If the value cannot be
        encoded, that lease is handed to ``release`` (default: released in
        this thread) and the error raised.
        """
        runtime = self._backend.runtime
        herd = runtime.herd
        px_arg = "" if px is None else px
        won = herd.claim(made)
        if won is None:
            # The hard timeout lets readers tell the entry's age from its PTTL;
            # the soft one is the reader's rule (SOFT_TIMEOUT_RATIO), not stored.
            written = runtime.clock.earliest_ms()
            meta = Meta(hard_ms=px, written_ms=written) if px else None
            encoded = self.encode(value, meta=meta, key=made)
            keys = [made, companion(made, LEASE)]
            return SetCall("set", keys, [encoded, px_arg, mode, self.wake_channel])
        meta = Meta(
            hard_ms=px or 0,
            delta_ms=won.delta_ms(time.monotonic()),
            seed=random.randrange(1, policy.SEED_RANGE),
            written_ms=runtime.clock.earliest_ms(),
        )
        try:
            encoded = self.encode(value, meta=meta, key=made)
        except Exception:
            (release or herd.release_quietly)(won.lease)
            raise
        held = won.lease
        args = [held.token, won.fingerprint, encoded, px_arg, held.channel]
        return SetCall("herd_set", [made, held.lease_key], args, won)

    def set_stored(self, call: SetCall, stored: Any) -> bool:
        """``call``'s answer: whether it stored (a herd write that found
        something newer is counted as a lost lease)."""
        if call.won is not None and not stored:
            self._backend.runtime.herd.lost()
        return bool(stored)

    def set_many_calls(
        self,
        data: dict[Any, Any],
        timeout: float | None,
        version: int | None,
        release: Callable[[lease.Lease], None] | None = None,
    ) -> tuple[list[tuple[list[Any], list[Any]]], list[SetCall]]:
        """``set_many``'s writes (``timeout`` in seconds, above 0, or None):
        the plain ``lua/set.lua`` calls, pipelined in one round trip, and the
        fenced writes of the keys whose lease a reader of this process won
        (herd mode), each sent alone as ``set`` sends it."""
        px = px_of(timeout)
        calls = [
            self.set_call(self.make_key(key, version=version), value, px, "", release)
            for key, value in data.items()
        ]
        plain = [(call.keys, call.args) for call in calls if call.won is None]
        return plain, [call for call in calls if call.won is not None]

    def pttl(
        self, key: Any, version: int | None = None, client: Redis | None = None
    ) -> int | None:
        """Milliseconds until the value stops being served (django-redis's shape).

        0 when absent (or past its hard timeout), None when persistent. For an
        entry written with ``stale_if_error`` this is the time to its hard
        timeout, not to the end of the grace Redis keeps it for.
        """
        made = self.make_key(key, version=version)
        if client is None:
            client = self.get_client(write=False)
        with interrupted(client):
            pipeline = peek(client.pipeline(transaction=False), made)
            return served_pttl(*pipeline.execute())

    def ttl(
        self, key: Any, version: int | None = None, client: Redis | None = None
    ) -> int | None:
        """Seconds until the value stops being served; see ``pttl``."""
        pttl = self.pttl(key, version=version, client=client)
        return None if pttl is None else (pttl + 500) // 1000

    def has_key(
        self, key: Any, version: int | None = None, client: Redis | None = None
    ) -> bool:
        """True when ``get`` would find a value (so not past its hard timeout)."""
        return self.pttl(key, version=version, client=client) != 0

    def set_many(
        self,
        data: dict[Any, Any],
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        client: Redis | None = None,
    ) -> list[Any]:
        """Set every pair in one round trip; return the keys that failed (none).

        Django's contract is a list of failed keys; Redis either takes the
        whole pipeline or raises. The ``lua/set.lua`` calls go pipelined
        through ``scripts.run_many`` (EVALSHA at once; a redis-py pipeline
        would first ask SCRIPT EXISTS in a round trip of its own). The keys
        whose lease a reader of this process won (herd mode) get their
        fenced write, as ``set`` gives them.
        """
        if timeout is DEFAULT_TIMEOUT:
            timeout = self._backend.default_timeout
        if client is None:
            client = self.get_client(write=True)
        if timeout is not None and timeout <= 0:
            with interrupted(client):
                pipeline = client.pipeline(transaction=False)
                for key, value in data.items():
                    self.set(key, value, timeout, version=version, client=pipeline)
                pipeline.execute()
            return []
        plain, fenced = self.set_many_calls(data, timeout, version)
        with interrupted(client):
            if plain:
                scripts.run_many(client, "set", plain)
            for call in fenced:
                self.set_stored(
                    call, scripts.run(client, call.name, call.keys, call.args)
                )
        return []


@dataclass(frozen=True)
class SetCall:
    """One write of ``set``: ``lua/<name>.lua``'s KEYS and ARGV, and the
    claim (a lease a reader of this process won, herd mode) it writes under."""

    name: str
    keys: list[Any]
    args: list[Any]
    won: Claim | None = None


def px_of(timeout: float | None) -> int | None:
    """A timeout in seconds (None: never expires) as ``PX`` milliseconds."""
    return None if timeout is None else to_milliseconds(timeout)


def peek(pipeline: Any, made: str) -> Any:
    """Queue what ``pttl`` and ``has_key`` read of ``made``: the header and
    metadata (not the value), and the PTTL."""
    pipeline.getrange(made, 0, HEADER_PEEK_BYTES - 1)
    pipeline.pttl(made)
    return pipeline


def served_pttl(raw: bytes | None, pttl: int) -> int | None:
    """Milliseconds until the entry stops being served, from ``peek``'s two
    answers: 0 absent, None persistent, the grace Redis keeps past the hard
    timeout (``stale_if_error``) left out."""
    if pttl == -2:
        return 0
    if pttl == -1:
        return None
    meta = peek_meta(raw) if raw is not None else None
    return max(0, int(pttl) - (meta.grace_ms if meta is not None else 0))


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
