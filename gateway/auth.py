"""Who may read and publish which topics: JWT verification and topic grants.

A token's claims ``sse.subscribe`` and ``sse.publish`` are lists of topic patterns in which
``*`` matches any run of characters. The key is chosen by the token's algorithm family before
anything is verified: an HMAC token is only ever checked against the configured secrets, and a
public-key token only against public keys, so a public key can never be used as an HMAC secret.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import jwt.warnings
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from gateway.config import Settings
from gateway.errors import HTTPError
from gateway.jwks import JwksCache
from publisher.protocol import TopicPatterns, compile_patterns, is_valid_pattern

log = logging.getLogger("gateway.auth")

MAX_TOKEN_BYTES = 8192
MIN_SECRET_BYTES = 32
REALM = 'Bearer realm="sse-gateway"'
HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
EC_ALGORITHMS = ("ES256", "ES384", "ES512")
EDDSA_ALGORITHMS = ("EdDSA",)
PUBLIC_KEY_ALGORITHMS = RSA_ALGORITHMS + EC_ALGORITHMS + EDDSA_ALGORITHMS


def token_required() -> HTTPError:
    return HTTPError(
        401, "token_required", "a token is required (Authorization: Bearer, ?token= or cookie)",
        {"www-authenticate": REALM},
    )  # fmt: skip


def invalid_token(reason: str) -> HTTPError:
    return HTTPError(
        401, "invalid_token", f"the token was refused: {reason}",
        {"www-authenticate": f'{REALM}, error="invalid_token"'},
    )  # fmt: skip


def forbidden_topic(topic: str, action: str) -> HTTPError:
    return HTTPError(
        403, "forbidden_topic", f"the token does not grant {action} on topic {topic!r}",
        topic=topic,
    )  # fmt: skip


NO_RIGHTS = compile_patterns(())


@dataclass(frozen=True, slots=True)
class Grant:
    """What one verified token allows."""

    subject: str
    expires: float | None
    subscribe: TopicPatterns
    publish: TopicPatterns


def _patterns(claims: dict[str, Any], name: str) -> TopicPatterns:
    rights = claims.get("sse")
    if rights is None:
        return NO_RIGHTS
    if not isinstance(rights, dict):
        raise invalid_token("claim 'sse' must be an object")
    patterns = rights.get(name, [])
    if not isinstance(patterns, list) or not all(is_valid_pattern(p) for p in patterns):
        raise invalid_token(f"claim 'sse.{name}' must be a list of topic patterns")
    return compile_patterns(tuple(patterns))


def grant_from_claims(claims: dict[str, Any]) -> Grant:
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise invalid_token("claim 'sub' must be a non-empty string")
    for name in ("exp", "nbf", "iat"):
        # PyJWT converts a string "exp" with int() when it checks it, but a stream's expiry
        # timer needs a number: "exp": "1795..." would never end the stream.
        if name in claims and not _is_number(claims[name]):
            raise invalid_token(f"claim {name!r} must be a number")
    exp = claims.get("exp")
    expires = exp if _is_number(exp) else None
    return Grant(subject, expires, _patterns(claims, "subscribe"), _patterns(claims, "publish"))


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _algorithms_for(key: Any) -> tuple[str, ...]:
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return EC_ALGORITHMS
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return EDDSA_ALGORITHMS
    return ()


def read_secret_file(path: str) -> bytes:
    """A secret from a file (its trailing line break dropped); a clear startup error if the
    file cannot be read or holds nothing."""
    try:
        secret = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise SystemExit(f"--jwt-secret-file {path}: {exc.strerror or exc}") from None
    if not secret:
        raise SystemExit(f"--jwt-secret-file {path}: the file is empty")
    return secret


def load_public_key(path: str) -> Any:
    """A PEM public key or certificate; a clear startup error for anything else."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SystemExit(f"--jwt-public-key {path}: {exc.strerror or exc}") from None
    try:
        key: Any = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = x509.load_pem_x509_certificate(data).public_key()
        except ValueError:
            raise SystemExit(
                f"--jwt-public-key {path}: not a PEM public key or certificate"
            ) from None
    if not _algorithms_for(key):
        raise SystemExit(f"--jwt-public-key {path}: unsupported key type {type(key).__name__}")
    return key


