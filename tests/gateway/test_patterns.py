"""Topic patterns match in linear time (issue 10 E, catastrophic backtracking).

``--public-topics '*:*:*:*:archive'`` was compiled to the regular expression
``.*:.*:.*:.*:archive``: eight anonymous requests for a topic of 256 colons froze the event
loop for about 10 s while the regex engine backtracked. A pattern is now matched segment by
segment, and a real node keeps answering ``/healthz`` while such requests arrive.
"""

from __future__ import annotations

import re
import threading
import time

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.auth import TopicPatterns
from tests.support.gateway import GatewayProcess

BACKTRACKING_PATTERNS = ["*:*:*:*:archive", "***:x"]
HEALTH_BOUND = 1.0
"""A liveness bound, not a speed measurement: a frozen loop takes seconds."""


def reference(patterns: list[str], topic: str) -> bool:
    """The old meaning of a pattern, as a regex: ``*`` is any run of characters."""
    return any(re.fullmatch(re.escape(p).replace(r"\*", ".*"), topic) for p in patterns)


small_text = st.text(alphabet="ab:*", max_size=8)


@settings(max_examples=2000, deadline=None, database=None)
@given(patterns=st.lists(small_text.filter(bool), max_size=3), topic=st.text("ab:", max_size=10))
def test_matching_means_what_it_meant(patterns: list[str], topic: str) -> None:
    """Issue 10 E: the linear matcher agrees with the old regex on every small case."""
    assert TopicPatterns(patterns).allows(topic) is reference(patterns, topic)


def test_a_backtracking_pattern_against_a_long_topic_is_answered_at_once() -> None:
    """Issue 10 E, catastrophic backtracking: the worst shapes match or fail without
    exploring every split of the topic (the old regex took seconds per topic)."""
    patterns = TopicPatterns(BACKTRACKING_PATTERNS)
    topics = [":" * 256, "a:" * 128]
    started = time.monotonic()
    for topic in topics:
        assert not patterns.allows(topic)
    assert patterns.allows(":" * 248 + "archive")
    assert time.monotonic() - started < HEALTH_BOUND


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
