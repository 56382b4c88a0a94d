"""One site, two cache backends: the stampede-safe call where there is one.

On ``DEMO_CACHE=apee`` the cache is an ApeeCache and these helpers take
django-apee's stampede-safe path. On ``DEMO_CACHE=naive`` it is plain
django-redis, which has no such path, and they do what most sites do:
``cache.get_or_set`` (a get, and on a miss compute and store), so every
request that finds the entry missing computes it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from django.core.cache import cache

from django_apee import get_or_set_stampede_safe, stampede_safe

T = TypeVar("T")


def stampede_safe_available() -> bool:
    return hasattr(cache, "get_or_set_stampede_safe")


def cached(key: str, compute: Callable[[], T], timeout: float, soft: float) -> T:
    """``compute()``'s value under ``key``: computed once fleet-wide on apee."""
    if stampede_safe_available():
        value: T = get_or_set_stampede_safe(key, compute, timeout, soft_timeout=soft)
        return value
    return cache.get_or_set(key, compute, timeout)


def cached_function(
    timeout: float, soft: float
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """``@stampede_safe`` on apee; the same key with ``get_or_set`` on naive."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        safe = stampede_safe(timeout, soft_timeout=soft)(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            if stampede_safe_available():
                return safe(*args, **kwargs)
            key = safe.cache_key(*args, **kwargs)
            return cache.get_or_set(key, lambda: fn(*args, **kwargs), timeout)

        return wrapper

    return decorate
