"""Graceful drain: on SIGTERM (or SIGINT) a node stops taking streams at once, ends the open
ones spread over ``--drain-seconds`` (each told a jittered ``retry:`` so their reconnects do not
land on the other nodes together), keeps delivering to those still open, and exits within the
window plus a margin. Every client resumes on another node with nothing lost."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from publisher import Publisher
from tests.conftest import GatewayFactory
from tests.support.gateway import GatewayProcess
from tests.support.sse import SSEStream
from tests.support.tokens import assert_error
from tests.support.waiting import wait_until_async

DRAIN = 3.0
STREAMS = 20
RETRY_MS = 3000
RETRY_AT_END = re.compile(rb"retry: (\d+)\n\n\Z")
TOPIC = "room"
CLEAN_EXIT = (0, -signal.SIGTERM)
"""uvicorn re-raises the signal it stopped on once shut down, so supervisors see it."""


class TimedStream(SSEStream):
    """An SSE stream that also keeps the raw bytes, when it closed, and what it received
    before closing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.raw = b""
        self.closed_at = 0.0

    async def read(self, client: httpx.AsyncClient) -> None:
        async with client.stream("GET", self.url, headers=self.headers) as response:
            self.status = response.status_code
            self._changed.set()
            async for chunk in response.aiter_raw():
                self.raw += chunk
                self.events.extend(self.parser.feed(chunk))
                self._changed.set()
        self.closed_at = time.monotonic()
        self.closed_by_server = True
        self._changed.set()

    def ids(self) -> list[str]:
        return [e.id for e in self.events]


def node_args(prefix: str, *extra: str) -> list[str]:
    return [
        "--prefix", prefix, "--drain-seconds", str(DRAIN), "--retry-ms", str(RETRY_MS),
        "--connect-rate", "0", "--max-connections-per-subject", "0", *extra,
    ]  # fmt: skip


class Publishing:
    """A thread publishing to the topic (~100/s) until stopped; ``ids`` in publish order."""

    def __init__(self, redis_url: str, prefix: str) -> None:
        self.publisher = Publisher.from_url(redis_url, prefix=prefix)
        self.ids: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.ids.append(self.publisher.publish(TOPIC, f"e{len(self.ids)}"))
            time.sleep(0.01)  # the publisher's pace: about 100 events a second

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()

    def publish(self, data: str) -> str:
        event_id = self.publisher.publish(TOPIC, data)
        self.ids.append(event_id)
        return event_id

    def close(self) -> None:
        self.stop()
        self.publisher.close()


@pytest.fixture
def publishing(redis_url: str, prefix: str) -> Iterator[Publishing]:
    scene = Publishing(redis_url, prefix)
    yield scene
    scene.close()


async def open_live_streams(
    http: httpx.AsyncClient, gateway: GatewayProcess, publishing: Publishing, count: int
) -> tuple[list[TimedStream], list[asyncio.Task[None]]]:
    """``count`` streams that hold every event after a known id, and are live."""
    start = publishing.publish("start")
    streams = [TimedStream(gateway.url, [TOPIC], last_event_id=start) for _ in range(count)]
    tasks = [asyncio.create_task(s.read(http)) for s in streams]
    ready = await asyncio.to_thread(publishing.publish, "ready")
    for stream in streams:
        await stream.wait_for(lambda s: ready in s.ids())
    return streams, tasks


async def wait_exit(gateway: GatewayProcess, timeout: float) -> int:
    assert gateway.process is not None
    try:
        return await asyncio.to_thread(gateway.process.wait, timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the gateway still runs {timeout}s after SIGTERM") from None


async def wait_not_ready(http: httpx.AsyncClient, gateway: GatewayProcess, since: float) -> float:
    """Poll ``/readyz`` until it is no longer 200; return how long after ``since`` that was."""

    async def no_longer_ready() -> httpx.Response | None:
        ready = await http.get(gateway.url + "/readyz")
        return ready if ready.status_code != 200 else None

    left = 2 - (time.monotonic() - since)
    try:
        ready = await wait_until_async(no_longer_ready, "/readyz to turn 503", left, step=0.02)
    except AssertionError:
        raise AssertionError("/readyz still 200 two seconds after the signal") from None
    assert ready is not None
    assert ready.status_code == 503, ready.text
    assert ready.json() == {"status": "draining"}
    return time.monotonic() - since


async def cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def test_sigterm_turns_readiness_and_new_streams_away_at_once(
    redis_url: str, prefix: str, gateway_factory: GatewayFactory, publishing: Publishing
) -> None:
    gateway = gateway_factory(*node_args(prefix), redis_url=redis_url)

    async def scenario() -> None:
        limits = httpx.Limits(max_connections=STREAMS + 10)
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None), limits=limits) as http:
            streams, tasks = await open_live_streams(http, gateway, publishing, STREAMS)
            try:
                sigterm = time.monotonic()
                gateway.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                assert await wait_not_ready(http, gateway, sigterm) < 0.5
                assert gateway.process.poll() is None  # type: ignore[union-attr]

                refused = await http.get(
                    gateway.url + "/events", params={"topic": TOPIC}, timeout=5
                )
                assert_error(refused, 503, "draining")
                assert gateway.process.poll() is None  # type: ignore[union-attr]
                assert not all(s.closed_by_server for s in streams)

                code = await wait_exit(gateway, DRAIN + 3)
                assert time.monotonic() - sigterm < DRAIN + 3
                assert code in CLEAN_EXIT, gateway.output()
            finally:
                await cancel(tasks)

    asyncio.run(scenario())
    assert "Traceback" not in gateway.output()


