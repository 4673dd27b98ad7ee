"""Keys from a JWKS URL: cached, refreshed when stale or when a token names an unknown ``kid``.

One fetch runs at a time and every waiter shares it; a fetch never takes longer than the
timeout, and refetches for unknown ``kid`` values are spaced so that a flood of forged tokens
cannot turn the gateway into a load generator against the key server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.request
from typing import Any

import jwt

from gateway.errors import HTTPError
from gateway.logs import redact, redact_url

log = logging.getLogger("gateway.auth")

MAX_JWKS_BYTES = 1 << 20
MAX_AGE = 300.0
MIN_REFETCH_INTERVAL = 1.0


def auth_unavailable(reason: str) -> HTTPError:
    return HTTPError(
        503, "auth_unavailable", f"token keys are unavailable: {reason}", {"retry-after": "5"}
    )


def fetch_keys(url: str, timeout: float) -> dict[str | None, list[Any]]:
    """Blocking: download and parse a JWKS into ``kid -> [public key objects]``."""
    request = urllib.request.Request(url, headers={"accept": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read(MAX_JWKS_BYTES + 1)
    if len(raw) > MAX_JWKS_BYTES:
        raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
    document = json.loads(raw)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("the JWKS has no 'keys' list")
    keys: dict[str | None, list[Any]] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK.from_dict(entry)
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError, KeyError):
            continue
        kid = entry.get("kid")
        keys.setdefault(kid if isinstance(kid, str) else None, []).append(key.key)
    return keys


class JwksCache:
    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._keys: dict[str | None, list[Any]] | None = None
        self._fetched_at = 0.0
        self._attempted_at = -MIN_REFETCH_INTERVAL
        self._fetch: asyncio.Task[None] | None = None

    def prefetch(self) -> None:
        self._start_fetch()

    async def close(self) -> None:
        if self._fetch is not None:
            self._fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._fetch

    async def keys(self, kid: str | None) -> list[Any]:
        """The keys that may have signed a token with this ``kid`` (all keys for no kid)."""
        if self._must_fetch(kid):
            await self._refresh()
        if self._keys is None:
            raise auth_unavailable("the JWKS could not be read")
        return self._lookup(kid)

    def keys_now(self, kid: str | None) -> list[Any] | None:
        """What :meth:`keys` returns when it would neither wait for a fetch nor refuse; None
        when it would."""
        if self._keys is None or self._must_fetch(kid):
            return None
        return self._lookup(kid)

    def _must_fetch(self, kid: str | None) -> bool:
        """Stale keys, or none for this ``kid``, and a fetch under way or allowed again."""
        now = time.monotonic()
        stale = self._keys is None or now - self._fetched_at > MAX_AGE
        fetching = self._fetch is not None and not self._fetch.done()
        may_fetch = fetching or now - self._attempted_at >= MIN_REFETCH_INTERVAL
        return may_fetch and (stale or not self._lookup(kid))

    def _lookup(self, kid: str | None) -> list[Any]:
        if self._keys is None:
            return []
        if kid is None:
            return [key for keys in self._keys.values() for key in keys]
        return self._keys.get(kid, [])

    async def _refresh(self) -> None:
        task = self._start_fetch()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), self.timeout + 1)

    def _start_fetch(self) -> asyncio.Task[None]:
        if self._fetch is None or self._fetch.done():
            self._attempted_at = time.monotonic()
            self._fetch = asyncio.create_task(self._download(), name="sse-gateway jwks")
        return self._fetch

    async def _download(self) -> None:
        try:
            keys = await asyncio.wait_for(
                asyncio.to_thread(fetch_keys, self.url, self.timeout), self.timeout + 1
            )
        except Exception as exc:
            log.warning(
                "JWKS fetch from %s failed: %s: %s",
                redact_url(self.url),
                type(exc).__name__,
                redact(str(exc).replace(self.url, redact_url(self.url))),
            )
            return
        self._keys = keys
        self._fetched_at = time.monotonic()
