"""Logging setup: uvicorn's format, the gateway's level, and tokens kept out of every line."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

from uvicorn.config import LOGGING_CONFIG

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


class RedactTokens(logging.Filter):
    """Applied to every handler, so uvicorn's access log (which prints the full path with its
    query string) never writes a ``?token=`` in clear."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def log_config(level: str) -> dict[str, Any]:
    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_tokens"] = {"()": "gateway.logs.RedactTokens"}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).append("redact_tokens")
    config["loggers"]["gateway"] = {
        "handlers": ["default"], "level": level.upper(), "propagate": False
    }  # fmt: skip
    return config
