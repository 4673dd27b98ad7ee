"""Scenario 13 (issue 10 D, a full Redis): Redis runs with ``maxmemory-policy noeviction`` (the
README's advice) and for 10 s its ``maxmemory`` is below what it holds, so it refuses every
write (OOM). Meanwhile every client's connection is cut, a third of the clients come back from
a pause with events to catch up on, then a node is killed and started again and every
connection is cut once more.

Reads keep working when Redis refuses writes: each client's replay arrives during the 10 s and
its stream stays open. Publishes fail at once with an error that says Redis is out of memory
(never acknowledged, never stored, never delivered). Once ``maxmemory`` is restored,
publishing resumes and the strict invariant holds for everything acknowledged."""

from __future__ import annotations

import contextlib
import signal
import time

import httpx
import pytest
import redis

from publisher.redis_transport import SCRIPT_SHA
from tests.chaos.harness import Chaos
from tests.support.clients import SSEClient, spread_topics, wait_connected
from tests.support.gateway import GatewayProcess
from tests.support.invariants import (
    Ledger,
    check_delivery,
    stored_tags,
    summary,
    tag_of,
    wait_caught_up,
)
from tests.support.proxy import LoadBalancer
from tests.support.waiting import let_time_pass, wait_until

TOPICS = [f"full{i}" for i in range(5)]
FULL_FOR = 10.0
REPLAY_DEADLINE = 6.0
"""Seconds after a cut within which every client has its replay (Redis still full)."""


def _cut_all(
    lb: LoadBalancer, nodes: list[GatewayProcess], clients: list[SSEClient]
) -> dict[SSEClient, int]:
    """Drop every client connection at the load balancer, as a network blip would. Returns
    each client's count of streams opened before the cut (a replay is awaited on a new one)."""
    opened = {client: client.streams for client in clients}
    for node in nodes:
        lb.remove(node.port, close_open=True)
        lb.add(node.port)
    return opened


def _oom(admin: redis.Redis, key: str) -> bool:
    try:
        admin.set(key, "x")
    except redis.exceptions.OutOfMemoryError:
        return True
    admin.delete(key)
    return False


def _await_replays(
    clients: list[SSEClient], before: Ledger, opened: dict[SSEClient, int], when: str
) -> tuple[float, list[str]]:
    """Wait until every client is connected again, on a stream opened after the cut, and has
    everything acknowledged before Redis filled up; return how long that took, and what went
    wrong. (Without the new stream, a client that had not yet noticed the cut passed at once.)"""
    began = time.monotonic()
    try:
        wait_until(
            lambda: all(
                c.connected and c.streams > opened[c] and c.last_key >= before.newest(c.topics)
                for c in clients
            ),
            "every client to have its replay",
            REPLAY_DEADLINE,
        )
    except TimeoutError as exc:
        behind = [c.describe() for c in clients if c.last_key < before.newest(c.topics)]
        return time.monotonic() - began, [
            f"{when}: {exc} while Redis is full: {len(behind)} behind: {behind[:3]}"
        ]
    return time.monotonic() - began, []


def _error(response: httpx.Response) -> str:
    """The ``error`` of a JSON error body ('' when the body is not one)."""
    try:
        body = response.json()
    except ValueError:
        return ""
    return str(body.get("error") or "") if isinstance(body, dict) else ""


def _closes(clients: list[SSEClient]) -> list[int]:
    return [c.server_closes for c in clients]


