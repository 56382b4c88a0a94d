"""What a Redis call can raise when Redis, not the caller, is at fault.

Callers catch exactly these to count a Redis error, fall back, or open the
circuit breaker; anything else is a bug and propagates.
"""

from __future__ import annotations

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, ResponseError, OSError)
