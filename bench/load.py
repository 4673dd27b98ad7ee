"""Build, run and read ``sseload``, the C epoll SSE load client.

A Python client saturates long before a good server does, so every number here comes from an
independent C client; the bench only starts it and parses its JSON summary."""

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SOURCE = Path(__file__).resolve().parent / "sseload"
SOURCE_FILES = ("Makefile", "sseload.c")
CLIENT_BOUND_PCT = 90.0


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sse-gateway-bench" / "sseload"


def build_sseload(source: Path = DEFAULT_SOURCE) -> Path:
    """Copy the sources into the cache and ``make`` there (the checkout stays clean, and a
    read-only one works); rebuilt only when a source file changed."""
    if not (source / "sseload.c").is_file():
        raise SystemExit(f"sseload sources not found in {source} (give --sseload-src)")
    if shutil.which("make") is None or not (shutil.which("cc") or shutil.which("gcc")):
        raise SystemExit(
            "building sseload (bench/sseload, C) needs make and a C compiler: "
            "apt-get install -y gcc make"
        )
    build = cache_dir()
    build.mkdir(parents=True, exist_ok=True)
    for name in SOURCE_FILES:
        src, dst = source / name, build / name
        if not dst.exists() or dst.read_bytes() != src.read_bytes():
            shutil.copyfile(src, dst)
    compiler = [] if shutil.which("cc") else ["CC=gcc"]
    done = subprocess.run(
        ["make", "-s", "-C", str(build), *compiler], capture_output=True, text=True
    )
    binary = build / "sseload"
    if done.returncode != 0 or not binary.is_file():
        raise SystemExit(f"building sseload failed:\n{done.stdout}{done.stderr}")
    return binary


@dataclass(frozen=True)
class LoadSpec:
    url: str
    clients: int
    duration: float
    warmup: float = 0.0
    ramp: float = 0.0
    threads: int = 1
    connect_timeout: float = 10.0
    ready_file: Path | None = None
    resume_seq: int = 0
    """Storm mode (with ``storm_file``): SIGUSR1 drops every stream, SIGUSR2 reconnects them
    all with their Last-Event-ID; a client has resumed once its ``seq`` reaches this."""
    storm_file: Path | None = None

    def argv(self, binary: Path) -> list[str]:
        args = [str(binary), "--url", self.url, "--clients", str(self.clients)]
        args += ["--duration", f"{self.duration:g}", "--warmup", f"{self.warmup:g}"]
        args += ["--ramp", f"{self.ramp:g}", "--threads", str(self.threads)]
        args += ["--connect-timeout", f"{self.connect_timeout:g}", "--json"]
        if self.ready_file is not None:
            args += ["--ready-file", str(self.ready_file)]
        if self.resume_seq:
            args += ["--resume-seq", str(self.resume_seq)]
        if self.storm_file is not None:
            args += ["--storm-file", str(self.storm_file)]
        return args


@dataclass(frozen=True)
class LoadResult:
    raw: dict[str, Any]

    def _get(self, *path: str) -> float:
        value: Any = self.raw
        for key in path:
            value = value.get(key, 0) if isinstance(value, dict) else 0
        return float(value or 0)

    @property
    def connected(self) -> int:
        return int(self._get("connected"))

    @property
    def failed(self) -> int:
        return int(self._get("failed"))

    @property
    def disconnected_early(self) -> int:
        return int(self._get("disconnected_early"))

    @property
    def events(self) -> int:
        return int(self._get("events"))

    @property
    def events_per_s(self) -> float:
        return self._get("events_per_s")

    @property
    def window_s(self) -> float:
        return self._get("window_s")

    def latency_ms(self, which: str) -> float:
        return self._get("latency_ms", which)

    @property
    def gaps(self) -> int:
        return int(self._get("seq", "gaps_missing_events"))

    @property
    def duplicates(self) -> int:
        return int(self._get("seq", "duplicates_or_reordered"))

    @property
    def client_cpu_pct(self) -> float:
        return self._get("sseload_cpu", "window_pct_of_one_core")

    @property
    def client_bound(self) -> bool:
        """Near one full core, the client rather than the server may be the limit (with
        ``--threads`` the sum over threads is compared: on a small machine it competes with
        the server for the same cores)."""
        return self.client_cpu_pct >= CLIENT_BOUND_PCT

    def _counts(self, key: str) -> dict[str, int]:
        counts = self.raw.get(key, {})
        if not isinstance(counts, dict):
            return {}
        return {str(k): int(v) for k, v in counts.items() if v}

    @property
    def storm(self) -> dict[str, Any]:
        """Storm mode's summary (see bench/sseload/README.md), empty otherwise."""
        storm = self.raw.get("storm", {})
        return storm if isinstance(storm, dict) else {}

    @property
    def http_status(self) -> dict[str, int]:
        return self._counts("http_status")

    @property
    def fail_reasons(self) -> dict[str, int]:
        return self._counts("fail_reasons")

    @property
    def disconnect_reasons(self) -> dict[str, int]:
        """Why streams ended before the run did (``end_of_chunked_stream``: the server closed
        the response; ``eof``/``error``: the connection went)."""
        return self._counts("disconnect_reasons")


class LoadRun:
    """One running ``sseload``; ``result()`` waits for its JSON summary."""

    def __init__(self, binary: Path, spec: LoadSpec) -> None:
        self.spec = spec
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            spec.argv(binary), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def wait_ready(self, timeout: float) -> bool:
        ready = self.spec.ready_file
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if ready is not None and ready.exists():
                return True
            time.sleep(0.05)
        return ready is not None and ready.exists()

    def storm_lines(self) -> list[str]:
        """What storm mode has reported so far (``dropped``, ``settled``)."""
        path = self.spec.storm_file
        try:
            return [] if path is None else path.read_text().split("\n")
        except FileNotFoundError:
            return []

    def wait_storm(self, what: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            if any(line.split(" ")[0] == what for line in self.storm_lines()):
                return True
            time.sleep(0.01)
        return any(line.split(" ")[0] == what for line in self.storm_lines())

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def interrupt(self) -> None:
        """Ends the run early; sseload still prints its summary on SIGINT."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def result(self, timeout: float) -> LoadResult:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("sseload did not finish in time") from None
        line = out.strip().splitlines()[-1] if out.strip() else ""
        try:
            raw = json.loads(line)
        except json.JSONDecodeError:
            raise RuntimeError(f"sseload exited {self.proc.returncode}: {err.strip()}") from None
        if not isinstance(raw, dict):
            raise RuntimeError(f"sseload printed {line[:200]!r}")
        return LoadResult(raw)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
