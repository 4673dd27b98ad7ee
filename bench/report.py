"""Tables for the terminal and the summary of the issue's target ratios."""

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from bench.records import ConnectResult, FanoutResult, IdleResult, StormResult
from bench.scenarios import saturation

FANOUT_HEADERS = (
    "target", "w", "clients", "rate", "pub/s", "delivered/s", "%exp", "p50 ms", "p99 ms",
    "p99.9 ms", "gaps", "dups", "conn/fail", "srv us/ev", "redis us/ev", "client%", "flags",
)  # fmt: skip
IDLE_HEADERS = ("target", "w", "idle conns", "conn/fail", "RSS before", "RSS after", "KB/conn")
CONNECT_HEADERS = (
    "target", "w", "clients", "ramp/s", "conn/fail", "all in s", "srv us/conn", "RSS before",
    "RSS open", "KB/conn", "RSS +10s left", "left/before", "srv us/close", "flags",
)  # fmt: skip
STORM_HEADERS = (
    "target", "w", "clients", "behind", "reconn/fail", "with id", "resumed", "all resumed s",
    "p50 ms", "p99 ms", "lost", "dups", "srv us/reconn", "flags",
)  # fmt: skip


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def flags(r: FanoutResult) -> str:
    marks: list[str] = []
    if r.error:
        marks.append("ERROR")
    if r.gaps or r.duplicates:
        marks.append("GAPS/DUPS!")
    if r.failed:
        why = [f"{k}={v}" for k, v in r.fail_reasons.items()]
        why += [f"{code}x{n}" for code, n in r.http_status.items() if code != "200"]
        marks.append(f"failed({','.join(why)})")
    if r.disconnected_early:
        reasons = ",".join(f"{k}" for k in r.disconnect_reasons)
        marks.append(f"dropped={r.disconnected_early}({reasons})")
    if r.client_bound:
        marks.append("CLIENT-BOUND")
    if r.publisher_short:
        marks.append("PUB-SHORT")
    if r.scenario in ("saturation", "workers"):
        marks.append("pass" if r.passed else "FAIL")
    return " ".join(marks)


def fanout_row(r: FanoutResult) -> list[str]:
    return [
        r.target, str(r.workers), str(r.clients), f"{r.rate:g}", num(r.published_per_s, 0),
        num(r.delivered_per_s, 0), num(100 * r.delivered_fraction, 1), num(r.p50_ms, 2),
        num(r.p99_ms, 2), num(r.p999_ms, 2), str(r.gaps), str(r.duplicates),
        f"{r.connected}/{r.failed}", num(r.server_us_per_event, 2), num(r.redis_us_per_event, 2),
        num(r.client_cpu_pct, 0), flags(r),
    ]  # fmt: skip


def idle_row(r: IdleResult) -> list[str]:
    per_conn = r.bytes_per_connection
    return [
        r.target, str(r.workers), str(r.clients), f"{r.open_connections}/{r.failed}",
        mib(r.rss_before), mib(r.rss_after), num(None if per_conn is None else per_conn / 1024, 2),
    ]  # fmt: skip


def connect_row(r: ConnectResult) -> list[str]:
    per_conn = r.bytes_per_connection
    marks = ["ERROR"] if r.error else []
    if r.failed:
        marks.append(f"failed({','.join(f'{k}={v}' for k, v in r.fail_reasons.items())})")
    if r.disconnected_early:
        marks.append(f"dropped={r.disconnected_early}({','.join(r.disconnect_reasons)})")
    return [
        r.target, str(r.workers), str(r.clients), f"{r.ramp_per_s:g}",
        f"{r.connected}/{r.failed}", num(r.connect_s, 2), num(r.cpu_us_per_connection, 0),
        mib(r.rss_before), mib(r.rss_open), num(None if per_conn is None else per_conn / 1024, 2),
        mib(r.rss_after_leave), num(r.leave_ratio, 2), num(r.cpu_us_per_close, 0), " ".join(marks),
    ]  # fmt: skip


def storm_row(r: StormResult) -> list[str]:
    marks = ["ERROR"] if r.error else []
    if r.lost or r.duplicates:
        marks.append("LOST/DUPS!")
    if r.reconnect_failed:
        why = ",".join(f"{k}={v}" for k, v in r.reconnect_fail_reasons.items())
        marks.append(f"reconnect failed({why})")
    if r.disconnected_early:
        marks.append(f"dropped={r.disconnected_early}({','.join(r.disconnect_reasons)})")
    marks.append("pass" if r.passed else "FAIL")
    behind = f"{r.behind_min}" if r.behind_min == r.behind_max else f"{r.behind_min}-{r.behind_max}"
    return [
        r.target, str(r.workers), str(r.clients), behind,
        f"{r.reconnected}/{r.reconnect_failed}", str(r.with_last_event_id), str(r.resumed),
        num(r.all_resumed_s, 2), num(r.resume_p50_ms, 0), num(r.resume_p99_ms, 0), str(r.lost),
        str(r.duplicates), num(r.cpu_us_per_reconnect, 0), " ".join(marks),
    ]  # fmt: skip


