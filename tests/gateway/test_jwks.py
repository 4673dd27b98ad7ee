"""Keys from a JWKS URL (issue 3, acceptance 3): a token whose ``kid`` the JWKS serves verifies;
a key added to the JWKS is picked up without a restart; an unknown ``kid`` is refused; and a
JWKS endpoint that is down or silent costs a bounded wait, never a hang, while the gateway keeps
serving everything else."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import GatewayFactory
from tests.support.ports import free_port
from tests.support.refusals import refusal_of
from tests.support.tokens import (
    SECRET,
    assert_error,
    assert_invalid_token,
    assert_streams,
    claims,
    describe,
    rsa_jwk,
    rsa_key,
    sign,
    subscribe,
    unsigned,
)
from tests.support.waiting import wait_until

UNLIMITED = ("--connect-rate", "0")
TOPIC = "user:alice"


class JWKSServer:
    """Serves ``keys`` as ``/jwks.json``; the test changes ``keys`` to rotate."""

    def __init__(self) -> None:
        self.keys: list[dict[str, Any]] = []
        self.fetches = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/jwks.json":
                    self.send_error(404)
                    return
                owner.fetches += 1
                body = orjson.dumps({"keys": owner.keys})
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"

    def __enter__(self) -> JWKSServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


class SilentServer:
    """Accepts connections and never answers (a JWKS endpoint that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.1)
        self.connections: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/jwks.json"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections.append(conn)

    def wait_for_connections(self, count: int, timeout: float) -> bool:
        """Whether ``count`` connections arrived within ``timeout``."""
        try:
            wait_until(lambda: len(self.connections) >= count, "connections", timeout, step=0.01)
        except AssertionError:
            return False
        return True

    def __enter__(self) -> SilentServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)
        for conn in self.connections:
            conn.close()
        self.sock.close()


@pytest.fixture
def jwks() -> Iterator[JWKSServer]:
    with JWKSServer() as server:
        yield server


@pytest.fixture
def silent() -> Iterator[SilentServer]:
    with SilentServer() as server:
        yield server


def token_for(key: Any, kid: str, algorithm: str = "RS256", **options: Any) -> str:
    return sign(claims(subscribe=[TOPIC], **options), key, algorithm, headers={"kid": kid})


def assert_refused_for_now(response: httpx.Response) -> None:
    """No key to check the token with: 401 invalid_token, or 503 auth_unavailable with a
    Retry-After when the JWKS could not be fetched (for a client that asked for an event
    stream, an ``auth_unavailable`` refusal that it retries)."""
    assert response.status_code in (200, 401, 503), describe(response)
    if response.status_code == 200:
        assert refusal_of(response).reason == "auth_unavailable"
    elif response.status_code == 401:
        assert_invalid_token(response)
    else:
        assert_error(response, 503, "auth_unavailable")
        assert response.headers.get("retry-after", "").strip().isdigit(), response.headers