@pytest.mark.chaos
def test_replays_work_and_publishes_fail_clearly_while_redis_is_full(chaos: Chaos) -> None:
    server = chaos.redis("--maxmemory-policy", "noeviction")
    nodes = [chaos.node(server.url) for _ in range(2)]
    lb = chaos.load_balancer(nodes)
    clients = chaos.clients(lb.port, spread_topics(TOPICS, 60))
    wait_connected(clients)
    publisher = chaos.publisher(server.url, TOPICS, rate=40, retry_for=5).start()
    away = clients[::3]

    let_time_pass(2, "events flow before some clients leave")
    chaos.pool.pause(away)
    let_time_pass(2, "events the paused clients will have to replay")
    problems: list[str] = []
    with contextlib.closing(server.client()) as admin:
        admin.config_set("maxmemory", 1)
        full_at = time.monotonic()
        assert _oom(admin, f"{chaos.prefix}:oom-check"), "Redis still accepts writes"
        wait_until(lambda: bool(publisher.failed), "a publish to be refused", 5)
        before = Ledger([publisher])
        opened = _cut_all(lb, nodes, clients)
        chaos.pool.resume(away)
        cut_at = time.monotonic()
        replayed, found = _await_replays(clients, before, opened, "after the cut")
        problems.extend(found)
        # A node restarted while Redis is full starts, and serves the replays of its share.
        nodes[1].stop(signal.SIGKILL)
        began = time.monotonic()
        nodes[1] = chaos.restart(nodes[1])
        restarted = time.monotonic() - began
        opened = _cut_all(lb, nodes, clients)
        replayed_again, found = _await_replays(clients, before, opened, "after a node restart")
        problems.extend(found)
        on_restarted = lb.open_to(nodes[1].port)
        closes = _closes(clients)
        http = httpx.post(
            nodes[0].url + "/publish",
            json={"topic": TOPICS[0], "data": {"tag": "http-full"}},
            timeout=10,
        )
        readiness = httpx.get(nodes[0].url + "/readyz", timeout=5)
        let_time_pass(max(0.0, FULL_FOR - (time.monotonic() - full_at)), "Redis stays full")
        still_full = _oom(admin, f"{chaos.prefix}:oom-check")
        ended = [c.describe() for c, n in zip(clients, closes, strict=True) if c.server_closes > n]
        admin.config_set("maxmemory", 0)
    refused = len(publisher.failed)
    wait_until(lambda: publisher.acked[-1].at > cut_at, "publishing to resume", 5)
    let_time_pass(3, "events flow after Redis has room again")
    publisher.stop()

    ledger = Ledger([publisher])
    wait_caught_up(clients, ledger, 15)
    chaos.pool.pause(clients)  # the restarted node, closed first, then has no streams to drain
    print(
        summary(clients, ledger),
        f"replays while full: {replayed:.1f}s, after a node restart ({restarted:.1f}s, "
        f"{on_restarted} clients on it) {replayed_again:.1f}s; {refused} publishes refused; "
        f"HTTP publish: {http.status_code} {http.text[:200]}; "
        f"direct publish: {publisher.failed[0][2][:200]}; "
        f"/readyz while full: {readiness.status_code} {readiness.text[:200]}",
    )
    assert still_full, "Redis accepted writes before the end of the fault: the test proves less"
    assert not problems, "\n".join(problems)
    assert on_restarted, "no client reached the restarted node: the test proves less"
    assert not ended, f"{len(ended)} streams ended while Redis was full: {ended[:3]}"
    unclear = [error for _, _, error in publisher.failed if "memory" not in error.lower()]
    assert not unclear, f"publishes failed without saying why: {unclear[:3]}"
    assert publisher.slowest < 3, f"a refused publish took {publisher.slowest:.1f}s (retried?)"
    assert http.status_code >= 400, f"POST /publish while full: {http.status_code} {http.text}"
    assert _error(http), f"POST /publish while full is not a JSON error: {http.text[:300]}"
    assert SCRIPT_SHA not in http.text, f"POST /publish while full leaks internals: {http.text}"
    failed = {tag for tag, _, _ in publisher.failed}
    with contextlib.closing(server.client()) as admin:
        stored = set(stored_tags(admin, chaos.prefix, TOPICS))
    assert not stored & failed, f"refused publishes were stored: {sorted(stored & failed)[:3]}"
    delivered = {tag for c in clients for r in c.received if (tag := tag_of(r.data))}
    assert not delivered & failed, f"refused publishes delivered: {sorted(delivered & failed)[:3]}"
    check_delivery(clients, ledger)
