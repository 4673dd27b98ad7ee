"""``job()`` through a gateway (issue 11: the publisher helpers work on both transports).

The same sequences as over Redis (tests/publisher/test_job.py), published with
``Publisher.from_url("http://...")`` and ``AsyncPublisher`` to a node on the embedded engine,
and read back with the Python subscriber as a service would."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from publisher import AsyncPublisher, Publisher
from publisher.subscriber import Event, subscribe
from tests.conftest import GatewayFactory
from tests.publisher.test_job import FakeClock, progress_of
from tests.publisher.test_subscriber import take


def check(events: list[Event], name: str, job_id: str) -> list[dict[str, Any]]:
    data: list[dict[str, Any]] = [e.value for e in events]
    for value in data:
        assert (value["job"], value["jobId"]) == (name, job_id), value
        assert isinstance(value["epochMs"], int), value
    return data


def test_jobs_through_a_gateway_send_the_same_sequences(gateway_factory: GatewayFactory) -> None:
    """Issue 11: a sync job that succeeds and an async job that raises, both over HTTP:
    started, throttled progress (the held-back report sent on exit), then completed, or
    failed with the error's type and message while the error propagates."""
    gateway = gateway_factory()
    clock = FakeClock()
    with (
        Publisher.from_url(gateway.url) as pub,
        pub.job("resize", topic="jobs:h1", job_id="h1", clock=clock) as job,
    ):
        assert job.progress(1, 4) is not None
        clock.now += 0.05
        assert job.progress(2, 4) is None  # held back by the rate (5 a second)

    async def failing() -> None:
        async with (
            AsyncPublisher.from_url(gateway.url) as apub,
            apub.job("render", topic="jobs:h2", job_id="h2", clock=clock) as job,
        ):
            assert await job.progress(1, 2) is not None
            raise RuntimeError("gpu lost")

    with pytest.raises(RuntimeError, match="gpu lost"):
        asyncio.run(failing())

    with subscribe(gateway.url, "jobs:h1", since=0) as sub:
        ok = take(sub, 4)
    assert [e.type for e in ok] == ["started", "progress", "progress", "completed"]
    data = check(ok, "resize", "h1")
    assert [progress_of(d) for d in data[1:]] == [(1, 4, 25.0), (2, 4, 50.0), (2, 4, 50.0)]

    with subscribe(gateway.url, "jobs:h2", since=0) as sub:
        failed = take(sub, 3)
    assert [e.type for e in failed] == ["started", "progress", "failed"]
    data = check(failed, "render", "h2")
    assert data[2]["error"] == {"type": "RuntimeError", "message": "gpu lost"}
    assert progress_of(data[2]) == (1, 2, 50.0)
