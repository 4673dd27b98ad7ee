"""Issue 11: every node serves the browser client, ``/client.js``, and its types,
``/client.d.ts``, with a JavaScript content type, an ETag and caching headers."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

import gateway
from tests.conftest import GatewayFactory
from tests.support.gateway import GatewayProcess

STATIC = Path(gateway.__file__).parent / "static"
APP = "https://app.example"


@pytest.fixture
def node(gateway_factory: GatewayFactory) -> GatewayProcess:
    return gateway_factory("--cors-origin", APP)


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/client.js", "application/javascript; charset=utf-8"),
        ("/client.d.ts", "application/typescript; charset=utf-8"),
    ],
)
def test_the_client_is_served_with_its_type_and_caching_headers(
    node: GatewayProcess, path: str, content_type: str
) -> None:
    response = httpx.get(node.url + path, timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["cache-control"] == "public, max-age=300"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert re.fullmatch(r'"[0-9a-f]{32}"', response.headers["etag"])
    assert response.content == (STATIC / path.lstrip("/")).read_bytes()


def test_a_matching_etag_is_a_304_without_body(node: GatewayProcess) -> None:
    etag = httpx.get(node.url + "/client.js", timeout=5).headers["etag"]
    for header in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = httpx.get(node.url + "/client.js", headers={"if-none-match": header}, timeout=5)
        assert response.status_code == 304, header
        assert response.content == b""
        assert response.headers["etag"] == etag
        assert response.headers["cache-control"] == "public, max-age=300"
    stale = httpx.get(node.url + "/client.js", headers={"if-none-match": '"old"'}, timeout=5)
    assert stale.status_code == 200
    assert stale.content


def test_head_and_other_origins(node: GatewayProcess) -> None:
    head = httpx.head(node.url + "/client.js", timeout=5)
    assert head.status_code == 200
    assert head.content == b""
    cross = httpx.get(node.url + "/client.js", headers={"origin": APP}, timeout=5)
    assert cross.headers["access-control-allow-origin"] == APP
    other = httpx.get(
        node.url + "/client.js", headers={"origin": "https://evil.example"}, timeout=5
    )
    assert "access-control-allow-origin" not in other.headers
    post = httpx.post(node.url + "/client.js", timeout=5)
    assert post.status_code == 405
    assert post.json()["error"] == "method_not_allowed"


def test_the_types_declare_every_export() -> None:
    script = (STATIC / "client.js").read_text()
    types = (STATIC / "client.d.ts").read_text()
    exports = re.findall(r"^export (?:async )?(?:function|class) (\w+)", script, re.M)
    assert "subscribe" in exports
    for name in exports:
        assert re.search(rf"^export (?:function|class) {name}\b", types, re.M), name
    for option in (
        "topics", "lastEventId", "since", "types", "token", "transport", "withCredentials",
        "on", "onReset", "onStatus", "onError", "backoff",
    ):  # fmt: skip
        assert re.search(rf"^\s+{option}\??:", types, re.M), option


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_client_is_an_es_module_that_loads_without_a_browser() -> None:
    """It parses as a module, and importing it touches no browser API (only calling does)."""
    url = (STATIC / "client.js").as_uri()
    code = f"const m = await import({url!r}); console.log(Object.keys(m).sort().join(','))"
    result = subprocess.run(
        ["node", "--input-type=module", "-e", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["EventStreamParser,compareIds,parseId,subscribe"]
