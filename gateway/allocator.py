"""Give memory back to the system after a wave of connections leaves.

Thousands of streams that close together free their objects, but the process keeps the memory:
reference cycles (a connection's protocol and its request cycle point at each other) wait for
the collector's oldest generation, which runs rarely, and glibc keeps freed heap pages in its
free lists. After a wave leaves (the open streams fell to half their peak or less, with at
least :data:`WAVE` gone), one collection and one ``malloc_trim(0)`` hand the pages back, once,
:data:`SETTLE` seconds after the last of them left.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import logging
import time
from collections.abc import Callable

log = logging.getLogger("gateway.allocator")

WAVE = 1000
"""Streams that must have left since the peak before memory is given back."""
SETTLE = 1.0
"""Seconds without another departure before giving back (a wave ends before it is trimmed)."""


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    return trim


def give_back() -> None:
    """Collect cyclic garbage, then return the heap's free pages to the system."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class Reclaimer:
    """Watches the number of open streams; gives memory back once after each wave leaves."""

    __slots__ = ("_peak", "_timer", "action", "settle", "wave")

    def __init__(
        self, wave: int = WAVE, settle: float = SETTLE, action: Callable[[], None] = give_back
    ) -> None:
        self.wave = wave
        self.settle = settle
        self.action = action
        self._peak = 0
        self._timer: asyncio.TimerHandle | None = None

    def opened(self, count: int) -> None:
        if count > self._peak:
            self._peak = count

    def left(self, count: int) -> None:
        """A stream left; ``count`` remain open."""
        if self._peak - count < self.wave or count * 2 > self._peak:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.settle, self._run, count)

    def _run(self, count: int) -> None:
        self._timer = None
        self._peak = count
        began = time.perf_counter()
        self.action()
        # It runs on the event loop: how long it held every other stream is worth knowing.
        log.debug(
            "memory given back after a wave of streams left (%d open) in %.1f ms",
            count, (time.perf_counter() - began) * 1000,
        )  # fmt: skip

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