def timed_subscribe(client: httpx.Client, token: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = subscribe(client, [TOPIC], token)
    return response, time.monotonic() - started


def test_jwks_keys_verify_and_a_rotated_in_key_works_without_a_restart(
    gateway_factory: GatewayFactory, jwks: JWKSServer
) -> None:
    k1, k2, stranger = rsa_key(), rsa_key(), rsa_key()
    jwks.keys = [rsa_jwk(k1, "k1")]
    gateway = gateway_factory("--jwks-url", jwks.url, *UNLIMITED)
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert_streams(subscribe(client, [TOPIC], token_for(k1, "k1")))
        assert_streams(subscribe(client, [TOPIC], token_for(k1, "k1", "PS256")))
        assert_invalid_token(subscribe(client, [TOPIC], token_for(stranger, "k1")))
        assert_invalid_token(subscribe(client, [TOPIC], token_for(SECRET, "k1", "HS256")))
        assert_invalid_token(subscribe(client, [TOPIC], unsigned(claims(subscribe=[TOPIC]))))

        jwks.keys = [rsa_jwk(k2, "k2")]
        rotated = token_for(k2, "k2")
        # the node fetches the key set again when it meets an unknown kid (at a bounded rate)
        responses = [subscribe(client, [TOPIC], rotated)]

        def accepted() -> bool:
            if responses[-1].status_code != 200:
                responses.append(subscribe(client, [TOPIC], rotated))
            return responses[-1].status_code == 200

        with contextlib.suppress(AssertionError):  # assert_streams says what came instead
            wait_until(accepted, "the rotated key accepted", 4, step=0.2)
        assert_streams(responses[-1])
        assert_invalid_token(subscribe(client, [TOPIC], token_for(stranger, "k2")))


def test_a_kid_the_jwks_never_serves_is_401_and_does_not_hammer_the_jwks(
    gateway_factory: GatewayFactory, jwks: JWKSServer
) -> None:
    k1, other = rsa_key(), rsa_key()
    jwks.keys = [rsa_jwk(k1, "k1")]
    gateway = gateway_factory("--jwks-url", jwks.url, *UNLIMITED)
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        assert_streams(subscribe(client, [TOPIC], token_for(k1, "k1")))
        fetches_before = jwks.fetches
        started = time.monotonic()
        for n in range(15):
            response, elapsed = timed_subscribe(client, token_for(other, f"unknown-{n}"))
            assert_invalid_token(response)
            assert elapsed < 3, elapsed
        spent = time.monotonic() - started
    refetches = jwks.fetches - fetches_before
    assert refetches <= spent + 2, f"{refetches} JWKS fetches in {spent:.1f}s for unknown kids"


def test_an_unreachable_jwks_refuses_quickly_and_the_gateway_keeps_serving(
    gateway_factory: GatewayFactory,
) -> None:
    nobody = f"http://127.0.0.1:{free_port()}/jwks.json"
    gateway = gateway_factory("--jwks-url", nobody, *UNLIMITED)
    token = token_for(rsa_key(), "k1")
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        for _ in range(3):
            response, elapsed = timed_subscribe(client, token)
            assert_refused_for_now(response)
            assert elapsed < 3, f"took {elapsed:.1f}s"
        assert client.get("/healthz").status_code == 200


def test_a_silent_jwks_times_out_within_jwks_timeout_while_other_requests_are_served(
    gateway_factory: GatewayFactory, silent: SilentServer
) -> None:
    gateway = gateway_factory("--jwks-url", silent.url, "--jwks-timeout", "1", *UNLIMITED)
    token = token_for(rsa_key(), "k1")

    async def scenario() -> tuple[list[tuple[int, float, httpx.Response]], float, int]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=15) as client:

            async def events() -> tuple[int, float, httpx.Response]:
                started = time.monotonic()
                headers = {"authorization": f"Bearer {token}"}
                async with client.stream(
                    "GET", "/events", params={"topic": TOPIC}, headers=headers
                ) as response:
                    if response.status_code != 200:
                        await response.aread()
                return response.status_code, time.monotonic() - started, response

            known = len(silent.connections)
            pending = [asyncio.create_task(events()) for _ in range(3)]
            try:
                # Once the gateway is waiting on the JWKS for these requests (if it does at all:
                # it may answer from a remembered failure), ask it for something else.
                await asyncio.to_thread(silent.wait_for_connections, known + 1, 2)
                started = time.monotonic()
                health = await client.get("/healthz")
                health_time = time.monotonic() - started
                results = await asyncio.gather(*pending)
            finally:
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        return results, health_time, health.status_code

    results, health_time, health_status = asyncio.run(scenario())
    assert silent.connections, "the gateway never contacted the JWKS URL"
    assert health_status == 200
    assert health_time < 1, f"/healthz took {health_time:.1f}s while the JWKS hung"
    for _, elapsed, response in results:
        assert_refused_for_now(response)
        assert elapsed < 3.5, f"a request waited {elapsed:.1f}s on a 1s JWKS timeout"
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        response, elapsed = timed_subscribe(client, token)
        assert_refused_for_now(response)
        assert elapsed < 3.5, elapsed
