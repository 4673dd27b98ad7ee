"""Hostile input (acceptance 9 and 10).

9. Random query strings, headers, ids, topics and bodies thrown at ``GET /events`` and
   ``POST /publish`` of a token-mode gateway never get a 5xx or a traceback: every refusal is a
   4xx JSON error (or the HTTP parser's own 400 for malformed HTTP), and a canary subscriber
   reading throughout receives every event published meanwhile, exactly once, in order.
10. Event names and topics containing CR, LF or NUL can neither be published nor inject frames,
    whatever the way in (``POST /publish``, the Python publisher, ``?topic=``, ``?types=``,
    ``Last-Event-ID``), and a subscriber sees exactly the legitimate events.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from types import TracebackType
from typing import Any

import httpx
import jwt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jwt.utils import base64url_encode

from publisher import Publisher
from tests.support.gateway import GatewayProcess
from tests.support.sse import SSEStream, collect, open_stream, subscribed

SECRET = "hostile-input-secret-" + "0123456789abcdef" * 4
ORIGIN = "https://app.example"
PARSER_400 = b"Invalid HTTP request received."
"""uvicorn's own answer to a request its HTTP parser rejects (before the app sees it)."""
DAY = 24 * 3600


def mint(claims: dict[str, Any], key: str = SECRET, algorithm: str = "HS256", **kw: Any) -> str:
    return jwt.encode(claims, key, algorithm=algorithm, **kw)


def claims(sub: str = "fuzz", ttl: float = DAY, **sse: Any) -> dict[str, Any]:
    return {"sub": sub, "exp": int(time.time() + ttl), "sse": sse}


def forged(header: dict[str, Any], payload: dict[str, Any], signature: bytes) -> str:
    def part(raw: bytes) -> str:
        return base64url_encode(raw).decode()

    return ".".join(
        (part(json.dumps(header).encode()), part(json.dumps(payload).encode()), part(signature))
    )


READ_ALL = mint(claims(subscribe=["*"]))
PUBLISH_FUZZ = mint(claims(publish=["fuzz:*"]))
"""Fuzzed publishes may succeed, but only to ``fuzz:*``: never to the canary's topics."""
CANARY_WRITER = mint(claims("canary-writer", publish=["canary", "private:canary"]))
CANARY_READER = mint(claims("canary-reader", subscribe=["private:canary"]))
INJECTOR = mint(claims("injector", subscribe=["inj:*"], publish=["inj:*"]))

VALID_TOKENS = [
    READ_ALL,
    PUBLISH_FUZZ,
    mint(claims(subscribe=["fuzz:*", "canary"], publish=["fuzz:*"]), algorithm="HS512"),
    mint(claims(subscribe=["*"]), headers={"kid": "../../etc/passwd", "jku": "http://10.0.0.1/"}),
]
BACKTRACKING_PUBLIC = "*:*:*:*:archive"
"""A public pattern that a ``.*`` regex matched in seconds against a topic of colons."""
BACKTRACKER = mint(
    claims("backtracker", subscribe=["*a*a*a*b", "*:*:*:*:x"], publish=["fuzz:*:*:*:*:x"])
)
"""Granted patterns that backtrack against long runs of ``a`` or ``:`` (issue 10 E)."""
VALID_TOKENS.append(BACKTRACKER)
HOSTILE_TOKENS = [
    mint(claims(subscribe=["*"], ttl=-DAY)),
    mint(claims(subscribe=["*"]), key="another-secret-0123456789abcdef0123456"),
    jwt.encode(claims(subscribe=["*"], publish=["*"]), "", algorithm="none"),
    forged({"alg": "RS256", "typ": "JWT"}, claims(subscribe=["*"]), b"\x00" * 32),
    forged({"alg": "HS256"}, {"sub": "x"}, b""),
    forged({"alg": ["HS256"]}, claims(subscribe=["*"]), b"sig"),
    mint({"sub": "fuzz", "exp": int(time.time() + DAY), "sse": {"subscribe": "*"}}),
    mint({"sub": "fuzz", "exp": int(time.time() + DAY), "sse": "everything"}),
    mint({"sub": "fuzz", "exp": int(time.time() + DAY), "sse": {"subscribe": [None, 5, {}]}}),
    mint({"sub": "fuzz", "exp": int(time.time() + DAY), "sse": {"publish": [["fuzz:*"]]}}),
    mint({"sub": 5, "exp": int(time.time() + DAY), "sse": {"subscribe": ["*"]}}),
    mint({"exp": int(time.time() + DAY), "sse": {"subscribe": ["*"]}}),
    mint({"sub": "fuzz", "sse": {"subscribe": ["*"]}}),
    mint({"sub": "fuzz", "exp": "tomorrow", "sse": {"subscribe": ["*"]}}),
    mint({"sub": "fuzz", "exp": 1e308, "sse": {"subscribe": ["*"]}}),
    mint({**claims(subscribe=["*"]), "pad": "x" * 9000}),
    READ_ALL[:-6],
    READ_ALL + "x",
    READ_ALL.replace(".", "..", 1),
    "a.b.c",
    "e30.e30.",
    "....",
    "null",
]
TOKENS = VALID_TOKENS + HOSTILE_TOKENS

