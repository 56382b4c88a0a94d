"""The pure core: freshness policy, the envelope, keys, breaker, single-flight.

Nothing here talks to Redis or knows Django; every decision takes its clock
and its randomness as arguments, so it is tested without a server. The two
names below are shared by every layer above.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["MISSING", "to_milliseconds"]

#: "No value here", where ``None`` is a value a cache may hold.
MISSING: Any = object()


def to_milliseconds(timeout: float) -> int:
    """Convert a positive timeout in seconds to whole milliseconds.

    A positive timeout shorter than a millisecond still stores the value for a
    millisecond: Django promises that only ``timeout <= 0`` expires at once.
    """
    return max(1, math.ceil(timeout * 1000))
