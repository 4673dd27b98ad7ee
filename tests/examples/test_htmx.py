"""Issue 12, htmx: the page (htmx 2 and its SSE extension, no script of ours) swaps the app's
multi-line HTML fragments in intact, and keeps doing so across a gateway restart (every node
stopped and started again on its port), on the embedded engine and on Redis with two nodes
behind a balancer."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from tests.examples.conftest import ROOT, ExampleProcess, readme_command, screenshot
from tests.support.gateway import GatewayProcess
from tests.support.ports import free_port
from tests.support.proxy import LoadBalancer

WAIT_MS = 15_000
NODE_ARGS = ("--drain-seconds", "1", "--retry-ms", "500")
COUNT_SOURCES = """
const Native = window.EventSource;
window.sources = [];
window.EventSource = class extends Native {
  constructor(url, init) { super(url, init); window.sources.push(url); }
};
"""
"""Test instrumentation only: records each EventSource the extension creates."""


def load_app() -> ModuleType:
    spec = importlib.util.spec_from_file_location("htmx_app", ROOT / "examples/htmx/app.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Deployment:
    """Gateway nodes the example is pointed at with ``GATEWAY_URL``, so the test can restart
    them: one on the embedded engine, or two on Redis behind a loopback balancer."""

    def __init__(self, mode: str, redis_url: str | None, prefix: str) -> None:
        self.mode = mode
        self.app_port = free_port()
        args = [*NODE_ARGS, "--cors-origin", f"http://127.0.0.1:{self.app_port}"]
        if redis_url:
            args += ["--prefix", prefix]
        count = 2 if redis_url else 1
        self.nodes = [GatewayProcess(*args, redis_url=redis_url) for _ in range(count)]
        self.balancer: LoadBalancer | None = None
        self.example: ExampleProcess | None = None

    def start(self) -> ExampleProcess:
        for node in self.nodes:
            node.start()
        url = self.nodes[0].url
        if len(self.nodes) > 1:
            self.balancer = LoadBalancer(node.port for node in self.nodes)
            url = f"http://127.0.0.1:{self.balancer.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "GATEWAY_URL")}
        env.update(GATEWAY_URL=url, PORT=str(self.app_port))
        self.example = ExampleProcess(readme_command("htmx"), env)
        return self.example

    def restart(self) -> None:
        for node in self.nodes:
            node.stop()
        for node in self.nodes:
            node.start()

    def close(self) -> None:
        if self.example is not None:
            self.example.stop()
        if self.balancer is not None:
            self.balancer.close()
        for node in self.nodes:
            node.close()


@pytest.fixture(params=["embedded", "redis-2-nodes"])
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    redis_url: str | None = None
    prefix = ""
    if request.param != "embedded":
        redis_url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("prefix")
    deployment = Deployment(request.param, redis_url, prefix)
    try:
        yield deployment
    finally:
        deployment.close()


def seq_of(page: Any, target: str) -> int:
    return int(page.locator(f"#{target} [data-seq]").get_attribute("data-seq"))


def wait_past(page: Any, seq: int) -> int:
    page.wait_for_function(
        f"() => Number(document.querySelector('#progress [data-seq]').dataset.seq) > {seq}",
        timeout=WAIT_MS,
    )
    return seq_of(page, "progress")


def assert_intact(page: Any, app: ModuleType) -> None:
    """Each target holds exactly the fragment the app rendered for the step it shows (read
    in one go, once htmx has settled: it marks fresh nodes with classes for 20 ms)."""
    shown = page.wait_for_function(
        "() => document.querySelector('.htmx-added, .htmx-settling, .htmx-swapping') ? null"
        " : {progress: document.getElementById('progress').innerHTML,"
        " phase: document.getElementById('phase').innerHTML}",
        timeout=WAIT_MS,
    ).json_value()
    for target, render in (("progress", app.render_progress), ("phase", app.render_phase)):
        match = re.search(r'data-seq="(\d+)"', shown[target])
        assert match, shown[target]
        assert shown[target] == render(app.State.at(int(match.group(1))))
    assert shown["progress"].count("\n") >= 5, shown["progress"]


def test_fragments_are_swapped_intact_across_a_gateway_restart(
    browser: Any, deployment: Deployment
) -> None:
    app = load_app()
    example = deployment.start()
    context = browser.new_context()
    try:
        context.add_init_script(COUNT_SOURCES)
        page = context.new_page()
        page.goto(example.url)
        rendered = seq_of(page, "progress")
        seq = wait_past(page, rendered)  # swapped by an event, not the rendered page
        assert_intact(page, app)
        assert page.evaluate("() => document.querySelectorAll('script:not([src])').length") == 0

        deployment.restart()
        seq = wait_past(page, seq + 2)
        # A phase fragment after the restart too: the evaluation's next phase.
        phase = seq_of(page, "phase")
        per_phase = app.ITEMS
        page.wait_for_function(
            f"() => Number(document.querySelector('#phase [data-seq]').dataset.seq) > {phase}",
            timeout=WAIT_MS + int(per_phase * app.STEP_SECONDS * 1000),
        )
        wait_past(page, seq)
        assert_intact(page, app)
        # The browser's own reconnect (with Last-Event-ID) carried the source across the
        # restart: the extension never had to recreate it from the URL's position.
        sources = page.evaluate("() => window.sources")
        assert len(sources) == 1, sources
        screenshot(page, f"htmx-{deployment.mode}")
    finally:
        context.close()
