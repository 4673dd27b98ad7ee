"""Issue 11: ``serve --demo`` (its simulated jobs, its page) and ``GET /``."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
from collections import defaultdict
from typing import Any

import httpx
import redis

from gateway.demo import JOBS_TOPIC, DemoPublisher
from gateway.engines.base import Frame
from gateway.engines.memory import MemoryEngine
from publisher.protocol import Keys
from publisher.sse import EventParser, ServerEvent
from tests.conftest import GatewayFactory, NodeFactory
from tests.support.sse import collect
from tests.support.waiting import let_time_pass, wait_until, wait_until_async

JOB_FIELDS = {"job", "jobId", "epochMs", "progress"}
ENDS = ("completed", "failed")


def check_job(events: list[tuple[str, dict[str, Any]]]) -> str:
    """One job's events, in order: started, progress 1..n, then completed (or failed at the
    step it reached); returns how it ended."""
    (first, start), *middle, (last, end) = events
    assert first == "started", events
    assert start["progress"] == {"current": 0, "total": start["progress"]["total"], "percent": 0}
    total = start["progress"]["total"]
    for step, (name, data) in enumerate(middle, 1):
        assert name == "progress", events
        assert data["progress"]["current"] == step
        assert data["progress"]["percent"] == round(100 * step / total, 1)
    for _, data in events:
        assert set(data) - {"error"} == JOB_FIELDS
        assert (data["job"], data["jobId"]) == (start["job"], start["jobId"])
        assert data["progress"]["total"] == total
    assert last in ("completed", "failed"), events
    if last == "completed":
        assert end["progress"] == {"current": total, "total": total, "percent": 100.0}
        assert len(middle) == total
    else:
        assert set(end["error"]) == {"type", "message"}
        assert end["progress"] == middle[-1][1]["progress"]  # the last one reported
    return last


def by_job(events: list[ServerEvent]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    jobs: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
    for ev in events:
        data = json.loads(ev.data)
        jobs[data["jobId"]].append((ev.event, data))
    return jobs


def test_demo_publisher_runs_jobs_that_complete_or_fail() -> None:
    """Each job is started, reports every step, and ends completed or failed (seeded)."""

    async def scenario() -> list[ServerEvent]:
        engine = MemoryEngine()
        frames: list[Frame] = []
        engine.set_listeners(lambda topic, frame: frames.append(frame), lambda topics: None)
        await engine.subscribe(JOBS_TOPIC)
        demo = DemoPublisher(engine, job_every=0.01, tick=0.001, rng=random.Random(7))
        demo.start()
        await wait_until_async(lambda: demo.count >= 16, "16 demo jobs", 20, step=0.01)
        await demo.stop()
        assert all(task.done() for task in demo._jobs)
        parser = EventParser()
        return [ev for frame in frames for ev in parser.feed(frame.data)]

    jobs = by_job(asyncio.run(scenario()))
    ended = [check_job(events) for events in jobs.values() if events[-1][0] in ENDS]
    assert len(ended) >= 12
    assert {"completed", "failed"} <= set(ended), ended
    assert len({job_id.split("-")[0] for job_id in jobs}) == 1  # one tag per process


def test_a_demo_node_streams_job_events_on_each_engine(node_factory: NodeFactory) -> None:
    node = node_factory("--demo")

    def one_job_ended(stream: Any) -> bool:
        jobs = by_job(stream.events)
        return any(e[0][0] == "started" and e[-1][0] in ENDS for e in jobs.values())

    stream = asyncio.run(collect(node.url, [JOBS_TOPIC], one_job_ended, timeout=30))
    finished = [e for e in by_job(stream.events).values() if e[0][0] == "started"]
    assert finished
    check_job(next(e for e in finished if e[-1][0] in ENDS))


def test_root_lists_the_endpoints_and_demo_is_off_without_the_flag(
    gateway_factory: GatewayFactory,
) -> None:
    gateway = gateway_factory()
    for accept in ("application/json", "text/html"):
        root = httpx.get(gateway.url + "/", headers={"accept": accept}, timeout=5)
        assert root.status_code == 200
        body = root.json()
        assert body["service"] == "sse-gateway"
        assert {"events", "publish", "healthz", "readyz", "metrics", "client"} <= set(
            body["endpoints"]
        )
        assert "--demo" in body["endpoints"]["demo"]
    page = httpx.get(gateway.url + "/demo", timeout=5)
    assert page.status_code == 404
    assert page.json()["error"] == "demo_disabled"
    assert "--demo" in page.json()["message"]


def test_root_sends_a_browser_to_the_demo_page(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory("--demo")
    browser = httpx.get(gateway.url + "/", headers={"accept": "text/html,*/*"}, timeout=5)
    assert (browser.status_code, browser.headers["location"]) == (302, "/demo")
    api = httpx.get(gateway.url + "/", timeout=5)
    assert api.json()["endpoints"]["demo"].startswith("GET /demo")
    page = httpx.get(gateway.url + "/demo", timeout=5)
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    policy = page.headers["content-security-policy"]
    assert "script-src 'self' 'sha256-" in policy
    assert "unsafe-inline" not in policy
    assert 'import { subscribe } from "/client.js";' in page.text
    assert "innerHTML" not in page.text  # events are shown as text, never markup


def test_demo_is_refused_with_token_keys() -> None:
    """The page reads and publishes without a token: --demo does not run with auth on."""
    command = [sys.executable, "-m", "gateway.cli", "serve", "--demo", "--port", "1"]
    result = subprocess.run(
        [*command, "--jwt-secret", "s" * 32], capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0
    assert "--demo is for development" in result.stderr


def test_the_demo_publisher_stops_when_the_node_drains(
    gateway_factory: GatewayFactory, redis_url: str, prefix: str, redis_client: redis.Redis
) -> None:
    gateway = gateway_factory(
        "--demo", "--prefix", prefix, "--drain-seconds", "4", redis_url=redis_url
    )
    stream_key = Keys(prefix).stream(JOBS_TOPIC)
    wait_until(lambda: redis_client.xlen(stream_key), "the demo to publish", 15)
    with (
        httpx.Client(timeout=httpx.Timeout(5, read=None)) as client,
        # an open stream keeps the node draining for a while
        client.stream("GET", gateway.url + "/events?topic=other"),
    ):
        assert gateway.process is not None
        gateway.process.send_signal(signal.SIGTERM)
        wait_until(lambda: client.get(gateway.url + "/readyz").status_code == 503, "draining")
        before = redis_client.xrevrange(stream_key, count=1)
        let_time_pass(1.0, "five progress ticks of a running job")
        assert gateway.process.poll() is None, "the node is still draining"
        assert redis_client.xrevrange(stream_key, count=1) == before
    gateway.process.wait(15)