Raw = str | bytes


def as_bytes(value: Raw) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass")


# -- the gateway under attack -------------------------------------------------------------------


@dataclass
class Hostile:
    gateway: GatewayProcess
    redis_url: str
    prefix: str

    @property
    def url(self) -> str:
        return self.gateway.url

    def direct_publisher(self) -> Publisher:
        """A publisher writing straight to the gateway's Redis."""
        return Publisher.from_url(self.redis_url, prefix=self.prefix)


@pytest.fixture(scope="module")
def hostile(redis_url: str) -> Iterator[Hostile]:
    """One token-mode gateway for the whole module, with every limit that could answer 429 or
    503 lifted: any 5xx (or 429) seen here is a bug."""
    prefix = "t" + uuid.uuid4().hex[:10]
    flags = ["--jwt-secret", SECRET, "--public-topics", "canary",
             "--public-topics", BACKTRACKING_PUBLIC, "--cors-origin", ORIGIN,
             "--max-connections", "1000000", "--max-connections-per-subject", "0",
             "--connect-rate", "0", "--prefix", prefix]  # fmt: skip
    gateway = GatewayProcess(*flags, redis_url=redis_url)
    try:
        gateway.start()
        yield Hostile(gateway, redis_url, prefix)
    finally:
        gateway.close()


# -- requests and what came back ----------------------------------------------------------------


@dataclass(frozen=True)
class HostileRequest:
    method: bytes
    target: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    version: bytes = b"HTTP/1.1"
    raw: bool = False
    """Send through a plain socket only (malformed HTTP that no client library would send)."""


@dataclass(frozen=True)
class Outcome:
    status: int | None
    """``None``: the server closed the connection without answering."""
    content_type: str
    body: bytes
    via: str


class Refused(Exception):
    """httpx (h11) will not put this request on the wire."""


def send_httpx(client: httpx.Client, base_url: str, request: HostileRequest) -> Outcome:
    """Send with httpx, the request target exactly as given; read a 200 stream's first chunk."""
    try:
        with client.stream(
            request.method.decode("latin-1"),
            base_url + "/",
            headers=list(request.headers),
            content=request.body or None,
            extensions={"target": request.target},
        ) as response:
            content_type = response.headers.get("content-type", "")
            if response.status_code == 200 and content_type.startswith("text/event-stream"):
                body = next(response.iter_raw(), b"")
            else:
                body = response.read()
            return Outcome(response.status_code, content_type, body, "httpx")
    except (httpx.LocalProtocolError, UnicodeError, ValueError) as exc:
        raise Refused(str(exc)) from exc
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError):
        return Outcome(None, "", b"", "httpx")


def encode_raw(request: HostileRequest) -> bytes:
    head = [request.method + b" " + request.target + b" " + request.version, b"Host: 127.0.0.1"]
    head += [name + b": " + value for name, value in request.headers]
    if request.body:
        head.append(b"Content-Length: %d" % len(request.body))
    head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + request.body


