"""Anonymous developer mode in a browser (issue 10 E).

- ``POST /publish`` accepted a cross-site ``text/plain`` POST: any page the developer visited
  could publish. Cross-origin requests whose ``Origin`` is not allowed, and bodies that are not
  declared JSON, are now refused.
- Requests whose ``Host`` is not a loopback name were accepted (DNS rebinding). An anonymous
  node on loopback now refuses them.
- The loopback rule of anonymous publishing used the forwarded address: with
  ``FORWARDED_ALLOW_IPS='*'``, ``X-Forwarded-For: 127.0.0.1`` published from anywhere. It now
  uses the TCP peer (and the forwarded address must be loopback too).
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import jwt
import pytest

from tests.support.gateway import GatewayProcess

SECRET = "csrf-secret-0123456789abcdef0123456789abcdef"
EVIL = "https://evil.example"
APP = "https://app.example"


def start(*args: str, env: dict[str, str] | None = None) -> GatewayProcess:
    return GatewayProcess("--connect-rate", "0", *args, env=env).start()


@pytest.fixture(scope="module")
def anonymous() -> Iterator[GatewayProcess]:
    """The developer default: no key, on 127.0.0.1, one listed origin."""
    gateway = start("--cors-origin", APP)
    try:
        yield gateway
    finally:
        gateway.close()


def topic() -> str:
    return "csrf:" + uuid.uuid4().hex[:10]


def history(gateway: GatewayProcess, name: str) -> bytes:
    """What a client resuming from the start reads of ``name`` (until the first ping)."""
    url = f"{gateway.url}/events?topic={name}"
    body = b""
    with httpx.stream("GET", url, headers={"last-event-id": "0-0"}, timeout=10) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            body += chunk
            if b": ok" in body:
                break
    return body


def test_a_cross_site_text_plain_post_does_not_publish(anonymous: GatewayProcess) -> None:
    """Issue 10 E, CSRF: what a form or a no-cors fetch on another site sends is refused,
    and nothing is stored."""
    name = topic()
    body = json.dumps({"topic": name, "data": "forged"})
    forged = [
        {"origin": EVIL, "content-type": "text/plain;charset=UTF-8"},
        {"origin": EVIL, "content-type": "application/json"},
        {"origin": "null", "content-type": "text/plain"},
        {"origin": EVIL},
    ]
    for headers in forged:
        response = httpx.post(anonymous.url + "/publish", content=body, headers=headers)
        assert response.status_code == 403, (headers, response.text)
        assert response.json()["error"] == "origin_not_allowed"
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        response = httpx.post(
            anonymous.url + "/publish", content=body, headers={"content-type": content_type}
        )
        assert response.status_code == 415, (content_type, response.text)
        assert response.json()["error"] == "unsupported_media_type"
    assert b"forged" not in history(anonymous, name)


def test_same_origin_and_listed_origins_still_publish(anonymous: GatewayProcess) -> None:
    """Issue 10 E, CSRF: the gateway's own origin, a ``--cors-origin`` and non-browser clients
    (no ``Origin``) publish JSON as before."""
    name = topic()
    own = f"http://127.0.0.1:{anonymous.port}"
    for headers in ({"origin": own}, {"origin": APP}, {}):
        response = httpx.post(
            anonymous.url + "/publish", json={"topic": name, "data": "ok"}, headers=headers
        )
        assert response.status_code == 200, (headers, response.text)
    for content_type in ("application/json; charset=utf-8", "application/merge-patch+json"):
        response = httpx.post(
            anonymous.url + "/publish",
            content=b'{"topic": "%s", "data": 1}' % name.encode(),
            headers={"content-type": content_type},
        )
        assert response.status_code == 200, (content_type, response.text)


def test_a_token_mode_publish_must_be_json_too() -> None:
    """Issue 10 E, CSRF: the content-type rule is the same in token mode."""
    gateway = start("--jwt-secret", SECRET)
    try:
        token = jwt.encode(
            {"sub": "w", "exp": int(time.time()) + 600, "sse": {"publish": ["*"]}}, SECRET
        )
        response = httpx.post(
            gateway.url + "/publish",
            content=b'{"topic": "a", "data": 1}',
            headers={"authorization": f"Bearer {token}", "content-type": "text/plain"},
        )
        assert response.status_code == 415, response.text
    finally:
        gateway.close()


REBOUND = ["evil.example", "evil.example:{port}", "192.0.2.7:{port}", "127.0.0.1.evil.example",
           "evil.example.:{port}", "[2001:db8::1]:{port}"]  # fmt: skip
LOOPBACK_NAMES = ["127.0.0.1:{port}", "localhost:{port}", "app.localhost:{port}", "127.0.0.2",
                  "[::1]:{port}", "localhost.", "devbox:{port}"]  # fmt: skip


@pytest.mark.parametrize("host", REBOUND)
def test_a_rebound_host_name_is_refused_by_an_anonymous_loopback_node(
    anonymous: GatewayProcess, host: str
) -> None:
    """Issue 10 E, DNS rebinding: a page whose name now resolves to 127.0.0.1 is same-origin
    with the node; every route answers it 421, a publish from it stores nothing."""
    host = host.format(port=anonymous.port)
    name = topic()
    headers = {"host": host}
    with httpx.Client(base_url=anonymous.url, timeout=10) as client:
        for response in (
            client.get(f"/events?topic={name}", headers=headers),
            client.get("/metrics", headers=headers),
            client.post(
                "/publish",
                json={"topic": name, "data": "rebound"},
                headers={**headers, "origin": f"http://{host}"},
            ),
        ):
            assert response.status_code == 421, (host, response.text)
            assert response.json()["error"] == "host_not_allowed"
    assert b"rebound" not in history(anonymous, name)


@pytest.mark.parametrize("host", LOOPBACK_NAMES)
def test_loopback_host_names_are_served(anonymous: GatewayProcess, host: str) -> None:
    """Issue 10 E, DNS rebinding: names that only ever mean this machine, and single-label
    names (no public DNS name is one, so no outside page can rebind it), are served."""
    host = host.format(port=anonymous.port)
    response = httpx.get(anonymous.url + "/readyz", headers={"host": host})
    assert response.status_code == 200, response.text


def test_a_token_node_or_an_allow_anonymous_node_serves_any_host_name() -> None:
    """Issue 10 E, DNS rebinding: the rule is for the loopback developer default only; a node
    behind a proxy sees the public name."""
    for args in (("--jwt-secret", SECRET), ("--allow-anonymous",)):
        gateway = start(*args)
        try:
            response = httpx.get(gateway.url + "/readyz", headers={"host": "sse.example.com"})
            assert response.status_code == 200, (args, response.text)
        finally:
            gateway.close()


def outside_address() -> str | None:
    """An address of this machine that is not loopback (None if it has none)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = str(probe.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address


def post_from(address: str, port: int, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.HTTPTransport(local_address=address)
    with httpx.Client(transport=transport, timeout=10) as client:
        return client.post(
            f"http://{address}:{port}/publish", json={"topic": "spoof", "data": 1}, headers=headers
        )


def test_a_forwarded_loopback_address_does_not_make_a_remote_peer_local() -> None:
    """Issue 10 E, the loopback rule: with ``FORWARDED_ALLOW_IPS='*'`` a remote client sending
    ``X-Forwarded-For: 127.0.0.1`` published without a token. The rule uses the TCP peer."""
    address = outside_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address")
    gateway = start("--host", "0.0.0.0", "--allow-anonymous", env={"FORWARDED_ALLOW_IPS": "*"})
    try:
        for forwarded in ("127.0.0.1", "::1", "127.0.0.1, 127.0.0.1"):
            response = post_from(address, gateway.port, {"x-forwarded-for": forwarded})
            assert response.status_code == 403, (forwarded, response.text)
            assert response.json()["error"] == "forbidden"
        response = httpx.post(
            gateway.url + "/publish",
            json={"topic": "spoof", "data": 1},
            headers={"x-forwarded-for": "203.0.113.9"},
        )
        assert response.status_code == 403, "a local proxy's remote client is not local"
        response = httpx.post(gateway.url + "/publish", json={"topic": "spoof", "data": 1})
        assert response.status_code == 200, response.text
    finally:
        gateway.close()