def test_open_streams_are_closed_spread_over_the_window_each_with_a_jittered_retry(
    redis_url: str, prefix: str, gateway_factory: GatewayFactory, publishing: Publishing
) -> None:
    gateway = gateway_factory(*node_args(prefix), redis_url=redis_url)

    async def scenario() -> tuple[float, list[TimedStream], float]:
        limits = httpx.Limits(max_connections=STREAMS + 10)
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None), limits=limits) as http:
            streams, tasks = await open_live_streams(http, gateway, publishing, STREAMS)
            try:
                sigterm = time.monotonic()
                gateway.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                for stream in streams:
                    await stream.wait_for(lambda s: s.closed_by_server, timeout=DRAIN + 3)
                await wait_exit(gateway, DRAIN + 3)
                exited = time.monotonic() - sigterm
            finally:
                await cancel(tasks)
        return sigterm, streams, exited

    sigterm, streams, exited = asyncio.run(scenario())
    closes = sorted(s.closed_at - sigterm for s in streams)
    assert closes[-1] <= DRAIN + 0.5, f"streams closed after the window: {closes}"
    # Spread over the window, not all at once: the last goes well after the first.
    assert closes[-1] - closes[0] >= DRAIN / 2, f"closes (s after SIGTERM): {closes}"
    hints = []
    for stream in streams:
        farewell = RETRY_AT_END.search(stream.raw)
        assert farewell, f"no retry: line before the close: {stream.raw[-80:]!r}"
        hints.append(int(farewell.group(1)))
    assert all(RETRY_MS // 2 <= hint <= RETRY_MS * 3 // 2 for hint in hints), hints
    assert len(set(hints)) > STREAMS // 2, f"retry hints are not jittered: {hints}"
    assert exited < DRAIN + 3


def test_streams_get_events_during_the_drain_and_resume_on_another_node_missing_nothing(
    redis_url: str, prefix: str, gateway_factory: GatewayFactory, publishing: Publishing
) -> None:
    leaving = gateway_factory(*node_args(prefix), redis_url=redis_url)
    staying = gateway_factory(*node_args(prefix), redis_url=redis_url)

    async def scenario() -> tuple[list[TimedStream], list[TimedStream], int]:
        limits = httpx.Limits(max_connections=2 * STREAMS + 10)
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None), limits=limits) as http:
            streams, tasks = await open_live_streams(http, leaving, publishing, STREAMS)
            resumed: list[TimedStream] = []
            try:
                publishing.start()
                await wait_until_async(lambda: len(publishing.ids) >= 20, "events flowing")
                published_before_sigterm = len(publishing.ids)
                leaving.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                for stream in streams:
                    await stream.wait_for(lambda s: s.closed_by_server, timeout=DRAIN + 3)
                    # A browser comes back after its retry delay, on whichever node answers.
                    resumed.append(
                        TimedStream(staying.url, [TOPIC], last_event_id=stream.parser.last_id)
                    )
                    tasks.append(asyncio.create_task(resumed[-1].read(http)))
                await wait_exit(leaving, DRAIN + 3)
                await asyncio.to_thread(publishing.stop)
                end = await asyncio.to_thread(publishing.publish, "end")
                for stream in resumed:
                    await stream.wait_for(lambda s: end in s.ids(), timeout=10)
            finally:
                await cancel(tasks)
        return streams, resumed, published_before_sigterm

    streams, resumed, before = asyncio.run(scenario())
    published = publishing.ids
    expected = published[1:]  # everything after the "start" id the streams opened with
    during_drain = set(published[before:])
    got_events_while_draining = [s for s in streams if during_drain & set(s.ids())]
    assert len(got_events_while_draining) > STREAMS // 2, (
        "events published during the drain did not reach the streams still open"
    )
    for first, second in zip(streams, resumed, strict=True):
        assert second.status == 200
        received = first.ids() + second.ids()
        assert received == expected, (
            f"{len(received)} received of {len(expected)}, "
            f"{len(received) - len(set(received))} duplicates, "
            f"missing {sorted(set(expected) - set(received))[:5]}"
        )
    assert "Traceback" not in leaving.output()


def test_with_no_open_streams_sigterm_exits_at_once(
    redis_url: str, prefix: str, gateway_factory: GatewayFactory
) -> None:
    gateway = gateway_factory(*node_args(prefix), redis_url=redis_url)
    assert gateway.process is not None

    sigterm = time.monotonic()
    gateway.process.send_signal(signal.SIGTERM)
    code = gateway.process.wait(DRAIN + 3)

    assert time.monotonic() - sigterm < 2.0
    assert code in CLEAN_EXIT, gateway.output()


def test_sigint_drains_like_sigterm(
    redis_url: str, prefix: str, gateway_factory: GatewayFactory, publishing: Publishing
) -> None:
    gateway = gateway_factory(*node_args(prefix), redis_url=redis_url)

    async def scenario() -> TimedStream:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as http:
            (stream,), tasks = await open_live_streams(http, gateway, publishing, 1)
            try:
                sigint = time.monotonic()
                gateway.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
                assert await wait_not_ready(http, gateway, sigint) < 0.5
                await stream.wait_for(lambda s: s.closed_by_server, timeout=DRAIN + 3)
                await wait_exit(gateway, DRAIN + 3)
            finally:
                await cancel(tasks)
        return stream

    stream = asyncio.run(scenario())
    assert RETRY_AT_END.search(stream.raw), stream.raw[-80:]
