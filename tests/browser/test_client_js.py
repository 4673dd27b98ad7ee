"""Issue 11, acceptance 1: ``/client.js`` in Chromium, with gateways on Redis.

The page is served at the gateway's own origin (Playwright answers ``/page.html``) and imports
the client from the node, as a site does. Events are published straight to Redis, so they can
be published while the node is down."""

from __future__ import annotations

import contextlib
import itertools
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from publisher import Publisher, Retention
from tests.conftest import GatewayFactory
from tests.support.gateway import GatewayProcess
from tests.support.tokens import SECRET, hs256
from tests.support.waiting import WaitTimeout, wait_until

WAIT_MS = 15_000
TOPIC = "feed:x"

PAGE = '<!doctype html><meta charset="utf-8"><title>client.js</title>'

FOLLOW = """async ({options, tokens}) => {
  const { subscribe } = await import("/client.js");
  const rec = window.rec = {statuses: [], errors: [], seqs: [], ids: [], resets: [],
                            tokenCalls: [], t0: performance.now()};
  const now = () => performance.now() - rec.t0;
  const opts = {...options};
  if (tokens) {
    opts.token = async () => {
      rec.tokenCalls.push(now());
      return tokens[Math.min(rec.tokenCalls.length, tokens.length) - 1];
    };
  }
  opts.on = {n: (data, ev) => { rec.seqs.push(data.seq); rec.ids.push(ev.id); }};
  opts.onStatus = (status) => rec.statuses.push([status, now()]);
  opts.onError = (error) => rec.errors.push({...error, at: now()});
  opts.onReset = (info) => rec.resets.push(info);
  window.sub = subscribe("/events", opts);
}"""


def blank_page(context: Any, gateway: GatewayProcess) -> Any:
    """An empty page at the gateway's origin."""
    page = context.new_page()
    url = gateway.url + "/page.html"
    page.route(url, lambda route: route.fulfill(body=PAGE, content_type="text/html"))
    page.goto(url)
    return page


def follow(
    context: Any,
    gateway: GatewayProcess,
    tokens: list[str] | None = None,
    page: Any = None,
    **options: Any,
) -> Any:
    """A page at the gateway's origin following ``TOPIC`` with ``subscribe(options)``."""
    page = page or blank_page(context, gateway)
    page.evaluate(FOLLOW, {"options": {"topics": [TOPIC], **options}, "tokens": tokens})
    return page


def rec(page: Any) -> dict[str, Any]:
    record: dict[str, Any] = page.evaluate("() => window.rec")
    return record


def statuses(page: Any) -> list[str]:
    return [status for status, _ in rec(page)["statuses"]]


def wait_seqs(page: Any, count: int) -> None:
    page.wait_for_function(f"() => window.rec.seqs.length >= {count}", timeout=WAIT_MS)


def wait_status(page: Any, status: str, times: int = 1) -> None:
    page.wait_for_function(
        f"() => window.rec.statuses.filter(([s]) => s === {status!r}).length >= {times}",
        timeout=WAIT_MS,
    )


def publish(pub: Publisher, seqs: range) -> None:
    for seq in seqs:
        pub.publish(TOPIC, {"seq": seq}, "n")


@pytest.fixture
def context(browser: Any, gateway_factory: GatewayFactory) -> Iterator[Any]:
    """Closed before the test's gateways stop, so they have no stream left to drain."""
    ctx = browser.new_context()
    yield ctx
    ctx.close()


@pytest.fixture
def pub(redis_url: str, prefix: str) -> Iterator[Publisher]:
    with Publisher.from_url(redis_url, prefix=prefix) as publisher:
        yield publisher


@pytest.mark.parametrize("transport", ["eventsource", "fetch"])
def test_a_node_killed_and_restarted_mid_stream_loses_and_repeats_nothing(
    context: Any,
    gateway_factory: GatewayFactory,
    redis_url: str,
    prefix: str,
    pub: Publisher,
    transport: str,
) -> None:
    """open → reconnecting → open, and every sequence number once, in order."""
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)
    page = follow(context, gateway, transport=transport, backoff={"initial": 300, "max": 2000})
    wait_status(page, "open")
    publish(pub, range(5))
    wait_seqs(page, 5)
    gateway.stop(signal.SIGKILL)
    wait_status(page, "reconnecting")
    publish(pub, range(5, 10))  # while the node is down
    gateway.start()
    wait_seqs(page, 10)
    publish(pub, range(10, 15))
    wait_seqs(page, 15)
    record = rec(page)
    assert record["seqs"] == list(range(15)), record
    assert len(set(record["ids"])) == 15, record
    assert statuses(page) == ["connecting", "open", "reconnecting", "open"], record
    assert page.evaluate("() => window.sub.lastEventId") == record["ids"][-1]


