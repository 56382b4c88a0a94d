"""The module-level helpers: the stampede-safe path on any ApeeCache alias."""

from __future__ import annotations

from typing import Any

from django.core.cache import caches
from django.core.cache.backends.base import DEFAULT_TIMEOUT


def _method(cache: str, name: str) -> Any:
    """``caches[cache].<name>``, refused for a backend that is not ApeeCache."""
    backend = caches[cache]
    method = getattr(backend, name, None)
    if method is None:
        raise TypeError(
            f"CACHES[{cache!r}] is {type(backend).__name__}, not "
            "django_apee.cache.ApeeCache."
        )
    return method


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
    return _method(cache, "get_or_set_stampede_safe")(
        key,
        default,
        timeout,
        soft_timeout=soft_timeout,
        stale_if_error=stale_if_error,
        version=version,
    )


async def aget_or_set_stampede_safe(
    key: Any,
    default: Any,
    timeout: float | None = DEFAULT_TIMEOUT,
    *,
    soft_timeout: float | None = None,
    stale_if_error: float | None = None,
    version: int | None = None,
    cache: str = "default",
) -> Any:
    """``await caches[cache].aget_or_set_stampede_safe(...)``: on the event
    loop, ``default`` may be an ``async def`` function."""
    return await _method(cache, "aget_or_set_stampede_safe")(
        key,
        default,
        timeout,
        soft_timeout=soft_timeout,
        stale_if_error=stale_if_error,
        version=version,
    )
