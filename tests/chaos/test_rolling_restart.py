"""Scenario 5: a rolling restart. Each of three nodes in turn is taken out of the load balancer
and sent SIGTERM with ``--drain-seconds 3``: it turns unready at once, refuses new streams
(503 ``draining``), closes its open streams spread over the window, and exits within the
window plus 3 s; a replacement starts on the same port. No client loses an event."""

from __future__ import annotations

import functools
import signal
import time

import httpx
import pytest

from tests.chaos.harness import Chaos
from tests.support.clients import spread_topics, wait_connected
from tests.support.invariants import Ledger, check_delivery, summary, wait_caught_up
from tests.support.waiting import let_time_pass, wait_until

TOPICS = [f"roll{i}" for i in range(5)]
DRAIN = 3.0


@pytest.mark.chaos
def _not_ready(url: str) -> httpx.Response | None:
    """``/readyz``'s answer if it is not a 200."""
    response = httpx.get(url + "/readyz", timeout=2)
    return response if response.status_code != 200 else None


def test_rolling_restart_drains_every_node_without_loss(chaos: Chaos) -> None:
    server = chaos.redis()
    nodes = [chaos.node(server.url, "--drain-seconds", str(DRAIN)) for _ in range(3)]
    lb = chaos.load_balancer(nodes)
    clients = chaos.clients(lb.port, spread_topics(TOPICS, 60))
    wait_connected(clients)
    publisher = chaos.publisher(server.url, TOPICS, rate=60).start()
    let_time_pass(2, "events flow before the first restart")

    restarts = []
    for index, node in enumerate(list(nodes)):
        on_node = lb.open_to(node.port)
        lb.remove(node.port)  # as a balancer does once the node's readiness fails
        closes_before = sum(c.server_closes for c in clients)
        began = time.monotonic()
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        if index == 0:
            # Unready at once (uvicorn notices the signal at its next tick, within 0.1 s).
            ready = wait_until(
                functools.partial(_not_ready, node.url),
                "/readyz to stop being 200 after SIGTERM",
                max(0.0, 0.5 - (time.monotonic() - began)),
                0.01,
            )
            assert ready is not None
            assert ready.status_code == 503, ready.text
            stream = httpx.get(node.url + "/events?topic=roll0", timeout=2)
            assert stream.status_code == 503, stream.text
            assert stream.json()["error"] == "draining"
        code = node.stop(timeout=DRAIN + 10)
        took = time.monotonic() - began
        closed = sum(c.server_closes for c in clients) - closes_before
        ends = sorted(t - began for c in clients for t in c.closed_at if t >= began)
        spread = ends[-1] - ends[0] if ends else 0.0
        restarts.append((node.port, on_node, closed, round(spread, 2), round(took, 2), code))
        assert took <= DRAIN + 3, f"node :{node.port} took {took:.1f}s to exit (drain {DRAIN}s)"
        # uvicorn re-raises the signal once it has shut down: -SIGTERM is a clean exit.
        assert code in (0, -signal.SIGTERM), f"node :{node.port} exited with {code}"
        assert "Traceback" not in node.output(), node.output()[-3000:]
        replacement = chaos.restart(node)
        lb.add(replacement.port)
        let_time_pass(1.5, "events flow before the next restart")
    let_time_pass(1.5, "events flow after the last restart")
    publisher.stop()

    ledger = Ledger([publisher])
    wait_caught_up(clients, ledger)
    print(
        summary(clients, ledger),
        f"restarts (port, clients, closed, spread s, exit s, code): {restarts}",
    )
    check_delivery(clients, ledger)
    for port, on_node, closed, spread, _, _ in restarts:
        assert closed >= on_node, f"node :{port} had {on_node} clients, closed {closed} streams"
        # Spread over the drain window, so the reconnects do not all land at once.
        assert spread >= DRAIN * 0.5, f"node :{port} closed {closed} streams within {spread}s"
