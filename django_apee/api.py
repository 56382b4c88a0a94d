"""The module-level helper: the stampede-safe path on any ApeeCache alias."""

from __future__ import annotations

from typing import Any

from django.core.cache import caches
from django.core.cache.backends.base import DEFAULT_TIMEOUT


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
