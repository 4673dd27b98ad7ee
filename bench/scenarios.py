"""One measured run (a target, a load) and the scenarios built from runs."""

import contextlib
import re
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from bench.load import LoadResult, LoadRun, LoadSpec
from bench.procstat import cpu_seconds, loadavg, sample_tree
from bench.publish import PacedPublisher, Sender, make_event
from bench.records import ConnectResult, FanoutResult, IdleResult, StormResult
from bench.targets import RedisServer, Server, Target

SCENARIOS = ("cpu", "saturation", "latency", "idle", "workers", "connect", "storm")
RAMP_SETTLE_S = 3.0
IDLE_SETTLE_S = 3.0
SERVER_SETTLE_S = 1.0
CONNECT_TAIL_S = 1.0
"""The connect CPU window ends this long after the last client connected (work a server does
just after answering, such as a first read from Redis, still belongs to the connection)."""
LEAVE_WAIT_S = 10.0
STORM_WARM_EVENTS = 3
"""Events every client receives before the drop, so that each has an id to resume from."""
STORM_CONNECT_TIMEOUT_S = 120.0
"""A reconnecting client waits this long for its response headers, as a browser's TCP connect
(SYNs retried 1, 3, 7, 15, 31, 63 s after a full accept queue dropped them) does."""
STORM_SETTLE_S = 2.0
"""After the warm-up events (for them to reach every client) and after the drop (for the server
to see every stream close, as a node's clients arrive at another node that never saw them)."""
LOG_TROUBLE = re.compile(
    r"Traceback|\b(WARNING|ERROR|CRITICAL)\b|\[(warn|error|crit|alert|emerg)\]"
)
LOG_BENIGN = re.compile(r"no token key configured")
NGINX_PREFIX = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (\[\w+\]) \d+#\d+: (\*\d+ )?")


@dataclass(frozen=True)
class Plan:
    cpu_clients: int = 1000
    cpu_rate: float = 100
    cpu_duration: float = 20
    cpu_warmup: float = 6
    sat_clients: int = 1000
    sat_rates: tuple[float, ...] = (50, 100, 200, 300, 400, 600, 800, 1200, 1600, 2400, 3200)
    sat_duration: float = 12
    sat_warmup: float = 4
    lat_clients: int = 5000
    lat_rate: float = 20
    lat_duration: float = 20
    lat_warmup: float = 6
    idle_clients: int = 10_000
    payload: int = 200
    sseload_threads: int = 1
    ramp: float = 2000
    workers: tuple[int, ...] = (1, 2)
    connect_clients: int = 10_000
    storm_clients: int = 10_000
    storm_behind: int = 100


QUICK = Plan(
    cpu_clients=200, cpu_rate=50, cpu_duration=8, cpu_warmup=3,
    sat_clients=200, sat_rates=(50, 200, 800, 1600), sat_duration=7, sat_warmup=3,
    lat_clients=500, lat_rate=20, lat_duration=8, lat_warmup=3,
    idle_clients=1000, connect_clients=1000, storm_clients=500,
)  # fmt: skip


def sleep_until(deadline: float) -> None:
    delay = deadline - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def log_trouble(server: Server, limit: int = 5) -> list[str]:
    """What the server logged at warning level or above, identical lines counted once
    (``410x stream refused: ...``): refusals and errors show up next to the numbers."""
    counts: dict[str, int] = {}
    for path in server.logs:
        if not path.is_file():
            continue
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                raised = next((x for x in lines[i + 1 :] if x and not x[0].isspace()), "?")
                line = f"Traceback: {raised}"
            if LOG_TROUBLE.search(line) and not LOG_BENIGN.search(line):
                key = NGINX_PREFIX.sub(r"\1 ", line.strip())[:300]
                counts[key] = counts.get(key, 0) + 1
    top = sorted(counts.items(), key=lambda item: -item[1])
    lines = [f"{server.target} log: {n}x {text}" for text, n in top[:limit]]
    if len(top) > limit:
        lines.append(f"{server.target} log: {len(top) - limit} more distinct lines")
    return lines


