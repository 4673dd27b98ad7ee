"""A crawler worker: starts runs and finishes them through the app, which stores each change
and publishes it (``run_started``, ``run_completed``).

Run: ``python examples/run_history/worker.py http://127.0.0.1:PORT [--runs N] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import random
import time

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("app", help="the example's URL, as it printed it")
    parser.add_argument("--crawler", default="1")
    parser.add_argument("--runs", type=int, default=5, help="runs to make (0: for ever)")
    parser.add_argument("--seconds", type=float, default=3.0, help="how long a run takes")
    args = parser.parse_args()
    app = args.app.rstrip("/")
    made = 0
    with httpx.Client(base_url=app, timeout=10) as client:
        while args.runs == 0 or made < args.runs:
            made += 1
            url = f"https://example.com/section/{random.randint(1, 99)}"
            reply = client.post("/api/runs", json={"crawler": args.crawler, "url": url})
            reply.raise_for_status()
            run = reply.json()
            print(f"run #{run['id']} started", flush=True)
            time.sleep(args.seconds)
            failed = random.random() < 0.2 if args.runs == 0 else False
            done = {"pages": random.randint(10, 500), "failed": failed}
            client.post(f"/api/runs/{run['id']}/finish", json=done).raise_for_status()
            print(f"run #{run['id']} {'failed' if failed else 'completed'}", flush=True)


if __name__ == "__main__":
    main()
