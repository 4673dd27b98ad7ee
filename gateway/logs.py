"""Logging setup: uvicorn's format, the gateway's level, and tokens kept out of every line."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

from uvicorn.config import LOGGING_CONFIG

_QUERY_TOKEN = re.compile(r"(?i)(\btoken=)[^&\s\"']*")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=-]+")


def redact(text: str) -> str:
    """``token=...`` query values and ``Bearer ...`` credentials become ``***``."""
    if "oken=" not in text and "earer" not in text:
        return text
    return _BEARER.sub(r"\1***", _QUERY_TOKEN.sub(r"\1***", text))


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