def default_algorithms(settings: Settings) -> tuple[str, ...]:
    if settings.jwt_algorithms:
        return settings.jwt_algorithms
    chosen: tuple[str, ...] = ()
    if settings.jwt_secret or settings.jwt_secret_file:
        chosen += HMAC_ALGORITHMS
    if settings.jwt_public_key or settings.jwks_url:
        chosen += PUBLIC_KEY_ALGORITHMS
    return chosen


class TokenVerifier:
    """Verifies tokens with the configured secrets, public keys and JWKS."""

    def __init__(self, settings: Settings) -> None:
        self.secrets = [secret.encode() for secret in settings.jwt_secret]
        self.secrets += [read_secret_file(path) for path in settings.jwt_secret_file]
        if any(len(secret) < MIN_SECRET_BYTES for secret in self.secrets):
            log.warning(
                "a --jwt-secret is shorter than %d bytes: it can be guessed offline from any "
                "token; use a long random secret",
                MIN_SECRET_BYTES,
            )
        # Said once above, not once per verified token.
        warnings.filterwarnings("ignore", category=jwt.warnings.InsecureKeyLengthWarning)
        self.public_keys = [load_public_key(path) for path in settings.jwt_public_key]
        self.jwks = (
            JwksCache(settings.jwks_url, settings.jwks_timeout) if settings.jwks_url else None
        )
        self.algorithms = frozenset(default_algorithms(settings))
        self.audience = settings.jwt_audience
        self.issuer = settings.jwt_issuer
        self.leeway = settings.jwt_leeway
        required = ["exp", "sub"] if settings.jwt_require_exp else ["sub"]
        self.options: jwt.types.Options = {"require": required}

    async def verify(self, token: str) -> Grant:
        """The token's grant; raises a 401 (or 503 when the JWKS cannot be read)."""
        algorithm, kid = self._algorithm(token)
        keys = await self._keys_for(algorithm, kid)
        claims = self._decode(token, algorithm, keys)
        return grant_from_claims(claims)

    def verify_now(self, token: str) -> Grant | None:
        """:meth:`verify` when no key has to be fetched (the JWKS, if any, holds fresh keys for
        the token's ``kid``); else None."""
        algorithm, kid = self._algorithm(token)
        if algorithm in HMAC_ALGORITHMS:
            return grant_from_claims(self._decode(token, algorithm, self.secrets))
        keys = self._public_keys(algorithm)
        if self.jwks is not None:
            found = self.jwks.keys_now(kid if isinstance(kid, str) else None)
            if found is None:
                return None
            keys += [key for key in found if algorithm in _algorithms_for(key)]
        return grant_from_claims(self._decode(token, algorithm, keys))

    def _algorithm(self, token: str) -> tuple[str, object]:
        """The token's accepted algorithm and key id, read from its unverified header."""
        if len(token) > MAX_TOKEN_BYTES:
            raise invalid_token(f"it is longer than {MAX_TOKEN_BYTES} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise invalid_token("it is not a JWT") from None
        algorithm = header.get("alg")
        if not isinstance(algorithm, str) or algorithm not in self.algorithms:
            raise invalid_token(f"algorithm {str(algorithm)[:20]!r} is not accepted")
        return algorithm, header.get("kid")

    def _public_keys(self, algorithm: str) -> list[Any]:
        return [key for key in self.public_keys if algorithm in _algorithms_for(key)]

    async def _keys_for(self, algorithm: str, kid: object) -> Sequence[Any]:
        if algorithm in HMAC_ALGORITHMS:
            return self.secrets
        keys = self._public_keys(algorithm)
        if self.jwks is not None:
            kid_text = kid if isinstance(kid, str) else None
            found = await self.jwks.keys(kid_text)
            keys += [key for key in found if algorithm in _algorithms_for(key)]
        return keys

    def _decode(self, token: str, algorithm: str, keys: Sequence[Any]) -> dict[str, Any]:
        if not keys:
            raise invalid_token("no configured key verifies it")
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[algorithm],
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway,
                    options=self.options,
                )
            except (jwt.InvalidSignatureError, jwt.InvalidKeyError):
                continue
            except jwt.ExpiredSignatureError:
                raise invalid_token("it has expired") from None
            except jwt.ImmatureSignatureError:
                raise invalid_token("it is not valid yet") from None
            except jwt.MissingRequiredClaimError as exc:
                raise invalid_token(f"claim {exc.claim!r} is missing") from None
            except jwt.InvalidTokenError as exc:
                raise invalid_token(str(exc)[:200] or type(exc).__name__) from None
            return claims
        raise invalid_token("the signature does not verify")


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller of one request: a verified grant, or nobody."""

    grant: Grant | None

    @property
    def subject(self) -> str | None:
        return self.grant.subject if self.grant is not None else None


ANONYMOUS = Identity(None)


class Authorizer:
    """Applies the node's access rules to one request's topics."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth_enabled
        self.verifier = TokenVerifier(settings) if self.enabled else None
        self.public = compile_patterns(settings.public_topics)
        self.leeway = settings.jwt_leeway

    async def start(self) -> None:
        if self.verifier is not None and self.verifier.jwks is not None:
            self.verifier.jwks.prefetch()

    async def close(self) -> None:
        if self.verifier is not None and self.verifier.jwks is not None:
            await self.verifier.jwks.close()

    async def identify(self, token: str | None) -> Identity:
        if token is None or self.verifier is None:
            return ANONYMOUS
        return Identity(await self.verifier.verify(token))

    def identify_now(self, token: str | None) -> Identity | None:
        """:meth:`identify` when it needs no wait; None when the key must come from the JWKS.
        Raises the same refusals."""
        if token is None or self.verifier is None:
            return ANONYMOUS
        grant = self.verifier.verify_now(token)
        return None if grant is None else Identity(grant)

    def check_subscribe(self, identity: Identity, topics: Sequence[str]) -> None:
        if not self.enabled:
            return
        if identity.grant is None:
            if self.public.first_denied(topics) is not None:
                raise token_required()
            return
        granted = identity.grant.subscribe
        for topic in topics:
            if not granted.allows(topic) and not self.public.allows(topic):
                raise forbidden_topic(topic, "subscribe")

    def check_publish(self, identity: Identity, topics: Sequence[str]) -> None:
        if identity.grant is None:
            raise token_required()
        denied = identity.grant.publish.first_denied(topics)
        if denied is not None:
            raise forbidden_topic(denied, "publish")

    def seconds_left(self, identity: Identity) -> float | None:
        """Seconds until the token expires (leeway included), or None if it never does."""
        if identity.grant is None or identity.grant.expires is None:
            return None
        return identity.grant.expires + self.leeway - time.time()


def bearer_token(headers: Sequence[tuple[bytes, bytes]]) -> str | None:
    """The ``Authorization: Bearer`` token. Another scheme (``Basic`` from a proxy's own login,
    say) is not meant for the gateway and is ignored, so a query or cookie token still counts;
    a ``Bearer`` without a token is a 401."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() != "bearer":
                continue
            if not token.strip():
                raise invalid_token("the Authorization header must be 'Bearer <token>'")
            return token.strip()
    return None


def request_token(
    headers: Sequence[tuple[bytes, bytes]], query_token: str | None, cookie: str
) -> str | None:
    """The token a request carries: ``Authorization: Bearer``, else the ``token`` query
    parameter, else the token cookie."""
    return bearer_token(headers) or query_token or cookie_token(headers, cookie)


def cookie_token(headers: Sequence[tuple[bytes, bytes]], name: str) -> str | None:
    prefix = name + "="
    for header, value in headers:
        if header == b"cookie":
            for part in value.decode("latin-1").split(";"):
                part = part.strip()
                if part.startswith(prefix):
                    return part[len(prefix) :].strip('"') or None
    return None
