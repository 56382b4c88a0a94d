"""The read path of the django-redis client mixin: ``get`` and ``get_many``.

A hit is what a cache is judged by, so it is kept lean: one plain ``GET``
(``MGET`` for ``get_many``), the envelope decoded (its MAC checked first),
and the entry's age judged from the write time it carries, in Redis's clock
(``Meta.written_ms``, ``store/clock.py``, ``policy.fresh_until_ms``). No
script, no PTTL, no intermediate lists or dicts for one key.

Whatever that cannot call a fresh hit takes the full path, ``lua/get.lua``:
the value again with its PTTL, and for an absent key its lease's PTTL, so
herd mode can give one reader the miss of a stale entry and waiters can
wait for a value being computed. That is an absent key, an entry past (or
near: XFetch) its soft timeout, an entry with a grace period
(``stale_if_error``) or written before ``written_ms`` existed, or a reader
without a sample of Redis's clock. An unreadable value is a miss (counted),
as before, without a second round trip.

``touch`` changes when Redis deletes an entry, not the write time in it: a
touched entry is read through the full path once past its original soft
timeout (and judged by its PTTL there), and one touched to a shorter
timeout is served until Redis deletes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django_redis.exceptions import ConnectionInterrupted
from django_redis.util import CacheKey

from django_apee.core import policy
from django_apee.core.envelope import DecodeError, Meta
from django_apee.core.keys import LEASE, companion
from django_apee.engine.herd import Row
from django_apee.observe import metrics
from django_apee.store import scripts
from django_apee.store.errors import REDIS_ERRORS

if TYPE_CHECKING:
    from collections.abc import Iterable

    from redis import Redis

    from django_apee.cache import ApeeCache
    from django_apee.store.clock import RedisClock

#: The most keys one ``lua/get.lua`` call or one ``MGET`` reads. Either
#: holds Redis's one thread until it returns: a get_many of 50,000 keys in
#: one script call blocked every other client for 131 ms. Larger get_many
#: calls are split into calls of this many keys, sent together in one
#: pipelined round trip, so other clients' commands run between them.
GET_CHUNK = 512

#: The most deadlines one client remembers (``ReadMixin._untils``); past
#: it they are all forgotten (a deadline costs ~1 µs to recompute).
UNTILS_LIMIT = 4096

#: What :meth:`ReadMixin._lean` returns for an entry it cannot call fresh.
_FULL_PATH = object()
#: ... and for an unreadable one: a miss, counted, with nothing to wait for.
_UNREADABLE = object()


class ReadMixin:
    """``get`` and ``get_many``: the lean hit, and the full path behind it."""

    _backend: ApeeCache
    #: False: every read takes the full path (a near cache's misses).
    _lean_reads = True
    #: The alias's ``RedisClock``, remembered on first use.
    _clock: RedisClock | None = None
    #: Each entry's fresh-until deadline (``policy.fresh_until_ms``) by its
    #: ``Meta``, for the policy in ``_untils_rules``: a function of the two,
    #: computed once per entry rather than per read. ``unpack_meta``
    #: memoises the ``Meta`` by its bytes, so a hit looks up an equal tuple.
    _untils: dict[Meta, float] | None = None
    _untils_rules: object = None

    if TYPE_CHECKING:  # supplied by ApeeClientMixin and django-redis's client

        def make_key(
            self, key: Any, version: int | None = None, prefix: str | None = None
        ) -> CacheKey: ...

        def get_client(self, write: bool = True) -> Redis: ...

        def _decode_with_meta(
            self, value: bytes | str, key: str
        ) -> tuple[Any, Meta | None]: ...

    def get(
        self,
        key: Any,
        default: Any = None,
        version: int | None = None,
        client: Redis | None = None,
    ) -> Any:
        """Return the value, or ``default`` when absent, unreadable or past hard.

        Herd mode (see ``herd.py``) may answer ``default`` for a value past
        its soft timeout: to the one reader fleet-wide that won its lease and
        is expected to ``set`` the next value.
        """
        made = self.make_key(key, version=version)
        if client is None:
            client = self.get_client(write=False)
        if not self._lean_reads:
            return self._full_path(client, {made: key}, {}).get(key, default)
        try:
            raw = self._read_value(client, made)
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error
        if raw is not None:
            value = self._lean_answer(made, raw)
            if value is _UNREADABLE:
                return default
            if value is not _FULL_PATH:
                return value
        return self._full_path(client, {made: key}, {}).get(key, default)

    def _lean_answer(self, made: CacheKey, raw: bytes | str) -> Any:
        """``_lean``'s answer for one key's read, counted when it is final
        (a hit, or an unreadable value's miss); ``_FULL_PATH`` is not."""
        value = self._lean(made, raw)
        if value is _UNREADABLE:
            metrics.tick_miss(self._backend.alias)
        elif value is not _FULL_PATH:
            metrics.tick_hit(self._backend.alias)
        return value

    def get_many(
        self,
        keys: Iterable[Any],
        version: int | None = None,
        client: Redis | None = None,
    ) -> dict[Any, Any]:
        """Every key's value in one round trip (``MGET``, ``GET_CHUNK`` keys
        a command); the keys that are not fresh hits take the full path in
        a second one."""
        if client is None:
            client = self.get_client(write=False)
        by_made_key = {self.make_key(key, version=version): key for key in keys}
        if not by_made_key:
            return {}
        if not self._lean_reads:
            return self._full_path(client, by_made_key, {})
        made_keys = list(by_made_key)
        try:
            raws = self._read_values(client, made_keys)
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error
        found, full, unreadable = self._sort_lean(by_made_key, raws)
        if not full:
            metrics.count_gets(self._backend.alias, len(found), unreadable)
            return found
        served = self._full_path(client, full, found, unreadable)
        return merged(by_made_key, found, served)

    def _sort_lean(
        self, by_made_key: dict[CacheKey, Any], raws: list[Any]
    ) -> tuple[dict[Any, Any], dict[CacheKey, Any], int]:
        """Sort a lean read's ``raws`` (in ``by_made_key``'s order): the
        fresh hits (key -> value), what takes the full path (made key ->
        key), and how many were unreadable."""
        found: dict[Any, Any] = {}
        full: dict[CacheKey, Any] = {}
        unreadable = 0
        for (made, key), raw in zip(by_made_key.items(), raws, strict=True):
            value = _FULL_PATH if raw is None else self._lean(made, raw)
            if value is _FULL_PATH:
                full[made] = key
            elif value is _UNREADABLE:
                unreadable += 1
            else:
                found[key] = value
        return found, full, unreadable

    def _rows(self, by_made_key: dict[CacheKey, Any], flat: list[Any]) -> list[Row]:
        """``lua/get.lua``'s flat answer for ``by_made_key`` as rows."""
        return [
            Row(made, key, flat[3 * i], int(flat[3 * i + 1]), int(flat[3 * i + 2]))
            for i, (made, key) in enumerate(by_made_key.items())
        ]

    def _lean(self, made: CacheKey, raw: bytes | str) -> Any:
        """The value of a fresh entry, judged from its envelope alone;
        ``_FULL_PATH`` when only its PTTL can tell, ``_UNREADABLE``."""
        try:
            value, meta = self._decode_with_meta(raw, made)
        except DecodeError:
            return _UNREADABLE  # counted and logged by the decoder
        if meta is None or meta.hard_ms == 0:
            return value  # no deadline: always fresh
        backend = self._backend
        rules = backend.options.policy
        untils = self._untils
        if untils is None or self._untils_rules is not rules:
            untils = self._untils = {}
            self._untils_rules = rules
        until = untils.get(meta)
        if until is None:
            until = policy.fresh_until_ms(meta, rules)
            if len(untils) >= UNTILS_LIMIT:
                untils.clear()
            untils[meta] = until
        if until == policy.UNDECIDED:
            return _FULL_PATH
        clock = self._clock
        if clock is None:
            # Kept: the clock stays right after a fork or a settings change
            # (it measures the same server; a new LOCATION is a new backend).
            clock = self._clock = backend.runtime.clock
        now = clock.latest_ms()
        if now is None or now >= until:
            return _FULL_PATH
        return value

    # -- the Redis reads: what a near cache or a cluster client overrides ------

    @staticmethod
    def _read_value(client: Redis, made: CacheKey) -> Any:
        """The bytes stored under ``made`` (None: absent): ``get``'s read."""
        return client.get(made)

    @staticmethod
    def _read_values(client: Redis, made_keys: list[CacheKey]) -> list[Any]:
        """The bytes under each of ``made_keys``, in order: ``get_many``'s
        read, ``MGET``s of ``GET_CHUNK`` keys pipelined in one round trip."""
        if len(made_keys) <= GET_CHUNK:
            return list(client.mget(made_keys))
        pipeline = client.pipeline(transaction=False)
        for start in range(0, len(made_keys), GET_CHUNK):
            pipeline.mget(made_keys[start : start + GET_CHUNK])
        return [raw for part in pipeline.execute() for raw in part]

    def _full_path(
        self,
        client: Redis,
        by_made_key: dict[CacheKey, Any],
        found: dict[Any, Any],
        unreadable: int = 0,
    ) -> dict[Any, Any]:
        """Read ``by_made_key`` with PTTLs and lease PTTLs (``lua/get.lua``)
        and let herd mode decide what it serves (``found``: the lean hits
        of the same call, for the metrics).

        The PTTL tells each entry's age: past its hard timeout it is a miss
        (entries kept longer for ``stale_if_error`` outlive it in Redis),
        past its soft timeout herd mode may make it a miss for one reader.
        An absent key whose lease is held is being computed: herd mode
        waits for that write (``herd.Herd.wait_for``).
        """
        made_keys = list(by_made_key)
        try:
            flat = self._read_rows(client, made_keys)
        except REDIS_ERRORS as error:
            raise ConnectionInterrupted(connection=client) from error
        served = self._backend.runtime.herd.read(self._rows(by_made_key, flat))
        self._count_full(by_made_key, found, served, unreadable)
        return served

    def _count_full(
        self,
        by_made_key: dict[CacheKey, Any],
        found: dict[Any, Any],
        served: dict[Any, Any],
        unreadable: int,
    ) -> None:
        """Count a read whose ``by_made_key`` took the full path: ``found``
        lean hits, ``served`` by herd mode, ``unreadable`` lean misses."""
        metrics.count_gets(
            self._backend.alias,
            len(found) + len(served),
            len(by_made_key) - len(served) + unreadable,
        )

    @staticmethod
    def _read_rows(client: Redis, made_keys: list[CacheKey]) -> list[Any]:
        """``lua/get.lua``'s flat answer for ``made_keys`` (value, PTTL, lease
        PTTL per key), ``GET_CHUNK`` keys per script call; more than one
        call go in one pipelined round trip."""
        calls: list[tuple[list[str], list[Any]]] = []
        for start in range(0, len(made_keys), GET_CHUNK):
            chunk = made_keys[start : start + GET_CHUNK]
            calls.append((chunk + [companion(made, LEASE) for made in chunk], []))
        if len(calls) == 1:
            keys, args = calls[0]
            return list(scripts.run(client, "get", keys=keys, args=args))
        runs = scripts.run_many(client, "get", calls)
        return [one for part in runs for one in part]


def merged(
    by_made_key: dict[CacheKey, Any], found: dict[Any, Any], served: dict[Any, Any]
) -> dict[Any, Any]:
    """A get_many's lean hits and full-path answers, in the order asked, as
    one read would have answered."""
    if not served:
        return found
    both = found | served
    return {key: both[key] for key in by_made_key.values() if key in both}
