"""django-apee: a stampede-proof Redis cache backend for Django.

The backend is ``django_apee.cache.ApeeCache``; set it as ``BACKEND`` in
``CACHES`` where ``django_redis.cache.RedisCache`` was.
"""

__version__ = "0.1.0.dev0"
