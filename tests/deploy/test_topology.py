"""The compose topology, run natively from the repo's files (tests/support/topology.py):
Debian's redis-server with deploy/redis.conf, the gateway nodes of docker-compose.yml with
their command and environment, Debian's nginx with deploy/nginx.conf in front, and Debian's
prometheus with deploy/prometheus.yml and deploy/alerts.yml scraping the nodes. Only host
names, ports and paths are substituted, plus Prometheus's scrape and evaluation interval
(1 s instead of the file's, so that scrapes and ``rate()`` windows fill within seconds).

Decisions:

- The idle stream. nginx's ``proxy_read_timeout`` restarts on every read from the upstream,
  and an idle gateway stream carries nothing but heartbeats, so the stream outlives the
  timeout exactly when heartbeats cross nginx more often than the timeout. Both files keep
  their own values (no timeout or heartbeat is substituted): the heartbeat the nodes read
  from compose must be below the read timeout of nginx's stream location, and an idle stream
  opened through nginx when the topology starts (other tests run meanwhile) is held, without
  a byte but heartbeats, past that read timeout (45 s in the repo's file; at most 60 s, a
  longer one would be held for two heartbeats), and must still be open, having never been
  silent much longer than one heartbeat interval.
- Alert rules are comparisons that are empty while the topology is healthy. Each rule's
  expression must run without error, and must return data either as written or, for a
  comparison, its left-hand side (the measured value the threshold applies to): so every
  metric a rule names exists with the labels it selects. Prometheus must also evaluate every
  rule itself without error (``/api/v1/rules``).
- Grafana's interval variables become ``1m``; a dashboard variable in a label matcher becomes
  ``.*`` (Grafana's "All").
- The slow consumer that the shed-rate alert measures is a raw socket that stops reading on a
  node directly: through nginx it would take nginx's buffers as well to fill, to the same end.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from publisher import Publisher, Retention
from tests.support.clients import (
    ClientPool,
    SSEClient,
    StalledClients,
    spread_topics,
    wait_connected,
)
from tests.support.invariants import Ledger, check_delivery, summary, wait_caught_up
from tests.support.publishing import PublisherThread
from tests.support.sse import SSEStream, collect, open_stream
from tests.support.topology import ROOT, ComposeNode, Topology
from tests.support.waiting import WaitTimeout, wait_until

pytestmark = pytest.mark.slow

DASHBOARD = ROOT / "deploy" / "grafana" / "sse-gateway.json"
ALERTS = ROOT / "deploy" / "alerts.yml"
PAGE_TOPICS = ["page0", "page1", "page2"]
IDLE_HOLD_CAP = 60.0
"""The longest the idle stream is held on purpose: past nginx's read timeout when that is
at most this (the repo's is), otherwise for two heartbeats (see the module's docstring)."""


class IdleStream:
    """A stream through nginx on a topic nobody publishes to, read by a thread that notes when
    each heartbeat arrives and whether the stream ended."""

    def __init__(self, port: int, topic: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        request = f"GET /events?topic={topic} HTTP/1.1\r\nHost: localhost\r\n"
        self.sock.sendall((request + "Accept: text/event-stream\r\n\r\n").encode())
        self.head = b""
        self.opened = 0.0
        self.heartbeats: list[float] = []
        self.ended: str | None = None
        self.preamble = threading.Event()
        self._thread = threading.Thread(target=self._read, name="topology-idle", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        self.sock.settimeout(None)
        try:
            while chunk := self.sock.recv(65536):
                now = time.monotonic()
                if not self.preamble.is_set():
                    self.head += chunk
                    if b": ok" in self.head:
                        self.opened = now
                        self.preamble.set()
                else:  # nothing else is published to the idle topic
                    self.heartbeats.append(now)
            self.ended = "closed by the server"
        except OSError as exc:
            self.ended = self.ended or f"{type(exc).__name__}: {exc}"
        finally:
            self.preamble.set()

    def close(self) -> None:
        self.ended = self.ended or "closed by the test"
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._thread.join(5)


@dataclass
class Stack:
    parts: Topology
    idle: IdleStream
    idle_node: str
    redis_url: str
    prefix: str
    heartbeat: float
    drain_seconds: float
    failed: list[str] = field(default_factory=list)

    @property
    def nodes(self) -> dict[str, ComposeNode]:
        return self.parts.nodes

    @property
    def nginx_url(self) -> str:
        assert self.parts.nginx is not None
        return self.parts.nginx.url

    def publisher(self, **options: Any) -> Publisher:
        return Publisher.from_url(self.redis_url, prefix=self.prefix, **options)


def _open_streams(node: ComposeNode) -> float:
    return node.metric("sse_connections ")


def _status(node: ComposeNode, path: str) -> int:
    return httpx.get(node.url + path, timeout=5).status_code


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    parts = Topology()
    failed_before = request.session.testsfailed
    try:
        parts.start()
        settings = {name: node.settings for name, node in parts.nodes.items()}
        first = next(iter(settings.values()))
        assert parts.nginx is not None
        idle = IdleStream(parts.nginx.port, "topology-idle")
        try:
            assert idle.preamble.wait(10)
            assert idle.opened, f"the idle stream did not open: {idle.head[:300]!r}"
            holders = wait_until(
                lambda: [n for n, node in parts.nodes.items() if _open_streams(node) >= 1],
                "the idle stream to show on one node",
                10,
            )
            assert len(holders) == 1, holders
            assert first.redis_url is not None, "the compose nodes run without Redis"
            yield Stack(
                parts, idle, holders[0], first.redis_url, first.prefix,
                first.heartbeat, first.drain_seconds,
            )  # fmt: skip
        finally:
            idle.close()
    finally:
        if request.session.testsfailed > failed_before:
            print(parts.logs())
        parts.close()


# -- Redis ------------------------------------------------------------------------------------


def test_redis_runs_deploy_conf_with_aof(stack: Stack) -> None:
    with contextlib.closing(stack.parts.redis.client()) as client:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("dir")["dir"] == str(stack.parts.redis.dir)
    for name, node in stack.nodes.items():
        assert node.settings.redis_url == stack.redis_url, name


# -- through nginx ----------------------------------------------------------------------------


def more_than(count: int) -> Callable[[SSEStream], bool]:
    return lambda stream: len(stream.events) > count


def test_first_event_arrives_through_nginx_unbuffered(stack: Stack) -> None:
    """Each event of a quiet stream reaches the client within 0.5 s of its publish: nginx
    holds nothing back (a buffering proxy would sit on them until its buffer filled)."""

    async def scenario() -> list[float]:
        with contextlib.closing(stack.publisher()) as pub:
            async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
                stream, task = open_stream(client, stack.nginx_url, ["first"])
                try:
                    await stream.wait_for(lambda s: s.status is not None)
                    assert stream.status == 200
                    await stream.until_subscribed()
                    delays = []
                    for i in range(5):
                        count = len(stream.events)
                        began = time.monotonic()
                        await asyncio.to_thread(pub.publish, "first", f"event-{i}")
                        await stream.wait_for(more_than(count), 5)
                        delays.append(time.monotonic() - began)
                        assert stream.events[-1].data == f"event-{i}"
                    return delays
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    delays = asyncio.run(scenario())
    print(f"publish -> receipt through nginx: {[round(d, 4) for d in delays]} s")
    assert max(delays) < 0.5, f"publish -> receipt through nginx took {delays}"


def test_last_event_id_resumes_on_every_node(stack: Stack) -> None:
    """A client that read part of a topic through nginx, then reconnects with its
    ``Last-Event-ID`` to each node in turn (so to a node other than the one that served it,
    whichever that was) and through nginx, gets exactly the events it missed, in order."""
    topic = "resume"

    async def scenario() -> None:
        with contextlib.closing(stack.publisher()) as pub:
            async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
                stream, task = open_stream(client, stack.nginx_url, [topic])
                try:
                    await stream.until_subscribed()
                    seen = [pub.publish(topic, f"seen-{i}") for i in range(3)]
                    await stream.wait_for(lambda s: bool(s.events) and s.events[-1].id == seen[-1])
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            missed = [pub.publish(topic, f"missed-{i}") for i in range(5)]
            bases = [node.url for node in stack.nodes.values()] + [stack.nginx_url] * 3
            for base in bases:
                resumed = await collect(
                    base, [topic], lambda s: len(s.events) >= len(missed), last_event_id=seen[-1]
                )
                assert resumed.status == 200, base
                got = [(e.id, e.data) for e in resumed.events]
                assert got == [(i, f"missed-{n}") for n, i in enumerate(missed)], base

    asyncio.run(scenario())


@dataclass
class Drain:
    victim: str
    on_victim: float
    exit_code: int | None
    took: float
    clients: list[SSEClient]
    ledger: Ledger


@pytest.fixture(scope="module")
def drained(stack: Stack) -> Drain:
    """Pages stream through nginx (browser-like clients that reconnect with Last-Event-ID)
    while events are published; one node, not the idle stream's, is sent SIGTERM, drains and
    exits, and is started again on its port, as compose's restart would."""
    victim = next(name for name in stack.nodes if name != stack.idle_node)
    assert stack.parts.nginx is not None
    pool = ClientPool()
    publisher: PublisherThread | None = None
    try:
        # These clients read a stream until EOF. A refusal (``event: refused``, from the
        # draining node) ends by its Content-Length instead, on a connection nginx keeps
        # open, which EventSource takes as the stream's end and retries after ``retry:``
        # (1.5 to 4.5 s). An idle timeout of 3 s, while every topic carries events many
        # times a second, stands in for that.
        topic_sets = spread_topics(PAGE_TOPICS, 12)
        clients = pool.spawn(stack.parts.nginx.port, topic_sets, "page", idle_timeout=3.0)
        wait_connected(clients)
        publisher = PublisherThread(stack.redis_url, stack.prefix, PAGE_TOPICS, rate=40)
        publisher.start()
        wait_until(lambda: all(c.received for c in clients), "every page to get events", 15)
        node = stack.nodes[victim]
        on_victim = _open_streams(node)
        began = time.monotonic()
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        # Draining: unready, and a stream asked of it directly is refused (503 ``draining``),
        # which the alert on refusals and the dashboard's refusals panel count.
        wait_until(lambda: _status(node, "/readyz") == 503, "the node to turn unready", 5)
        refused = httpx.get(node.url + "/events?topic=page0", timeout=5)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"] == "draining", refused.text
        code = node.stop(signal.SIGTERM, timeout=stack.drain_seconds + 10)
        took = time.monotonic() - began
        stack.parts.restart(victim)
        after = len(publisher.acked)
        wait_until(lambda: len(publisher.acked) >= after + 40, "publishes after the restart", 15)
        wait_connected(clients)
        publisher.stop()
        ledger = Ledger([publisher])
        wait_caught_up(clients, ledger, timeout=20)
        print(summary(clients, ledger))
        return Drain(victim, on_victim, code, took, clients, ledger)
    finally:
        if publisher is not None:
            publisher.stop()
        pool.close()