class Bench:
    def __init__(
        self, plan: Plan, redis: RedisServer, targets: dict[str, Target], sseload: Path
    ) -> None:
        self.plan = plan
        self.redis = redis
        self.targets = targets
        self.sseload = sseload
        self.fanout: list[FanoutResult] = []
        self.idle: list[IdleResult] = []
        self.connect: list[ConnectResult] = []
        self.storm: list[StormResult] = []

    def _load(self, server: Server, clients: int, duration: float, warmup: float) -> LoadSpec:
        return LoadSpec(
            url=server.url, clients=clients, duration=duration, warmup=warmup,
            ramp=self.plan.ramp, threads=self.plan.sseload_threads,
        )  # fmt: skip

    def run_fanout(
        self, scenario: str, target: Target, clients: int, rate: float,
        duration: float, warmup: float, workers: int = 1,
    ) -> FanoutResult:  # fmt: skip
        """Fresh server, clients connect, events at ``rate``; CPU is sampled at the start and
        the end of sseload's measured window ``[warmup, duration]``."""
        ramp = self.plan.ramp
        if ramp:
            extra = max(0.0, clients / ramp + RAMP_SETTLE_S - warmup)
            warmup, duration = warmup + extra, duration + extra
        result = FanoutResult(
            scenario, target.name, workers, clients, rate, self.plan.payload,
            duration, warmup, ramp, loadavg_1m=loadavg(),
        )  # fmt: skip
        progress(f"  {scenario}: {target.name} w={workers} {clients} clients x {rate:g} ev/s ...")
        self.redis.flush()
        server: Server | None = None
        sender: Sender | None = None
        publisher: PacedPublisher | None = None
        load: LoadRun | None = None
        try:
            server = target.start(workers)
            sender = target.sender(server)
            publisher = PacedPublisher(sender, rate, self.plan.payload)
            load = LoadRun(self.sseload, self._load(server, clients, duration, warmup))
            publisher.start()
            sleep_until(load.started + warmup)
            before = sample_tree(server.process.pid)
            redis_before = cpu_seconds(self.redis.pid)
            sent_before, at_before = publisher.sent, time.monotonic()
            sleep_until(load.started + duration)
            after = sample_tree(server.process.pid)
            redis_after = cpu_seconds(self.redis.pid)
            sent_after, at_after = publisher.sent, time.monotonic()
            stats = load.result(timeout=60)
            self._fill(result, stats)
            result.server_processes = len(after.pids)
            result.server_cpu_s = after.cpu_s - before.cpu_s
            result.published_per_s = (sent_after - sent_before) / max(1e-9, at_after - at_before)
            result.publish_errors = publisher.errors
            if publisher.errors:
                result.notes.append(f"publish errors: {publisher.errors} ({publisher.last_error})")
            if stats.events:
                result.server_us_per_event = result.server_cpu_s / stats.events * 1e6
            if target.uses_redis:
                result.redis_cpu_s = redis_after - redis_before
                if stats.events:
                    result.redis_us_per_event = result.redis_cpu_s / stats.events * 1e6
            if not server.process.alive():
                result.error = f"server exited {server.process.proc.returncode}"
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if publisher is not None:
                publisher.stop()
            if sender is not None:
                sender.close()
            if load is not None:
                load.kill()
            if server is not None:
                server.stop()
                result.notes.extend(log_trouble(server))
        self.fanout.append(result)
        return result

    @staticmethod
    def _fill(result: FanoutResult, stats: LoadResult) -> None:
        result.connected = stats.connected
        result.failed = stats.failed
        result.fail_reasons = stats.fail_reasons
        result.disconnected_early = stats.disconnected_early
        result.disconnect_reasons = stats.disconnect_reasons
        result.http_status = stats.http_status
        result.events = stats.events
        result.window_s = stats.window_s
        result.delivered_per_s = stats.events_per_s
        result.p50_ms = stats.latency_ms("p50")
        result.p99_ms = stats.latency_ms("p99")
        result.p999_ms = stats.latency_ms("p999")
        result.max_ms = stats.latency_ms("max")
        result.gaps = stats.gaps
        result.duplicates = stats.duplicates
        result.client_cpu_pct = stats.client_cpu_pct
        result.client_bound = stats.client_bound

    def run_idle(self, target: Target, clients: int, workers: int = 1) -> IdleResult:
        """Server RSS (all its processes) before and after ``clients`` idle streams are open."""
        ramp = self.plan.ramp
        connect_s = clients / ramp if ramp else 1.0
        result = IdleResult(target.name, workers, clients, ramp)
        progress(f"  idle: {target.name} w={workers} {clients} idle connections ...")
        self.redis.flush()
        server: Server | None = None
        load: LoadRun | None = None
        try:
            server = target.start(workers)
            time.sleep(1.0)
            result.rss_before = sample_tree(server.process.pid).rss
            ready = server.process.log.with_suffix(".ready")
            spec = replace(
                self._load(server, clients, connect_s + 120, 0.0), ready_file=ready,
                connect_timeout=30.0,
            )  # fmt: skip
            load = LoadRun(self.sseload, spec)
            if not load.wait_ready(timeout=connect_s + 60):
                result.notes.append("sseload never reported every client settled")
            time.sleep(IDLE_SETTLE_S)
            after = sample_tree(server.process.pid)
            result.rss_after, result.server_processes = after.rss, len(after.pids)
            load.interrupt()
            stats = load.result(timeout=60)
            result.connected, result.failed = stats.connected, stats.failed
            result.fail_reasons = stats.fail_reasons
            result.disconnected_early = stats.disconnected_early
            result.disconnect_reasons = stats.disconnect_reasons
            result.http_status = stats.http_status
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if load is not None:
                load.kill()
            if server is not None:
                server.stop()
                result.notes.extend(log_trouble(server))
        self.idle.append(result)
        return result

    def run_connect(self, target: Target, clients: int, workers: int = 1) -> ConnectResult:
        """``clients`` streams opened at the ramp, held idle, then all closed: server CPU over
        the ramp, RSS before, with them open, and ``LEAVE_WAIT_S`` after they left."""
        ramp = self.plan.ramp
        connect_s = clients / ramp if ramp else 1.0
        result = ConnectResult(target.name, workers, clients, ramp, loadavg_1m=loadavg())
        progress(f"  connect: {target.name} w={workers} {clients} clients at {ramp:g}/s ...")
        self.redis.flush()
        server: Server | None = None
        load: LoadRun | None = None
        try:
            server = target.start(workers)
            time.sleep(SERVER_SETTLE_S)
            before = sample_tree(server.process.pid)
            result.rss_before = before.rss
            ready = server.process.log.with_suffix(".ready")
            spec = replace(
                self._load(server, clients, connect_s + 180, 0.0), ready_file=ready,
                connect_timeout=30.0,
            )  # fmt: skip
            load = LoadRun(self.sseload, spec)
            if not load.wait_ready(timeout=connect_s + 60):
                result.notes.append("sseload never reported every client settled")
            with contextlib.suppress(OSError, ValueError):
                result.connect_s = float(ready.read_text().split()[0])
            time.sleep(CONNECT_TAIL_S)
            connected = sample_tree(server.process.pid)
            result.connect_cpu_s = connected.cpu_s - before.cpu_s
            time.sleep(max(0.0, IDLE_SETTLE_S - CONNECT_TAIL_S))
            idle = sample_tree(server.process.pid)
            result.rss_open, result.server_processes = idle.rss, len(idle.pids)
            load.interrupt()
            left_at = time.monotonic()
            stats = load.result(timeout=60)
            result.connected, result.failed = stats.connected, stats.failed
            result.fail_reasons = stats.fail_reasons
            result.disconnected_early = stats.disconnected_early
            result.disconnect_reasons = stats.disconnect_reasons
            result.http_status = stats.http_status
            sleep_until(left_at + LEAVE_WAIT_S)
            after = sample_tree(server.process.pid)
            result.after_leave_s = time.monotonic() - left_at
            result.rss_after_leave = after.rss
            result.close_cpu_s = after.cpu_s - idle.cpu_s
            if not server.process.alive():
                result.error = f"server exited {server.process.proc.returncode}"
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if load is not None:
                load.kill()
            if server is not None:
                server.stop()
                result.notes.extend(log_trouble(server))
        self.connect.append(result)
        return result

    def run_storm(self, target: Target, clients: int, workers: int = 1) -> StormResult:
        """Every client streams, then drops at once; ``storm_behind`` events are published;
        then every client reconnects at once with its Last-Event-ID. sseload checks that each
        client's ``seq`` continues without a hole or a repeat up to the last event."""
        plan = self.plan
        warm, behind = STORM_WARM_EVENTS, plan.storm_behind
        ramp = plan.ramp
        connect_s = clients / ramp if ramp else 1.0
        result = StormResult(target.name, workers, clients, behind, loadavg_1m=loadavg())
        progress(
            f"  storm: {target.name} w={workers} {clients} clients reconnecting {behind} behind ..."
        )
        self.redis.flush()
        server: Server | None = None
        sender: Sender | None = None
        load: LoadRun | None = None
        try:
            server = target.start(workers)
            sender = target.sender(server)
            log = server.process.log
            spec = replace(
                self._load(server, clients, connect_s + 600, 0.0),
                ready_file=log.with_suffix(".ready"), storm_file=log.with_suffix(".storm"),
                connect_timeout=STORM_CONNECT_TIMEOUT_S, resume_seq=warm + behind,
            )  # fmt: skip
            load = LoadRun(self.sseload, spec)
            if not load.wait_ready(timeout=connect_s + 60):
                raise RuntimeError("sseload never reported every client settled")
            time.sleep(STORM_SETTLE_S)
            publish(sender, range(1, warm + 1), plan.payload)
            time.sleep(STORM_SETTLE_S)
            load.signal(signal.SIGUSR1)
            if not load.wait_storm("dropped", timeout=30):
                raise RuntimeError("sseload never reported the streams dropped")
            publish(sender, range(warm + 1, warm + behind + 1), plan.payload)
            time.sleep(STORM_SETTLE_S)
            before = sample_tree(server.process.pid)
            load.signal(signal.SIGUSR2)
            if not load.wait_storm("settled", timeout=STORM_CONNECT_TIMEOUT_S + 60):
                result.notes.append("not every client resumed, failed or ended in time")
            after = sample_tree(server.process.pid)
            result.storm_cpu_s = after.cpu_s - before.cpu_s
            load.interrupt()
            self._fill_storm(result, load.result(timeout=60))
            if not server.process.alive():
                result.error = f"server exited {server.process.proc.returncode}"
        except Exception as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            if sender is not None:
                sender.close()
            if load is not None:
                load.kill()
            if server is not None:
                server.stop()
                result.notes.extend(log_trouble(server))
        self.storm.append(result)
        return result

    @staticmethod
    def _fill_storm(result: StormResult, stats: LoadResult) -> None:
        storm = stats.storm
        if not storm:
            raise RuntimeError("sseload printed no storm summary (an old build?)")

        def count(key: str) -> int:
            return int(storm.get(key) or 0)

        result.connected, result.failed = stats.connected, stats.failed
        result.dropped = count("dropped")
        behind = storm.get("behind_at_drop") or {}
        result.behind_min, result.behind_max = int(behind["min"]), int(behind["max"])
        result.reconnected = count("reconnected")
        result.with_last_event_id = count("with_last_event_id")
        result.reconnect_failed = count("failed")
        reasons = storm.get("fail_reasons") or {}
        result.reconnect_fail_reasons = {str(k): int(v) for k, v in reasons.items() if v}
        result.resumed = count("resumed")
        all_resumed = float(storm.get("all_resumed_s", -1))
        result.all_resumed_s = all_resumed if all_resumed >= 0 else None
        resume = storm.get("resume_ms") or {}
        result.resume_p50_ms, result.resume_p99_ms = float(resume["p50"]), float(resume["p99"])
        result.lost, result.duplicates = count("lost"), count("duplicates")
        result.disconnected_early = stats.disconnected_early
        result.disconnect_reasons = stats.disconnect_reasons
        result.http_status = stats.http_status
        cpu = stats.raw.get("sseload_cpu") or {}
        result.client_cpu_s = float(cpu.get("total_s") or 0)
        if count("long_ids"):
            result.notes.append(f"{count('long_ids')} ids longer than sseload keeps")

    def ladder(self, target: Target, workers: int = 1, scenario: str = "saturation") -> None:
        """Steps the rate up until a step fails (see ``FanoutResult.passed``). When the first
        step already fails, steps down instead (first/2, first/5) until one passes, so a slow
        target still gets a saturation figure rather than only "less than the first step"."""
        plan = self.plan

        def step(rate: float) -> bool:
            return self.run_fanout(
                scenario, target, plan.sat_clients, rate, plan.sat_duration, plan.sat_warmup,
                workers,
            ).passed  # fmt: skip

        first, *higher = plan.sat_rates
        if not step(first):
            for rate in (first / 2, first / 5):
                if step(rate):
                    return
            return
        for rate in higher:
            if not step(rate):
                return


