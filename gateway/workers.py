"""``--workers N``: N gateway processes on one port, each with its own hub and Redis links.

Each worker binds its own listening socket with ``SO_REUSEPORT``, so the kernel spreads new
connections across them evenly (a shared accept socket wakes every worker per connection and
hands most to whichever is least busy at that instant). The supervisor forwards SIGTERM/SIGINT,
so every worker drains on its own schedule, and restarts a worker that dies unexpectedly.

The workers share their metrics through prometheus-client's multiprocess mode: one scrape of
any worker reports the whole node (``metrics_directory``).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from types import FrameType

from prometheus_client.multiprocess import mark_process_dead

from gateway.config import Settings

log = logging.getLogger("gateway.workers")

RESTART_DELAY = 1.0
STOP_MARGIN = 5.0


def reuse_port_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


Worker = Callable[[Settings, socket.socket], int]
MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


@contextlib.contextmanager
def metrics_directory() -> Iterator[str]:
    """The directory where the workers write their metrics, empty at start: the operator's
    ``PROMETHEUS_MULTIPROC_DIR`` (created if missing; its ``.db`` files are removed, as they
    describe processes of an earlier run), else a private one removed at exit. It is set in
    the environment before any worker is spawned: prometheus-client reads it at import."""
    given = os.environ.get(MULTIPROC_VARIABLE)
    if given:
        os.makedirs(given, exist_ok=True)
        for name in os.listdir(given):
            if name.endswith(".db"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(given, name))
        yield given
        return
    path = tempfile.mkdtemp(prefix="sse-gateway-metrics-")
    os.environ[MULTIPROC_VARIABLE] = path
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_VARIABLE, None)
        shutil.rmtree(path, ignore_errors=True)


def _gone(process: multiprocessing.process.BaseProcess) -> None:
    """A worker ended: its live gauges (open streams, topics, readiness) leave the sums."""
    if process.pid is not None and os.environ.get(MULTIPROC_VARIABLE):
        mark_process_dead(process.pid)  # type: ignore[no-untyped-call]


def _run_worker(run: Worker, settings: Settings) -> None:
    raise SystemExit(run(settings, reuse_port_socket(settings.host, settings.port)))


def supervise(settings: Settings, run: Worker) -> int:
    """Run ``settings.workers`` processes of ``run`` until SIGTERM/SIGINT, then stop them all
    within their drain window (plus a margin) and return."""
    context = multiprocessing.get_context("spawn")
    stopping = False

    def start() -> multiprocessing.process.BaseProcess:
        process = context.Process(target=_run_worker, args=(run, settings), daemon=False)
        process.start()
        return process

    def stop(signum: int, frame: FrameType | None) -> None:
        """SIGTERM each worker (after a terminal's SIGINT, which reached them too, uvicorn
        takes it as the same request to drain, not as a second, forcing one)."""
        nonlocal stopping
        stopping = True
        for process in workers:
            if process.is_alive():
                process.terminate()

    workers = [start() for _ in range(settings.workers)]
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    log.info("supervising %d workers on port %d", settings.workers, settings.port)
    try:
        while not stopping:
            for index, process in enumerate(workers):
                if not process.is_alive() and not stopping:
                    log.warning(
                        "worker %s exited with %s; restarting", process.pid, process.exitcode
                    )
                    _gone(process)
                    time.sleep(RESTART_DELAY)
                    if not stopping:
                        workers[index] = start()
            time.sleep(0.2)
        deadline = time.monotonic() + settings.drain_seconds + STOP_MARGIN
        for process in workers:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                log.warning("worker %s did not stop in time; killing it", process.pid)
                process.kill()
                process.join()
            _gone(process)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
