"""What a Redis call can raise when Redis, not the caller, is at fault.

Callers catch exactly these to count a Redis error, fall back, or open the
circuit breaker; anything else is a bug and propagates.
"""

from __future__ import annotations

from redis.exceptions import ClusterError, RedisClusterException, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

#: On Redis Cluster also ``ClusterError`` (redirections that never end) and
#: ``RedisClusterException``: no startup node reachable, a slot no node
#: covers while the slot map is rebuilt. (It also covers client-side misuse
#: such as a multi-key command across slots, which ApeeClusterClient never
#: sends: keys whose companions cannot share their slot are refused first.)
REDIS_ERRORS = (
    RedisConnectionError,
    RedisTimeoutError,
    ResponseError,
    OSError,
    ClusterError,
    RedisClusterException,
)
