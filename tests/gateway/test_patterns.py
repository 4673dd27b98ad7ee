"""Topic patterns match in linear time (issue 10 E, catastrophic backtracking).

``--public-topics '*:*:*:*:archive'`` was compiled to the regular expression
``.*:.*:.*:.*:archive``: eight anonymous requests for a topic of 256 colons froze the event
loop for about 10 s while the regex engine backtracked. A pattern is now matched segment by
segment (the matcher's own tests: tests/publisher/test_protocol.py), and a real node keeps
answering ``/healthz`` while such requests arrive.
"""

from __future__ import annotations

import threading
import time

import httpx

from tests.support.gateway import GatewayProcess

HEALTH_BOUND = 1.0
"""A liveness bound, not a speed measurement: a frozen loop takes seconds."""


def test_a_node_keeps_answering_while_backtracking_topics_are_requested() -> None:
    """Issue 10 E, catastrophic backtracking: ``--public-topics '*:*:*:*:archive'`` plus
    anonymous requests for a 256-colon topic froze the event loop; ``/healthz`` now answers
    fast throughout."""
    gateway = GatewayProcess(
        "--jwt-secret", "patterns-secret-0123456789abcdef0123456789",
        "--public-topics", "*:*:*:*:archive", "--connect-rate", "0",
    )  # fmt: skip
    try:
        gateway.start()
        topic = ":" * 256
        answers: list[int] = []

        def hostile() -> None:
            with httpx.Client(timeout=60) as client:
                for _ in range(2):
                    answers.append(client.get(f"{gateway.url}/events?topic={topic}").status_code)

        threads = [threading.Thread(target=hostile) for _ in range(8)]
        for thread in threads:
            thread.start()
        slowest = 0.0
        with httpx.Client(timeout=30) as probe:
            while any(thread.is_alive() for thread in threads):
                started = time.monotonic()
                assert probe.get(gateway.url + "/healthz").status_code == 200
                slowest = max(slowest, time.monotonic() - started)
        for thread in threads:
            thread.join()
        assert answers == [401] * 16
        assert slowest < HEALTH_BOUND, f"/healthz took {slowest:.2f}s"
    finally:
        gateway.close()
