"""Logging setup: uvicorn's format, the gateway's level, and tokens kept out of every line."""

from __future__ import annotations

import copy
import logging
import re
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

import orjson
from uvicorn.config import LOGGING_CONFIG
from uvicorn.logging import DefaultFormatter

_QUERY_PAIR = re.compile(r"(?<=[?&;])([^=&;\s\"'?#]+)=([^&;\s\"']*)")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+")
SECRET_PARAMETERS = frozenset({"token", "access_token", "password", "api_key", "apikey", "key"})


def _redact_pair(match: re.Match[str]) -> str:
    """A query parameter is judged by its decoded name, as the gateway reads it: ``%74oken``
    is ``token``."""
    name = match.group(1)
    decoded = unquote_plus(name) if "%" in name or "+" in name else name
    if decoded.strip().lower() in SECRET_PARAMETERS:
        return f"{name}=***"
    return match.group(0)


def redact(text: str) -> str:
    """Query values of ``token`` (however it is percent-encoded) and of other secret-looking
    parameters, and ``Bearer ...`` credentials, become ``***``."""
    if "=" in text:
        text = _QUERY_PAIR.sub(_redact_pair, text)
    if "earer" in text:
        text = _BEARER.sub(r"\1***", text)
    return text


def redact_url(url: str) -> str:
    """A URL for a log line: no user or password, and no query values."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if parts.username is not None or parts.password is not None:
        netloc = "***@" + netloc
    query = "&".join(
        f"{name.partition('=')[0]}=***" if "=" in name else name
        for name in parts.query.split("&")
        if name
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "color_message",
}  # fmt: skip
"""Attributes every record has (and uvicorn's ANSI copy of its message): the rest came as
``extra=`` and are a line's own fields."""
_ACCESS_FIELDS = ("client", "method", "path", "http_version", "status")
_PLAIN_VALUE = re.compile(r"[^\s\"=]+")


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and k[0] != "_"}


class RedactTokens(logging.Filter):
    """Applied to every handler, so uvicorn's access log (which prints the full path with its
    query string) never writes a ``?token=`` in clear, nor does any ``extra=`` field."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        for name, value in extra_fields(record).items():
            if isinstance(value, str):
                setattr(record, name, redact(value))
        return True


def _plain(value: Any) -> str:
    if value is None:
        return "null"
    text = str(value)
    return text if _PLAIN_VALUE.fullmatch(text) else orjson.dumps(text).decode()


class PlainFormatter(DefaultFormatter):
    """uvicorn's format, with a record's ``extra=`` fields appended as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = extra_fields(record)
        if fields and record.name.startswith("gateway"):
            line += " " + " ".join(f"{k}={_plain(v)}" for k, v in fields.items())
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    then the record's own fields (an access line: client, method, path, http_version, status)
    and ``exc_info`` as text."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        args = record.args
        if record.name == "uvicorn.access" and isinstance(args, tuple) and len(args) == 5:
            line.update(zip(_ACCESS_FIELDS, args, strict=True))
        for name, value in extra_fields(record).items():
            line.setdefault(name, value)
        if record.exc_info:
            line["exc_info"] = redact(self.formatException(record.exc_info))
        return orjson.dumps(line, default=str).decode()


def log_config(level: str, log_format: str = "plain") -> dict[str, Any]:
    """uvicorn's logging config with the gateway's logger, redaction on every handler, and
    the chosen format (``json``: uvicorn's lines and access log too, and every other logger
    through the root)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": "gateway.logs.RedactTokens"}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_tokens")
    config["loggers"]["gateway"] = {
        "handlers": ["default"], "level": level.upper(), "propagate": False
    }  # fmt: skip
    if log_format == "json":
        for formatter in config["formatters"].values():
            formatter.clear()
            formatter["()"] = "gateway.logs.JsonFormatter"
        config["root"] = {"handlers": ["default"], "level": "WARNING"}
    else:
        config["formatters"]["default"]["()"] = "gateway.logs.PlainFormatter"
    return config
