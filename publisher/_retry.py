"""How long to wait between attempts of a publish."""

from __future__ import annotations

import random
import time


class Backoff:
    """Capped exponential delays with jitter, until a deadline."""

    def __init__(self, retry_for: float) -> None:
        self.deadline = time.monotonic() + retry_for
        self.delay = 0.05

    def left(self) -> float:
        """Seconds until the deadline."""
        return max(0.0, self.deadline - time.monotonic())

    def next_delay(self) -> float | None:
        """Seconds to wait before the next attempt, or None when time is up."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            return None
        delay = min(self.delay * (0.5 + random.random()), left)
        self.delay = min(self.delay * 2, 1.0)
        return delay
