"""``job()``: job progress as events, sync and asyncio (issue 11, acceptance 4).

The events are read back from the topic's Redis stream, as the gateway would replay them. The
progress rate is paced by an injected clock, so the throttling is observed without timing.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from publisher import AsyncPublisher, Publisher
from publisher.protocol import Keys
from tests.support.redis_server import stream_entries


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def pub(redis_url: str, prefix: str) -> Iterator[Publisher]:
    with Publisher.from_url(redis_url, prefix=prefix) as publisher:
        yield publisher


def events_of(client: redis.Redis, prefix: str, topic: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of every event stored for ``topic``, in order."""
    events = []
    for _, fields in stream_entries(client, Keys(prefix).stream(topic)):
        lines = fields[b"f"].decode().splitlines()
        name = lines[0].removeprefix("event: ")
        data = orjson.loads("\n".join(line.removeprefix("data: ") for line in lines[1:] if line))
        events.append((name, data))
    return events


def check_common(events: list[tuple[str, dict[str, Any]]], name: str, job_id: str) -> None:
    for _, data in events:
        assert data["job"] == name
        assert data["jobId"] == job_id
        assert isinstance(data["epochMs"], int)
        assert abs(data["epochMs"] - time.time() * 1000) < 60_000


def progress_of(data: dict[str, Any]) -> tuple[Any, Any, Any]:
    p = data["progress"]
    return p["current"], p["total"], p["percent"]


def run_successful_sync_job(pub: Publisher, topic: str, clock: FakeClock) -> list[str | None]:
    sent: list[str | None] = []
    with pub.job("resize", topic=topic, job_id="job-1", progress_rate=5, clock=clock) as job:
        assert job.id == "job-1"
        sent.append(job.progress(1, 10))  # the first: sent
        clock.now += 0.1
        sent.append(job.progress(2, 10))  # 0.1 s later: held back
        clock.now += 0.05
        sent.append(job.progress(3, 10))  # held back, replaces 2
        clock.now += 0.1
        sent.append(job.progress(4, 10))  # 0.25 s after 1: sent (3 is dropped)
        clock.now += 0.01
        sent.append(job.progress(5, 10, "half way"))  # held back: sent on exit
    return sent


