"""Publishers at a steady rate in threads, each publish recorded with its id, topics and tag
(``PublisherThread``), for the delivery invariant to check against."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from publisher import Publisher, Retention
from publisher.protocol import id_key

# -- publishers -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Published:
    tag: str
    id: str
    key: int
    topics: tuple[str, ...]
    at: float = 0.0
    """``time.monotonic()`` when the publish returned."""


def topic_plan(topics: Sequence[str], pair_every: int = 4) -> Callable[[int], tuple[str, ...]]:
    """Event ``seq`` goes to one topic, and every ``pair_every``th to two at once."""

    def plan(seq: int) -> tuple[str, ...]:
        first = topics[seq % len(topics)]
        if pair_every and seq % pair_every == 0 and len(topics) > 1:
            return first, topics[(seq + 1) % len(topics)]
        return (first,)

    return plan


class PublisherThread:
    """Publishes numbered events (``{"tag": ..., "pad": ...}``) at a steady rate (``batch`` at
    a time with ``publish_many``), directly to Redis; ``acked`` records every publish that
    returned an id, ``failed`` every one that raised (it may or may not have been stored)."""

    def __init__(
        self,
        url: str,
        prefix: str,
        topics: Sequence[str],
        rate: float,
        *,
        name: str = "p",
        retry_for: float | None = None,
        retention: Retention | None = None,
        payload_bytes: int = 0,
        pair_every: int = 4,
        batch: int = 1,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.plan = topic_plan(topics, pair_every)
        self.topics = tuple(topics)
        self.rate = rate
        self.name = name
        self.retry_for = retry_for
        self.retention = retention
        self.pad = "x" * payload_bytes
        self.batch = batch
        self.options = dict(options or {})
        self.acked: list[Published] = []
        self.failed: list[tuple[str, tuple[str, ...], str]] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"chaos-publisher-{name}")

    def open(self) -> Publisher:
        options = dict(self.options)
        if self.retry_for is not None:
            options["retry_for"] = self.retry_for
        return Publisher.from_url(self.url, prefix=self.prefix, retention=self.retention, **options)

    def start(self) -> PublisherThread:
        self._thread.start()
        self._opened.wait(30)
        if self._error is not None:
            self._thread.join(5)
            raise RuntimeError(f"publisher {self.name} did not start") from self._error
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise RuntimeError(f"publisher {self.name} is stuck in a publish")

    def _main(self) -> None:
        try:
            pub = self.open()
        except BaseException as exc:
            self._error = exc
            self._opened.set()
            return
        self._opened.set()
        interval = self.batch / self.rate
        next_at = time.monotonic()
        seq = 0
        try:
            while not self._stop.is_set():
                batch = []
                for _ in range(self.batch):
                    seq += 1
                    tag = f"{self.name}-{seq}"
                    batch.append((tag, self.plan(seq)))
                began = time.monotonic()
                try:
                    if self.batch == 1:
                        tag, topics = batch[0]
                        ids = [pub.publish(list(topics), {"tag": tag, "pad": self.pad})]
                    else:
                        ids = pub.publish_many(
                            [(list(topics), {"tag": tag, "pad": self.pad}) for tag, topics in batch]
                        )
                except Exception as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    self.failed.extend((tag, topics, error) for tag, topics in batch)
                else:
                    at = time.monotonic()
                    for (tag, topics), event_id in zip(batch, ids, strict=True):
                        self.acked.append(Published(tag, event_id, id_key(event_id), topics, at))
                self.slowest = max(self.slowest, time.monotonic() - began)
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    self._stop.wait(delay)
                elif delay < -1.0:
                    next_at = time.monotonic()  # after a stall, go on at the rate, no burst
        finally:
            pub.close()


@dataclasses.dataclass
class Publishes:
    """Publishes made by hand, for a :class:`Ledger` next to the publisher threads'."""

    acked: list[Published] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, tuple[str, ...], str]] = dataclasses.field(default_factory=list)
