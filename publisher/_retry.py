"""How long to wait between attempts of a publish."""

from __future__ import annotations

import random
import time
from collections.abc import Callable


class Backoff:
    """Capped exponential delays with jitter, until a deadline.

    ``clock`` (monotonic seconds) is a parameter so that the publish plan, and its tests, can
    decide when to give up without reading the real clock."""

    def __init__(self, retry_for: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.deadline = clock() + retry_for
        self.delay = 0.05

    def left(self) -> float:
        """Seconds until the deadline."""
        return max(0.0, self.deadline - self.clock())

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None when time is up."""
        left = self.deadline - self.clock()
        if left <= 0:
            return None
        delay = min(self.delay * (0.5 + random.random()), left)
        self.delay = min(self.delay * 2, 1.0)
        return delay
