"""Events with ``seq``/``ts`` for sseload, published on an absolute schedule."""

import threading
import time
from typing import Any, Protocol

import orjson

MAX_BATCH = 200
BATCH_TICK_S = 0.002
"""Above 1/BATCH_TICK_S events/s the publisher wakes at most every tick and sends what is due
in one batch (one round trip), so the publisher is not the limit at high rates. ``ts`` is
stamped when an event is sent, so batching does not inflate measured latency."""


class Sender(Protocol):
    """``drain``: whether everything sent so far was accepted within ``timeout`` seconds."""

    def send(self, events: list[dict[str, Any]]) -> None: ...
    def drain(self, timeout: float) -> bool: ...
    def close(self) -> None: ...


def make_event(seq: int, payload: int) -> dict[str, Any]:
    """``{"seq", "ts", "pad"}`` whose JSON encoding is ``payload`` bytes (or just over, when
    ``payload`` is smaller than the bare fields)."""
    event: dict[str, Any] = {"seq": seq, "ts": time.time_ns(), "pad": ""}
    event["pad"] = "x" * max(0, payload - len(orjson.dumps(event)))
    return event


class PacedPublisher:
    """Publishes event ``i`` (seq ``i``, from 1) at ``start + (i - 1) / rate``; when behind,
    publishes what is due without sleeping. Runs in a thread of the bench process, outside
    the measured server."""

    def __init__(self, sender: Sender, rate: float, payload: int) -> None:
        self.sender = sender
        self.rate = rate
        self.payload = payload
        self.sent = 0
        self.errors = 0
        self.last_error = ""
        self.started = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="publisher", daemon=True)

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        tick = BATCH_TICK_S if self.rate * BATCH_TICK_S > 1 else 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            due = int((now - self.started) * self.rate) + 1
            if due > self.sent:
                count = min(due - self.sent, MAX_BATCH)
                batch = [make_event(self.sent + i + 1, self.payload) for i in range(count)]
                try:
                    self.sender.send(batch)
                except Exception as exc:  # keep pacing; the run reports the shortfall
                    self.errors += 1
                    self.last_error = f"{type(exc).__name__}: {exc}"
                    self._stop.wait(0.1)
                    continue
                self.sent += count
                continue
            next_at = self.started + self.sent / self.rate
            self._stop.wait(max(0.0, next_at - now) + tick)
