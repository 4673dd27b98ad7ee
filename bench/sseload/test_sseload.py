#!/usr/bin/env python3
"""Self-test for sseload: a scripted loopback HTTP server feeds edge cases
(chunked framing split at odd places, CR / LF / CRLF line endings, BOM,
multi-line data, comments, retry/id/event fields, gaps, duplicates,
non-200 status, end of stream) and the JSON summary is checked.

Usage: python3 test_sseload.py ./sseload      (stdlib only)
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

SSELOAD = sys.argv[1] if len(sys.argv) > 1 else "./sseload"


def ev(seq, ts=None, extra=""):
    ts = time.time_ns() if ts is None else ts
    return f'{{"seq":{seq},"ts":{ts}{extra}}}'


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(b):
    return b"%x\r\n" % len(b) + b + b"\r\n"


def case_chunked_lf(send):
    send(CHUNKED_HEAD)
    body = b": hello comment\n\n"
    for i in range(10):
        body += f"id: {i}\nevent: tick\ndata: {ev(i)}\n\n".encode()
    # split the body into 1..7 byte chunks, and write the framing bytes one by one
    framed = b""
    i = 0
    sizes = [1, 2, 3, 5, 7]
    k = 0
    while i < len(body):
        n = sizes[k % len(sizes)]
        k += 1
        framed += chunk(body[i : i + n])
        i += n
    for j in range(0, len(framed), 3):
        send(framed[j : j + 3], pause=0.0005)
    return "hold"


def case_plain_crlf_bom(send):
    send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n\r\n")
    body = b"\xef\xbb\xbf" + b"retry: 1500\r\n"
    for i in range(5):
        # multi-line data: seq on the second line, ts on the third
        body += b'data: {"n":1,\r\ndata: "seq":%d,\r\ndata: "ts":%d}\r\n\r\n' % (i, time.time_ns())
    body += b"data\r\n\r\n"  # data field without colon -> event with empty data
    body += b"event: only-type\r\n\r\n"  # no data -> not dispatched
    body += b"unknownfield: x\r\n\r\n"  # ignored, no data -> not dispatched
    for j in range(0, len(body), 4):
        send(body[j : j + 4], pause=0.0005)
    return "hold"


def case_cr_only(send):
    send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
    body = b""
    for i in range(6):
        body += b"data: %s\r\r" % ev(i).encode()
    body += b":comment\r"
    # CRLF split across writes must not be seen as two line ends
    body2 = b"data: %s\r" % ev(6).encode()
    send(body)
    send(body2, pause=0.01)
    send(b"\n\r\n", pause=0.01)
    return "hold"


def case_gaps(send):
    send(CHUNKED_HEAD)
    for s in [0, 1, 2, 5, 5, 6, 3, 7]:
        send(chunk(b"data: %s\n\n" % ev(s).encode()), pause=0.001)
    return "hold"


def case_404(send):
    send(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    return "close"


def case_content_length(send):
    body = b"".join(b"data: %s\n\n" % ev(i).encode() for i in range(3))
    send(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n"
        % len(body)
        + body
    )
    return "hold"  # client must stop at Content-Length by itself


def case_chunked_end(send):
    send(CHUNKED_HEAD)
    send(chunk(b"data: %s\n\n" % ev(0).encode()) + chunk(b"data: %s\n\n" % ev(1).encode()))
    send(b"0\r\nX-Trailer: 1\r\n\r\n", pause=0.01)
    return "hold"


def case_latency(send):
    send(CHUNKED_HEAD)
    for i in range(200):
        time.sleep(0.002)
        send(chunk(b"data: %s\n\n" % ev(i, time.time_ns() - 50_000_000).encode()))
    return "hold"


def case_warmup(send):
    send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
    for i in range(5):
        send(b"data: %s\n\n" % ev(i).encode())
    time.sleep(1.3)
    for i in range(5, 10):
        send(b"data: %s\n\n" % ev(i).encode())
    return "hold"


def case_eof(send):
    send(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
    send(b"data: %s\n\ndata: incomplete-no-blank-line\n" % ev(0).encode())
    return "close"


STORM_LAST = 10
STORM_SEEN = []  # Last-Event-ID header of every storm request (None: a first connection)
STORM_SENT = threading.Semaphore(0)  # released once per first connection, after its events


def last_event_id(request):
    for line in request.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"last-event-id":
            return value.strip().decode()
    return None


def storm_case(first, resume):
    """First connection: ``first`` events; a reconnect: ``resume(last_id)`` events."""

    def case(send, request):
        last = last_event_id(request)
        STORM_SEEN.append(last)
        if last is not None and resume is None:
            send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            return "close"
        send(CHUNKED_HEAD)
        send(chunk(first() if last is None else resume(last)))
        if last is None:
            STORM_SENT.release()
        return "hold"

    return case


def events(seqs):
    return b"".join(b"id: %d\ndata: %s\n\n" % (s, ev(s).encode()) for s in seqs)


# a server that resumes exactly after the id it is given
case_storm = storm_case(
    lambda: events(range(1, 6)), lambda last: events(range(int(last) + 1, STORM_LAST + 1))
)
# an id-only event moves the resume point (WHATWG: the id is adopted at dispatch, without data)
case_storm_id_only = storm_case(
    lambda: events(range(1, 5)) + b"id: 4b\n\n",
    lambda last: events(range(5, STORM_LAST + 1)) if last == "4b" else b"",
)
# a server that repeats one event and skips another on resume: 1 duplicate, 1 lost per client
case_storm_bad = storm_case(
    lambda: events(range(1, 6)), lambda last: events([5, *range(7, STORM_LAST + 1)])
)


CASES = {
    "/chunked_lf": case_chunked_lf,
    "/plain_crlf_bom": case_plain_crlf_bom,
    "/cr_only": case_cr_only,
    "/gaps": case_gaps,
    "/notfound": case_404,
    "/content_length": case_content_length,
    "/chunked_end": case_chunked_end,
    "/latency": case_latency,
    "/warmup": case_warmup,
    "/eof": case_eof,
    "/storm": case_storm,
    "/storm_id_only": case_storm_id_only,
    "/storm_bad": case_storm_bad,
    "/storm_refused": storm_case(lambda: events(range(1, 6)), None),
}
STORM_CASES = {"/storm", "/storm_id_only", "/storm_bad", "/storm_refused"}


def handle(conn):
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        req = b""
        while b"\r\n\r\n" not in req:
            d = conn.recv(4096)
            if not d:
                return
            req += d
        path = req.split(b" ")[1].decode().split("?")[0]
        assert b"Accept: text/event-stream" in req

        def send(b, pause=0.0):
            if pause:
                time.sleep(pause)
            conn.sendall(b)

        what = CASES[path](send, req) if path in STORM_CASES else CASES[path](send)
        if what == "hold":
            conn.settimeout(10)
            while conn.recv(4096):
                pass
    except (OSError, KeyError):
        pass
    finally:
        conn.close()


def serve(lsock):
    while True:
        try:
            c, _ = lsock.accept()
        except OSError:
            return
        threading.Thread(target=handle, args=(c,), daemon=True).start()


def run(port, path, clients=1, duration=1.0, extra=()):
    cmd = [
        SSELOAD,
        "--url",
        f"http://127.0.0.1:{port}{path}",
        "--clients",
        str(clients),
        "--duration",
        str(duration),
        "--json",
        *list(extra),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 20)
    if out.returncode != 0:
        raise SystemExit(f"sseload failed: {cmd}\n{out.stderr}")
    return json.loads(out.stdout)


def wait_for(predicate, what, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for " + what)
        time.sleep(0.01)


def storm_lines(path):
    try:
        with open(path) as f:
            return [line.split()[0] for line in f]
    except FileNotFoundError:
        return []


def run_storm(port, path, clients=3):
    """Clients stream, SIGUSR1 drops them all, SIGUSR2 reconnects them all with Last-Event-ID."""
    del STORM_SEEN[:]
    with tempfile.TemporaryDirectory() as tmp:
        storm_file = os.path.join(tmp, "storm")
        cmd = [
            SSELOAD,
            "--url",
            f"http://127.0.0.1:{port}{path}",
            "--clients",
            str(clients),
            "--duration",
            "20",
            "--json",
            "--resume-seq",
            str(STORM_LAST),
            "--storm-file",
            storm_file,
        ]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            for _ in range(clients):
                if not STORM_SENT.acquire(timeout=10):
                    raise SystemExit("the clients never connected")
            time.sleep(0.3)  # let the client read what was sent before it drops the streams
            proc.send_signal(signal.SIGUSR1)
            wait_for(lambda: "dropped" in storm_lines(storm_file), "the drop")
            proc.send_signal(signal.SIGUSR2)
            wait_for(lambda: "settled" in storm_lines(storm_file), "the storm to settle")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"sseload failed: {cmd}\n{err}")
    return json.loads(out)


FAILS = []


def check(name, cond, info):
    print(f"{'ok' if cond else 'FAIL':<5} {name}")
    if not cond:
        FAILS.append(name)
        print("      ", info)


def main():
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(128)
    port = lsock.getsockname()[1]
    threading.Thread(target=serve, args=(lsock,), daemon=True).start()

    r = run(port, "/chunked_lf", clients=3)
    check("chunked+LF: 10 events x3 clients", r["events"] == 30, r)
    check("chunked+LF: comments", r["comments"] == 3, r)
    check("chunked+LF: id fields", r["id_fields"] == 30 and r["events_typed"] == 30, r)
    check(
        "chunked+LF: no gaps/dups",
        r["seq"]["gaps_missing_events"] == 0 and r["seq"]["duplicates_or_reordered"] == 0,
        r,
    )
    check(
        "chunked+LF: all connected, none dropped",
        r["connected"] == 3 and r["disconnected_early"] == 0 and r["http_status"] == {"200": 3},
        r,
    )
    check(
        "chunked+LF: per-client",
        r["per_client_events"] == {"clients": 3, "min": 10, "median": 10, "max": 10},
        r,
    )

    r = run(port, "/plain_crlf_bom")
    check("CRLF+BOM+multiline: 6 events (5 + empty data)", r["events"] == 6, r)
    check(
        "CRLF+BOM+multiline: seq/ts found across data lines",
        r["events_with_seq"] == 5 and r["events_with_ts"] == 5,
        r,
    )
    check("CRLF+BOM: retry field", r["retry_fields"] == 1, r)

    r = run(port, "/cr_only")
    check("CR-only: 7 events, 1 comment", r["events"] == 7 and r["comments"] == 1, r)
    check("CR-only: no gaps", r["seq"]["gaps_missing_events"] == 0, r)

    r = run(port, "/gaps")
    check("gaps: 8 events", r["events"] == 8, r)
    check(
        "gaps: 2 missing in 1 incident",
        r["seq"]["gaps_missing_events"] == 2 and r["seq"]["gap_incidents"] == 1,
        r,
    )
    check("gaps: 2 duplicates/reorders", r["seq"]["duplicates_or_reordered"] == 2, r)

    r = run(port, "/notfound", clients=2)
    check(
        "404: failed with status counted",
        r["failed"] == 2 and r["connected"] == 0 and r["http_status"] == {"404": 2},
        r,
    )

    r = run(port, "/content_length")
    check("content-length: 3 events then end", r["events"] == 3 and r["disconnected_early"] == 1, r)

    r = run(port, "/chunked_end")
    check(
        "chunked end: 2 events, end-of-stream",
        r["events"] == 2 and r["disconnect_reasons"]["end_of_chunked_stream"] == 1,
        r,
    )

    r = run(port, "/eof")
    check(
        "eof: incomplete event not dispatched",
        r["events"] == 1 and r["disconnect_reasons"]["eof"] == 1,
        r,
    )

    r = run(port, "/latency", duration=1.5)
    lat = r["latency_ms"]
    check("latency: 200 events", r["events"] == 200 and lat["count"] == 200, r)
    check("latency: p50 ~ 50 ms (+ delivery)", 49.6 <= lat["p50"] <= 52.0, lat)
    check("latency: max ~ 50 ms", 49.6 <= lat["max"] <= 60.0, lat)

    r = run(port, "/warmup", duration=2.0, extra=["--warmup", "1.0"])
    check(
        "warmup: 5 discarded, 5 counted", r["events"] == 5 and r["events_warmup_discarded"] == 5, r
    )

    r = run_storm(port, "/storm")
    st = r["storm"]
    check(
        "storm: 3 dropped 5 behind, 3 reconnected with their Last-Event-ID",
        st["dropped"] == 3
        and st["behind_at_drop"] == {"min": 5, "max": 5}
        and st["reconnected"] == 3
        and st["with_last_event_id"] == 3,
        r,
    )
    check(
        "storm: the server saw each client's last id",
        STORM_SEEN.count(None) == 3 and STORM_SEEN.count("5") == 3,
        STORM_SEEN,
    )
    check(
        "storm: all resumed, 0 lost, 0 duplicated",
        st["resumed"] == 3
        and st["not_resumed"] == 0
        and st["lost"] == 0
        and st["duplicates"] == 0
        and st["all_resumed_s"] >= 0
        and r["events"] == 30,
        r,
    )

    r = run_storm(port, "/storm_id_only")
    st = r["storm"]
    check("storm: an id-only event is the resume point", STORM_SEEN.count("4b") == 3, STORM_SEEN)
    check(
        "storm (id-only): all resumed, 0 lost, 0 duplicated",
        st["resumed"] == 3 and st["lost"] == 0 and st["duplicates"] == 0 and r["events"] == 30,
        r,
    )

    r = run_storm(port, "/storm_bad")
    st = r["storm"]
    check(
        "storm (bad server): 1 lost and 1 duplicate per client, yet resumed",
        st["resumed"] == 3
        and st["lost"] == 3
        and st["gaps"] == 3
        and st["shortfall"] == 0
        and st["duplicates"] == 3,
        r,
    )

    r = run_storm(port, "/storm_refused")
    st = r["storm"]
    check(
        "storm (refused): settles with 3 failed, none resumed, 5 lost each",
        st["failed"] == 3
        and st["resumed"] == 0
        and st["not_resumed"] == 3
        and st["lost"] == 15
        and st["all_resumed_s"] == -1
        and st["settled_s"] >= 0
        and r["http_status"].get("503") == 3
        and st["fail_reasons"]["http_status"] == 3,
        r,
    )

    # histogram bucket error bound (<= 1%), checked inside the binary
    out = subprocess.run([SSELOAD, "--selftest-hist"], capture_output=True, text=True, timeout=60)
    check("histogram: max relative error <= 1%", out.returncode == 0, out.stdout + out.stderr)
    if FAILS:
        print("FAILED:", FAILS)
        sys.exit(1)
    print("all sseload self-tests passed")


if __name__ == "__main__":
    main()