def test_node_sigterm_while_pages_stream_loses_nothing(stack: Stack, drained: Drain) -> None:
    assert drained.on_victim >= 1, f"no page streamed from {drained.victim} when it was stopped"
    # uvicorn re-raises the signal once it has shut down: -SIGTERM is a clean exit.
    assert drained.exit_code in (0, -signal.SIGTERM), drained.exit_code
    assert drained.took <= stack.drain_seconds + 3, f"drain took {drained.took:.1f}s"
    reconnects = sum(c.reconnects for c in drained.clients)
    assert reconnects >= drained.on_victim, f"{reconnects} reconnects"
    check_delivery(drained.clients, drained.ledger)


# -- Prometheus -------------------------------------------------------------------------------


def test_prometheus_sees_every_node_up(stack: Stack) -> None:
    prometheus = stack.parts.prometheus
    assert prometheus is not None
    assert len(stack.nodes) == 3, f"docker-compose.yml runs nodes {list(stack.nodes)}"
    expected = set(prometheus.targets)
    assert len(expected) == len(stack.nodes), (expected, list(stack.nodes))

    def all_up() -> bool:
        result = prometheus.query("up")
        up = {r["metric"]["instance"]: r["value"][1] for r in result}
        return all(up.get(target) == "1" for target in expected)

    wait_until(all_up, "up == 1 for every node", 20, 0.2)