def test_a_token_expiring_mid_stream_is_refreshed_without_loss_or_repeat(
    context: Any, gateway_factory: GatewayFactory, redis_url: str, prefix: str, pub: Publisher
) -> None:
    gateway = gateway_factory(
        "--prefix", prefix, "--jwt-secret", SECRET, "--jwt-leeway", "0", redis_url=redis_url
    )
    short = hs256(subscribe=[TOPIC], ttl=3)
    fresh = hs256(subscribe=[TOPIC], ttl=600)
    page = follow(context, gateway, tokens=[short, fresh])
    wait_status(page, "open")
    publish(pub, range(5))
    wait_seqs(page, 5)
    # the short token expires: the stream ends with token_expired and the client takes another
    page.wait_for_function("() => window.rec.tokenCalls.length >= 2", timeout=WAIT_MS)
    publish(pub, range(5, 10))
    wait_seqs(page, 10)
    record = rec(page)
    assert record["seqs"] == list(range(10)), record
    assert len(record["tokenCalls"]) == 2, record
    assert record["errors"] == [], record  # a planned hand-over, not a failure
    assert statuses(page) == ["connecting", "open"], record


def test_a_401_on_reconnect_calls_token_then_reconnects(
    context: Any, gateway_factory: GatewayFactory, redis_url: str, prefix: str, pub: Publisher
) -> None:
    """The page's token() first hands back the expired token again (a stale cache): the
    native EventSource fails for good on the 401, the client learns the status and asks again."""
    gateway = gateway_factory(
        "--prefix", prefix, "--jwt-secret", SECRET, "--jwt-leeway", "0", redis_url=redis_url
    )
    short = hs256(subscribe=[TOPIC], ttl=3)
    fresh = hs256(subscribe=[TOPIC], ttl=600)
    page = follow(context, gateway, tokens=[short, short, fresh], backoff={"initial": 200})
    wait_status(page, "open")
    publish(pub, range(3))
    wait_seqs(page, 3)
    page.wait_for_function("() => window.rec.tokenCalls.length >= 3", timeout=WAIT_MS)
    wait_status(page, "open", times=2)
    publish(pub, range(3, 6))
    wait_seqs(page, 6)
    record = rec(page)
    assert record["seqs"] == list(range(6)), record
    assert [(e.get("status"), e.get("error")) for e in record["errors"]] == [
        (401, "invalid_token")
    ], record
    assert statuses(page) == ["connecting", "open", "reconnecting", "open"], record


def test_reset_calls_on_reset_once_with_reason_and_topics(
    context: Any, gateway_factory: GatewayFactory, redis_url: str, prefix: str
) -> None:
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)
    # retention trims approximately: 400 events leave a few of them
    with Publisher.from_url(redis_url, prefix=prefix, retention=Retention(5, 3600)) as pub:
        old = pub.publish(TOPIC, {"seq": -1}, "n")
        pub.publish_many([(TOPIC, {"seq": seq}, "n") for seq in range(400)])
    page = follow(context, gateway, lastEventId=old)
    page.wait_for_function("() => window.rec.seqs.at(-1) === 399", timeout=WAIT_MS)
    record = rec(page)
    assert record["resets"] == [{"reason": "trimmed", "topics": [TOPIC]}], record
    seqs = record["seqs"]
    assert 5 <= len(seqs) < 400, seqs
    assert seqs == list(range(400 - len(seqs), 400)), seqs


def test_a_node_down_for_10_s_is_retried_with_jittered_growing_delays(
    context: Any, gateway_factory: GatewayFactory, redis_url: str, prefix: str
) -> None:
    initial, cap = 250, 4000
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)
    page = follow(context, gateway, backoff={"initial": initial, "max": cap})
    wait_status(page, "open")
    gateway.stop(signal.SIGKILL)
    page.wait_for_function("() => window.rec.errors.length >= 1", timeout=WAIT_MS)
    down_at = rec(page)["errors"][0]["at"]
    page.wait_for_function(f"() => performance.now() - window.rec.t0 > {down_at + 10_000}")
    attempts = [e["at"] for e in rec(page)["errors"]]
    gateway.start()
    wait_status(page, "open", times=2)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    # 10 s at most 250, 500, 1000, 2000, 4000, 4000... apart: at least 5 attempts; a fixed
    # retry of 250 ms would make 40.
    assert 5 <= len(gaps) <= 20, gaps
    for k, gap in enumerate(gaps):  # each delay is drawn below a bound that doubles
        assert gap <= min(cap, initial * 2**k) + 400, (k, gaps)
    assert max(gaps) > 2 * initial, gaps  # the bound grew
    assert max(gaps) > 2 * min(gaps), gaps  # and the delays are spread, not one value
    assert statuses(page)[-2:] == ["reconnecting", "open"]


