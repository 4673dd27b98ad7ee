"""The smaller hostile-input findings of issue 10 E, each against a real node."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from gateway.limits import MAX_TRACKED_KEYS, RateLimiter
from tests.support.gateway import GatewayProcess
from tests.support.ports import free_port
from tests.support.waiting import wait_until

SECRET = "hygiene-secret-0123456789abcdef0123456789abcdef"


def mint(ttl: float = 600, **claims: Any) -> str:
    body = {"sub": "hygiene", "exp": int(time.time() + ttl),
            "sse": {"subscribe": ["*"], "publish": ["*"]}, **claims}  # fmt: skip
    return jwt.encode(body, SECRET, algorithm="HS256")


TOKEN = mint(ttl=24 * 3600)  # minted at import: valid however long the suite runs


@pytest.fixture(scope="module")
def node() -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(
        "--jwt-secret", SECRET, "--public-topics", "public:*", "--connect-rate", "0",
        "--access-log", "--log-level", "info",
    )  # fmt: skip
    try:
        yield gateway.start()
    finally:
        gateway.close()


def first_bytes(
    url: str, headers: dict[str, str] | None = None, until: bytes = b": ok\n\n"
) -> tuple[int, bytes]:
    """Status and body of an answer; for a 200 stream, what arrives up to ``until``."""
    with httpx.stream("GET", url, headers=headers, timeout=10) as response:
        body = b""
        for chunk in response.iter_raw():
            body += chunk
            if response.status_code == 200 and until in body:
                break
        return response.status_code, body


def test_a_percent_encoded_token_parameter_is_redacted_in_the_access_log(
    node: GatewayProcess,
) -> None:
    """Issue 10 E: ``?%74oken=<JWT>`` was accepted but logged in clear. Parameters are
    redacted by their decoded name."""
    secret_part = TOKEN.rsplit(".", 1)[1]
    for name in ("%74oken", "tok%65n", "%54OKEN"):
        status, _ = first_bytes(f"{node.url}/events?topic=public:a&{name}={TOKEN}&marker={name}")
        assert status in (200, 401)
        node.wait_for_output(f"marker={name}")
    assert secret_part not in node.output()


def test_a_since_of_thousands_of_digits_is_a_400(node: GatewayProcess) -> None:
    """Issue 10 E: ``since`` with more than 4,300 digits was a 500 and a traceback."""
    status, body = first_bytes(f"{node.url}/events?topic=public:a&since={'9' * 5000}")
    assert status == 400, body[:300]
    assert b'"invalid_since"' in body
    assert "Traceback" not in node.output()


def test_a_string_exp_is_an_invalid_token(node: GatewayProcess) -> None:
    """Issue 10 E: ``"exp": "1795..."`` was accepted, and no ``token_expired`` was ever sent."""
    token = mint(exp=str(int(time.time()) + 600))
    status, body = first_bytes(f"{node.url}/events?topic=private:a&token={token}")
    assert status == 401, body[:300]
    assert b'"invalid_token"' in body
    assert b"exp" in body


def test_a_basic_authorization_header_does_not_spoil_a_query_token(node: GatewayProcess) -> None:
    """Issue 10 E: any ``Authorization: Basic`` header (a proxy's own login, say) made a valid
    query token a 401. Non-Bearer schemes are ignored; a Bearer that fails is still a 401."""
    basic = {"authorization": "Basic dXNlcjpwYXNz"}
    status, body = first_bytes(f"{node.url}/events?topic=private:a&token={TOKEN}", basic)
    assert status == 200, body[:300]
    status, _ = first_bytes(f"{node.url}/events?topic=private:a", basic)
    assert status == 401
    status, _ = first_bytes(
        f"{node.url}/events?topic=private:a&token={TOKEN}", {"authorization": "Bearer x.y.z"}
    )
    assert status == 401


def test_an_expired_token_on_a_public_topic_is_a_401_not_anonymous(node: GatewayProcess) -> None:
    """Issue 10 E, decided: a presented token that has expired is a 401 ``invalid_token`` even
    on a public topic, so the client refreshes it instead of silently losing its private
    topics; without a token the public topic is served."""
    expired = mint(ttl=-3600)
    status, body = first_bytes(f"{node.url}/events?topic=public:a&token={expired}")
    assert status == 401, body[:300]
    assert b"expired" in body
    assert first_bytes(f"{node.url}/events?topic=public:a")[0] == 200


def test_percent_encoded_paths_do_not_reach_the_routes(node: GatewayProcess) -> None:
    """Issue 10 E: ``/%70ublish`` routed to ``/publish``, where a proxy matching paths as sent
    saw another path. Routes are matched undecoded."""
    with httpx.Client(base_url=node.url, timeout=10) as client:
        paths = [("POST", "/%70ublish"), ("GET", "/%65vents?topic=public:a"),
                 ("GET", "/%68ealthz"), ("GET", "/events%2F?topic=public:a")]  # fmt: skip
        for method, path in paths:
            response = client.request(
                method, path, json={"topic": "a", "data": 1},
                headers={"authorization": f"Bearer {TOKEN}"},
            )  # fmt: skip
            assert response.status_code == 404, (path, response.text)
            assert response.json()["error"] == "not_found"


def test_the_javascript_spelling_last_event_id_replays(node: GatewayProcess) -> None:
    """Issue 10 E: ``?lastEventId=`` (as JavaScript spells ``event.lastEventId``) was ignored,
    so nothing was replayed. It is accepted like ``lastEventID``; unknown parameters are
    still ignored (cache-busters such as ``_=123`` keep working)."""
    auth = {"authorization": f"Bearer {TOKEN}"}
    ids = [
        httpx.post(f"{node.url}/publish", json={"topic": "js:1", "data": n}, headers=auth).json()[
            "id"
        ]
        for n in ("first", "second")
    ]
    url = f"{node.url}/events?topic=js:1&lastEventId={ids[0]}&_=123&token={TOKEN}"
    try:
        status, body = first_bytes(url, until=b"data: second")
    except httpx.ReadTimeout:
        raise AssertionError("nothing was replayed") from None
    assert status == 200
    assert f"id: {ids[1]}\ndata: second".encode() in body
    assert b"first" not in body


def test_an_http_1_0_stream_is_not_chunked(node: GatewayProcess) -> None:
    """Issue 10 E: an HTTP/1.0 request got a chunked body (HTTP/1.0 has no chunked encoding).
    The stream is now delimited by closing the connection."""
    with socket.create_connection(("127.0.0.1", node.port), timeout=10) as sock:
        sock.sendall(b"GET /events?topic=public:old HTTP/1.0\r\n\r\n")
        received = b""
        while b": ok\n\n" not in received:
            chunk = sock.recv(65536)
            assert chunk, received
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"transfer-encoding" not in head.lower(), head
    assert b"connection: close" in head.lower(), head
    assert body.startswith(b"retry: "), body


def test_the_rate_limiter_never_resets_a_limited_bucket_when_its_table_fills() -> None:
    """Issue 10 E: when the bucket table filled up, every bucket was cleared, handing each
    limited client (the attacker first) a fresh burst. Only refilled buckets, or the stalest
    few, are forgotten."""
    limiter = RateLimiter(rate=1.0, burst=2)
    assert limiter.acquire("victim", now=0.0) == 0
    assert limiter.acquire("victim", now=0.0) == 0
    assert limiter.acquire("victim", now=0.0) > 0
    for n in range(MAX_TRACKED_KEYS + 10):
        limiter.acquire(f"flood-{n}", now=0.5)
        if n % 10_000 == 0:
            assert limiter.acquire("victim", now=0.5) > 0, f"reset after {n} new keys"
    assert limiter.acquire("victim", now=0.5) > 0
    assert len(limiter) <= MAX_TRACKED_KEYS


def test_the_jwks_url_is_logged_without_credentials() -> None:
    """Issue 10 E: the JWKS URL (with its user, password and query) was logged in clear."""
    url = f"http://keyuser:keypass@127.0.0.1:{free_port()}/jwks.json?api_key=keyquery"
    gateway = GatewayProcess("--jwks-url", url, "--jwks-timeout", "1")
    try:
        gateway.start()
        output = gateway.wait_for_output("JWKS fetch from")
        for secret in ("keyuser", "keypass", "keyquery"):
            assert secret not in output, output[-2000:]
    finally:
        gateway.close()


def test_a_jwt_secret_file_keeps_the_secret_out_of_the_process_list() -> None:
    """Issue 10 E: ``--jwt-secret-file`` reads the secret at start (its trailing newline
    dropped), so it never shows in ``ps``; an unreadable file is a clear startup error."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "secret")
        with open(path, "w") as f:
            f.write(SECRET + "\n")
        gateway = GatewayProcess("--jwt-secret-file", path, "--connect-rate", "0")
        try:
            gateway.start()
            with open(f"/proc/{gateway.pid}/cmdline", "rb") as f:
                assert SECRET.encode() not in f.read()
            status, body = first_bytes(f"{gateway.url}/events?topic=private:a&token={TOKEN}")
            assert status == 200, body[:300]
            assert first_bytes(f"{gateway.url}/events?topic=private:a")[0] == 401
        finally:
            gateway.close()
        missing = os.path.join(directory, "missing")
        result = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(free_port()),
             "--jwt-secret-file", missing],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode != 0
        assert f"--jwt-secret-file {missing}: No such file or directory" in result.stderr


