"""``sse-gateway tail`` and ``publish`` as a user runs them: subprocesses against real nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from publisher import Publisher
from tests.conftest import GatewayFactory
from tests.support.ports import free_port
from tests.support.proxy import CuttingProxy
from tests.support.tokens import SECRET, hs256

REPO = Path(__file__).resolve().parents[2]
DEADLINE = 30


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m gateway.cli ARGS`` with no ``SSE_GATEWAY_*`` variable but ``env``."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SSE_GATEWAY_")}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        env=environ,
        cwd=REPO,
        timeout=DEADLINE,
        check=False,
    )


@pytest.fixture
def cut_twice(gateway_factory: GatewayFactory) -> Iterator[tuple[CuttingProxy, list[str]]]:
    gateway = gateway_factory()
    with Publisher.from_url(gateway.url) as pub:
        ids = [pub.publish("t", {"seq": seq}) for seq in range(10)]
    proxy = CuttingProxy(gateway.port, [b'"seq":4', b'"seq":7']).start()
    yield proxy, ids
    proxy.close()


def test_tail_resumes_exactly_after_a_cut_inside_a_frame(
    cut_twice: tuple[CuttingProxy, list[str]],
) -> None:
    """Issue 11: a cut in the middle of a frame made ``tail`` resume after an event it never
    printed. Every event is printed once, in order."""
    proxy, ids = cut_twice
    result = cli("tail", "t", "--url", proxy.url, "--since", "0", "--count", "10")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines == [f'{i}\tmessage\t{{"seq":{seq}}}' for seq, i in enumerate(ids)]


def test_tail_json_lines_and_readable_multi_line_data(gateway_factory: GatewayFactory) -> None:
    gateway = gateway_factory()
    with Publisher.from_url(gateway.url) as pub:
        first = pub.publish("t", "one\ntwo\nthree", event="note")
        second = pub.publish("t", {"a": 1})
    plain = cli("tail", "t", "--url", gateway.url, "--since", "0", "--count", "2")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines() == [
        f"{first}\tnote\tone",
        "\t\ttwo",
        "\t\tthree",
        f'{second}\tmessage\t{{"a":1}}',
    ]
    lines = cli("tail", "t", "--url", gateway.url, "--since", "0", "--count", "2", "--json")
    assert lines.returncode == 0, lines.stderr
    assert [json.loads(line) for line in lines.stdout.splitlines()] == [
        {"id": first, "event": "note", "data": "one\ntwo\nthree"},
        {"id": second, "event": "message", "data": '{"a":1}'},
    ]


def test_token_flag_and_variable_work_for_publish_and_tail(
    gateway_factory: GatewayFactory,
) -> None:
    """Issue 11: ``--token`` (and ``SSE_GATEWAY_TOKEN``) for ``publish`` and ``tail`` against a
    node that requires tokens."""
    gateway = gateway_factory("--jwt-secret", SECRET)
    writer = hs256(sub="worker", subscribe=[], publish=["t"])
    reader = hs256(sub="alice", subscribe=["t"])

    published = cli("publish", "t", "hello", "--url", gateway.url, "--token", writer)
    assert published.returncode == 0, published.stderr
    from_env = cli("publish", "t", "again", "--url", gateway.url, env={"SSE_GATEWAY_TOKEN": writer})
    assert from_env.returncode == 0, from_env.stderr
    ids = [published.stdout.strip(), from_env.stdout.strip()]

    tailed = cli("tail", "t", "--url", gateway.url, "--since", "0", "--count", "2", "--token",
                 reader)  # fmt: skip
    assert tailed.returncode == 0, tailed.stderr
    assert tailed.stdout.splitlines() == [f"{ids[0]}\tmessage\thello", f"{ids[1]}\tmessage\tagain"]
    env = {"SSE_GATEWAY_TOKEN": reader}
    tailed = cli("tail", "t", "--url", gateway.url, "--since", "0", "--count", "1", env=env)
    assert tailed.returncode == 0, tailed.stderr
    assert tailed.stdout.splitlines() == [f"{ids[0]}\tmessage\thello"]

    refused = cli("tail", "t", "--url", gateway.url, "--count", "1")
    assert refused.returncode == 1
    assert "401" in refused.stderr
    assert "Traceback" not in refused.stderr
    refused = cli("publish", "t", "x", "--url", gateway.url)
    assert refused.returncode == 1
    assert "401" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_publish_with_no_gateway_up_says_what_to_start() -> None:
    """Issue 11: ``publish`` with no gateway up says at once what to start."""
    url = f"http://127.0.0.1:{free_port()}"
    began = time.monotonic()
    result = cli("publish", "t", "hello", "--url", url)
    took = time.monotonic() - began
    assert result.returncode == 1
    assert f"no gateway at {url}" in result.stderr, result.stderr
    assert "sse-gateway serve" in result.stderr
    assert "Traceback" not in result.stderr
    assert took < 5, took