def send_raw(port: int, request: HostileRequest, timeout: float = 10.0) -> Outcome:
    """Write the request on a plain socket; read the status line, headers and a bounded body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # the server may answer (or close) before it has read everything
        with contextlib.suppress(OSError):
            sock.sendall(encode_raw(request))
        received = b""
        try:
            while True:
                outcome = parse_raw_response(received, request.method == b"HEAD")
                if outcome is not None:
                    return outcome
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            message = f"no complete answer in {timeout}s, got {received[:300]!r}"
            raise AssertionError(message) from None
    if not received:
        return Outcome(None, "", b"", "socket")
    outcome = parse_raw_response(received, request.method == b"HEAD", eof=True)
    assert outcome is not None, f"truncated response {received[:300]!r}"
    return outcome


def parse_raw_response(received: bytes, head_only: bool, eof: bool = False) -> Outcome | None:
    end = received.find(b"\r\n\r\n")
    if end < 0:
        return None
    status_line, *lines = received[:end].split(b"\r\n")
    match = re.fullmatch(rb"HTTP/1\.[01] ([0-9]{3})(?: .*)?", status_line)
    assert match is not None, f"not an HTTP status line: {status_line!r}"
    status = int(match.group(1))
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip().decode("latin-1")
    content_type = headers.get(b"content-type", "")
    body = received[end + 4 :]
    if head_only or (status == 200 and content_type.startswith("text/event-stream")):
        return Outcome(status, content_type, b"", "socket")
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and len(body) >= int(length):
        return Outcome(status, content_type, body[: int(length)], "socket")
    return Outcome(status, content_type, body, "socket") if eof else None


def send(client: httpx.Client, hostile: Hostile, request: HostileRequest) -> Outcome:
    if not request.raw:
        try:
            return send_httpx(client, hostile.url, request)
        except Refused:
            pass
    return send_raw(hostile.gateway.port, request)


def check(request: HostileRequest, outcome: Outcome) -> None:
    """No 5xx, no 429 (every limit is lifted), no traceback, and errors are JSON with a code."""
    where = f"{request!r:.1500} -> {outcome!r:.800}"
    assert outcome.status is None or outcome.status < 500, where
    assert outcome.status != 429, where
    assert b"Traceback" not in outcome.body, where
    assert b'File "' not in outcome.body, where
    if outcome.status is None or outcome.status < 400 or request.method == b"HEAD":
        return
    if outcome.body == PARSER_400:
        assert outcome.status == 400, where
        return
    assert outcome.content_type.startswith("application/json"), where
    body = json.loads(outcome.body)
    assert isinstance(body, dict), where
    assert isinstance(body.get("error"), str), where
    assert body["error"], where


# -- strategies ---------------------------------------------------------------------------------

TOPIC_CHARS = "ABCXYZabcxyz0189_.:/@-"
ODD_TOPICS = ["canary", "private:canary", "fuzz:a", "fuzz:", "user:alice", "*", "fuzz:*", "",
              " ", "a b", "x" * 256, "x" * 257, "caf\u00e9", "x\r\nevent: evil", "canary\x00",
              "canary\n", "%0D%0A", "../../etc", "\ufeffcanary"]  # fmt: skip
ODD_IDS = ["0-0", "0", "1-0", "1-", "-1-0", "1-2-3", " 1-0 ", "abc", "", "\uff11-0", "1_0",
           "18446744073709551615-18446744073709551615", "18446744073709551616-0",
           "99999999999999999999999-0", "0x10-0", "1e3-0", "9" * 400]  # fmt: skip
QUERY_NAMES = ["topic", "topic", "topic", "types", "since", "lastEventID", "token", "", "Topic",
               "topic[]", "t\u00f3pico", "topic%00"]  # fmt: skip
QUERY_JUNK = [b"", b"", b"&", b"&&", b"=", b"==", b"%", b"%F", b"%FF", b"%zz", b";", b"%00",
              b"%0D%0A", b"#frag", b"?", b"+", b"%C0%80", b"%ED%A0%80"]  # fmt: skip

valid_topics = st.text(alphabet=TOPIC_CHARS, min_size=1, max_size=24)
backtracking_topics = st.one_of(
    st.integers(200, 256).map(lambda n: ":" * n),
    st.integers(200, 256).map(lambda n: "a" * n),
    st.integers(100, 128).map(lambda n: "a:" * n),
    st.integers(100, 120).map(lambda n: "fuzz:" + ":" * n + "y"),
)
"""Topic shapes that make a backtracking glob matcher explore every split (issue 10 E)."""
topics = st.one_of(
    backtracking_topics,
    st.sampled_from(ODD_TOPICS),
    valid_topics,
    valid_topics.map(lambda t: "fuzz:" + t),
    st.text(max_size=30),
)
ids = st.one_of(
    st.sampled_from(ODD_IDS),
    st.tuples(st.integers(-5, 2**70), st.integers(-5, 2**70)).map(lambda p: f"{p[0]}-{p[1]}"),
    st.text(max_size=30),
)
tokens = st.one_of(st.sampled_from(TOKENS), st.text(max_size=60))
event_names = st.one_of(
    st.sampled_from(["message", "seq", "done", "x\ny", "x\r", "x\r\nid: 1-0", "\x00", "", " "]),
    st.text(max_size=20),
)
types_values = st.one_of(
    st.sampled_from(["message", "a,b", ",,,", "a\r\nb", "\x00", "\u00e9", "a b", "seq,done"]),
    st.text(max_size=20),
)
since_values = st.one_of(
    st.integers(-10, 2**70).map(str), st.sampled_from(["", "1.5", "-1", "1e9", "\u0663", "now"])
)
huge_values = st.sampled_from([1000, 9000, 20000, 70000]).map(lambda n: "x" * n)
query_values = st.one_of(
    topics, ids, tokens, types_values, since_values, huge_values, st.binary(max_size=40)
)
query_names = st.one_of(st.sampled_from(QUERY_NAMES), st.text(max_size=10))


def encode_query_part(value: Raw, mode: str) -> bytes:
    raw = as_bytes(value)
    if mode == "quote":
        return urllib.parse.quote_from_bytes(raw, safe="").encode()
    if mode == "plus":
        return urllib.parse.quote_plus(raw, safe="").encode()
    return raw


query_pairs = st.tuples(
    query_names, query_values, st.sampled_from(["quote", "quote", "plus", "raw"]), st.booleans()
).map(
    lambda p: (
        encode_query_part(p[0], p[2]) + (b"=" + encode_query_part(p[1], p[2]) if p[3] else b"")
    )
)
query_junk = st.sampled_from(QUERY_JUNK)
many_params = st.integers(60, 400).map(lambda n: b"&".join(b"topic=fuzz:%d" % i for i in range(n)))


def quoted(name: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """``name=<value percent-encoded>``."""
    return values.map(lambda v: name.encode() + b"=" + encode_query_part(v, "quote"))


plausible_queries = st.tuples(
    st.lists(
        quoted("topic", st.one_of(valid_topics, valid_topics.map(lambda t: "fuzz:" + t),
                                  st.sampled_from(["canary", "fuzz:a", "private:canary"]),
                                  backtracking_topics)),
        min_size=1, max_size=3,
    ),
    st.lists(
        st.one_of(quoted("types", types_values), quoted("since", since_values),
                  quoted("lastEventID", ids), quoted("token", tokens), query_pairs),
        max_size=2,
    ),
).map(lambda q: b"&".join(q[0] + q[1]))  # fmt: skip
"""Valid topics with one or two odd extras: these get past parsing to the deeper checks."""
queries = st.one_of(
    plausible_queries,
    plausible_queries,
    st.tuples(query_junk, st.lists(query_pairs, max_size=6), query_junk).map(
        lambda q: q[0] + b"&".join(q[1]) + q[2]
    ),
    many_params,
)
REFUSED_NAMES = {"host", "content-length", "transfer-encoding", "connection", "expect", "te",
                 "upgrade", "trailer", "keep-alive"}  # fmt: skip
"""Header names a random header must not take: they change how the request is framed."""
ODD_AUTHORIZATIONS = ["Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "bearer " + READ_ALL,
                      "Bearer  " + READ_ALL, "Bearer " + READ_ALL + " extra",
                      "Bearer\t" + READ_ALL, "Bearer " + "x" * 9000,
                      "Bearer " + "x" * 20000]  # fmt: skip
ODD_COOKIES = ["sse_token=", "sse_token", "=;;=;", f"sse_token=a; sse_token={READ_ALL}",
               '"sse_token"="x"', f"a=b; sse_token={READ_ALL}; c", "sse_token=" + "x" * 9000,
               f"SSE_TOKEN={READ_ALL}", f"sse_token={READ_ALL}%00"]  # fmt: skip
ODD_ORIGINS = [ORIGIN, ORIGIN, ORIGIN + "/", "https://evil.example", "null", "", "*",
               "https://app.example.evil", "HTTPS://APP.EXAMPLE",
               "https://app.example:443"]  # fmt: skip
CONTENT_TYPES = ["application/json", "application/json; charset=latin-1", "text/plain", "",
                 "*/*", "multipart/form-data; boundary=x",
                 "application/x-www-form-urlencoded"]  # fmt: skip

header_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
header_names = header_names.map(lambda n: "x-" + n if n.lower() in REFUSED_NAMES else n)
header_values = st.one_of(st.text(max_size=40), st.binary(max_size=40), huge_values)
authorizations = st.one_of(
    st.sampled_from(VALID_TOKENS).map(lambda t: "Bearer " + t),
    st.sampled_from(TOKENS).map(lambda t: "Bearer " + t),
    st.sampled_from(TOKENS),
    st.text(max_size=40).map(lambda t: "Bearer " + t),
    st.sampled_from(ODD_AUTHORIZATIONS),
    st.binary(max_size=40),
)
cookies = st.one_of(
    st.sampled_from(TOKENS).map(lambda t: "sse_token=" + t),
    st.sampled_from(ODD_COOKIES),
    st.text(max_size=40),
    st.binary(max_size=40),
)
origins = st.one_of(st.sampled_from(ODD_ORIGINS), st.text(max_size=30))
content_types = st.sampled_from(CONTENT_TYPES)
headers = st.lists(
    st.one_of(
        st.tuples(st.just("last-event-id"), ids),
        st.tuples(st.just("authorization"), authorizations),
        st.tuples(st.just("cookie"), cookies),
        st.tuples(st.just("origin"), origins),
        st.tuples(
            st.just("access-control-request-method"),
            st.sampled_from(["GET", "POST", "DELETE", "", "get"]),
        ),
        st.tuples(
            st.just("access-control-request-headers"),
            st.sampled_from(["authorization", "last-event-id,content-type", "x-evil", "*"]),
        ),
        st.tuples(st.just("content-type"), content_types),
        st.tuples(st.just("accept"), st.sampled_from(["text/event-stream", "*/*", "", "a/b"])),
        st.tuples(header_names, header_values),
    ),
    max_size=6,
).map(lambda hs: tuple((as_bytes(name), as_bytes(value)) for name, value in hs))

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
publish_objects = st.dictionaries(
    st.sampled_from(
        ["topic", "topic", "topics", "topics", "event", "data", "data", "id", "retry", "Topic", ""]
    ),
    st.one_of(json_values, topics, st.lists(topics, max_size=4), event_names),
    max_size=5,
)
publish_attempts = st.fixed_dictionaries(
    {"data": json_values},
    optional={
        "topic": st.one_of(topics, valid_topics.map(lambda t: "fuzz:" + t), st.just("fuzz:a")),
        "event": event_names,
    },
)


def dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True, ensure_ascii=False).encode("utf-8", "surrogatepass")


bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    json_values.map(dumps),
    publish_objects.map(dumps),
    publish_attempts.map(dumps),
    publish_attempts.map(dumps),
    st.integers(1, 32000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 20000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.sampled_from([60 * 1024, 70 * 1024]).map(
        lambda n: b'{"topic":"fuzz:big","data":"' + b"x" * n + b'"}'
    ),
)

READ_ALL_HEADER = ((b"authorization", b"Bearer " + READ_ALL.encode()),)
events_requests = st.builds(
    lambda method, path, query, hs, auth: HostileRequest(method, path + b"?" + query, auth + hs),
    st.sampled_from([b"GET"] * 16 + [b"HEAD", b"POST", b"OPTIONS", b"DELETE"]),
    st.sampled_from([b"/events"] * 16 + [b"/events/", b"//events", b"/events;x"]),
    queries,
    headers,
    st.sampled_from([(), READ_ALL_HEADER]),
)
publish_requests = st.builds(
    lambda method, path, query, hs, body, auth: HostileRequest(
        method, path + (b"?" + query if query else b""), hs + auth, body
    ),
    st.sampled_from([b"POST"] * 16 + [b"GET", b"OPTIONS", b"PUT"]),
    st.sampled_from([b"/publish"] * 16 + [b"/publish/", b"/%70ublish"]),
    st.one_of(st.just(b""), st.just(b""), st.just(b""), queries),
    headers,
    bodies,
    st.sampled_from([(), ((b"authorization", b"Bearer " + PUBLISH_FUZZ.encode()),)]),
)
INJECTIONS = [b"\r", b"\n", b"\r\n", b"\x00", b"\r\n ", b"\r\n\t", b"\x0b", b"\x7f", b"\xff",
              b" ", b"\t", b"\r\r\n"]  # fmt: skip
RAW_METHODS = [b"GET", b"GET", b"POST", b"HEAD", b"G\x00ET", b"", b"GET GET", b"\xff", b"get",
               b"OPTIONS"]  # fmt: skip
RAW_TARGETS = [b"*", b"", b"http://evil.example/events?topic=canary", b"events",
               b"/events?topic=canary#x", b"/events?topic=canary HTTP/1.1\r\nX: y"]  # fmt: skip
RAW_VERSIONS = [b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/9.9", b"", b"HTTP/1.1 x",
                b"http/1.1"]  # fmt: skip
RAW_HEADER_NAMES = [b"Last-Event-ID", b"Authorization", b"Cookie", b"Origin", b"X-Evil",
                    b"Last-Event-ID "]  # fmt: skip

injected = st.tuples(st.binary(max_size=12), st.sampled_from(INJECTIONS), st.binary(max_size=12))
malformed_requests = st.builds(
    lambda method, target, version, hs, body: HostileRequest(
        method, target, hs, body, version, raw=True
    ),
    st.sampled_from(RAW_METHODS),
    st.one_of(
        st.tuples(
            st.sampled_from([b"/events?topic=", b"/publish?", b"/events?", b"/"]), injected
        ).map(lambda t: t[0] + b"".join(t[1])),
        st.binary(max_size=40).map(lambda b: b"/events?topic=canary&x=" + b),
        st.sampled_from(RAW_TARGETS),
    ),
    st.sampled_from(RAW_VERSIONS),
    st.lists(
        st.tuples(st.sampled_from(RAW_HEADER_NAMES), injected.map(lambda t: b"".join(t))),
        max_size=3,
    ).map(tuple),
    st.sampled_from([b"", b"{}", b'{"topic":"fuzz:a","data":1}']),
)
hostile_requests = st.one_of(
    events_requests, events_requests, publish_requests, publish_requests, malformed_requests
)


# -- the canary ---------------------------------------------------------------------------------

CANARY_TOPICS = ["canary", "private:canary"]


class Canary:
    """Two subscribers, to the public ``canary`` topic and (with a token) ``private:canary``,
    while a thread publishes numbered ``seq`` events to both over HTTP with a publish token."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ids: list[str] = []
        self.errors: list[BaseException] = []
        self.streams: list[SSEStream] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main: asyncio.Task[None] | None = None
        self._reader = threading.Thread(target=self._read_thread, name="canary-reader", daemon=True)
        self._writer = threading.Thread(
            target=self._write_thread, name="canary-writer", daemon=True
        )

    def __enter__(self) -> Canary:
        self._reader.start()
        if not self._ready.wait(60) or self.errors:
            self._shutdown()
            raise AssertionError(f"the canary never subscribed: {self.errors!r}")
        self._writer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._shutdown()

    def _shutdown(self) -> None:
        self._stop.set()
        if self._writer.is_alive():
            self._writer.join(30)
        if self._reader.is_alive():
            try:
                with Publisher.from_url(self.url, token=CANARY_WRITER) as pub:
                    for topic in CANARY_TOPICS:
                        pub.publish(topic, "done", "done")
            except Exception as exc:
                self.errors.append(exc)
            self._reader.join(30)
        if self._reader.is_alive() and self._loop is not None and self._main is not None:
            self._loop.call_soon_threadsafe(self._main.cancel)
            self._reader.join(10)

    def _read_thread(self) -> None:
        try:
            asyncio.run(self._read())
        except BaseException as exc:
            self.errors.append(exc)
            self._ready.set()

    async def _read(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._main = asyncio.current_task()
        await self._follow()

    async def _follow(self) -> None:
        async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
            public, public_task = open_stream(client, self.url, ["canary"])
            private, private_task = open_stream(
                client, self.url, ["private:canary"], query=f"&token={CANARY_READER}"
            )
            self.streams = [public, private]
            try:
                await subscribed(public, private)
                self._ready.set()
                for stream in self.streams:
                    await stream.wait_for(
                        lambda s: s.closed_by_server or any(e.event == "done" for e in s.events),
                        timeout=600,
                    )
            finally:
                for task in (public_task, private_task):
                    task.cancel()
                await asyncio.gather(public_task, private_task, return_exceptions=True)

    def _write_thread(self) -> None:
        seq = 0
        with Publisher.from_url(self.url, token=CANARY_WRITER) as pub:
            while not self._stop.is_set():
                try:
                    self.ids.append(pub.publish(CANARY_TOPICS, str(seq), "seq"))
                except Exception as exc:
                    self.errors.append(exc)
                    return
                seq += 1
                self._stop.wait(0.01)

    def assert_received_everything_once_in_order(self) -> None:
        assert not self.errors, self.errors
        assert len(self.ids) >= 10, f"only {len(self.ids)} canary events were published"
        expected = [(event_id, "seq", str(seq)) for seq, event_id in enumerate(self.ids)]
        for stream, topic in zip(self.streams, CANARY_TOPICS, strict=True):
            assert stream.status == 200, topic
            assert not stream.closed_by_server, f"the {topic} stream was closed by the server"
            got = [(e.id, e.event, e.data) for e in stream.events if e.event == "seq"]
            assert got == expected, topic
            assert {e.event for e in stream.events} <= {"probe", "seq", "done"}, topic
            assert stream.events[-1].event == "done", topic


# -- acceptance 9 -------------------------------------------------------------------------------

STREAM_OK = HostileRequest(
    b"GET",
    b"/events?topic=fuzz:a&types=message",
    (
        (b"authorization", b"Bearer " + READ_ALL.encode()),
        (b"last-event-id", b"0-0"),
        (b"origin", ORIGIN.encode()),
    ),
)
PUBLISH_OK = HostileRequest(
    b"POST",
    b"/publish",
    (
        (b"authorization", b"Bearer " + PUBLISH_FUZZ.encode()),
        (b"content-type", b"application/json"),
    ),
    b'{"topic":"fuzz:a","event":"x","data":[1]}',
)
CRLF_ID = HostileRequest(
    b"GET", b"/events?topic=canary", ((b"Last-Event-ID", b"1-0\r\nX: y"),), raw=True
)


class Liveness:
    """Probes ``/healthz`` back to back from a thread and keeps the longest wait seen,
    counting a probe still in flight: a frozen event loop shows at once (issue 10 E)."""

    BOUND = 1.0
    """A functional bound: a blocked loop takes seconds, a served probe milliseconds."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.slowest = 0.0
        self.probes = 0
        self._started: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveness", daemon=True)

    def __enter__(self) -> Liveness:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                self._started = time.monotonic()
                client.get(self.url + "/healthz").raise_for_status()
                self.slowest = max(self.slowest, time.monotonic() - self._started)
                self._started = None
                self.probes += 1
                self._stop.wait(0.02)

    def longest_wait(self) -> float:
        started = self._started
        in_flight = time.monotonic() - started if started is not None else 0.0
        return max(self.slowest, in_flight)

    def check(self, what: object) -> None:
        waited = self.longest_wait()
        assert waited < self.BOUND, f"/healthz waited {waited:.2f}s around {what!r:.300}"


BACKTRACKER_HEADER = (b"authorization", b"Bearer " + BACKTRACKER.encode())
BACKTRACKING_EXAMPLES = [
    HostileRequest(b"GET", b"/events?topic=" + b":" * 256),
    HostileRequest(b"GET", b"/events?topic=" + b"a" * 256, (BACKTRACKER_HEADER,)),
    HostileRequest(
        b"POST",
        b"/publish",
        (BACKTRACKER_HEADER, (b"content-type", b"application/json")),
        b'{"topic":"fuzz:' + b":" * 200 + b'y","data":1}',
    ),
]


def test_hostile_requests_get_json_4xx_and_never_disturb_a_stream(hostile: Hostile) -> None:
    """Also issue 10 E: pattern and topic shapes that make a backtracking matcher explore
    every split never stall the node: ``/healthz`` answers fast throughout."""
    seen: dict[str, int] = {}

    with (
        Canary(hostile.url) as canary,
        Liveness(hostile.url) as liveness,
        httpx.Client(timeout=httpx.Timeout(10)) as client,
    ):

        @settings(
            max_examples=250,
            deadline=None,
            database=None,
            suppress_health_check=[
                HealthCheck.function_scoped_fixture,
                HealthCheck.too_slow,
                HealthCheck.data_too_large,
                HealthCheck.large_base_example,
            ],
        )
        @given(request=hostile_requests)
        @example(request=STREAM_OK)
        @example(request=PUBLISH_OK)
        @example(request=CRLF_ID)
        @example(request=BACKTRACKING_EXAMPLES[0])
        @example(request=BACKTRACKING_EXAMPLES[1])
        @example(request=BACKTRACKING_EXAMPLES[2])
        @example(request=HostileRequest(b"GET", b"/events?topic=canary%FF&topic=%C0%80"))
        @example(request=HostileRequest(b"POST", b"/publish", (), b"[" * 30000 + b"]" * 30000))
        def attack(request: HostileRequest) -> None:
            outcome = send(client, hostile, request)
            check(request, outcome)
            liveness.check(request)
            key = f"{outcome.status} via {outcome.via}"
            seen[key] = seen.get(key, 0) + 1

        attack()
        assert liveness.probes >= 10, liveness.probes
        assert hostile.gateway.process is not None
        assert hostile.gateway.process.poll() is None, "the gateway died"

    canary.assert_received_everything_once_in_order()
    assert seen.get("200 via httpx", 0) >= 2, seen  # the explicit examples at least
    output = hostile.gateway.output()
    assert "Traceback" not in output, output[-5000:]


# -- acceptance 10 ------------------------------------------------------------------------------

BAD_EVENT_NAMES = ["evil\n", "a\nb", "a\rb", "a\r\nb", "a\x00b", "\n", "\r", "\x00", "\r\n",
                   "x\n\nevent: evil\ndata: injected", "x\rid: 999-0", "x\r\nretry: 1"]  # fmt: skip
BAD_TOPIC_SUFFIXES = ["\n", "\r", "\r\n", "\x00", "\r\nevent: evil", "\n\ndata: injected\n\n",
                      "\x00id: 999-0"]  # fmt: skip
HOSTILE_DATA = [
    "a\n\nevent: evil\ndata: x",
    "b\r\n\r\nevent: evil\r\nid: 999-0\r\ndata: y",
    "c\rretry: 1\r\rdata: z",
    "\n\n",
    "id: 1-1\n\ndata: w",
    ": comment\n\nevent: evil\n\n",
]


def new_topic() -> str:
    return "inj:" + uuid.uuid4().hex[:12]


def normalised(text: str) -> str:
    """What a subscriber receives for a data string: its line breaks become LF."""
    return re.sub(r"\r\n|\r", "\n", text)


def refused(call: Callable[[], object]) -> None:
    try:
        call()
    except ValueError:
        return
    raise AssertionError("expected a ValueError")


async def watch(hostile: Hostile, topic: str, action: Callable[[], None]) -> SSEStream:
    """Subscribe to ``topic``, run ``action`` (in a thread) while subscribed, then wait for an
    ``end`` event published after it: the stream then holds everything ``action`` caused."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(10, read=None)) as client:
        stream, task = open_stream(client, hostile.url, [topic], query=f"&token={INJECTOR}")
        with hostile.direct_publisher() as pub:
            try:
                await stream.until_subscribed()
                await asyncio.to_thread(action)
                await asyncio.to_thread(pub.publish, topic, "end", "end")
                await stream.wait_for(
                    lambda s: s.closed_by_server or any(e.event == "end" for e in s.events)
                )
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
    assert stream.status == 200
    assert not stream.closed_by_server
    return stream


def delivered(stream: SSEStream) -> list[tuple[str, str, str]]:
    """``(id, event, data)`` of every event but the probes and the final ``end``."""
    return [(e.id, e.event, e.data) for e in stream.events if e.event not in ("probe", "end")]


def replayed(hostile: Hostile, topic: str) -> list[tuple[str, str, str]]:
    """Everything a subscriber resuming from the beginning gets from the topic's history."""
    stream = asyncio.run(
        collect(
            hostile.url,
            [topic],
            lambda s: any(e.event == "end" for e in s.events),
            last_event_id="0-0",
            query=f"&token={INJECTOR}",
        )
    )
    assert stream.status == 200
    assert not any(e.event == "reset" for e in stream.events)
    return delivered(stream)


def assert_json_400(response: httpx.Response, error: str | None, what: object) -> None:
    assert response.status_code == 400, (what, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), what
    body = response.json()
    assert isinstance(body.get("error"), str), (what, body)
    if error is not None:
        assert body["error"] == error, (what, body)


def test_post_publish_refuses_event_names_and_topics_with_cr_lf_or_nul(hostile: Hostile) -> None:
    topic = new_topic()
    attempts: list[tuple[str, dict[str, Any], httpx.Response]] = []
    legit: list[str] = []

    def attack() -> None:
        auth = {"authorization": f"Bearer {INJECTOR}"}
        with httpx.Client(base_url=hostile.url, headers=auth, timeout=10) as api:

            def post(error: str, body: dict[str, Any]) -> None:
                attempts.append((error, body, api.post("/publish", json=body)))

            for name in BAD_EVENT_NAMES:
                post("invalid_event", {"topic": topic, "event": name, "data": "x"})
                post("invalid_event", {"topics": [topic], "event": name, "data": {"a": 1}})
            for suffix in BAD_TOPIC_SUFFIXES:
                post("invalid_topic", {"topic": topic + suffix, "data": "x"})
                post("invalid_topic", {"topics": [topic, topic + suffix], "data": "x"})
                post("invalid_topic", {"topics": [topic + suffix, topic], "event": "ok", "data": 1})
            response = api.post("/publish", json={"topic": topic, "event": "legit", "data": "ok"})
            assert response.status_code == 200, response.text
            legit.append(response.json()["id"])

    stream = asyncio.run(watch(hostile, topic, attack))
    for error, body, response in attempts:
        assert_json_400(response, error, body)
    expected = [(legit[0], "legit", "ok")]
    assert delivered(stream) == expected
    assert "999-0" not in {e.id for e in stream.events}
    assert replayed(hostile, topic) == expected
    assert "Traceback" not in hostile.gateway.output()


def test_the_python_publisher_refuses_them_and_hostile_data_stays_inside_one_event(
    hostile: Hostile,
) -> None:
    topic = new_topic()
    expected: list[tuple[str, str, str]] = []

    def attack() -> None:
        with (
            hostile.direct_publisher() as direct,
            Publisher.from_url(hostile.url, token=INJECTOR) as over_http,
        ):
            for pub in (direct, over_http):
                for name in BAD_EVENT_NAMES:
                    refused(partial(pub.publish, topic, "x", event=name))
                for suffix in BAD_TOPIC_SUFFIXES:
                    refused(partial(pub.publish, topic + suffix, "x"))
                    refused(partial(pub.publish, [topic, topic + suffix], "x", "ok"))
                refused(partial(pub.publish_many, [(topic, "first"), (topic, "x", "e\n")]))
                refused(partial(pub.publish, topic, "nul\x00inside"))
                for data in HOSTILE_DATA:
                    event_id = pub.publish(topic, data, event="legit")
                    expected.append((event_id, "legit", normalised(data)))
                    event_id = pub.publish(topic, data)
                    expected.append((event_id, "message", normalised(data)))

    stream = asyncio.run(watch(hostile, topic, attack))
    assert delivered(stream) == expected
    assert not any(e.event == "evil" for e in stream.events)
    assert "999-0" not in {e.id for e in stream.events}
    assert stream.parser.retry != 1
    assert replayed(hostile, topic) == expected


TOPIC_QUERIES = [
    "topic={t}%0D%0Aevent:%20evil",
    "topic={t}%0A",
    "topic={t}%0D",
    "topic={t}%00",
    "topic={t}%0D%0A%0D%0Adata:%20injected",
    "topic={t}&topic={t}-2%0D%0Adata:%20injected",
    "topic=%0D%0A",
    "topic=%00",
]
TYPES_QUERIES = [
    "topic={t}&types=a%0D%0Aevent:%20evil",
    "topic={t}&types=%0A",
    "topic={t}&types=message%0D",
    "topic={t}&types=message,x%0D%0Aretry:%201",
]


def test_cr_lf_nul_in_the_query_is_a_400_and_the_stream_is_untouched(hostile: Hostile) -> None:
    topic = new_topic()
    attempts: list[tuple[str, str | None, httpx.Response]] = []
    legit: list[str] = []

    def attack() -> None:
        cases: list[tuple[str, str | None]] = [(q, "invalid_topic") for q in TOPIC_QUERIES]
        cases += [(q, None) for q in TYPES_QUERIES]
        cases.append(("topic={t}&lastEventID=1-0%0D%0Aevent:%20evil", None))
        auth = {"authorization": f"Bearer {INJECTOR}"}
        with httpx.Client(base_url=hostile.url, timeout=10) as api:
            for query, error in cases:
                target = "/events?" + query.format(t=topic)
                attempts.append((target, error, api.get(target)))
                attempts.append((target, error, api.get(target, headers=auth)))
        with hostile.direct_publisher() as pub:
            legit.append(pub.publish(topic, "ok", "legit"))

    stream = asyncio.run(watch(hostile, topic, attack))
    for target, error, response in attempts:
        assert_json_400(response, error, target)
    assert delivered(stream) == [(legit[0], "legit", "ok")]


LAST_EVENT_IDS = [
    b"1-0\r",
    b"1-0\rX",
    b"1-0\revent: evil",
    b"1-0\nX",
    b"1-0\nevent: evil",
    b"1-0\x00",
    b"\x00",
    b"1-0\x00\r\nevent: evil",
    b"1-0\r\n event: evil",
    b"1-0\r\n\tevent: evil",
    b"1-0\n\nevent: evil",
    b"1-0%0D%0Aevent:%20evil",
    b"1-0\\r\\nevent: evil",
]


def test_cr_lf_nul_in_last_event_id_is_refused_and_the_stream_is_untouched(
    hostile: Hostile,
) -> None:
    topic = new_topic()
    outcomes: list[tuple[bytes, Outcome]] = []
    legit: list[str] = []

    def attack() -> None:
        for value in LAST_EVENT_IDS:
            request = HostileRequest(
                b"GET",
                f"/events?topic={topic}&token={INJECTOR}".encode(),
                ((b"Last-Event-ID", value),),
                raw=True,
            )
            outcomes.append((value, send_raw(hostile.gateway.port, request)))
        with hostile.direct_publisher() as pub:
            legit.append(pub.publish(topic, "ok", "legit"))

    stream = asyncio.run(watch(hostile, topic, attack))
    for value, outcome in outcomes:
        # the HTTP parser's own 400, a JSON 400 from the gateway, or a closed connection
        assert outcome.status in (400, None), (value, outcome)
        if outcome.status == 400 and outcome.body != PARSER_400:
            assert outcome.content_type.startswith("application/json"), (value, outcome)
            assert json.loads(outcome.body)["error"] == "invalid_last_event_id", (value, outcome)
    assert delivered(stream) == [(legit[0], "legit", "ok")]
    assert replayed(hostile, topic) == [(legit[0], "legit", "ok")]
    assert "Traceback" not in hostile.gateway.output()
