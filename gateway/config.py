"""One ``Settings`` object from command-line flags, ``SSE_GATEWAY_*`` variables and defaults.

Every field is a flag ``--field-name`` and a variable ``SSE_GATEWAY_FIELD_NAME``; a flag wins
over the variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from publisher.protocol import (
    DEFAULT_IDEMPOTENCY_TTL,
    DEFAULT_MAX_AGE_SECONDS,
    DEFAULT_MAX_EVENTS,
    DEFAULT_PREFIX,
    MAX_TOPIC_LENGTH,
    is_valid_pattern,
)

ENV_PREFIX = "SSE_GATEWAY_"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    host: str = _opt("127.0.0.1", "interface to listen on (0.0.0.0 in containers)")
    port: int = _opt(8000, "TCP port to listen on")
    workers: int = _opt(1, "processes serving the port (SO_REUSEPORT), each with its own hub")
    redis_url: str | None = _opt(
        None, "Redis URL (redis://, rediss://, unix://); without one the in-memory engine runs"
    )
    prefix: str = _opt(DEFAULT_PREFIX, "prefix of every Redis key and channel")
    heartbeat: float = _opt(15.0, "seconds of silence after which a ': ping' comment is sent")
    retry_ms: int = _opt(3000, "reconnect delay announced to browsers in the preamble (ms)")
    max_pending_bytes: int = _opt(
        1 << 20, "bytes queued for one client before it is disconnected as too slow"
    )
    send_timeout: float = _opt(10.0, "seconds one write may take before the client is dropped")
    coalesce_ms: float = _opt(
        0.0, "milliseconds to gather live frames before writing them (0: once per loop turn)"
    )
    linger: float = _opt(2.0, "seconds a topic stays subscribed after its last local client left")
    subscribe_timeout: float = _opt(5.0, "seconds to wait for the engine to confirm a subscribe")
    max_events: int = _opt(
        DEFAULT_MAX_EVENTS, "history kept per topic by events published through this node"
    )
    max_age: float = _opt(
        DEFAULT_MAX_AGE_SECONDS, "seconds of history kept per topic (0: no age limit)"
    )
    max_publish_bytes: int = _opt(64 * 1024, "largest POST /publish body accepted")
    publish_rate: float = _opt(
        1000.0,
        "POST /publish events per second per token subject (per address when anonymous), "
        "bursts of twice that (0: unlimited)",
    )
    idempotency_ttl: float = _opt(
        DEFAULT_IDEMPOTENCY_TTL,
        "seconds a publish's idempotency key is remembered (a retry returns its first id)",
    )
    publish_replicas: int = _opt(
        0, "replicas that must hold a publish before POST /publish answers (Redis WAIT)"
    )
    probe_interval: float = _opt(5.0, "seconds between self-probes of the pub/sub link (0: off)")
    drain_seconds: float = _opt(
        10.0, "on SIGTERM, seconds over which open streams are closed before the process exits"
    )
    max_lifetime: float = _opt(
        0.0, "seconds after which a stream ends, less up to 10%% jitter, to rebalance (0: never)"
    )
    tcp_keepalive: float = _opt(
        30.0, "idle seconds before TCP keepalive probes a client, to drop vanished ones (0: off)"
    )
    allow_remote_publish: bool = _opt(
        False, "accept POST /publish from non-loopback addresses without authentication"
    )
    jwt_secret: tuple[str, ...] = _opt(
        (), "HMAC secret that verifies tokens; repeat to accept several (rotation)", split=False
    )
    jwt_secret_file: tuple[str, ...] = _opt(
        (), "file holding an HMAC secret, read at start (repeatable; keeps it out of ps)",
        split=False,
    )  # fmt: skip
    jwt_public_key: tuple[str, ...] = _opt(
        (), "PEM file with a public key or certificate that verifies tokens (repeatable)"
    )
    jwks_url: str | None = _opt(None, "JWKS URL whose keys verify tokens (cached, refetched)")
    jwks_timeout: float = _opt(5.0, "seconds one JWKS fetch may take")
    jwt_algorithms: tuple[str, ...] = _opt(
        (), "accepted token algorithms (default: HS* with secrets, RS*/PS*/ES*/EdDSA with keys)"
    )
    jwt_audience: str | None = _opt(None, "required 'aud' claim")
    jwt_issuer: str | None = _opt(None, "required 'iss' claim")
    jwt_leeway: float = _opt(30.0, "seconds of clock skew allowed on exp and nbf")
    jwt_require_exp: bool = _opt(True, "refuse tokens without an 'exp' claim")
    token_cookie: str = _opt("sse_token", "cookie that may carry the token of GET /events")
    public_topics: tuple[str, ...] = _opt(
        (), "topic patterns anyone may read without a token (comma list, '*' globs)"
    )
    allow_anonymous: bool = _opt(
        False, "serve without any token key on a non-loopback interface (no authentication)"
    )
    cors_origin: tuple[str, ...] = _opt(
        (), "origin allowed to use the gateway from a browser (repeatable; '*' for any)"
    )
    max_connections: int = _opt(10_000, "open streams per node (0: unlimited)")
    max_connections_per_subject: int = _opt(64, "open streams per token subject (0: unlimited)")
    max_connections_per_address: int = _opt(
        0,
        "open streams per client address (0: unlimited; behind a balancer, one address is many;"
        " while both per-address options are 0, public addresses get 1000)",
    )
    max_topics: int = _opt(64, "topics per stream and per publish")
    connect_rate: float = _opt(
        20.0, "new streams per second per token subject, bursts of twice that (0: unlimited)"
    )
    connect_rate_per_address: float = _opt(
        0.0,
        "new streams per second per client address, bursts of twice that (0: unlimited;"
        " while both per-address options are 0, public addresses get 50)",
    )
    max_query_bytes: int = _opt(8192, "longest query string accepted")
    max_header_bytes: int = _opt(16384, "largest total size of a request's headers")
    header_timeout: float = _opt(
        15.0,
        "seconds a connection has to send a request's complete headers, then a publish's body "
        "(slowloris)",
    )
    demo: bool = _opt(
        False, "serve /demo, a live page fed by simulated jobs published in this node (development)"
    )
    log_level: str = _opt("info", "debug, info, warning or error")
    log_format: str = _opt(
        "plain", "plain (text lines) or json (one JSON object per line, for log collectors)"
    )
    access_log: bool = _opt(True, "log one line per HTTP request")
    forwarded_allow_ips: str | None = _opt(
        None,
        "proxy addresses whose X-Forwarded-For/-Proto are trusted (comma list, '*' for any; "
        "default: uvicorn's FORWARDED_ALLOW_IPS variable, else 127.0.0.1)",
    )

    @property
    def auth_enabled(self) -> bool:
        """Any key is configured: reading non-public topics and publishing need a token."""
        return bool(self.jwt_secret or self.jwt_secret_file or self.jwt_public_key or self.jwks_url)

    @property
    def engine_name(self) -> str:
        return "redis" if self.redis_url else "memory"

    def redacted_redis_url(self) -> str | None:
        """The Redis URL without its password (in the user part or the query), for logs."""
        if not self.redis_url:
            return None
        parts = urlsplit(self.redis_url)
        netloc = parts.netloc
        if parts.password is not None:
            netloc = netloc.replace(f":{parts.password}@", ":***@")
        query = [
            (name, "***" if name.lower() == "password" else value)
            for name, value in parse_qsl(parts.query, keep_blank_values=True)
        ]
        if netloc == parts.netloc and all(value != "***" for _, value in query):
            return self.redis_url
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _is_list(f: dataclasses.Field[Any]) -> bool:
    return isinstance(f.default, tuple)


def _split(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _convert(f: dataclasses.Field[Any], text: str) -> Any:
    default: Any = f.default
    if _is_list(f):
        return _split(text)
    kind: type[Any] = type(default) if default is not None else str
    if kind is bool:
        return _parse_bool(text)
    return kind(text)


def _converter(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return _convert(f, text)

    convert.__name__ = f.name
    return convert


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(Settings):
        env = ENV_PREFIX + f.name.upper()
        help_text = f"{f.metadata['help']} (env {env}; default {f.default!r})"
        if isinstance(f.default, bool):
            parser.add_argument(
                _flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, help=help_text
            )
        elif _is_list(f):
            parser.add_argument(
                _flag(f.name), dest=f.name, metavar=f.name.upper(), action="append",
                help=help_text + "; repeatable",
            )  # fmt: skip
        else:
            parser.add_argument(
                _flag(f.name), dest=f.name, metavar=f.name.upper(), help=help_text,
                type=_converter(f),
            )  # fmt: skip


def settings_from(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        given = getattr(args, f.name, None) if args is not None else None
        env = environ.get(ENV_PREFIX + f.name.upper())
        if given is not None:
            if _is_list(f):
                split = f.metadata.get("split", True)
                given = tuple(p for text in given for p in (_split(text) if split else [text]))
            values[f.name] = given
        elif env is not None:
            try:
                values[f.name] = _convert(f, env)
            except ValueError as exc:
                raise SystemExit(f"{ENV_PREFIX}{f.name.upper()}: {exc}") from None
    settings = Settings(**values)
    _validate(settings)
    return settings


def _validate(settings: Settings) -> None:
    for f in dataclasses.fields(Settings):
        value = getattr(settings, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"{_flag(f.name)} must be a finite number")
    positive: tuple[str, ...] = ("heartbeat", "max_pending_bytes", "send_timeout", "workers")
    positive += ("subscribe_timeout", "max_events", "jwks_timeout", "max_topics")
    positive += ("max_query_bytes", "max_header_bytes", "idempotency_ttl", "header_timeout")
    for name in positive:
        if getattr(settings, name) <= 0:
            raise SystemExit(f"{_flag(name)} must be greater than 0")
    at_least_zero: tuple[str, ...] = ("linger", "max_age", "retry_ms", "jwt_leeway", "coalesce_ms")
    at_least_zero += ("max_connections", "max_connections_per_subject", "connect_rate")
    at_least_zero += ("max_connections_per_address", "connect_rate_per_address")
    at_least_zero += ("publish_rate",)
    at_least_zero += (
        "publish_replicas",
        "probe_interval",
        "drain_seconds",
        "max_lifetime",
        "tcp_keepalive",
    )
    for name in at_least_zero:
        if getattr(settings, name) < 0:
            raise SystemExit(f"{_flag(name)} must be 0 or more")
    if settings.workers > 1 and not settings.redis_url:
        raise SystemExit(
            "--workers above 1 needs --redis-url: the in-memory engine lives in one process, "
            "so workers would not see each other's events"
        )
    if settings.log_format not in LOG_FORMATS:
        raise SystemExit(
            f"--log-format: {settings.log_format!r} is not one of {', '.join(LOG_FORMATS)}"
        )
    _validate_security(settings)


LOG_FORMATS = ("plain", "json")
SUPPORTED_ALGORITHMS = (
    "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
    "ES256", "ES384", "ES512", "EdDSA",
)  # fmt: skip


def _validate_security(settings: Settings) -> None:
    for name in settings.jwt_algorithms:
        if name.lower() == "none":
            raise SystemExit("--jwt-algorithms: 'none' is never accepted")
        if name not in SUPPORTED_ALGORITHMS:
            raise SystemExit(
                f"--jwt-algorithms: unknown algorithm {name!r} "
                f"(supported: {', '.join(SUPPORTED_ALGORITHMS)})"
            )
    if settings.allow_anonymous and settings.auth_enabled:
        raise SystemExit(
            "--allow-anonymous turns authentication off, but a token key is configured: "
            "choose one (use --public-topics to let anyone read some topics)"
        )
    for pattern in settings.public_topics:
        if not is_valid_pattern(pattern):
            raise SystemExit(
                f"--public-topics: {pattern!r} is not a topic pattern "
                f"(1-{MAX_TOPIC_LENGTH} characters from A-Z a-z 0-9 _ . : / @ - and *)"
            )
    if settings.demo and settings.auth_enabled:
        raise SystemExit(
            "--demo is for development: its page reads and publishes without a token, so it "
            "does not run with token keys configured (start a node without them for the demo)"
        )
    if "*" in settings.cors_origin and len(settings.cors_origin) > 1:
        raise SystemExit("--cors-origin '*' allows every origin: give it alone")
    for origin in settings.cors_origin:
        if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", origin):
            raise SystemExit(
                f"--cors-origin: {origin!r} is not an origin like https://app.example:8443"
            )
    if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", settings.token_cookie):
        raise SystemExit(f"--token-cookie: {settings.token_cookie!r} is not a cookie name")


def is_loopback_address(host: str | None) -> bool:
    """A loopback IP address, IPv4-mapped ones included (a name is not an address)."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def is_loopback_host(host: str) -> bool:
    """A listen address on loopback: ``localhost`` or a loopback IP address."""
    return host == "localhost" or is_loopback_address(host)


def check_exposure(settings: Settings) -> None:
    """Anonymous mode is the loopback developer default; anywhere else it must be explicit."""
    if settings.auth_enabled or settings.allow_anonymous or is_loopback_host(settings.host):
        return
    raise SystemExit(
        f"refusing to serve {settings.host} without authentication: configure --jwt-secret, "
        "--jwt-public-key or --jwks-url, or pass --allow-anonymous to let anyone read every topic"
    )


def parse(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="sse-gateway serve")
    add_arguments(parser)
    return settings_from(parser.parse_args(argv))
