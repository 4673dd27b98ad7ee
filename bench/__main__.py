"""``python -m bench``: fan-out benchmark of sse-gateway against a naive baseline and nchan.

See bench/README.md for what each scenario and column means."""

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from types import FrameType
from typing import Any

from bench.load import DEFAULT_SOURCE, REPO_ROOT, build_sseload
from bench.report import render_scenario, render_summary, summary_goals
from bench.scenarios import QUICK, RUNNERS, SCENARIOS, Bench, Plan
from bench.targets import TARGETS, GatewayTarget, ManagedProcess, RedisServer, Target

WANTED_NOFILE = 65536


def csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--targets", type=csv, default=list(TARGETS), help="gateway,naive,nchan")
    parser.add_argument(
        "--scenario", type=csv, default=list(SCENARIOS), help=f"comma list of {','.join(SCENARIOS)}"
    )
    parser.add_argument("--quick", action="store_true", help="small, short runs (smoke test)")
    parser.add_argument("--json", type=Path, help="write every raw number to this file")
    parser.add_argument("--sseload-threads", type=int, help="sseload worker threads (default 1)")
    parser.add_argument("--payload", type=int, help="bytes of each event's JSON data (default 200)")
    parser.add_argument(
        "--workers", type=lambda t: [int(x) for x in csv(t)],
        help="gateway worker counts for the workers scenario (default 1,2)",
    )  # fmt: skip
    parser.add_argument("--clients", type=int, help="override every scenario's client count")
    parser.add_argument(
        "--ramp", type=float, help="new connections per second (default 2000; 0: all at once)"
    )
    parser.add_argument(
        "--rates", type=lambda t: [float(x) for x in csv(t)], help="saturation ladder (ev/s)"
    )
    parser.add_argument(
        "--sseload-src",
        type=Path,
        default=DEFAULT_SOURCE,
        help="sseload sources (built in the cache)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    args = parser.parse_args(argv)
    for name in args.targets:
        if name not in TARGETS:
            parser.error(f"unknown target {name!r} (choose from {', '.join(TARGETS)})")
    for name in args.scenario:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r} (choose from {', '.join(SCENARIOS)})")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    plan = QUICK if args.quick else Plan()
    changes: dict[str, Any] = {}
    if args.payload is not None:
        changes["payload"] = args.payload
    if args.sseload_threads is not None:
        changes["sseload_threads"] = args.sseload_threads
    if args.workers:
        changes["workers"] = tuple(sorted({1, *args.workers}))
    if args.ramp is not None:
        changes["ramp"] = args.ramp
    if args.rates:
        changes["sat_rates"] = tuple(args.rates)
    if args.clients:
        for name in (
            "cpu_clients", "sat_clients", "lat_clients", "idle_clients", "connect_clients",
            "storm_clients",
        ):  # fmt: skip
            changes[name] = args.clients
    return replace(plan, **changes)


def raise_nofile() -> int:
    """Soft limit up to the hard one (above it when allowed), inherited by every child: 10k
    idle clients need 10k descriptors in the server and, for the naive baseline, 10k more for
    its Redis connections."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < WANTED_NOFILE:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (WANTED_NOFILE, WANTED_NOFILE))
            return WANTED_NOFILE
        except (ValueError, OSError):
            pass
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else "?"


def meta(args: argparse.Namespace, plan: Plan, nofile: int) -> dict[str, Any]:
    rev = version(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    dirty = version(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "gateway", "publisher"]
    )
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "git": rev + (" (gateway/publisher modified)" if dirty not in ("", "?") else ""),
        "redis": version(["redis-server", "--version"]),
        "nginx": version(["nginx", "-v"]) if shutil.which("nginx") else None,
        "nofile": nofile,
        "quick": args.quick,
        "plan": asdict(plan),
    }


def write_json(path: Path | None, info: dict[str, Any], bench: Bench, goals: list[Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "meta": info,
        "fanout": [r.as_dict() for r in bench.fanout],
        "idle": [r.as_dict() for r in bench.idle],
        "connect": [r.as_dict() for r in bench.connect],
        "storm": [r.as_dict() for r in bench.storm],
        "summary": [g.as_dict() for g in goals],
    }
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def goals_of(bench: Bench, workers_note: str | None) -> list[Any]:
    return summary_goals(bench.fanout, bench.idle, workers_note, bench.connect, bench.storm)


def run(args: argparse.Namespace) -> int:
    plan = make_plan(args)
    nofile = raise_nofile()
    sseload = build_sseload(args.sseload_src)
    info = meta(args, plan, nofile)
    print(
        f"bench: {info['cpus']} CPUs, load {os.getloadavg()[0]:.2f}, nofile {nofile}, "
        f"git {info['git']}, {'quick' if args.quick else 'full'} run",
        flush=True,
    )
    workdir = Path(tempfile.mkdtemp(prefix="sse-bench-"))
    started = time.monotonic()
    redis: RedisServer | None = None
    bench: Bench | None = None
    workers_note: str | None = None
    try:
        redis = RedisServer(workdir)
        targets: list[Target] = []
        for name in args.targets:
            target = TARGETS[name](redis.url, workdir)
            reason = target.unavailable()
            if reason:
                print(f"{name}: {reason}", flush=True)
            else:
                targets.append(target)
        gateway = next((t for t in targets if isinstance(t, GatewayTarget)), None)
        bench = Bench(plan, redis, {t.name: t for t in targets}, sseload)
        for scenario in args.scenario:
            if scenario == "workers":
                if gateway is None:
                    workers_note = " (gateway not run)"
                    print("workers: gateway not among the targets", flush=True)
                    continue
                if not gateway.supports_workers():
                    workers_note = " (workers: not supported)"
                    print("workers: not supported (sse-gateway serve has no --workers)", flush=True)
                    continue
            print(f"\n-- {scenario} --", file=sys.stderr, flush=True)
            RUNNERS[scenario](bench, targets)
            rendered = render_scenario(
                scenario, bench.fanout, bench.idle, bench.connect, bench.storm
            )
            print("\n" + rendered, flush=True)
            write_json(args.json, info, bench, goals_of(bench, workers_note))
        goals = goals_of(bench, workers_note)
        print("\n" + render_summary(goals, args.quick))
        info["elapsed_s"] = round(time.monotonic() - started, 1)
        print(f"elapsed: {info['elapsed_s']:.0f} s")
        write_json(args.json, info, bench, goals)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr)
        return 130
    finally:
        if redis is not None:
            redis.stop()
        ManagedProcess.stop_all()
        if args.keep_logs:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, on_sigterm)
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