def test_a_successful_job_sends_started_throttled_progress_and_completed(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    """Issue 11 acceptance 4 (sync): started, progress at most 5 a second (a report held back
    is replaced by a later one, and the last one is sent on exit), then completed with the
    last progress."""
    clock = FakeClock()
    sent = run_successful_sync_job(pub, "jobs:1", clock)
    assert [s is not None for s in sent] == [True, False, False, True, False]

    events = events_of(redis_client, prefix, "jobs:1")
    assert [name for name, _ in events] == [
        "started", "progress", "progress", "progress", "completed",
    ]  # fmt: skip
    check_common(events, "resize", "job-1")
    assert "progress" not in events[0][1]
    assert [progress_of(d) for _, d in events[1:4]] == [(1, 10, 10.0), (4, 10, 40.0), (5, 10, 50.0)]
    assert "message" not in events[1][1]
    assert events[3][1]["message"] == "half way"
    assert progress_of(events[4][1]) == (5, 10, 50.0)
    assert "error" not in events[4][1]


def test_a_job_that_raises_sends_failed_and_the_error_propagates(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    """Issue 11 acceptance 4 (sync): an exception sends the progress held back, then
    ``failed`` with the error's type and message, and is raised on unchanged."""
    clock = FakeClock()
    ids: list[str] = []

    def work() -> None:
        topic = ["jobs:2", "user:alice"]
        with pub.job("import", topic=topic, progress_rate=5, clock=clock) as job:
            ids.append(job.id)
            job.progress(1, 4)
            clock.now += 0.01
            job.progress(2, 4, "reading")
            raise KeyError("missing-input")

    with pytest.raises(KeyError, match="missing-input"):
        work()

    events = events_of(redis_client, prefix, "jobs:2")
    assert events == events_of(redis_client, prefix, "user:alice")
    assert [name for name, _ in events] == ["started", "progress", "progress", "failed"]
    assert re.fullmatch(r"[0-9a-f]{32}", ids[0])
    check_common(events, "import", ids[0])
    assert progress_of(events[2][1]) == (2, 4, 50.0)
    failed = events[3][1]
    assert failed["error"] == {"type": "KeyError", "message": "'missing-input'"}
    assert progress_of(failed) == (2, 4, 50.0)


def test_one_hundred_percent_is_sent_at_once_and_a_rate_of_zero_sends_all(
    pub: Publisher, redis_client: redis.Redis, prefix: str
) -> None:
    """Issue 11 acceptance 4: a report of 100 % is never held back; progress_rate=0 sends
    every report; a job without progress completes without a ``progress`` field."""
    clock = FakeClock()
    with pub.job("a", topic="jobs:3", clock=clock) as job:
        assert job.progress(0, 3) is not None
        assert job.progress(1, 3) is None
        assert job.progress(3, 3) is not None
    with pub.job("b", topic="jobs:4", progress_rate=0, clock=clock) as job:
        assert all(job.progress(n, 5) is not None for n in range(5))
    with pub.job("c", topic="jobs:5"):
        pass

    first = events_of(redis_client, prefix, "jobs:3")
    assert [n for n, _ in first] == ["started", "progress", "progress", "completed"]
    assert progress_of(first[2][1]) == (3, 3, 100.0)
    assert [n for n, _ in events_of(redis_client, prefix, "jobs:4")].count("progress") == 5
    last = events_of(redis_client, prefix, "jobs:5")
    assert [n for n, _ in last] == ["started", "completed"]
    assert "progress" not in last[1][1]


def test_bad_progress_values_are_refused_locally(pub: Publisher) -> None:
    """Issue 11: progress needs finite numbers, 0 <= current and 0 < total."""
    with pub.job("x", topic="jobs:6") as job:
        for current, total in [(1, 0), (-1, 5), (float("nan"), 5), ("1", 5), (True, 5)]:
            with pytest.raises(ValueError, match=r"current|total|progress"):
                job.progress(current, total)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="name"):
        pub.job("", topic="jobs:6")


def test_async_jobs_send_the_same_sequences(
    redis_url: str, redis_client: redis.Redis, prefix: str
) -> None:
    """Issue 11 acceptance 4 (asyncio): ``async with apub.job(...)`` sends the same events,
    throttled the same way, for a job that succeeds and one that raises."""
    clock = FakeClock()
    job_id = uuid.uuid4().hex

    async def run() -> None:
        async with AsyncPublisher.from_url(redis_url, prefix=prefix) as apub:
            async with apub.job("render", topic="jobs:a1", job_id=job_id, clock=clock) as job:
                assert await job.progress(1, 10) is not None
                clock.now += 0.1
                assert await job.progress(2, 10) is None
                clock.now += 0.15
                assert await job.progress(3, 10) is not None
                clock.now += 0.01
                assert await job.progress(4, 10, "almost") is None
            with pytest.raises(RuntimeError, match="gpu lost"):
                await failing_job(apub)

    async def failing_job(apub: AsyncPublisher) -> None:
        async with apub.job("render", topic="jobs:a2", clock=clock) as failing:
            clock.now += 1
            await failing.progress(1, 2)
            clock.now += 0.01
            await failing.progress(1.5, 2)
            raise RuntimeError("gpu lost")

    asyncio.run(run())

    ok = events_of(redis_client, prefix, "jobs:a1")
    assert [n for n, _ in ok] == ["started", "progress", "progress", "progress", "completed"]
    check_common(ok, "render", job_id)
    assert [progress_of(d) for _, d in ok[1:]] == [
        (1, 10, 10.0), (3, 10, 30.0), (4, 10, 40.0), (4, 10, 40.0),
    ]  # fmt: skip
    assert ok[3][1]["message"] == "almost"

    failed = events_of(redis_client, prefix, "jobs:a2")
    assert [n for n, _ in failed] == ["started", "progress", "progress", "failed"]
    assert progress_of(failed[2][1]) == (1.5, 2, 75.0)
    assert failed[3][1]["error"] == {"type": "RuntimeError", "message": "gpu lost"}
