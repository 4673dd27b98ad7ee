"""``sse-gateway token`` mints an HS256 token (secret from ``--jwt-secret`` or
``SSE_GATEWAY_JWT_SECRET``) that a gateway with the same secret accepts, for exactly the topics
it names."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from tests.conftest import GatewayFactory

SECRET = "token-cli-secret-0123456789abcdef0123"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Minted:
    token: str
    claims: dict[str, Any]
    header: dict[str, Any]
    before: float
    """Time just before the command ran (exp is at least ``before + ttl``, give or take)."""
    after: float


def run_token(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m gateway.cli token ARGS`` with no ``SSE_GATEWAY_*`` variable but ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "token", *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def mint(
    *args: str, secret: str = SECRET, env: dict[str, str] | None = None, **decode: Any
) -> Minted:
    """Run the command, check it printed one token and nothing else, and verify it."""
    before = time.time()
    result = run_token(*args, env=env)
    after = time.time()
    assert result.returncode == 0, (result.returncode, result.stderr)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    token = lines[0].strip()
    assert token.count(".") == 2, token
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, secret, algorithms=["HS256"], **decode)
    return Minted(token, claims, header, before, after)


def assert_ttl(minted: Minted, seconds: int) -> None:
    exp = minted.claims["exp"]
    assert isinstance(exp, int | float)
    assert minted.before + seconds - 2 <= exp <= minted.after + seconds + 2, (exp, seconds)


def test_token_prints_an_hs256_jwt_with_the_requested_claims() -> None:
    minted = mint(
        "--sub", "alice", "--subscribe", "user:alice", "--publish", "jobs:*", "--ttl", "1h",
        "--jwt-secret", SECRET,
    )  # fmt: skip
    assert minted.header["alg"] == "HS256"
    assert minted.claims["sub"] == "alice"
    assert minted.claims["sse"]["subscribe"] == ["user:alice"]
    assert minted.claims["sse"]["publish"] == ["jobs:*"]
    assert abs(minted.claims["exp"] - (time.time() + 3600)) <= 60
    assert_ttl(minted, 3600)


def test_a_token_signed_with_another_secret_does_not_verify() -> None:
    minted = mint("--sub", "alice", "--subscribe", "user:alice", "--jwt-secret", SECRET)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(minted.token, "another-secret-0123456789abcdef012345", algorithms=["HS256"])


def test_the_secret_can_come_from_the_environment() -> None:
    env = {"SSE_GATEWAY_JWT_SECRET": "from-the-environment-0123456789abcdef"}
    minted = mint(
        "--sub", "bob", "--subscribe", "user:bob", "--ttl", "15m",
        secret="from-the-environment-0123456789abcdef", env=env,
    )  # fmt: skip
    assert minted.claims["sub"] == "bob"
    assert minted.claims["sse"]["subscribe"] == ["user:bob"]
    assert_ttl(minted, 900)


def test_the_flag_wins_over_the_environment() -> None:
    env = {"SSE_GATEWAY_JWT_SECRET": "from-the-environment-0123456789abcdef"}
    minted = mint("--sub", "bob", "--subscribe", "user:bob", "--jwt-secret", SECRET, env=env)
    assert minted.claims["sub"] == "bob"


def test_subscribe_and_publish_are_repeatable() -> None:
    minted = mint(
        "--sub", "carol",
        "--subscribe", "user:carol", "--subscribe", "room:*", "--subscribe", "news",
        "--publish", "jobs:*", "--publish", "room:1",
        "--jwt-secret", SECRET,
    )  # fmt: skip
    assert minted.claims["sse"]["subscribe"] == ["user:carol", "room:*", "news"]
    assert minted.claims["sse"]["publish"] == ["jobs:*", "room:1"]


@pytest.mark.parametrize(
    ("ttl", "seconds"),
    [("30s", 30), ("15m", 900), ("1h", 3600), ("2d", 172800), ("90", 90)],
)
def test_ttl_forms(ttl: str, seconds: int) -> None:
    minted = mint("--sub", "alice", "--subscribe", "user:alice", "--ttl", ttl,
                  "--jwt-secret", SECRET)  # fmt: skip
    assert_ttl(minted, seconds)


def test_audience_and_issuer_are_set() -> None:
    minted = mint(
        "--sub", "alice", "--subscribe", "user:alice", "--jwt-secret", SECRET,
        "--jwt-audience", "sse-clients", "--jwt-issuer", "https://auth.example",
        audience="sse-clients", issuer="https://auth.example",
    )  # fmt: skip
    assert minted.claims["aud"] in ("sse-clients", ["sse-clients"])
    assert minted.claims["iss"] == "https://auth.example"
    with pytest.raises(jwt.InvalidAudienceError):
        jwt.decode(minted.token, SECRET, algorithms=["HS256"], audience="someone-else")


def test_without_a_secret_it_exits_2_with_a_message() -> None:
    result = run_token("--sub", "alice", "--subscribe", "user:alice", "--ttl", "1h")
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.strip(), "no message on stderr"
    assert "Traceback" not in result.stderr
    assert result.stdout.strip() == "", "no token may be printed"


def open_status(url: str, topic: str, token: str) -> tuple[int, dict[str, Any] | None]:
    """The status of ``GET /events?topic=`` with the token (and the JSON body of a refusal);
    a 200 stream is closed after its first bytes."""
    headers = {"authorization": f"Bearer {token}"}
    with (
        httpx.Client(timeout=httpx.Timeout(10)) as client,
        client.stream("GET", url + "/events", params={"topic": topic}, headers=headers) as r,
    ):
        if r.status_code == 200:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert next(r.iter_raw(), b"")
            return 200, None
        r.read()
        return r.status_code, r.json()


def test_the_gateway_accepts_a_minted_token_for_its_topics_only(
    gateway_factory: GatewayFactory,
) -> None:
    token = mint(
        "--sub", "alice", "--subscribe", "user:alice", "--publish", "jobs:*", "--ttl", "1h",
        "--jwt-secret", SECRET,
    ).token  # fmt: skip
    gateway = gateway_factory("--jwt-secret", SECRET)

    assert open_status(gateway.url, "user:alice", token) == (200, None)
    status, body = open_status(gateway.url, "user:bob", token)
    assert status == 403
    assert body is not None
    assert body["error"] == "forbidden_topic"
    assert body["topic"] == "user:bob"

    auth = {"authorization": f"Bearer {token}"}
    with httpx.Client(base_url=gateway.url, headers=auth, timeout=10) as api:
        assert api.post("/publish", json={"topic": "jobs:1", "data": 1}).status_code == 200
        refused = api.post("/publish", json={"topic": "user:alice", "data": 1})
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"] == "forbidden_topic"


def test_the_gateway_checks_the_audience_and_issuer_it_was_given(
    gateway_factory: GatewayFactory,
) -> None:
    aud_iss = ["--jwt-audience", "sse-clients", "--jwt-issuer", "https://auth.example"]
    base = ["--sub", "alice", "--subscribe", "user:alice", "--jwt-secret", SECRET]
    matching = mint(*base, *aud_iss, audience="sse-clients", issuer="https://auth.example")
    plain = mint(*base)
    gateway = gateway_factory("--jwt-secret", SECRET, *aud_iss)

    assert open_status(gateway.url, "user:alice", matching.token) == (200, None)
    status, body = open_status(gateway.url, "user:alice", plain.token)
    assert status == 401
    assert body is not None
    assert body["error"] == "invalid_token"
