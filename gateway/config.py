"""One ``Settings`` object from command-line flags, ``SSE_GATEWAY_*`` variables and defaults.

Every field is a flag ``--field-name`` and a variable ``SSE_GATEWAY_FIELD_NAME``; a flag wins
over the variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

ENV_PREFIX = "SSE_GATEWAY_"


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Settings:
    host: str = _opt("127.0.0.1", "interface to listen on (0.0.0.0 in containers)")
    port: int = _opt(8000, "TCP port to listen on")
    redis_url: str | None = _opt(
        None, "Redis URL (redis://, rediss://, unix://); without one the in-memory engine runs"
    )
    prefix: str = _opt("sse", "prefix of every Redis key and channel")
    heartbeat: float = _opt(15.0, "seconds of silence after which a ': ping' comment is sent")
    retry_ms: int = _opt(3000, "reconnect delay announced to browsers in the preamble (ms)")
    max_pending_bytes: int = _opt(
        1 << 20, "bytes queued for one client before it is disconnected as too slow"
    )
    send_timeout: float = _opt(10.0, "seconds one write may take before the client is dropped")
    linger: float = _opt(2.0, "seconds a topic stays subscribed after its last local client left")
    subscribe_timeout: float = _opt(5.0, "seconds to wait for the engine to confirm a subscribe")
    max_events: int = _opt(2000, "history kept per topic by events published through this node")
    max_age: float = _opt(3600.0, "seconds of history kept per topic (0: no age limit)")
    max_publish_bytes: int = _opt(64 * 1024, "largest POST /publish body accepted")
    allow_remote_publish: bool = _opt(
        False, "accept POST /publish from non-loopback addresses without authentication"
    )
    log_level: str = _opt("info", "debug, info, warning or error")
    access_log: bool = _opt(True, "log one line per HTTP request")

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


def _convert(f: dataclasses.Field[Any], text: str) -> Any:
    default: Any = f.default
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
    positive = ("heartbeat", "max_pending_bytes", "send_timeout", "subscribe_timeout", "max_events")
    for name in positive:
        if getattr(settings, name) <= 0:
            raise SystemExit(f"{_flag(name)} must be greater than 0")
    for name in ("linger", "max_age", "retry_ms"):
        if getattr(settings, name) < 0:
            raise SystemExit(f"{_flag(name)} must be 0 or more")


def parse(argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog="sse-gateway serve")
    add_arguments(parser)
    return settings_from(parser.parse_args(argv))
