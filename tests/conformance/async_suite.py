"""Django's ``BaseCacheTests`` again, every read through ApeeCache's ``a*``
methods on real event loops.

Django's own async cache tests only cover DummyCache (``tests_async.py``),
so the contract the sync methods are held to is applied to the async ones:
the backend below answers ``get``, ``get_many``, ``set``, ``add``,
``set_many``, ``has_key``, ``get_or_set``, ``get_or_set_stampede_safe``,
``delete``, ``delete_many``, ``touch``, ``incr`` and ``decr`` by running
``aget``, ``aget_many``, ``aset``, ``adelete``... on a
fresh event loop each call (``async_to_sync``), so a value one writes is
read by the other, and every call also exercises the per-loop connections:
opened on the loop, closed when it ends. Collected like ``suite.py``.
"""

from __future__ import annotations

import unittest
from typing import Any

from asgiref.sync import async_to_sync
from cache.tests import BaseCacheTests, caches_setting_for_tests  # type: ignore[import-not-found]
from django.conf import settings
from django.test import TestCase, override_settings

from django_apee.cache import ApeeCache
from tests.conformance.suite import APEE, wait_for_tracking


class AsyncRoutedCache(ApeeCache):
    """ApeeCache whose reads, writes and deletes are its native async methods."""

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        assert self._native() is not None, "the async engine must be on"
        return async_to_sync(self.aget)(key, default, version)

    def get_many(self, keys: Any, version: int | None = None) -> Any:
        return async_to_sync(self.aget_many)(keys, version)

    def set(self, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        return async_to_sync(self.aset)(key, value, *args, **kwargs)

    def add(self, key: Any, value: Any, *args: Any, **kwargs: Any) -> Any:
        return async_to_sync(self.aadd)(key, value, *args, **kwargs)

    def set_many(self, data: Any, *args: Any, **kwargs: Any) -> list[Any]:
        failed: list[Any] = async_to_sync(self.aset_many)(data, *args, **kwargs)
        return failed

    def has_key(self, key: Any, version: int | None = None) -> Any:
        return async_to_sync(self.ahas_key)(key, version)

    def delete(self, key: Any, version: int | None = None) -> bool:
        return bool(async_to_sync(self.adelete)(key, version))

    def delete_many(self, keys: Any, version: int | None = None) -> None:
        async_to_sync(self.adelete_many)(keys, version)

    def incr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return async_to_sync(self.aincr)(key, delta, version)

    def decr(self, key: Any, delta: int = 1, version: int | None = None) -> Any:
        return async_to_sync(self.adecr)(key, delta, version)

    def touch(self, key: Any, *args: Any, **kwargs: Any) -> bool:
        return bool(async_to_sync(self.atouch)(key, *args, **kwargs))

    def get_or_set_stampede_safe(
        self, key: Any, default: Any, *args: Any, **kwargs: Any
    ) -> Any:
        return async_to_sync(self.aget_or_set_stampede_safe)(
            key, default, *args, **kwargs
        )


class AsyncNearRoutedCache(ApeeCache):
    """With a near cache, the natively async methods: ``aget`` and
    ``aget_or_set_stampede_safe`` (the rest run the sync ones in a thread:
    routing those here would call themselves)."""

    def get(self, key: Any, default: Any = None, version: int | None = None) -> Any:
        assert self._native_reads() is not None, "the async engine must be on"
        return async_to_sync(self.aget)(key, default, version)

    def get_or_set_stampede_safe(
        self, key: Any, default: Any, *args: Any, **kwargs: Any
    ) -> Any:
        return async_to_sync(self.aget_or_set_stampede_safe)(
            key, default, *args, **kwargs
        )


ROUTED = {**APEE, "BACKEND": f"{__name__}.AsyncRoutedCache"}
NEAR_ROUTED = {
    **APEE,
    "BACKEND": f"{__name__}.AsyncNearRoutedCache",
    "OPTIONS": {**APEE["OPTIONS"], "NEAR_CACHE": True},
}


@override_settings(
    CACHES=caches_setting_for_tests(base=ROUTED, exclude={"cull", "zero_cull"})
)
class ApeeAsyncConformanceTests(BaseCacheTests, TestCase):  # type: ignore[misc]
    """Every test Django applies to its cache backends, read asynchronously."""


@unittest.skipUnless(
    getattr(settings, "APEE_CONFORMANCE_NEAR", True),
    "no near cache on this deployment (ApeeClusterClient refuses it)",
)
@override_settings(
    CACHES=caches_setting_for_tests(
        base=NEAR_ROUTED,
        exclude={"cull", "zero_cull"},
    )
)
class ApeeAsyncNearCacheConformanceTests(ApeeAsyncConformanceTests):
    """With the near cache on: native async reads, from memory once filled."""

    def setUp(self) -> None:
        super().setUp()
        wait_for_tracking()
