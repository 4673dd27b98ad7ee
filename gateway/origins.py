"""What a hostile page can make a visitor's browser send, and who is really on the socket.

- **Cross-site publishes (CSRF).** A page on any site can make the browser ``POST`` a
  ``text/plain`` or form body to ``/publish`` without a preflight. ``POST /publish`` refuses a
  request whose ``Origin`` is neither the gateway's own (``Origin`` matching ``Host``) nor
  allowed by ``--cors-origin`` (403 ``origin_not_allowed``), and any body that is not declared
  JSON (415 ``unsupported_media_type``; a request without ``Content-Type`` is read as JSON, as
  browsers always send one with a body).
- **DNS rebinding.** A page on ``evil.example`` whose name then resolves to 127.0.0.1 is
  same-origin with a developer's loopback node. In anonymous mode on loopback (no token key,
  no ``--allow-anonymous``), every request whose ``Host`` is not a loopback name is a 421
  ``host_not_allowed``.
- **The TCP peer.** uvicorn rewrites ``scope["client"]`` from ``X-Forwarded-For`` when the peer
  is a trusted proxy (``FORWARDED_ALLOW_IPS``). The loopback rule of anonymous publishing needs
  the socket's own peer, which :mod:`gateway.protocol` records in the scope.
"""

from __future__ import annotations

import functools
import ipaddress

from starlette.types import Scope

from gateway.config import Settings, is_loopback_address, is_loopback_host
from gateway.cors import CorsPolicy, request_origin
from gateway.errors import HTTPError
from gateway.protocol import PEER_EXTENSION

FORWARDING_HEADERS = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})
DEFAULT_PORTS = {b"http": b"80", b"https": b"443"}


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def tcp_peer(scope: Scope) -> str | None:
    """The address on the other end of the socket, whatever ``X-Forwarded-For`` says.

    Under another server than ``sse-gateway serve`` the scope has no recorded peer: then
    ``scope["client"]`` is used only when the request carries no forwarding header (which that
    server may have applied), and the peer is unknown otherwise."""
    extensions = scope.get("extensions") or {}
    if PEER_EXTENSION in extensions:
        peer = extensions[PEER_EXTENSION]
        return str(peer[0]) if peer else None
    if any(name in FORWARDING_HEADERS for name, _ in scope["headers"]):
        return None
    client = scope.get("client")
    return str(client[0]) if client else None


def is_loopback_client(scope: Scope) -> bool:
    """Both the TCP peer and the client address (``X-Forwarded-For`` from a trusted proxy)
    are loopback: a forged header cannot make a remote peer local, and a local proxy in front
    of the node does not make its remote clients local."""
    client = scope.get("client")
    return is_loopback_address(tcp_peer(scope)) and is_loopback_address(
        str(client[0]) if client else None
    )


def _split_host(authority: bytes) -> tuple[bytes, bytes]:
    """``host[:port]`` (IPv6 in brackets) as lower-case host and port."""
    authority = authority.strip().lower()
    if authority.startswith(b"["):
        end = authority.find(b"]")
        return authority[: end + 1], authority[end + 2 :] if end >= 0 else b""
    host, _, port = authority.partition(b":")
    return host, port


def same_origin(origin: bytes, host: bytes | None) -> bool:
    """``Origin`` names the host and port the request was sent to (its ``Host``)."""
    if host is None:
        return False
    scheme, separator, authority = origin.lower().partition(b"://")
    if not separator or scheme not in DEFAULT_PORTS:
        return False
    default = DEFAULT_PORTS[scheme]
    origin_host, origin_port = _split_host(authority)
    host_name, host_port = _split_host(host)
    return origin_host == host_name and (origin_port or default) == (host_port or default)


def is_json(content_type: bytes) -> bool:
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def check_publish_request(scope: Scope, cors: CorsPolicy) -> None:
    """Refuse what a cross-site page could make a browser send to ``POST /publish``."""
    origin = request_origin(scope)
    if not (origin is None or cors.allows(origin) or same_origin(origin, header(scope, b"host"))):
        raise HTTPError(
            403, "origin_not_allowed",
            f"origin {origin[:100].decode('latin-1')!r} may not publish "
            "(allow it with --cors-origin)",
        )  # fmt: skip
    content_type = header(scope, b"content-type")
    if content_type is not None and not is_json(content_type):
        raise HTTPError(
            415, "unsupported_media_type",
            "the body must be JSON, sent with Content-Type: application/json",
        )  # fmt: skip


def guards_host(settings: Settings) -> bool:
    """Anonymous mode on a loopback interface: the developer default that DNS rebinding
    targets. ``--allow-anonymous`` (a deliberate anonymous deployment) turns it off."""
    return (
        not settings.auth_enabled
        and not settings.allow_anonymous
        and is_loopback_host(settings.host)
    )


def is_loopback_name(host: bytes | None) -> bool:
    """Whether a ``Host`` no outside page can rebind to this machine (:func:`_loopback_name`);
    remembered for names of a usual length only, since the client chooses them."""
    if host is not None and len(host) > CACHED_HOST_BYTES:
        return _loopback_name(host)
    return _loopback_name_cached(host)


CACHED_HOST_BYTES = 256


def _loopback_name(host: bytes | None) -> bool:
    """A ``Host`` that no outside page can rebind to this machine: ``localhost``,
    ``*.localhost`` (RFC 6761), a loopback address, or a single-label name (public DNS serves
    none, so an attacker's page never has one). No ``Host`` (HTTP/1.0) is not a browser."""
    if host is None:
        return True
    name = _split_host(host)[0].decode("latin-1").removesuffix(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if name.startswith("["):
        return is_loopback_address(name[1:-1])
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return "." not in name
    return is_loopback_address(name)


_loopback_name_cached = functools.lru_cache(maxsize=1024)(_loopback_name)


def host_not_allowed(scope: Scope) -> HTTPError | None:
    host = header(scope, b"host")
    if is_loopback_name(host):
        return None
    shown = (host or b"")[:100].decode("latin-1")
    return HTTPError(
        421, "host_not_allowed",
        f"this anonymous loopback node answers only to loopback host names, not {shown!r} "
        "(configure a token key, or --allow-anonymous to serve any host name)",
    )  # fmt: skip
