"""Log lines that cannot flood: one per topic per interval.

A corrupt hot key is read thousands of times a second; one line a minute
(with how many were suppressed) tells the operator without drowning them.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any


class RateLimitedLog:
    """Log a message at most once per ``per_seconds`` for each topic.

    A corrupt hot key is read thousands of times a second; one line a minute
    (with how many were suppressed) tells the operator without drowning them.
    """

    def __init__(self, logger: logging.Logger, per_seconds: float) -> None:
        self.logger = logger
        self.per_seconds = per_seconds
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warning(self, topic: str, message: str, *args: Any) -> bool:
        """Log unless ``topic`` was logged recently; return whether it logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(topic)
            if last is not None and now - last < self.per_seconds:
                self._suppressed[topic] = self._suppressed.get(topic, 0) + 1
                return False
            self._last[topic] = now
            suppressed = self._suppressed.pop(topic, 0)
        if suppressed:
            message += " (%d similar suppressed)"
            args = (*args, suppressed)
        self.logger.warning(message, *args)
        return True
