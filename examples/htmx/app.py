"""htmx example: the server renders HTML fragments and publishes them; htmx swaps them in.

A simulated evaluation runs in the app: it moves through its phases, scoring one item a step.
Each step publishes, to the topic ``eval:demo``, the ``progress`` fragment (and, when the phase
changes, the ``phase`` fragment). Each fragment is the whole current state of its target, so a
page that missed events (its stream recreated without its position) is right again after the
next one. The page itself is rendered with the current state and the position it was read at.

Run: ``python examples/htmx/app.py`` (README in this folder).
"""

from __future__ import annotations

import contextlib
import html
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _launch import Example, run_example
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from publisher import Publisher

TOPIC = "eval:demo"
PHASES = ("loading model", "scoring", "writing report")
ITEMS = 12
"""Items scored per evaluation; each phase takes this many steps."""
STEP_SECONDS = 0.4
HERE = Path(__file__).resolve().parent
HTMX = "vendor/htmx.org-2.0.11/htmx.min.js"
HTMX_SSE = "vendor/htmx-ext-sse-2.2.4/sse.min.js"


@dataclass(frozen=True)
class State:
    """The evaluation at step ``seq``: a pure function of it, so a test can render it too."""

    seq: int
    run: int
    phase: int
    done: int

    @classmethod
    def at(cls, seq: int) -> State:
        per_run = len(PHASES) * ITEMS
        run, step = divmod(seq, per_run)
        phase, done = divmod(step, ITEMS)
        return cls(seq, run + 1, phase, done + 1)

    @property
    def percent(self) -> int:
        return round(100 * self.done / ITEMS)


def score(run: int, item: int) -> str:
    return f"0.{(run * 37 + item * 11) % 90 + 10:02d}"


def render_phase(state: State) -> str:
    """The ``phase`` fragment: several lines, indented, as the browser must keep them."""
    lines = [f'<h2 data-seq="{state.seq}">Evaluation {state.run}</h2>', '<ol class="phases">']
    for index, name in enumerate(PHASES):
        status = "done" if index < state.phase else "current" if index == state.phase else "next"
        lines.append(f'  <li class="{status}">{html.escape(name)}</li>')
    lines.append("</ol>")
    return "\n".join(lines)


def render_progress(state: State) -> str:
    """The ``progress`` fragment: the current phase's bar and its latest scores."""
    name = html.escape(PHASES[state.phase])
    lines = [
        f'<p class="step" data-seq="{state.seq}">{name}: {state.done} of {ITEMS}</p>',
        f'<progress max="{ITEMS}" value="{state.done}"></progress>',
        f'<span class="percent">{state.percent} %</span>',
        '<ul class="scores">',
    ]
    for item in range(max(1, state.done - 2), state.done + 1):
        lines.append(f"  <li>item {item}: {score(state.run, item)}</li>")
    lines.append("</ul>")
    return "\n".join(lines)


class Evaluation:
    """Steps the simulated evaluation in a thread and publishes each step's fragments."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self.state = State.at(0)
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="evaluation", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(STEP_SECONDS):
            state = State.at(self.state.seq + 1)
            events: list[tuple[str, str, str]] = [(TOPIC, render_progress(state), "progress")]
            if state.phase != self.state.phase or state.run != self.state.run:
                events.insert(0, (TOPIC, render_phase(state), "phase"))
            with self.lock:
                try:
                    self.publisher.publish_many(events)
                except Exception as exc:  # the gateway may be restarting: try the next step
                    print(f"publish failed, retrying next step: {exc!r}", file=sys.stderr)
                    continue
                self.state = state

    def snapshot(self) -> tuple[str, State]:
        """The position, then the state: the page streams everything after that position."""
        with self.lock:
            return self.publisher.position([TOPIC]), self.state

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation (htmx)</title>
<script src="/static/{htmx}"></script>
<script src="/static/{htmx_sse}"></script>
<style>
  body {{ font: 16px system-ui, sans-serif; margin: 2rem; max-width: 40rem; }}
  .phases li.done {{ color: #2a7; }} .phases li.current {{ font-weight: bold; }}
  .phases li.next {{ color: #999; }} progress {{ width: 20rem; }}
</style>
</head>
<body>
<h1>Evaluation, rendered on the server</h1>
<main hx-ext="sse" sse-connect="{stream}">
  <section id="phase" sse-swap="phase">{phase}</section>
  <section id="progress" sse-swap="progress">{progress}</section>
</main>
</body>
</html>
"""


def build(example: Example) -> Starlette:
    publisher = example.publisher()
    evaluation = Evaluation(publisher)

    def page(request: Request) -> HTMLResponse:
        position, state = evaluation.snapshot()
        query = urlencode({"topic": TOPIC, "lastEventID": position})
        return HTMLResponse(
            PAGE.format(
                htmx=HTMX,
                htmx_sse=HTMX_SSE,
                stream=html.escape(f"{example.gateway_url}/events?{query}"),
                phase=render_phase(state),
                progress=render_progress(state),
            )
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        evaluation.start()
        try:
            yield
        finally:
            evaluation.stop()
            publisher.close()

    routes = [Route("/", page), Mount("/static", StaticFiles(directory=HERE / "static"))]
    return Starlette(routes=routes, lifespan=lifespan)


if __name__ == "__main__":
    run_example(build)
