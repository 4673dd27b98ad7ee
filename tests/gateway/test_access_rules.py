"""Units of access control: token claims, token buckets, log redaction, security settings
(topic patterns are rules of the protocol: tests/publisher/test_protocol.py)."""

from __future__ import annotations

import logging

import pytest

from gateway.auth import cookie_token, grant_from_claims
from gateway.config import check_exposure, parse
from gateway.errors import HTTPError
from gateway.limits import MAX_TRACKED_KEYS, RateLimiter
from gateway.logs import RedactTokens, redact


@pytest.mark.parametrize(
    "claims",
    [
        {"exp": 1},
        {"sub": ""},
        {"sub": 7},
        {"sub": "a", "sse": []},
        {"sub": "a", "sse": {"subscribe": "user:a"}},
        {"sub": "a", "sse": {"publish": [1]}},
        {"sub": "a", "sse": {"subscribe": ["bad topic"]}},
        {"sub": "a", "sse": {"subscribe": ["x\nevent: y"]}},
    ],
)
def test_malformed_claims_are_an_invalid_token(claims: dict[str, object]) -> None:
    with pytest.raises(HTTPError) as caught:
        grant_from_claims(claims)
    assert (caught.value.status, caught.value.error) == (401, "invalid_token")


def test_a_token_without_rights_grants_nothing() -> None:
    grant = grant_from_claims({"sub": "a", "exp": 5})
    assert grant.subject == "a"
    assert grant.expires == 5
    assert not grant.subscribe.allows("a")
    assert not grant.publish.allows("a")


def test_the_token_cookie_is_found_among_others() -> None:
    headers = [(b"cookie", b"theme=dark; sse_token=abc.def.ghi; other=1")]
    assert cookie_token(headers, "sse_token") == "abc.def.ghi"
    assert cookie_token(headers, "missing") is None
    assert cookie_token([(b"cookie", b"x_sse_token=1")], "sse_token") is None


def test_a_bucket_allows_its_burst_then_paces_at_its_rate() -> None:
    bucket = RateLimiter(rate=2.0, burst=4)
    assert [bucket.acquire("ip", now=100.0) for _ in range(4)] == [0.0] * 4
    assert bucket.acquire("ip", now=100.0) == pytest.approx(0.5)
    assert bucket.acquire("other", now=100.0) == 0.0
    assert bucket.acquire("ip", now=100.5) == 0.0
    assert bucket.acquire("ip", now=100.5) > 0


def test_a_refused_attempt_does_not_extend_the_wait() -> None:
    bucket = RateLimiter(rate=1.0, burst=1)
    assert bucket.acquire("ip", now=0.0) == 0.0
    for step in range(10):
        bucket.acquire("ip", now=step / 10)
    assert bucket.acquire("ip", now=1.0) == 0.0


def test_the_bucket_table_stays_bounded_under_many_addresses() -> None:
    bucket = RateLimiter(rate=10.0, burst=20)
    for n in range(MAX_TRACKED_KEYS + 50):
        bucket.acquire(f"10.{n}", now=n / 1000)
    assert len(bucket) <= MAX_TRACKED_KEYS


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            '"GET /events?topic=a&token=eyJ.abc.def HTTP/1.1"',
            '"GET /events?topic=a&token=*** HTTP/1.1"',
        ),
        ("/events?token=x&topic=a", "/events?token=***&topic=a"),
        ("Authorization: Bearer eyJ.abc.def", "Authorization: Bearer ***"),
        ("/events?topic=token", "/events?topic=token"),
    ],
)
def test_tokens_are_redacted_from_log_text(line: str, expected: str) -> None:
    assert redact(line) == expected


def test_the_log_filter_redacts_uvicorn_access_arguments() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", "/events?topic=a&token=secret.value.x", "1.1", 200), None,
    )  # fmt: skip
    assert RedactTokens().filter(record)
    assert "secret" not in record.getMessage()
    assert "token=***" in record.getMessage()


@pytest.mark.parametrize(
    "argv",
    [
        ["--jwt-algorithms", "none"],
        ["--jwt-algorithms", "HS256,NONE"],
        ["--jwt-algorithms", "HS1"],
        ["--allow-anonymous", "--jwt-secret", "s"],
        ["--public-topics", "bad topic"],
        ["--cors-origin", "*", "--cors-origin", "https://a.example"],
        ["--cors-origin", "a.example"],
        ["--token-cookie", "a b"],
        ["--max-topics", "0"],
        ["--connect-rate", "-1"],
    ],
)
def test_unsafe_or_malformed_security_settings_stop_the_node(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse(argv)


def test_list_settings_repeat_and_split_on_commas_except_secrets() -> None:
    s = parse(["--jwt-secret", "a,b", "--jwt-secret", "c", "--public-topics", "x:*,y"])
    assert s.jwt_secret == ("a,b", "c")
    assert s.public_topics == ("x:*", "y")
    assert s.auth_enabled


def test_anonymous_mode_is_refused_off_loopback_unless_explicit() -> None:
    check_exposure(parse([]))
    check_exposure(parse(["--host", "::1"]))
    check_exposure(parse(["--host", "0.0.0.0", "--allow-anonymous"]))
    check_exposure(parse(["--host", "0.0.0.0", "--jwt-secret", "s"]))
    with pytest.raises(SystemExit, match="--allow-anonymous"):
        check_exposure(parse(["--host", "0.0.0.0"]))
