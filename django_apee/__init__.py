"""django-apee: a stampede-proof Redis cache backend for Django.

The backend is ``django_apee.cache.ApeeCache``; set it as ``BACKEND`` in
``CACHES`` where ``django_redis.cache.RedisCache`` was. The helpers below take
the stampede-safe path on any ApeeCache alias.
"""

from __future__ import annotations

from django_apee.api import aget_or_set_stampede_safe, get_or_set_stampede_safe
from django_apee.decorators import stampede_safe

__version__ = "0.1.0.dev0"
__all__ = ["aget_or_set_stampede_safe", "get_or_set_stampede_safe", "stampede_safe"]
