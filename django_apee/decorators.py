"""``@stampede_safe``: cache a function's result, computed once fleet-wide.

The key is built from the function's module and qualified name and its bound
arguments (so ``f(1, b=2)`` and ``f(1, 2)`` share an entry, defaults
included). Arguments must have a stable identity across processes:

* ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``Decimal``,
  ``UUID``, dates, times, timedeltas, enums, classes (by qualified name);
* tuples, lists, sets, frozensets and dicts of those (sets and dicts in a
  canonical order);
* Django model instances, by model label and primary key (so ``self`` of a
  model method works).

Anything else (an arbitrary object whose ``repr`` holds a memory address, a
request, a file) raises ``TypeError`` naming it: pass ``key=`` a callable
taking the same arguments and returning the cache key. Arguments are hashed
(SHA-256), so huge ones make a key of the same short length.
``wrapper.cache_key(*args, **kwargs)`` returns the key, for invalidation.
"""

from __future__ import annotations

import datetime
import enum
import functools
import hashlib
import inspect
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

from django.core.cache.backends.base import DEFAULT_TIMEOUT

from django_apee.api import aget_or_set_stampede_safe, get_or_set_stampede_safe

T = TypeVar("T")

_SCALARS = (
    type(None), bool, int, float, str, bytes, Decimal, uuid.UUID,
    datetime.date, datetime.time, datetime.timedelta,
)  # fmt: skip


def _canonical(value: Any) -> str:
    """A text that is equal for equal arguments in every process."""
    if isinstance(value, enum.Enum):
        return f"enum:{type(value).__module__}.{type(value).__qualname__}.{value.name}"
    if isinstance(value, _SCALARS):
        return f"{type(value).__name__}:{value!r}"
    if isinstance(value, type):
        return f"type:{value.__module__}.{value.__qualname__}"
    if isinstance(value, (tuple, list)):
        inner = ",".join(_canonical(item) for item in value)
        return f"{type(value).__name__}:[{inner}]"
    if isinstance(value, (set, frozenset)):
        inner = ",".join(sorted(_canonical(item) for item in value))
        return f"{type(value).__name__}:{{{inner}}}"
    if isinstance(value, dict):
        pairs = sorted(f"{_canonical(k)}={_canonical(v)}" for k, v in value.items())
        return "dict:{" + ",".join(pairs) + "}"
    meta = getattr(value, "_meta", None)
    if meta is not None and getattr(value, "pk", None) is not None:
        return f"model:{meta.label}:{_canonical(value.pk)}"
    raise TypeError(
        f"@stampede_safe cannot build a stable cache key from a "
        f"{type(value).__qualname__} argument; pass key=<callable> to the "
        "decorator to name the entry yourself."
    )


def function_key(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> str:
    """The default key of ``fn(*args, **kwargs)``."""
    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    text = ";".join(f"{name}={_canonical(v)}" for name, v in bound.arguments.items())
    digest = hashlib.sha256(text.encode()).hexdigest()[:32]
    return f"apee:fn:{fn.__module__}.{fn.__qualname__}:{digest}"


def stampede_safe(
    timeout: float | None = DEFAULT_TIMEOUT,
    *,
    soft_timeout: float | None = None,
    stale_if_error: float | None = None,
    key: Callable[..., Any] | None = None,
    version: int | None = None,
    cache: str = "default",
) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a function so its result is cached with ``get_or_set_stampede_safe``
    (``aget_or_set_stampede_safe`` for an ``async def`` function)."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        def cache_key(*args: Any, **kwargs: Any) -> Any:
            return key(*args, **kwargs) if key else function_key(fn, args, kwargs)

        options: dict[str, Any] = {
            "soft_timeout": soft_timeout,
            "stale_if_error": stale_if_error,
            "version": version,
            "cache": cache,
        }
        wrapper: Any
        if inspect.iscoroutinefunction(fn):
            # An ``async def`` function: awaited on the loop, once fleet-wide
            # (``functools.partial`` keeps it recognisably a coroutine function).

            @functools.wraps(fn)
            async def wrapper(*args: Any, **kwargs: Any) -> Any:
                return await aget_or_set_stampede_safe(
                    cache_key(*args, **kwargs),
                    functools.partial(fn, *args, **kwargs),
                    timeout,
                    **options,
                )

        else:

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> T:
                result: T = get_or_set_stampede_safe(
                    cache_key(*args, **kwargs),
                    lambda: fn(*args, **kwargs),
                    timeout,
                    **options,
                )
                return result

        wrapper.cache_key = cache_key
        return wrapper  # type: ignore[no-any-return]

    return decorate