def test_the_fetch_transport_sends_authorization_and_no_token_reaches_a_url(
    context: Any, gateway_factory: GatewayFactory, redis_url: str, prefix: str, pub: Publisher
) -> None:
    gateway = gateway_factory(
        "--prefix", prefix, "--jwt-secret", SECRET, "--access-log", "--log-level", "info",
        redis_url=redis_url,
    )  # fmt: skip
    token = hs256(subscribe=[TOPIC], ttl=600)
    requests: list[tuple[str, dict[str, str]]] = []
    page = blank_page(context, gateway)

    def seen(request: Any) -> None:
        if "/events" in request.url:
            requests.append((request.url, request.headers))

    page.on("request", seen)
    follow(context, gateway, tokens=[token], page=page, transport="fetch")
    wait_status(page, "open")
    publish(pub, range(3))
    wait_seqs(page, 3)
    page.evaluate("() => window.sub.close()")
    record = rec(page)
    assert record["seqs"] == [0, 1, 2], record
    assert record["errors"] == [], record
    assert requests, "the page made no request to /events"
    for url, headers in requests:
        assert headers.get("authorization") == f"Bearer {token}", headers
        assert headers.get("accept") == "text/event-stream", headers
        assert "token" not in url, url
    log = gateway.output()
    assert "GET /events?topic=feed%3Ax" in log, log  # the access log is on
    assert token not in log, log
    assert "token=" not in log, log


def test_close_stops_all_attempts(
    context: Any, gateway_factory: GatewayFactory, redis_url: str, prefix: str
) -> None:
    gateway = gateway_factory("--prefix", prefix, redis_url=redis_url)
    streaming = follow(context, gateway, transport="fetch")
    retrying = follow(context, gateway, backoff={"initial": 100, "max": 200})
    wait_status(streaming, "open")
    wait_status(retrying, "open")
    # a live fetch stream: close() aborts it, and the node sees the stream end
    streaming.evaluate("() => window.sub.close()")
    with contextlib.suppress(WaitTimeout):  # asserted just below
        wait_until(lambda: open_streams(gateway) <= 1, "the node to see the stream end")
    assert open_streams(gateway) == 1
    # a subscription retrying every 200 ms at most: close() stops it for good
    gateway.stop(signal.SIGKILL)
    retrying.wait_for_function("() => window.rec.errors.length >= 3", timeout=WAIT_MS)
    retrying.evaluate("() => window.sub.close()")
    before = rec(retrying)
    seen: list[str] = []
    retrying.on("request", lambda r: seen.append(r.url))
    retrying.evaluate("() => new Promise((resolve) => setTimeout(resolve, 1500))")
    after = rec(retrying)
    assert seen == [], seen
    assert after["errors"] == before["errors"], after
    assert after["statuses"][-1][0] == "closed", after
    assert after["statuses"] == before["statuses"], after
    assert retrying.evaluate("() => window.sub.status") == "closed"
    for page in (streaming, retrying):
        assert rec(page)["statuses"][-1][0] == "closed"


def open_streams(node: GatewayProcess) -> float:
    text = httpx.get(node.url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith("sse_connections "):
            return float(line.split()[1])
    raise AssertionError("no sse_connections gauge")


def readme_example() -> str:
    """The README's status indicator example, as written."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text("utf-8")
    section = readme.split("\n## Browser client\n", 1)[1]
    return section.split("```html\n", 1)[1].split("```", 1)[0]


def test_the_readme_status_indicator_example_works(
    context: Any, gateway_factory: GatewayFactory, redis_url: str, prefix: str, pub: Publisher
) -> None:
    """Served at the gateway's origin with a token endpoint, the README's page goes open (in
    green) and logs a job's progress and a plain message with their ids."""
    gateway = gateway_factory("--prefix", prefix, "--jwt-secret", SECRET, redis_url=redis_url)
    token = hs256(subscribe=["user:alice", "jobs:42"], ttl=600)
    page = context.new_page()
    page.route(
        gateway.url + "/app.html",
        lambda route: route.fulfill(body=PAGE + readme_example(), content_type="text/html"),
    )
    page.route(gateway.url + "/api/sse-token", lambda route: route.fulfill(body=token))
    page.goto(gateway.url + "/app.html")
    page.wait_for_function(
        "() => document.getElementById('status').textContent === 'open'", timeout=WAIT_MS
    )
    assert page.evaluate("() => document.getElementById('status').style.color") == "green"
    done = {"current": 1, "total": 2, "percent": 50}
    progress = {"job": "resize", "jobId": "j1", "progress": done}
    first = pub.publish("jobs:42", progress, "progress")
    second = pub.publish("user:alice", "hello")
    page.wait_for_function(
        "() => document.querySelectorAll('#log li').length >= 2", timeout=WAIT_MS
    )
    lines = page.evaluate("() => [...document.querySelectorAll('#log li')].map(l => l.textContent)")
    assert lines == [f"{first} resize: 50%", f"{second} hello"], lines