def test_prometheus_saw_the_draining_node_unready(stack: Stack, drained: Drain) -> None:
    """What the not-ready alert and the refusals panel watch: the SIGTERMed node reported
    itself unready and counted its ``draining`` refusal before it exited."""
    prometheus = stack.parts.prometheus
    assert prometheus is not None
    instance = f'instance="127.0.0.1:{stack.parts.ports[drained.victim]}"'
    lowest = prometheus.query(f"min_over_time(sse_node_ready{{{instance}}}[5m])")
    assert [r["value"][1] for r in lowest] == ["0"], lowest
    refused = prometheus.query(f'sse_streams_refused_total{{{instance},reason="draining"}}[5m]')
    assert refused, "no draining refusal was scraped from the draining node"


GRAFANA_INTERVALS = re.compile(r"\$\{?__(?:rate_interval|interval|range)(?::\w+)?\}?")


def dashboard_queries(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """``(panel title, expr)`` for every target of every panel, rows' panels included, with
    Grafana's variables replaced (see the module's docstring)."""
    dashboard = json.loads(path.read_text())
    variables = [v["name"] for v in dashboard.get("templating", {}).get("list", [])]
    queries = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels") or [])
            for target in panel.get("targets") or []:
                if expr := target.get("expr"):
                    queries.append((str(panel.get("title")), grafana_expr(expr, variables)))

    walk(dashboard.get("panels") or [])
    return queries


def grafana_expr(expr: str, variables: list[str]) -> str:
    expr = GRAFANA_INTERVALS.sub("1m", expr)
    for name in variables:
        ref = rf"(?:\$\{{{name}(?::\w+)?\}}|\${name}\b|\[\[{name}\]\])"
        expr = re.sub(rf'(\w+)\s*=~?\s*"{ref}"', r'\1=~".*"', expr)
        expr = re.sub(ref, ".*", expr)
    return expr


def alert_expressions(path: Path = ALERTS) -> list[tuple[str, str]]:
    document = yaml.safe_load(path.read_text())
    return [
        (str(rule.get("alert") or rule.get("record")), str(rule["expr"]))
        for group in document["groups"]
        for rule in group["rules"]
    ]


def left_side(expr: str) -> str | None:
    """The left operand of a top-level comparison in ``expr`` (None when there is none)."""
    depth = 0
    quote = ""
    i = 0
    while i < len(expr):
        char = expr[i]
        if quote:
            if char == "\\":
                i += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and char in "<>=!":
            pair = expr[i : i + 2]
            if pair in ("==", "!=", ">=", "<=") or char in "<>":
                return expr[:i].strip()
        i += 1
    return None


@pytest.fixture(scope="module")
def scripted(stack: Stack, drained: Drain) -> None:
    """Traffic beyond the streams above, so every series the dashboard and rules name exists:
    a malformed stream request, a trimmed history (a ``reset``), a shed slow consumer, and
    publishes through ``POST /publish``, accepted and malformed."""
    bad = httpx.get(stack.nginx_url + "/events", timeout=5)
    assert bad.status_code == 400, bad.text

    with contextlib.closing(stack.publisher(retention=Retention(max_events=1))) as pub:
        ids = pub.publish_many([("trimmed", f"old-{i}") for i in range(300)])
    reset = asyncio.run(
        collect(
            stack.nginx_url, ["trimmed"], lambda s: any(e.event == "reset" for e in s.events),
            last_event_id=ids[0],
        )
    )  # fmt: skip
    assert any(e.event == "reset" for e in reset.events), reset.data()[:5]

    node = next(n for name, n in stack.nodes.items() if name != stack.idle_node)
    shed = ('sse_disconnects_total{reason="slow_consumer"}', 'sse_disconnects_total{reason="send')
    before = sum(node.metric(name) for name in shed)
    stalled = StalledClients()
    try:
        stalled.open(node.port, ["shed"], 1)
        big = "x" * 60_000
        with contextlib.closing(stack.publisher()) as pub:

            def shed_one() -> bool:
                pub.publish_many([("shed", big)] * 16)
                return sum(node.metric(name) for name in shed) > before

            wait_until(shed_one, "a stalled client to be shed", 30, 0.1)
    finally:
        stalled.close()

    accepted = httpx.post(node.url + "/publish", json={"topic": "p", "data": 1}, timeout=5)
    assert accepted.status_code == 200, accepted.text
    malformed = httpx.post(node.url + "/publish", content=b"{", timeout=5)
    assert malformed.status_code == 400, malformed.text


def test_every_dashboard_and_alert_query_returns_data(stack: Stack, scripted: None) -> None:
    prometheus = stack.parts.prometheus
    assert prometheus is not None
    queries = [(f"panel {t!r}", e, e) for t, e in dashboard_queries()]
    queries += [(f"alert {n!r}", e, left_side(e) or e) for n, e in alert_expressions()]
    assert queries, "no dashboard or alert expressions found"
    deadline = time.monotonic() + 30
    empty = []
    for what, expr, measured in queries:
        prometheus.query(expr)  # runs without error (a refused query raises with the reason)
        with contextlib.suppress(WaitTimeout):  # listed below if it never has data
            left = max(0.0, deadline - time.monotonic())
            wait_until(functools.partial(prometheus.query, measured), f"data: {what}", left, 0.2)
        if not prometheus.query(measured):
            empty.append(f"{what}: {measured}")
    print(f"{len(queries)} dashboard and alert queries ran, {len(queries) - len(empty)} with data")
    assert not empty, "queries without data after the scripted traffic:\n" + "\n".join(empty)


def test_prometheus_evaluates_every_alert_rule_without_error(stack: Stack) -> None:
    prometheus = stack.parts.prometheus
    assert prometheus is not None
    names = {name for name, _ in alert_expressions()}

    def evaluated() -> list[dict[str, Any]]:
        rules = prometheus.rules()
        done = len(rules) == len(names) and all(r.get("health") != "unknown" for r in rules)
        return rules if done else []

    rules = wait_until(evaluated, "every rule to be evaluated", 15, 0.2)
    broken = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert not broken, broken


def test_promtool_checks_config_and_rules(stack: Stack) -> None:
    prometheus = stack.parts.prometheus
    assert prometheus is not None
    # The repo's file as is (its rule file is found next to it, as in the container), the
    # file as run here, and the rules.
    checks = [
        ("check", "config", str(prometheus.source)),
        ("check", "config", str(prometheus.conf_path)),
        ("check", "rules", str(ALERTS)),
    ]
    for args in checks:
        result = prometheus.promtool(*args)
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


# -- the idle stream, open since the topology started ------------------------------------------


def _read_timeout(stack: Stack) -> float:
    """nginx's ``proxy_read_timeout`` for the stream location (the conf's default, 60 s, when
    it sets none), in seconds."""
    assert stack.parts.nginx is not None
    text = stack.parts.nginx.source
    location = re.search(r"location\s+[^{]*events[^{]*\{(?P<body>[^}]*)\}", text)
    values = re.findall(r"proxy_read_timeout\s+([^;]+);", location["body"] if location else "")
    values = values or re.findall(r"proxy_read_timeout\s+([^;]+);", text)
    if not values:
        return 60.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d)?", values[-1]):
        total += int(number) * units[unit or "s"]
    return total