def simple_problems(results: Sequence[ConnectResult | StormResult]) -> list[str]:
    lines: list[str] = []
    for r in results:
        who = f"{r.target} w={r.workers} {r.clients} clients"
        if isinstance(r, StormResult) and (r.lost or r.duplicates):
            lines.append(
                f"!!! WARNING {who}: {r.lost} events lost, {r.duplicates} duplicated or "
                "reordered across the reconnect: resumption is NOT exact !!!"
            )
        if r.error:
            lines.append(f"!!! {who}: {r.error}")
        lines += [f"    {who}: {note}" for note in r.notes]
    return lines


def mib(value: int) -> str:
    return f"{value / 2**20:,.1f} MiB"


def problems(results: Sequence[FanoutResult | IdleResult]) -> list[str]:
    lines: list[str] = []
    for r in results:
        who = f"{r.target} w={r.workers} {r.clients} clients"
        if isinstance(r, FanoutResult):
            who += f" x {r.rate:g}/s"
            if r.gaps or r.duplicates:
                lines.append(
                    f"!!! WARNING {who}: {r.gaps} missing events, {r.duplicates} duplicates"
                    " or reordered: delivery is NOT exact !!!"
                )
        if r.disconnected_early:
            reasons = ", ".join(f"{k} {v}" for k, v in r.disconnect_reasons.items())
            lines.append(f"!!! {who}: {r.disconnected_early} streams ended early ({reasons})")
        if r.error:
            lines.append(f"!!! {who}: {r.error}")
        lines += [f"    {who}: {note}" for note in r.notes]
    return lines


def by_target(results: Sequence[FanoutResult], scenario: str) -> dict[str, FanoutResult]:
    return {r.target: r for r in results if r.scenario == scenario and r.workers == 1}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratio_text(a: float | None, b: float | None) -> str:
    value = ratio(a, b)
    return "n/a" if value is None else f"{value:.2f}"


def render_scenario(
    scenario: str, fanout: Sequence[FanoutResult], idle: Sequence[IdleResult],
    connect: Sequence[ConnectResult] = (), storm: Sequence[StormResult] = (),
) -> str:  # fmt: skip
    out: list[str] = [f"== {scenario} =="]
    if scenario == "connect":
        out.append(table(CONNECT_HEADERS, [connect_row(r) for r in connect]))
        gw_run, nchan_run = _first(connect, "gateway"), _first(connect, "nchan")
        if gw_run and nchan_run:
            out.append(
                "gateway/nchan us/conn: "
                f"{ratio_text(gw_run.cpu_us_per_connection, nchan_run.cpu_us_per_connection)}   "
                "KB/conn: "
                f"{ratio_text(gw_run.bytes_per_connection, nchan_run.bytes_per_connection)}"
            )
        out += simple_problems(connect)
        return "\n".join(out)
    if scenario == "storm":
        out.append(table(STORM_HEADERS, [storm_row(r) for r in storm]))
        out += simple_problems(storm)
        return "\n".join(out)
    if scenario == "idle":
        out.append(table(IDLE_HEADERS, [idle_row(r) for r in idle]))
        out += problems(idle)
        return "\n".join(out)
    runs = [r for r in fanout if r.scenario == scenario]
    out.append(table(FANOUT_HEADERS, [fanout_row(r) for r in runs]))
    if scenario == "cpu":
        cpu = {t: r.server_us_per_event for t, r in by_target(runs, "cpu").items()}
        out.append(
            f"gateway/nchan us/ev: {ratio_text(cpu.get('gateway'), cpu.get('nchan'))}   "
            f"gateway/naive us/ev: {ratio_text(cpu.get('gateway'), cpu.get('naive'))}"
        )
    if scenario in ("saturation", "workers"):
        sat = saturation_by(runs)
        for (target, workers), value in sat.items():
            steps = [r for r in runs if r.target == target and r.workers == workers]
            capped = " (no step failed: at least this)" if _capped(steps) else ""
            out.append(f"saturation {target} w={workers}: {num(value, 0)} delivered ev/s{capped}")
        if scenario == "saturation":
            gw, naive, nchan = (sat.get((t, 1)) for t in ("gateway", "naive", "nchan"))
            out.append(
                f"gateway/naive: {ratio_text(gw, naive)}   gateway/nchan: {ratio_text(gw, nchan)}"
            )
        else:
            base = sat.get(("gateway", 1))
            for (_, workers), value in sat.items():
                if workers != 1:
                    out.append(f"{workers}w/1w: {ratio_text(value, base)}")
    out += problems(runs)
    return "\n".join(out)


