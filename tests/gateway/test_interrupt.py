"""Ctrl-C on ``sse-gateway serve``: a loopback development node stops without the drain
window, a second Ctrl-C stops any node at once, and neither prints a traceback."""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import GatewayFactory
from tests.support.gateway import GatewayProcess
from tests.support.waiting import wait_until

DRAIN = "30"
"""A drain window far longer than any wait below: a node that waited it would fail the test."""
BOUND = 10.0


@pytest.fixture
def streams() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def open_streams(gateway: GatewayProcess, opened: list[socket.socket], count: int = 10) -> None:
    """``count`` open streams (their drain would be spread over the whole window)."""
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
        opened.append(sock)
        sock.sendall(
            b"GET /events?topic=t HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")


def wait_exit(gateway: GatewayProcess) -> int:
    assert gateway.process is not None
    try:
        return gateway.process.wait(BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running {BOUND}s after the signal:\n{gateway.output()[-2000:]}")


def wait_draining(gateway: GatewayProcess) -> None:
    try:
        wait_until(
            lambda: httpx.get(gateway.url + "/readyz", timeout=2).status_code == 503,
            "draining",
            BOUND,
        )
    except AssertionError:
        pytest.fail("the node did not start draining")


def test_ctrl_c_on_a_loopback_node_does_not_wait_the_drain_window(
    gateway_factory: GatewayFactory, streams: list[socket.socket]
) -> None:
    """Issue 11: on a loopback development node, Ctrl-C does not wait the full drain window,
    and stopping prints no traceback."""
    gateway = gateway_factory("--drain-seconds", DRAIN)
    open_streams(gateway, streams)
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGINT)
    assert wait_exit(gateway) == 0
    assert "Traceback" not in gateway.output()


def test_a_second_ctrl_c_stops_a_draining_node_at_once(
    gateway_factory: GatewayFactory, streams: list[socket.socket]
) -> None:
    """Issue 11: a second Ctrl-C on ``serve`` exits at once, without a traceback (here after
    a SIGTERM, which keeps the full drain window)."""
    gateway = gateway_factory("--drain-seconds", DRAIN)
    open_streams(gateway, streams)
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGTERM)
    wait_draining(gateway)
    assert gateway.process.poll() is None, "SIGTERM keeps the full drain window"
    gateway.process.send_signal(signal.SIGINT)
    # uvicorn ends by the signals it was sent, once stopped: SIGTERM, as without the Ctrl-C.
    assert wait_exit(gateway) == -signal.SIGTERM
    assert "Traceback" not in gateway.output()


def test_two_ctrl_c_on_a_node_bound_beyond_loopback(
    gateway_factory: GatewayFactory, streams: list[socket.socket]
) -> None:
    """The first Ctrl-C on a node that serves other machines drains for the whole window; the
    second stops it at once."""
    gateway = gateway_factory("--drain-seconds", DRAIN, "--host", "0.0.0.0", "--allow-anonymous")
    open_streams(gateway, streams)
    assert gateway.process is not None
    gateway.process.send_signal(signal.SIGINT)
    wait_draining(gateway)
    assert gateway.process.poll() is None
    gateway.process.send_signal(signal.SIGINT)
    assert wait_exit(gateway) == 130
    assert "Traceback" not in gateway.output()
