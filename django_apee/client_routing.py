"""Which server a django-redis call goes to: the primary, unless opted out.

django-redis sends every read (``get_client(write=False)``) to a replica
when LOCATION lists several servers (``DefaultClient``) or under
``SentinelClient``. For ApeeCache that is wrong by default: a replica lags
its primary, so a reader would miss a value just written, take a lease for
an entry already recomputed, or see a lease already released. So:

* leases, herd claims, fenced writes, wake-ups and every stampede-safe read
  always use the primary (``write=True``: the engine asks for nothing else);
* plain reads (``get``, ``get_many``, ``ttl``, ``has_key``) go to the
  primary too, unless ``REPLICA_READS`` is set: then django-redis picks a
  replica for them as it always did, and they may be stale by the
  replication lag (herd mode still takes its leases on the primary).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from django_apee.cache import ApeeCache


class RoutingMixin:
    """Put in front of django-redis's ``DefaultClient`` (or a subclass)."""

    _backend: ApeeCache

    def get_next_client_index(
        self, write: bool = True, tried: list[int] | None = None
    ) -> int:
        """django-redis's choice of server, with replica reads opt-in."""
        primary_only = write or not self._backend.options.replica_reads
        index: int = super().get_next_client_index(  # type: ignore[misc]
            write=primary_only, tried=tried
        )
        return index
