"""django-redis's Sentinel connection factory: the primary found sooner, and
again after every reconnect.

django-redis's ``SentinelConnectionFactory`` builds redis-py's ``Sentinel``,
which keeps naming the old primary until a failover has completed (see
``store/failover.py``). ApeeCache puts this factory in its place (``conf.py``
does, when OPTIONS name django-redis's), so that connections go to a promoted
replica as soon as the sentinels have promoted it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from django_redis.pool import SentinelConnectionFactory as DjangoRedisFactory

from django_apee.store.failover import (
    PrimarySentinel,
    SentinelPrimaryConnection,
    SentinelPrimarySSLConnection,
)

#: The factory OPTIONS name; replaced by ``SentinelConnectionFactory`` below.
DJANGO_REDIS_FACTORY = "django_redis.pool.SentinelConnectionFactory"
FACTORY = "django_apee.sentinel.SentinelConnectionFactory"


class SentinelConnectionFactory(DjangoRedisFactory):  # type: ignore[misc]
    """django-redis's factory, asking the sentinels through ``PrimarySentinel``,
    with connections that ask them again on every reconnect."""

    def __init__(self, options: dict[str, Any]) -> None:
        super().__init__(options)
        # As django-redis builds its Sentinel, with our subclass.
        connection_kwargs = self.make_connection_params("")
        connection_kwargs.pop("url")
        connection_kwargs.update(self.pool_cls_kwargs)
        self._sentinel = PrimarySentinel(  # type: ignore[no-untyped-call]
            options["SENTINELS"],
            sentinel_kwargs=options.get("SENTINEL_KWARGS"),
            **connection_kwargs,
        )

    def get_connection_pool(self, params: dict[str, Any]) -> Any:
        # A connection_class in CONNECTION_POOL_KWARGS still wins (django-redis
        # applies those after these params).
        tls = urlparse(params["url"]).scheme == "rediss"
        chosen = SentinelPrimarySSLConnection if tls else SentinelPrimaryConnection
        return super().get_connection_pool({**params, "connection_class": chosen})