def test_idle_stream_outlives_nginx_read_timeout(stack: Stack) -> None:
    timeout = _read_timeout(stack)
    assert stack.heartbeat < timeout, (
        f"heartbeat {stack.heartbeat}s is not below nginx's proxy_read_timeout {timeout}s"
    )
    idle = stack.idle
    hold = max(min(timeout + 1, IDLE_HOLD_CAP), stack.heartbeat * 2 + 1)

    def held_or_ended() -> bool:
        return idle.ended is not None or time.monotonic() - idle.opened >= hold

    wait_until(held_or_ended, f"the idle stream to be held {hold:g}s", hold + 5, 0.2)
    assert idle.ended is None, f"the idle stream ended: {idle.ended}"
    beats = [idle.opened, *idle.heartbeats, time.monotonic()]
    gaps = [round(b - a, 2) for a, b in itertools.pairwise(beats)]
    assert len(gaps) >= 3, f"fewer than two heartbeats through nginx: {gaps}"
    # Each heartbeat passes nginx as it is sent: no silence much beyond the interval.
    assert max(gaps) < stack.heartbeat + 2, f"silences through nginx (s): {gaps}"
    held = time.monotonic() - idle.opened
    print(f"idle stream held {held:.1f}s, read timeout {timeout:g}s, silences {gaps}")