def publish(sender: Sender, seqs: range, payload: int) -> None:
    """Events ``seqs`` in one batch, accepted by the server or Redis when this returns."""
    sender.send([make_event(seq, payload) for seq in seqs])
    if not sender.drain(timeout=30):
        raise RuntimeError("the server did not accept every event in time")


def saturation(results: Sequence[FanoutResult]) -> float | None:
    """Highest delivered events/s among passing steps."""
    passing = [r.delivered_per_s for r in results if r.passed]
    return max(passing) if passing else None


ScenarioFn = Callable[[Bench, list[Target]], None]


def scenario_cpu(bench: Bench, targets: list[Target]) -> None:
    plan = bench.plan
    for target in targets:
        bench.run_fanout(
            "cpu", target, plan.cpu_clients, plan.cpu_rate, plan.cpu_duration, plan.cpu_warmup
        )


def scenario_saturation(bench: Bench, targets: list[Target]) -> None:
    for target in targets:
        bench.ladder(target)


def scenario_latency(bench: Bench, targets: list[Target]) -> None:
    plan = bench.plan
    for target in targets:
        bench.run_fanout(
            "latency", target, plan.lat_clients, plan.lat_rate, plan.lat_duration, plan.lat_warmup
        )


def scenario_idle(bench: Bench, targets: list[Target]) -> None:
    for target in targets:
        bench.run_idle(target, bench.plan.idle_clients)


def scenario_workers(bench: Bench, targets: list[Target]) -> None:
    for target in targets:
        if target.name != "gateway":
            continue
        for workers in bench.plan.workers:
            bench.ladder(target, workers, scenario="workers")


def scenario_connect(bench: Bench, targets: list[Target]) -> None:
    for target in targets:
        bench.run_connect(target, bench.plan.connect_clients)


def scenario_storm(bench: Bench, targets: list[Target]) -> None:
    for target in targets:
        if not target.resumes:
            progress(f"  storm: {target.name} skipped (no history to resume from)")
            continue
        bench.run_storm(target, bench.plan.storm_clients)


RUNNERS: dict[str, ScenarioFn] = {
    "cpu": scenario_cpu,
    "saturation": scenario_saturation,
    "latency": scenario_latency,
    "idle": scenario_idle,
    "workers": scenario_workers,
    "connect": scenario_connect,
    "storm": scenario_storm,
}