def saturation_by(runs: Sequence[FanoutResult]) -> dict[tuple[str, int], float | None]:
    groups: dict[tuple[str, int], list[FanoutResult]] = {}
    for r in runs:
        groups.setdefault((r.target, r.workers), []).append(r)
    return {key: saturation(steps) for key, steps in groups.items()}


@dataclass(frozen=True)
class Goal:
    name: str
    value: float | None
    goal: str
    met: bool | None
    detail: str = ""
    bound: str = ""
    """``>=``/``<=`` when the value is only a bound (a saturation ladder that never failed)."""

    def line(self) -> str:
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[self.met]
        value = self.bound + num(self.value, 2)
        return f"{self.name:<40} {value:>9}  goal {self.goal:<7} {verdict:<7}{self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "value": self.value, "bound": self.bound or None,
            "goal": self.goal, "met": self.met, "detail": self.detail.strip(),
        }  # fmt: skip


def _goal(name: str, value: float | None, goal: str, ok: bool, detail: str = "") -> Goal:
    return Goal(name, value, goal, None if value is None else ok, detail)


def _capped(steps: Sequence[FanoutResult]) -> bool:
    """No step failed: the saturation is at least the best step, not the best step."""
    return bool(steps) and all(r.passed for r in steps)


def _sat_detail(name: str, steps: Sequence[FanoutResult]) -> str:
    value = saturation(steps)
    if value is not None:
        return f"{name} {'>=' * _capped(steps)}{num(value, 0)}/s"
    if not steps:
        return f"{name} not run"
    low = min(steps, key=lambda r: r.rate)
    return f"{name} passed no step ({num(low.delivered_per_s, 0)}/s at {low.rate:g} ev/s)"


def _sat_estimate(steps: Sequence[FanoutResult]) -> tuple[float | None, int]:
    """A ladder's saturation and what it is: 0 exact, +1 a lower bound (no step failed), -1 an
    upper bound (no step passed: the target sustains less than the first step's load)."""
    value = saturation(steps)
    if value is not None:
        return value, 1 if _capped(steps) else 0
    if steps:
        return min(r.expected_per_s for r in steps), -1
    return None, 0


def _sat_goal(
    name: str, top: tuple[str, Sequence[FanoutResult]], bottom: tuple[str, Sequence[FanoutResult]],
    at_least: float,
) -> Goal:  # fmt: skip
    """top / bottom saturation against a ``>=`` goal, as a bound when a ladder ended without
    failing or without passing."""
    (top_value, top_kind), (bottom_value, bottom_kind) = map(_sat_estimate, (top[1], bottom[1]))
    value = ratio(top_value, bottom_value)
    detail = f"  {_sat_detail(*top)}, {_sat_detail(*bottom)}"
    goal = f">= {at_least:g}"
    if value is None:
        return Goal(name, None, goal, None, detail)
    kinds = {top_kind, -bottom_kind} - {0}
    if len(kinds) > 1:
        return Goal(name, value, goal, None, detail + " (unknown: raise --rates)", "?")
    if kinds == {1}:
        return Goal(name, value, goal, True if value >= at_least else None, detail, ">=")
    if kinds == {-1}:
        return Goal(name, value, goal, False if value < at_least else None, detail, "<=")
    return Goal(name, value, goal, value >= at_least, detail)


def _first(results: Sequence[ConnectResult], target: str) -> ConnectResult | None:
    return next((r for r in results if r.target == target and r.workers == 1), None)