def serve_until(args: list[str], text: str, timeout: float = 20) -> str:
    """Run ``sse-gateway serve`` at info level until ``text`` is logged (or it exits)."""
    command = [sys.executable, "-m", "gateway.cli", "serve", "--log-level", "info", *args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    stdout = process.stdout
    lines: list[str] = []

    def logged_or_exited() -> bool:
        while line := stdout.readline():
            lines.append(line.decode())
        return any(text in line for line in lines) or process.poll() is not None

    try:
        os.set_blocking(stdout.fileno(), False)
        with contextlib.suppress(AssertionError):  # the caller checks what was logged
            wait_until(logged_or_exited, repr(text), timeout, step=0.02)
    finally:
        process.terminate()
        try:
            rest = process.communicate(timeout=20)[0]
        except subprocess.TimeoutExpired:
            process.kill()
            rest = process.communicate()[0]
    return "".join(lines) + (rest or b"").decode()


def test_ready_is_logged_only_once_the_port_is_bound_and_the_engine_reachable() -> None:
    """Issue 10 E: "ready" was logged before the port was bound (even when binding then
    failed) and while Redis was unreachable."""
    output = serve_until(["--port", str(free_port())], "sse-gateway ready")
    assert output.index("Uvicorn running on") < output.index("sse-gateway ready"), output

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        output = serve_until(["--port", str(port)], "address already in use")
    assert "sse-gateway ready" not in output, output

    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    output = serve_until(
        ["--port", str(free_port()), "--redis-url", dead_redis], "waiting for the engine"
    )
    assert "waiting for the engine" in output, output
    assert "sse-gateway ready" not in output, output


def test_ipv6_clients_are_limited_by_their_64() -> None:
    """Issue 10 E: the per-address connect rate keyed IPv6 clients by their full address, so
    one host (which usually holds a whole /64) dodged it by changing address. Addresses come
    from ``X-Forwarded-For`` of the trusted loopback proxy here."""
    env = {"SSE_GATEWAY_CONNECT_RATE": "1", "SSE_GATEWAY_CONNECT_RATE_PER_ADDRESS": "1"}
    gateway = GatewayProcess(env=env)
    try:
        gateway.start()

        def status(address: str) -> int:
            return first_bytes(f"{gateway.url}/events?topic=v6", {"x-forwarded-for": address})[0]

        same_64 = [status(f"2001:db8:0:7::{n}") for n in range(1, 5)]
        assert same_64[:2] == [200, 200], same_64
        assert 429 in same_64[2:], same_64
        assert status("2001:db8:0:8::1") == 200
    finally:
        gateway.close()
