"""django-apee: a stampede-proof Redis cache backend for Django.

The backend is ``django_apee.cache.ApeeCache``; set it as ``BACKEND`` in
``CACHES`` where ``django_redis.cache.RedisCache`` was. The helpers below take
the stampede-safe path on any ApeeCache alias.
"""

from __future__ import annotations

from typing import Any

from django.core.cache.backends.base import DEFAULT_TIMEOUT

from django_apee.decorators import stampede_safe

__version__ = "0.1.0.dev0"
__all__ = ["get_or_set_stampede_safe", "stampede_safe"]


def get_or_set_stampede_safe(
    key: Any,
    default: Any,
    timeout: float | None = DEFAULT_TIMEOUT,
    *,
    soft_timeout: float | None = None,
    stale_if_error: float | None = None,
    version: int | None = None,
    cache: str = "default",
) -> Any:
    """``caches[cache].get_or_set_stampede_safe(...)``; see ApeeCache's method."""
    from django.core.cache import caches

    backend = caches[cache]
    method = getattr(backend, "get_or_set_stampede_safe", None)
    if method is None:
        raise TypeError(
            f"CACHES[{cache!r}] is {type(backend).__name__}, not "
            "django_apee.cache.ApeeCache."
        )
    return method(
        key,
        default,
        timeout,
        soft_timeout=soft_timeout,
        stale_if_error=stale_if_error,
        version=version,
    )
