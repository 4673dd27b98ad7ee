"""Scenario 12 (issue 10 D, bad data stays local): one topic's stream key holds a string
(``SET <prefix>:s:<topic> oops``) and a client on each node listens to that topic, next to 60
clients on good topics. Then every node's pub/sub link is killed, twice: each backfill reads
the broken key with the good ones.

The broken key must fail only its own topic: good topics keep the strict invariant without a
reconnect, the nodes stay up and ready, and the broken topic's clients are told at once (their
stream ends or is refused) instead of hanging, with a log line naming the topic. A client that
resumes the broken topic with a Last-Event-ID gets an answer that ends and names the topic."""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest
import redis

from publisher.protocol import Keys
from tests.chaos.harness import Chaos
from tests.support.clients import SSEClient, spread_topics, wait_connected
from tests.support.gateway import GatewayProcess
from tests.support.invariants import Ledger, check_delivery, summary, wait_caught_up
from tests.support.publishing import PublisherThread
from tests.support.waiting import let_time_pass, wait_until

TOPICS = [f"good{i}" for i in range(5)]
BAD = "wrongtype0"
DEADLINE = 10.0
"""Seconds after a kill within which good clients are caught up and bad ones told."""


def _status(url: str, path: str) -> int:
    try:
        return httpx.get(url + path, timeout=2).status_code
    except httpx.TransportError:
        return 0


def _resume_broken(url: str, last_event_id: str) -> str:
    """What a client resuming the broken topic from ``last_event_id`` is answered: the whole
    response, which must end (a hang is a read timeout)."""
    headers = {"Accept": "text/event-stream", "Last-Event-ID": last_event_id}
    try:
        with httpx.stream(
            "GET", f"{url}/events?topic={BAD}", headers=headers, timeout=DEADLINE
        ) as response:
            return f"{response.status_code} {response.read().decode('utf-8', 'replace')}"
    except httpx.HTTPError as exc:
        return f"no answer: {type(exc).__name__}: {exc}"


def _refusals(client: SSEClient) -> int:
    return sum(n for status, n in client.statuses.items() if status != 200)


def _told(client: SSEClient, closes: int, refusals: int) -> bool:
    """Whether the server ended or refused the client's stream since the counts were taken."""
    return client.server_closes > closes or _refusals(client) > refusals


def _kill_pubsub(
    admin: redis.Redis,
    clients: list[SSEClient],
    bad: list[SSEClient],
    nodes: list[GatewayProcess],
    publisher: PublisherThread,
) -> tuple[int, float, list[str]]:
    """Kill every pub/sub link; return how many, how long the good clients took to catch up
    with what was acknowledged a second after, and what went wrong."""
    problems = []
    before = [(c, c.server_closes, _refusals(c)) for c in bad]
    killed = admin.client_kill_filter(_type="pubsub")
    began = time.monotonic()
    let_time_pass(1, "events flow to the other topics meanwhile")
    snapshot = Ledger([publisher])
    waited = wait_caught_up(clients, snapshot, DEADLINE) + 1
    if any(c.last_key < snapshot.newest(c.topics) for c in clients):
        problems.append(f"good topics stalled for {waited:.1f}s")
    try:
        wait_until(
            lambda: all(_told(*b) for b in before),
            "the broken topic's clients to be told",
            max(1.0, DEADLINE - (time.monotonic() - began)),
        )
    except TimeoutError:
        hung = [c.describe() for c, *counts in before if not _told(c, *counts)]
        problems.append(f"the broken topic's clients were left hanging: {hung}")
    ready = [_status(n.url, "/readyz") == 200 for n in nodes]
    if not all(ready):
        problems.append(f"/readyz {ready}")
    return int(killed), waited, problems


@pytest.mark.chaos
def test_a_wrong_type_key_fails_only_its_topic_through_pubsub_kills(chaos: Chaos) -> None:
    server = chaos.redis()
    with contextlib.closing(server.client()) as admin:
        admin.set(Keys(chaos.prefix).stream(BAD), "oops")
    nodes = [chaos.node(server.url) for _ in range(2)]
    lb = chaos.load_balancer(nodes)
    clients = chaos.clients(lb.port, spread_topics(TOPICS, 60))
    bad = [c for node in nodes for c in chaos.clients(node.port, [(BAD,)], name="bad")]
    wait_connected(clients + bad)
    publisher = chaos.publisher(server.url, TOPICS, rate=40).start()

    let_time_pass(2, "events flow before the first kill")
    problems: list[str] = []
    killed = []
    recovered = []
    with contextlib.closing(server.client()) as admin:
        for round_ in (1, 2):
            with contextlib.suppress(AssertionError):  # refused for good is fine too
                wait_connected(bad, 3)
            count, waited, found = _kill_pubsub(admin, clients, bad, nodes, publisher)
            killed.append(count)
            recovered.append(round(waited, 1))
            problems.extend(f"kill {round_}: {problem}" for problem in found)
    let_time_pass(2, "events flow after the last kill")
    publisher.stop()

    ledger = Ledger([publisher])
    wait_caught_up(clients, ledger, 15)
    print(summary(clients, ledger), f"good topics caught up after each kill: {recovered}s")
    print("broken topic's clients:", [c.describe() for c in bad])
    alive = [n.process is not None and n.process.poll() is None for n in nodes]
    assert all(alive), f"a node exited: {alive}"
    assert all(_status(n.url, "/healthz") == 200 for n in nodes)
    assert not problems, "\n".join(problems)
    assert all(count >= len(nodes) for count in killed), f"pub/sub links killed: {killed}"
    check_delivery(clients, ledger)
    moved = [c.describe() for c in clients if c.reconnects]
    assert not moved, f"{len(moved)} clients of good topics had to reconnect: {moved[:3]}"
    answers = [_resume_broken(n.url, publisher.acked[-1].id) for n in nodes]
    print("resuming the broken topic:", answers)
    unclear = [answer for answer in answers if BAD not in answer]
    assert not unclear, f"resuming the broken topic is not answered clearly: {unclear}"
    leaked = [(c.name, r.data[:60]) for c in bad for r in c.received if '"tag"' in r.data]
    assert not leaked, f"the broken topic's clients received events: {leaked[:3]}"
    unnamed = [n.port for n in nodes if BAD not in n.output()]
    assert not unnamed, f"nodes {unnamed} logged nothing naming the broken topic {BAD!r}"
