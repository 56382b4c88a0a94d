"""A circuit breaker for Redis, so an outage costs one timeout, not one per request.

Pure: the clock is injected. After ``threshold`` consecutive failures the
breaker opens: callers skip Redis (and compute locally) for ``cooldown``
seconds. Then one caller is let through as a probe (half-open): success
closes the breaker, failure opens it again for twice as long, up to
``max_cooldown``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class CircuitBreaker:
    def __init__(
        self,
        *,
        threshold: int = 3,
        cooldown: float = 1.0,
        max_cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1 or cooldown <= 0 or max_cooldown < cooldown:
            raise ValueError("need threshold >= 1 and 0 < cooldown <= max_cooldown")
        self.threshold = threshold
        self.cooldown = cooldown
        self.max_cooldown = max_cooldown
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._open_until = 0.0
        self._current_cooldown = cooldown
        self._probing = False

    def allow(self) -> bool:
        """May this caller use Redis now? (At most one probe while half-open.)

        Closed, the answer is one read of an int (atomic under the GIL), no
        lock: every stampede-safe hit asks. A failure counted concurrently
        is as if it came just after this call.
        """
        if self._failures < self.threshold:
            return True
        with self._lock:
            if self._failures < self.threshold:
                return True
            if self._clock() < self._open_until or self._probing:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        """Close the breaker. Already clean (no failure counted), nothing to
        do, without the lock: only ``success`` sets ``_failures`` to 0, and
        it resets the probe and the cooldown with it."""
        if self._failures == 0:
            return
        with self._lock:
            self._failures = 0
            self._probing = False
            self._current_cooldown = self.cooldown

    def failure(self) -> None:
        with self._lock:
            self._failures += 1
            if self._failures < self.threshold:
                return
            if self._probing:
                self._current_cooldown = min(
                    self._current_cooldown * 2, self.max_cooldown
                )
            self._probing = False
            self._open_until = self._clock() + self._current_cooldown

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._failures >= self.threshold
