"""The near cache on django-redis's client: reads ask process memory first.

``NearClientMixin`` goes in front of the client class of an alias whose
OPTIONS turn ``NEAR_CACHE`` on (``near_client``); aliases without it keep
the plain class, so they pay nothing. What it changes:

- ``get`` and ``get_many`` answer from the alias's ``store.near.Near`` what
  it holds fresh, and read the rest from Redis as usual, reserving each key
  before the read is sent and filling it from the answer (see
  ``core/near.py`` for why in that order);
- those reads go to the primary, not a replica: a replica behind the
  primary could hand back a value older than an invalidation already
  handled, and it would stay near-cached;
- every write or delete of this process forgets its keys *after* it
  reached Redis, so a thread reads its own writes at once (other processes
  learn through tracking).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from django.core.cache.backends.base import (
    DEFAULT_TIMEOUT,
)

from django_apee.core import MISSING
from django_apee.core.wire import RAW_INT

if TYPE_CHECKING:
    from collections.abc import Iterable

    from redis import Redis

    from django_apee.cache import ApeeCache
    from django_apee.store.near import Near


#: Forks so far in this process's line: a child forgets what its parent's
#: clients remembered (its near cache is its own, ``core/process.py``).
_FORKS = [0]


def _forked() -> None:
    _FORKS[0] += 1


os.register_at_fork(after_in_child=_forked)


class NearClientMixin:
    """Near-cache reads and local invalidation for one ApeeCache client."""

    _backend: ApeeCache
    _near_held: tuple[int, Near]

    @property
    def _near(self) -> Near:
        """The alias's near cache, remembered by this client until a fork
        or until it is closed (its configuration dropped): finding the
        runtime is a fifth of a near hit."""
        held: tuple[int, Near] | None = getattr(self, "_near_held", None)
        if held is not None and held[0] == _FORKS[0] and not held[1].closed:
            return held[1]
        near = self._backend.runtime.near
        assert near is not None  # this class is used only with NEAR_CACHE on
        self._near_held = (_FORKS[0], near)
        return near

    # -- reads ------------------------------------------------------------------

    def get(
        self,
        key: Any,
        default: Any = None,
        version: int | None = None,
        client: Redis | None = None,
    ) -> Any:
        """A near hit costs a key, a dict lookup and one unpacking; a miss
        reads the primary (see the module)."""
        made = self._made_key(key, version)
        value = self._near.lookup(made)
        if value is not MISSING:
            return value
        if client is None:
            client = self.get_client(write=True)  # type: ignore[attr-defined]
        return super().get(key, default, version=version, client=client)  # type: ignore[misc]

    def get_many(
        self,
        keys: Iterable[Any],
        version: int | None = None,
        client: Redis | None = None,
    ) -> dict[Any, Any]:
        near = self._near
        found: dict[Any, Any] = {}
        rest: list[Any] = []
        for key in keys:
            value = near.lookup(self._made_key(key, version))
            if value is MISSING:
                rest.append(key)
            else:
                found[key] = value
        if rest:
            if client is None:
                client = self.get_client(write=True)  # type: ignore[attr-defined]
            found.update(super().get_many(rest, version=version, client=client))  # type: ignore[misc]
        return found

    def _made_key(self, key: Any, version: int | None) -> Any:
        """``make_key`` (which remembers str keys of the default version)."""
        return self.make_key(key, version=version)  # type: ignore[attr-defined]

    def _read_value(self, client: Redis, made: Any) -> Any:
        """``get``'s plain GET, reserved before it is sent and filled from
        its answer (freshness from the write time the envelope carries)."""
        return self._read_values(client, [made], single=True)[0]

    def _read_values(
        self, client: Redis, made_keys: list[Any], *, single: bool = False
    ) -> list[Any]:
        """``get_many``'s plain MGET, each key reserved before it is sent and
        filled from its answer.

        A raw int carries no write time: its PTTL, read after it (so the
        deadline it gives is early, never late), comes with it, one
        pipelined round trip for all of them, only when it is to be kept.
        """
        near = self._near
        tickets = [near.reserve(made) for made in made_keys]
        sent = time.monotonic()
        if single:
            raws = [super()._read_value(client, made_keys[0])]  # type: ignore[misc]
        else:
            raws = super()._read_values(client, made_keys)  # type: ignore[misc]
        ints = [
            i
            for i, raw in enumerate(raws)
            if tickets[i] is not None and raw and RAW_INT.fullmatch(raw)
        ]
        pttls: dict[int, int] = {}
        if ints:
            pipeline = client.pipeline(transaction=False)
            for i in ints:
                pipeline.pttl(made_keys[i])
            pttls = dict(zip(ints, pipeline.execute(), strict=True))
        for i, ticket in enumerate(tickets):
            if ticket is not None:
                near.fill(ticket, raws[i], sent, pttl_ms=pttls.get(i))
        return list(raws)

    def _read_rows(self, client: Redis, made_keys: list[Any]) -> list[Any]:
        """The Redis read of ``get_many``, with each key reserved before it is
        sent and filled from its answer."""
        near = self._near
        tickets = [near.reserve(made) for made in made_keys]
        sent = time.monotonic()
        flat: list[Any] = super()._read_rows(client, made_keys)  # type: ignore[misc]
        for i, ticket in enumerate(tickets):
            if ticket is not None:
                near.fill(ticket, flat[3 * i], sent, pttl_ms=int(flat[3 * i + 1]))
        return flat

    # -- writes: forget after Redis has them --------------------------------------

    def _forget(self, keys: Iterable[Any], version: int | None) -> None:
        self._near.wrote(
            [self.make_key(key, version=version) for key in keys]  # type: ignore[attr-defined]
        )

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
        try:
            stored: bool = super().set(  # type: ignore[misc]
                key, value, timeout, version=version, client=client, nx=nx, xx=xx
            )
        finally:
            self._forget([key], version)
        return stored

    def set_many(
        self,
        data: dict[Any, Any],
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        client: Redis | None = None,
    ) -> list[Any]:
        try:
            failed: list[Any] = super().set_many(  # type: ignore[misc]
                data, timeout, version=version, client=client
            )
        finally:
            self._forget(data, version)
        return failed

    def delete(
        self,
        key: Any,
        version: int | None = None,
        prefix: str | None = None,
        client: Redis | None = None,
    ) -> int:
        try:
            deleted: int = super().delete(  # type: ignore[misc]
                key, version=version, prefix=prefix, client=client
            )
        finally:
            made = self.make_key(key, version=version, prefix=prefix)  # type: ignore[attr-defined]
            self._near.wrote([made])
        return deleted

    def delete_many(
        self,
        keys: Iterable[Any],
        version: int | None = None,
        client: Redis | None = None,
    ) -> int:
        keys = list(keys)
        try:
            deleted: int = super().delete_many(keys, version=version, client=client)  # type: ignore[misc]
        finally:
            self._forget(keys, version)
        return deleted

    def touch(
        self,
        key: Any,
        timeout: float | None = DEFAULT_TIMEOUT,
        version: int | None = None,
        client: Redis | None = None,
    ) -> bool:
        try:
            touched: bool = super().touch(key, timeout, version=version, client=client)  # type: ignore[misc]
        finally:
            self._forget([key], version)
        return touched

    def _incr(
        self, key: Any, delta: int = 1, version: int | None = None, **kw: Any
    ) -> Any:
        try:
            return super()._incr(key, delta, version=version, **kw)  # type: ignore[misc]
        finally:
            self._forget([key], version)

    def incr_version(
        self, key: Any, delta: int = 1, version: int | None = None, **kw: Any
    ) -> int:
        try:
            new: int = super().incr_version(key, delta, version=version, **kw)  # type: ignore[misc]
        finally:
            self._forget([key], version)
        if new is not None:
            self._forget([key], new)
        return new

    def clear(self, client: Redis | None = None) -> None:
        try:
            super().clear(client=client)  # type: ignore[misc]
        finally:
            self._near.cleared()

    def delete_pattern(self, *args: Any, **kwargs: Any) -> int:
        """Keys matched by a pattern are not known here: everything goes."""
        try:
            deleted: int = super().delete_pattern(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._near.cleared()
        return deleted


_CLASSES: dict[type, type] = {}


def near_client(base: type) -> type:
    """``base`` (an ApeeClientMixin client class) with the near cache in
    front; one class per base, made once."""
    if issubclass(base, NearClientMixin):
        return base
    made = _CLASSES.get(base)
    if made is None:
        made = _CLASSES[base] = type(
            f"Near{base.__name__}", (NearClientMixin, base), {}
        )
    return made
