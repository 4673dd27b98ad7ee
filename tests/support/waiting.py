"""Waiting, the one way tests wait: for a condition (bounded), or for time itself to pass.

A test never sleeps to let something happen: it waits until the thing it needs holds
(``wait_until``), or on the signal that says so (``SSEStream.subscribed`` for a stream's
subscription). When the passing of time IS the scenario (a client that stays silent, a
publisher's pace, history that must age), the test says so with ``let_time_pass``.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

T = TypeVar("T")


class WaitTimeout(AssertionError, TimeoutError):
    """A bounded wait ran out: a failed assertion to pytest, and a ``TimeoutError`` to a caller
    that handles the timeout itself."""


POLL = 0.05
"""How often a condition is checked again: short enough to react quickly, long enough that
a test polling a process over HTTP does not load it."""


def wait_until(
    condition: Callable[[], T], what: str, timeout: float = 10.0, step: float = POLL
) -> T:
    """Check ``condition`` every ``step`` seconds until it returns something truthy, and
    return that; ``WaitTimeout`` naming ``what`` if it does not within ``timeout``.
    Exceptions from ``condition`` propagate (a condition that may fail transiently catches
    them itself)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(step)


@overload
async def wait_until_async(
    condition: Callable[[], Awaitable[T]], what: str, timeout: float = ..., step: float = ...
) -> T: ...


@overload
async def wait_until_async(
    condition: Callable[[], T], what: str, timeout: float = ..., step: float = ...
) -> T: ...


async def wait_until_async(
    condition: Callable[[], Any],
    what: str,
    timeout: float = 10.0,
    step: float = POLL,
) -> Any:
    """``wait_until`` inside an event loop: the loop keeps running while it waits, and
    ``condition`` may be a coroutine function (or return an awaitable, such as
    ``asyncio.to_thread(check)`` for a check that blocks)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise WaitTimeout(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(step)


def elapsed_until(condition: Callable[[], object], what: str, timeout: float = 10.0) -> float:
    """Seconds until ``condition`` held (``wait_until``), for tests that bound how long a
    reaction took."""
    started = time.monotonic()
    wait_until(condition, what, timeout)
    return time.monotonic() - started


def let_time_pass(seconds: float, why: str) -> None:
    """Let ``seconds`` pass because the scenario is about time (``why`` says how): nothing is
    being waited for, so there is no signal to wait on instead."""
    assert why, "say why time must pass"
    time.sleep(seconds)


async def let_time_pass_async(seconds: float, why: str) -> None:
    """``let_time_pass`` inside an event loop."""
    assert why, "say why time must pass"
    await asyncio.sleep(seconds)
