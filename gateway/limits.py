"""Admission limits: open streams per node and per subject, new streams per second."""

from __future__ import annotations

import functools
import ipaddress
import itertools
import math
import re
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.auth import MAX_TOKEN_BYTES, cookie_token, invalid_token
from gateway.config import Settings
from gateway.errors import HTTPError

MAX_TRACKED_KEYS = 100_000


class RateLimiter:
    """Token buckets keyed by client address or subject; ``rate`` tokens per second.

    The table holds at most ``max_keys`` buckets, kept in the order they were last used. When
    a new key finds it full, the buckets that have refilled (a full bucket is the same as no
    bucket) are forgotten; if none has, the least recently used hundredth goes, those nearest
    to full. A flood of new keys never resets everyone's buckets at once (which handed every
    limited client a fresh burst), and memory stays bounded however many keys arrive."""

    def __init__(self, rate: float, burst: int, max_keys: int = MAX_TRACKED_KEYS) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}

    def acquire(self, key: str, now: float | None = None, cost: float = 1.0) -> float:
        """Take ``cost`` tokens (at most the burst); return 0 if granted, else the seconds until
        they are available."""
        now = time.monotonic() if now is None else now
        entry = self._buckets.pop(key, None)
        if entry is None:
            if len(self._buckets) >= self.max_keys:
                self._make_room(now)
            tokens = self.burst
        else:
            tokens = min(self.burst, entry[0] + (now - entry[1]) * self.rate)
        if tokens < cost:
            self._buckets[key] = (tokens, now)
            return (cost - tokens) / self.rate
        self._buckets[key] = (tokens - cost, now)
        return 0.0

    def refund(self, key: str, cost: float = 1.0) -> None:
        """Give back what an :meth:`acquire` took, for a request refused after all."""
        entry = self._buckets.get(key)
        if entry is not None:
            self._buckets[key] = (min(self.burst, entry[0] + cost), entry[1])

    def _make_room(self, now: float) -> None:
        for key, (tokens, stamp) in list(self._buckets.items()):
            if tokens + (now - stamp) * self.rate >= self.burst:
                del self._buckets[key]
        if len(self._buckets) >= self.max_keys:
            stalest = list(itertools.islice(self._buckets, max(1, self.max_keys // 100)))
            for key in stalest:
                del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)


def retry_after(seconds: float) -> dict[str, str]:
    return {"retry-after": str(max(1, math.ceil(seconds)))}


def rate_limited(what: str, seconds: float) -> HTTPError:
    return HTTPError(
        429, "rate_limited", f"too many new streams from this {what}; retry later",
        retry_after(seconds),
    )  # fmt: skip


class Admission:
    """Counts open streams and paces new ones; every refusal is an ``HTTPError`` (429 or 503:
    temporary, so the stream answers a browser with a refusal it retries by itself).

    The address is ``scope["client"]``: the peer, or the ``X-Forwarded-For`` address when the
    peer is a proxy uvicorn trusts (``FORWARDED_ALLOW_IPS``). The per-address options are off by
    default, because behind a balancer that does not forward it one address is every client;
    a balancer sits on a private or loopback address, so until they are set, public addresses
    alone get :data:`PUBLIC_ADDRESS_STREAMS` and :data:`PUBLIC_ADDRESS_RATE`: a node reachable
    from the internet without a proxy is never one address's to fill."""

    def __init__(self, settings: Settings) -> None:
        self.max_connections = settings.max_connections
        self.max_per_subject = settings.max_connections_per_subject
        self.max_per_address = settings.max_connections_per_address
        self.open = 0
        self.by_subject: dict[str, int] = {}
        self.by_address_open: dict[str, int] = {}
        self.by_address = rate_limiter(settings.connect_rate_per_address)
        self.public_only = not self.max_per_address and self.by_address is None
        """No per-address option is set: the built-in limits guard public addresses only."""
        if self.public_only:
            self.max_per_address = PUBLIC_ADDRESS_STREAMS
            self.by_address = rate_limiter(PUBLIC_ADDRESS_RATE)
        self.by_subject_rate = rate_limiter(settings.connect_rate)

    def check_node(self) -> None:
        if self.max_connections and self.open >= self.max_connections:
            raise HTTPError(
                503, "too_many_connections", "this node is at its connection limit",
                retry_after(1 + self.open % 5),
            )  # fmt: skip

    def check_address(self, address: str | None) -> str | None:
        """Returns the key whose rate was charged, if any."""
        if not address or (self.public_only and not is_public(address)):
            return None
        address = address_key(address)
        if self.max_per_address and self.by_address_open.get(address, 0) >= self.max_per_address:
            raise HTTPError(
                429, "too_many_address_connections",
                f"this address has {self.max_per_address} open streams already",
                retry_after(5),
            )  # fmt: skip
        if self.by_address is not None:
            wait = self.by_address.acquire(address)
            if wait:
                raise rate_limited("address", wait)
            return address
        return None

    def check_subject(self, subject: str | None) -> None:
        if subject is None:
            return
        if self.max_per_subject and self.by_subject.get(subject, 0) >= self.max_per_subject:
            raise HTTPError(
                429, "too_many_subject_connections",
                f"subject {subject[:100]!r} has {self.max_per_subject} open streams already",
                retry_after(5),
            )  # fmt: skip
        if self.by_subject_rate is not None:
            wait = self.by_subject_rate.acquire(subject)
            if wait:
                raise rate_limited("subject", wait)

    def admit(self, subject: str | None, address: str | None) -> None:
        """The node, address and subject checks as one step: when one refuses, no rate token
        stays taken (the same request may then be checked again, with the same outcome)."""
        self.check_node()
        charged = self.check_address(address)
        try:
            self.check_subject(subject)
        except HTTPError:
            if charged is not None and self.by_address is not None:
                self.by_address.refund(charged)
            raise

    def opened(self, subject: str | None, address: str | None = None) -> None:
        self.open += 1
        if subject is not None:
            self.by_subject[subject] = self.by_subject.get(subject, 0) + 1
        if address and self._counts(address):
            address = address_key(address)
            self.by_address_open[address] = self.by_address_open.get(address, 0) + 1

    def closed(self, subject: str | None, address: str | None = None) -> None:
        self.open -= 1
        if subject is not None:
            _decrement(self.by_subject, subject)
        if address and self._counts(address):
            _decrement(self.by_address_open, address_key(address))

    def _counts(self, address: str) -> bool:
        return bool(self.max_per_address) and (not self.public_only or is_public(address))


PUBLIC_ADDRESS_STREAMS = 1000
"""Open streams per public address while no per-address option is set."""
PUBLIC_ADDRESS_RATE = 50.0
"""New streams per second per public address (bursts of twice that) while none is set."""


def _is_public(address: str) -> bool:
    """Whether ``address`` is a globally routable IP address: never a balancer's private,
    loopback or link-local one (anything unparsable counts as not public)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global


def _address_key(address: str) -> str:
    """What the per-address limits count: an IPv6 client by its /64, which one host or one
    home usually holds whole (so it cannot dodge them by changing address within it)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address)
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


CACHED_ADDRESS_CHARS = 64
"""Addresses at most this long are remembered (an IPv6 address with a zone fits): a longer one,
which a forwarding header can carry, is parsed each time rather than kept."""
_is_public_cached = functools.lru_cache(maxsize=4096)(_is_public)
_address_key_cached = functools.lru_cache(maxsize=4096)(_address_key)


def is_public(address: str) -> bool:
    """Whether ``address`` is a globally routable IP address: never a balancer's private,
    loopback or link-local one (anything unparsable counts as not public)."""
    if len(address) > CACHED_ADDRESS_CHARS:
        return _is_public(address)
    return _is_public_cached(address)


def address_key(address: str) -> str:
    """What the per-address limits count: an IPv6 client by its /64."""
    if len(address) > CACHED_ADDRESS_CHARS:
        return _address_key(address)
    return _address_key_cached(address)


def rate_limiter(rate: float) -> RateLimiter | None:
    """``rate`` per second in bursts of twice that; None for 0 (unlimited)."""
    return RateLimiter(rate, max(1, math.ceil(2 * rate))) if rate > 0 else None


def _decrement(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def check_sizes(scope: Scope, settings: Settings) -> None:
    """Refuse oversized requests before any parsing work is spent on them; an oversized token
    is a 401 wherever it was sent, so a client learns that its token, not its URL, is wrong."""
    size = 0
    for name, value in scope["headers"]:
        size += len(name) + len(value) + 4
        if len(value) <= MAX_TOKEN_BYTES:
            continue
        if name == b"authorization":
            raise token_too_large()
        if name == b"cookie":
            token = cookie_token([(name, value)], settings.token_cookie)
            if token is not None and len(token) > MAX_TOKEN_BYTES:
                raise token_too_large()
    query = scope["query_string"]
    if len(query) > settings.max_query_bytes:
        for match in QUERY_TOKEN.finditer(query):
            if len(match.group(1)) > MAX_TOKEN_BYTES:
                raise token_too_large()
        raise HTTPError(
            414, "query_too_long",
            f"the query string must be at most {settings.max_query_bytes} bytes",
        )  # fmt: skip
    if size > settings.max_header_bytes:
        raise HTTPError(
            431, "headers_too_large",
            f"the headers must be at most {settings.max_header_bytes} bytes",
        )  # fmt: skip


QUERY_TOKEN = re.compile(rb"(?:^|&)token=([^&]*)")


def token_too_large() -> HTTPError:
    return invalid_token(f"it is longer than {MAX_TOKEN_BYTES} bytes")


class RequestSizeLimits:
    """``check_sizes`` for the routes other than the stream (which checks in its own order)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                check_sizes(scope, self.settings)
            except HTTPError as exc:
                await exc(scope, receive, send)
                return
        await self.app(scope, receive, send)
