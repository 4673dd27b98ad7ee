"""A worker process that runs jobs one after another and reports them with ``Publisher.job()``.

Each job is named after the worker's host and pid, so the page shows one bar per job and
server. Every third job (offset by the worker's number) fails halfway with an error.

Run: ``PUBLISHER_URL=... PUBLISHER_TOKEN=... python examples/job_progress/worker.py <number>``
(the example's app starts several).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from itertools import count
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from publisher import Publisher

TOPIC = "jobs"
STEPS = 20
STEP_SECONDS = 0.15
PAUSE_SECONDS = 1.0
KINDS = ("thumbnails", "invoices", "reindex")


class JobError(RuntimeError):
    pass


def run_job(pub: Publisher, number: int, worker: int) -> None:
    kind = KINDS[worker % len(KINDS)]
    name = f"{kind} #{number + 1} on {socket.gethostname()}/{os.getpid()}"
    fails = (number + worker) % 3 == 2
    with pub.job(name, topic=TOPIC) as job:
        for step in range(1, STEPS + 1):
            time.sleep(STEP_SECONDS)
            if fails and step > STEPS // 2:
                raise JobError(f"disk full while writing item {step} of {STEPS}")
            job.progress(step, STEPS, message=f"item {step} of {STEPS}")


def main() -> None:
    worker = int(sys.argv[1])
    token = os.environ.get("PUBLISHER_TOKEN") or None
    parent = os.getppid()
    with Publisher.from_url(os.environ["PUBLISHER_URL"], token=token) as pub:
        for number in count():
            if os.getppid() != parent:
                return  # the app that started this worker is gone
            try:
                run_job(pub, number, worker)
            except JobError:
                pass  # reported to the page as `failed`
            except Exception as exc:  # the gateway or Redis may be away for a moment
                print(f"worker {worker}: job {number + 1} not reported: {exc!r}", file=sys.stderr)
            time.sleep(PAUSE_SECONDS)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
