"""Test tokens and authenticated requests.

Honest tokens are minted with pyjwt; forgeries that pyjwt refuses to make (``alg: none``, an HMAC
over a PEM public key, a tampered payload) are built by hand. ``subscribe`` sends a token the way
a browser or a service would, and the ``assert_*`` helpers check the spec's error shapes.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import httpx
import jwt
import orjson
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

SECRET = "sse-gateway-test-secret-one-0123456789abcdef0123"
OTHER_SECRET = "sse-gateway-test-secret-two-0123456789abcdef0123"
WRONG_SECRET = "sse-gateway-test-secret-not-configured-0123456789"

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def claims(
    sub: str | None = "alice",
    subscribe: Sequence[str] = ("user:alice",),
    publish: Sequence[str] = (),
    ttl: float = 300,
    **extra: Any,
) -> dict[str, Any]:
    """Claims as the gateway expects them: ``sub``, ``exp`` and ``sse`` rights."""
    body: dict[str, Any] = {
        "exp": int(time.time() + ttl),
        "sse": {"subscribe": list(subscribe), "publish": list(publish)},
    }
    if sub is not None:
        body["sub"] = sub
    body.update(extra)
    return body


def hs256(secret: str = SECRET, **options: Any) -> str:
    """An HS256 token; keyword arguments go to ``claims``."""
    return jwt.encode(claims(**options), secret, algorithm="HS256")


def sign(
    body: dict[str, Any], key: Any, algorithm: str, headers: dict[str, Any] | None = None
) -> str:
    return jwt.encode(body, key, algorithm=algorithm, headers=headers)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def unsigned(body: dict[str, Any], alg: str = "none") -> str:
    """An ``alg: none`` token: header and payload, and an empty signature."""
    header = b64url(orjson.dumps({"alg": alg, "typ": "JWT"}))
    return f"{header}.{b64url(orjson.dumps(body))}."


def hmac_signed(body: dict[str, Any] | bytes, key: bytes | str, alg: str = "HS256") -> str:
    """An HMAC token over any payload bytes and any key bytes (pyjwt will not use a PEM public
    key as a secret, nor sign a payload that is not a JSON object)."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    key = key.encode() if isinstance(key, str) else key
    signing_input = b64url(orjson.dumps({"alg": alg, "typ": "JWT"})) + "." + b64url(payload)
    signature = hmac.new(key, signing_input.encode("ascii"), digest).digest()
    return f"{signing_input}.{b64url(signature)}"


def with_payload(token: str, body: dict[str, Any]) -> str:
    """``token`` with its payload replaced and its header and signature kept."""
    header, _, signature = token.split(".")
    return f"{header}.{b64url(orjson.dumps(body))}.{signature}"


def payload_of(token: str) -> dict[str, Any]:
    decoded = orjson.loads(b64url_decode(token.split(".")[1]))
    assert isinstance(decoded, dict)
    return decoded


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def ed25519_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


def public_pem(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def certificate_pem(key: rsa.RSAPrivateKey, common_name: str = "sse-gateway-test") -> bytes:
    """A self-signed X.509 certificate for ``key``, PEM encoded."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def write_pem(directory: Path, name: str, pem: bytes) -> str:
    path = directory / name
    path.write_bytes(pem)
    return str(path)


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, alg: str = "RS256") -> dict[str, Any]:
    """The public half of ``key`` as a JWKS entry."""
    entry = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    entry.pop("key_ops", None)
    return {**entry, "kid": kid, "alg": alg, "use": "sig"}


Source = Literal["header", "query", "cookie"]


def subscribe(
    client: httpx.Client,
    topics: Sequence[str],
    token: str | None = None,
    *,
    via: Source = "header",
    cookie: str = "sse_token",
) -> httpx.Response:
    """``GET /events`` for ``topics`` with ``token`` sent ``via`` one source. A 200 stream is
    closed as soon as its headers arrive; any other response (a refusal too) is read whole."""
    params: list[tuple[str, str | int | float | bool | None]] = [("topic", t) for t in topics]
    headers: list[tuple[bytes, bytes]] = [(b"accept", b"text/event-stream")]
    if token is not None:
        if via == "header":
            headers.append((b"authorization", b"Bearer " + token.encode("utf-8")))
        elif via == "query":
            params.append(("token", token))
        else:
            headers.append((b"cookie", f"{cookie}=".encode() + token.encode("utf-8")))
    with client.stream("GET", "/events", params=params, headers=headers) as response:
        if response.status_code != 200 or "content-length" in response.headers:
            response.read()  # an error, or a finished stream: a refusal the client retries
    return response


def describe(response: httpx.Response) -> str:
    try:
        return f"{response.status_code} {response.text[:300]!r}"
    except httpx.ResponseNotRead:
        return f"{response.status_code} (stream)"


def assert_streams(response: httpx.Response) -> None:
    """The request was accepted: a 200 event stream."""
    assert response.status_code == 200, describe(response)
    assert response.headers["content-type"].startswith("text/event-stream")


def assert_error(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    """A JSON error body ``{"error": error, "message": ...}`` with ``status``."""
    assert response.status_code == status, describe(response)
    assert response.headers["content-type"].startswith("application/json"), describe(response)
    body = response.json()
    assert isinstance(body, dict), body
    assert body.get("error") == error, body
    assert isinstance(body.get("message"), str), body
    assert body["message"], body
    assert "Traceback" not in response.text
    return body


def assert_token_required(response: httpx.Response) -> None:
    """401 ``token_required`` with a plain Bearer challenge (no error code: nothing was sent)."""
    assert_error(response, 401, "token_required")
    challenge = response.headers.get("www-authenticate", "")
    assert challenge.startswith("Bearer "), challenge
    assert 'realm="sse-gateway"' in challenge, challenge
    assert "error=" not in challenge, challenge


def assert_invalid_token(response: httpx.Response) -> None:
    """401 ``invalid_token`` with a Bearer challenge that says so."""
    assert_error(response, 401, "invalid_token")
    challenge = response.headers.get("www-authenticate", "")
    assert challenge.startswith("Bearer "), challenge
    assert 'realm="sse-gateway"' in challenge, challenge
    assert 'error="invalid_token"' in challenge, challenge


def assert_forbidden(response: httpx.Response, topic: str) -> None:
    """403 ``forbidden_topic`` naming the first topic the token does not grant."""
    body = assert_error(response, 403, "forbidden_topic")
    assert body.get("topic") == topic, body