def connect_goals(connect: Sequence[ConnectResult], storm: Sequence[StormResult]) -> list[Goal]:
    """Issue 14's acceptance: connection cost and memory against nchan, memory given back,
    and the reconnect storm."""
    gw, nchan = _first(connect, "gateway"), _first(connect, "nchan")
    gw_cpu = gw.cpu_us_per_connection if gw else None
    nchan_cpu = nchan.cpu_us_per_connection if nchan else None
    cpu = ratio(gw_cpu, nchan_cpu)
    cpu_detail = f"  gateway {num(gw_cpu, 0)} us, nchan {num(nchan_cpu, 0)} us"
    gw_kb, nchan_kb = (
        r.bytes_per_connection / 1024 if r and r.bytes_per_connection is not None else None
        for r in (gw, nchan)
    )
    mem = ratio(gw_kb, nchan_kb)
    mem_detail = f"  gateway {num(gw_kb, 2)} KB, nchan {num(nchan_kb, 2)} KB"
    if gw:
        cpu_detail += f" at {gw.connected} clients, {gw.ramp_per_s:g}/s"
        mem_detail += f" at {gw.open_connections} open"
    left = gw.leave_ratio if gw else None
    left_detail = (
        f"  {mib(gw.rss_before)} before, {mib(gw.rss_after_leave)} "
        f"{gw.after_leave_s:.0f} s after {gw.open_connections} left"
        if gw
        else ""
    )
    st = next((r for r in storm if r.target == "gateway" and r.workers == 1), None)
    storm_goal = Goal("9. storm: gateway all resumed, 0 lost/dup", None, "pass", None)
    if st is not None:
        storm_goal = Goal(
            storm_goal.name, st.all_resumed_s, "pass", st.passed,
            f"  s to all resumed; {st.resumed}/{st.clients} resumed, {st.lost} lost, "
            f"{st.duplicates} duplicated, {st.behind_min}-{st.behind_max} behind",
        )  # fmt: skip
    return [
        _goal("6. connect: gateway/nchan CPU per conn", cpu, "<= 2.5", (cpu or 0) <= 2.5,
              cpu_detail),
        _goal("7. connect: gateway/nchan KB per idle conn", mem, "<= 1.1", (mem or 0) <= 1.1,
              mem_detail),
        _goal("8. connect: gateway RSS after leave/before", left, "<= 1.25",
              (left or 0) <= 1.25, left_detail),
        storm_goal,
    ]  # fmt: skip


def summary_goals(
    fanout: Sequence[FanoutResult], idle: Sequence[IdleResult], workers_note: str | None,
    connect: Sequence[ConnectResult] = (), storm: Sequence[StormResult] = (),
) -> list[Goal]:  # fmt: skip
    cpu = by_target(fanout, "cpu")
    cpu_gw, cpu_nchan = (
        cpu[t].server_us_per_event if t in cpu else None for t in ("gateway", "nchan")
    )
    c_ratio = ratio(cpu_gw, cpu_nchan)
    c_detail = f"  gateway {num(cpu_gw, 2)} us/ev, nchan {num(cpu_nchan, 2)} us/ev"
    if "gateway" in cpu:
        c_detail += f" at {cpu['gateway'].clients}x{cpu['gateway'].rate:g}/s"

    sat_runs = [r for r in fanout if r.scenario == "saturation" and r.workers == 1]
    steps = {t: [r for r in sat_runs if r.target == t] for t in ("gateway", "naive", "nchan")}

    lat = by_target(fanout, "latency").get("gateway")
    lat_p99 = lat.p99_ms if lat and lat.error is None and lat.events else None
    lat_detail = (
        f"  at {lat.clients}x{lat.rate:g}/s{' CLIENT-BOUND' * lat.client_bound}" if lat else ""
    )

    idle_gw = next((r for r in idle if r.target == "gateway" and r.workers == 1), None)
    idle_bytes = idle_gw.bytes_per_connection if idle_gw else None
    idle_kb = idle_bytes / 1024 if idle_bytes is not None else None
    idle_detail = f"  {idle_gw.open_connections} open connections" if idle_gw else ""

    w_runs = [r for r in fanout if r.scenario == "workers" and r.target == "gateway"]
    w1 = [r for r in w_runs if r.workers == 1]
    w2 = [r for r in w_runs if r.workers == 2]
    workers = _sat_goal("5. workers: 2 workers / 1 worker", ("2w", w2), ("1w", w1), 1.7)
    if workers_note:
        workers = replace(workers, detail=workers_note)
    elif any(r.client_bound for r in w_runs):
        workers = replace(workers, detail=workers.detail + " (sseload at its CPU limit in a step)")
    return [
        _goal(
            "1. cpu: gateway us/ev / nchan us/ev",
            c_ratio,
            "<= 1.0",
            (c_ratio or 0) <= 1.0,
            c_detail,
        ),
        _sat_goal(
            "2a. saturation: gateway / naive",
            ("gateway", steps["gateway"]),
            ("naive", steps["naive"]),
            10,
        ),
        _sat_goal(
            "2b. saturation: gateway / nchan",
            ("gateway", steps["gateway"]),
            ("nchan", steps["nchan"]),
            0.8,
        ),
        _goal("3. latency: gateway p99 ms", lat_p99, "< 50", (lat_p99 or 0) < 50, lat_detail),
        _goal(
            "4. idle: gateway KB per connection",
            idle_kb,
            "<= 20",
            (idle_kb or 0) <= 20,
            idle_detail,
        ),
        workers,
        *connect_goals(connect, storm),
    ]


def render_summary(goals: Sequence[Goal], quick: bool) -> str:
    head = "== summary (target ratios) =="
    if quick:
        head += "  [--quick: smaller loads than the issue's conditions; indicative only]"
    return "\n".join([head, *(g.line() for g in goals)])
