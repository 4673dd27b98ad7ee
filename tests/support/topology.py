"""The compose topology (docker-compose.yml and deploy/) run natively, without a container
engine: Debian's redis-server, nginx and prometheus, and ``sse-gateway serve`` nodes, each
started from the repo's own files.

Only what cannot be the same outside compose is substituted: the service host names and ports
(every part listens on a free loopback port), data and temporary directories, and file paths
that compose mounts elsewhere, and Prometheus's intervals (:data:`SCRAPE_INTERVAL`). Everything
else (flags, environment, nginx directives, rules) is the file's own. :class:`Topology` starts
the parts and ``close`` stops them all.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.config import ENV_PREFIX, Settings, add_arguments, settings_from
from tests.support.gateway import GatewayProcess
from tests.support.ports import free_port
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
LOOPBACK = "127.0.0.1"

INSTALL_HINT = (
    "{binary} is needed by tests/deploy (the compose topology run natively): install it "
    "(Debian/Ubuntu: apt-get install {package}); .ci/run installs it"
)


def require(binary: str, package: str) -> str:
    """The binary's path, or a clear error naming the package that provides it."""
    path = shutil.which(binary) or shutil.which(binary, path="/usr/sbin:/usr/bin")
    if path is None:
        raise RuntimeError(INSTALL_HINT.format(binary=binary, package=package))
    return path


# -- docker-compose.yml -----------------------------------------------------------------------

_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_]\w*)")


def interpolate(text: str) -> str:
    """Compose's variable substitution with nothing set: ``${VAR:-default}`` gives its
    default, ``${VAR}`` and ``$VAR`` nothing, ``$$`` a dollar."""

    def value(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return match.group(2) or ""

    return _INTERPOLATION.sub(value, text)


@dataclass
class Service:
    """One compose service as the topology needs it: its command and environment."""

    name: str
    command: list[str]
    environment: dict[str, str]
    definition: dict[str, Any]


def _as_list(command: Any) -> list[str]:
    if command is None:
        return []
    if isinstance(command, str):
        return shlex.split(interpolate(command))
    return [interpolate(str(part)) for part in command]


def _environment(definition: Mapping[str, Any], root: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    files = definition.get("env_file") or []
    for entry in [files] if isinstance(files, str | dict) else files:
        path = entry["path"] if isinstance(entry, dict) else entry
        for line in (root / path).read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                name, _, value = line.partition("=")
                env[name.strip()] = value.strip().strip("'\"")
    given = definition.get("environment") or {}
    if isinstance(given, list):
        given = dict(item.split("=", 1) if "=" in item else (item, "") for item in given)
    for name, value in given.items():
        if value is None:
            continue  # passed through from the host: nothing is set here
        env[str(name)] = interpolate(str(value).lower() if isinstance(value, bool) else str(value))
    return env


def _image_command(definition: Mapping[str, Any], root: Path) -> tuple[list[str], list[str]]:
    """ENTRYPOINT and CMD of the image a service builds from the repo (none for a pulled
    image: the topology runs those natively by their own rules)."""
    build = definition.get("build")
    if build is None:
        return [], []
    context = root / (build if isinstance(build, str) else build.get("context", "."))
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    found: dict[str, list[str]] = {"ENTRYPOINT": [], "CMD": []}
    for line in (context / dockerfile).read_text().replace("\\\n", " ").splitlines():
        match = re.match(r"\s*(ENTRYPOINT|CMD)\s+(.*)", line, re.IGNORECASE)
        if match:
            body = match.group(2).strip()
            shell = ["/bin/sh", "-c", body]
            found[match.group(1).upper()] = json.loads(body) if body.startswith("[") else shell
    return found["ENTRYPOINT"], found["CMD"]


def compose_services(root: Path = ROOT) -> dict[str, Service]:
    """The services of docker-compose.yml, each with the command its container runs (as
    Docker combines the service's ``entrypoint``/``command`` with the image's)."""
    document = yaml.safe_load((root / "docker-compose.yml").read_text())
    services: dict[str, Service] = {}
    for name, definition in document["services"].items():
        entrypoint, cmd = _image_command(definition, root)
        if definition.get("entrypoint") is not None:
            entrypoint, cmd = _as_list(definition["entrypoint"]), []
        if definition.get("command") is not None:
            cmd = _as_list(definition["command"])
        environment = _environment(definition, root)
        services[name] = Service(name, [*entrypoint, *cmd], environment, definition)
    return services


def is_gateway_node(service: Service) -> bool:
    """A service that runs ``sse-gateway serve`` (the demo publisher runs something else)."""
    command = service.command
    for index, part in enumerate(command):
        if Path(part).name == "sse-gateway" or part == "gateway.cli":
            return "serve" in command[index + 1 : index + 2]
    return False


def gateway_nodes(services: Mapping[str, Service]) -> list[Service]:
    return [service for service in services.values() if is_gateway_node(service)]


def serve_arguments(command: list[str]) -> list[str]:
    """The arguments after ``serve``."""
    return command[command.index("serve") + 1 :]


def node_settings(service: Service) -> Settings:
    """The settings the gateway itself reads from the service's command and environment."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    environ = {k: v for k, v in service.environment.items() if k.startswith(ENV_PREFIX)}
    return settings_from(parser.parse_args(serve_arguments(service.command)), environ)


def with_address(url: str, host: str, port: int) -> str:
    """``url`` with its host and port replaced; scheme, credentials, path and query kept."""
    parts = urllib.parse.urlsplit(url)
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}:{port}" if credentials else f"{host}:{port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


# -- Redis ------------------------------------------------------------------------------------


def redis_from_conf(conf: Path, directory: Path) -> RedisServer:
    """redis-server with a copy of deploy/redis.conf whose ``port``, ``bind`` and ``dir``
    directives are replaced (Redis applies ``dir`` as it reads it, so a container path cannot
    be overridden on the command line: it fails first)."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    text = conf.read_text()
    values = {"port": str(port), "bind": LOOPBACK, "dir": str(directory)}
    for name, value in values.items():
        text, found = re.subn(rf"(?im)^\s*{name}\s.*$", f"{name} {value}", text)
        if not found:
            text += f"\n{name} {value}\n"
    copy = directory / "redis.conf"
    copy.write_text(text)
    binary = require("redis-server", "redis-server")
    password = _directive(text, "requirepass")
    return RedisServer(binary, conf=copy, port=port, directory=directory, password=password)


def _directive(text: str, name: str) -> str | None:
    value = None
    for line in text.splitlines():
        words = line.split(None, 1)
        if len(words) == 2 and words[0].lower() == name:
            value = words[1].strip().strip("\"'")
    return value


def _stop(process: subprocess.Popen[bytes] | None, sig: int, timeout: float = 10.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- gateway nodes ----------------------------------------------------------------------------


class ComposeNode(GatewayProcess):
    """One compose gateway service as a local process: its own command and environment, with
    the listen address, the Redis URL's host and port, and the metrics directory (when the
    environment names one) substituted."""

    def __init__(self, service: Service, redis_server: RedisServer, port: int, tmp: Path):
        super().__init__()
        self.service = service
        self.port = port
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        env.update(service.environment)
        env[ENV_PREFIX + "HOST"] = LOOPBACK
        env[ENV_PREFIX + "PORT"] = str(port)
        if url := env.get(ENV_PREFIX + "REDIS_URL"):
            env[ENV_PREFIX + "REDIS_URL"] = with_address(url, LOOPBACK, redis_server.port)
        if "PROMETHEUS_MULTIPROC_DIR" in service.environment:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / f"metrics-{service.name}-{port}")
        self.env = env
        self.command = self._native(service.command, redis_server)

    def _native(self, command: list[str], redis_server: RedisServer) -> list[str]:
        at = next(
            i for i, part in enumerate(command)
            if Path(part).name == "sse-gateway" or part == "gateway.cli"
        )  # fmt: skip
        args = list(command[at + 1 :])
        for index, arg in enumerate(args):
            name, equals, value = arg.partition("=")
            if name in ("--host", "--port", "--redis-url"):
                new = {"--host": LOOPBACK, "--port": str(self.port)}.get(name)
                if new is None:
                    template = value if equals else args[index + 1]
                    new = with_address(template, LOOPBACK, redis_server.port)
                if equals:
                    args[index] = f"{name}={new}"
                else:
                    args[index + 1] = new
        return [sys.executable, "-m", "gateway.cli", *args]

    @property
    def settings(self) -> Settings:
        return node_settings(Service(self.service.name, self.command, self.env, {}))

    def start(self, timeout: float = 20.0) -> ComposeNode:
        self.process = subprocess.Popen(
            self.command, stdout=self.log, stderr=subprocess.STDOUT, env=self.env
        )

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"{self.service.name} exited at start:\n{self.output()}")
            try:
                return httpx.get(self.url + "/readyz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, f"{self.service.name} to be ready", timeout)
        return self


# -- nginx ------------------------------------------------------------------------------------


class Nginx:
    """Debian's nginx with deploy/nginx.conf: ``host:port`` of each gateway service becomes
    its node's loopback address, and each ``listen`` port a free loopback port."""

    def __init__(self, conf: Path, nodes: Mapping[str, int], directory: Path) -> None:
        self.binary = require("nginx", "nginx")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        # The worker (nobody, when the master runs as root) writes its temporary files here.
        self.dir.chmod(0o777)
        self.source = conf.read_text()
        self.listen: dict[str, int] = {}
        self.conf_path = self.dir / "nginx.conf"
        self.conf_path.write_text(self._substituted(self.source, nodes))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def port(self) -> int:
        return next(iter(self.listen.values()))

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _substituted(self, text: str, nodes: Mapping[str, int]) -> str:
        names = "|".join(re.escape(name) for name in sorted(nodes, key=len, reverse=True))
        text = re.sub(
            rf"(?<![\w.-])({names}):(\d+)\b", lambda m: f"{LOOPBACK}:{nodes[m.group(1)]}", text
        )

        def listen(match: re.Match[str]) -> str:
            original = match.group(2)
            port = self.listen.setdefault(original, free_port())
            return f"{match.group(1)}{LOOPBACK}:{port}"

        text = re.sub(r"(\blisten\s+)(?:[\w.*\[\]:]+:)?(\d+)\b", listen, text)
        if not re.search(r"^\s*http\s*\{", text, re.MULTILINE):
            # A conf.d server file: the image's main configuration includes it in ``http``.
            text = f"events {{}}\nhttp {{\ninclude /etc/nginx/mime.types;\n{text}\n}}\n"
        return text

    def start(self, timeout: float = 15.0) -> Nginx:
        check = self._run("-t")
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t failed:\n{check.stderr}")
        log = open(self.dir / "stderr.log", "wb")  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen(
            self._command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir
        )
        log.close()

        def answers() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"nginx exited:\n{self.log()}")
            try:
                httpx.get(self.url + "/healthz", timeout=1)
                return True
            except httpx.TransportError:
                return False

        wait_until(answers, "nginx to listen", timeout)
        return self

    def _command(self, *extra: str) -> list[str]:
        main = []
        if not re.search(r"^\s*daemon\s", self.source, re.MULTILINE):
            main.append("daemon off;")
        if not re.search(r"^\s*pid\s", self.source, re.MULTILINE):
            main.append(f"pid {self.dir / 'nginx.pid'};")
        command = [self.binary, "-p", f"{self.dir}/", "-c", str(self.conf_path)]
        command += ["-e", str(self.dir / "error.log")]
        return [*command, *(["-g", " ".join(main)] if main else []), *extra]

    def _run(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._command(*extra), capture_output=True, text=True, timeout=30)

    def log(self) -> str:
        text = ""
        for name in ("stderr.log", "error.log"):
            with contextlib.suppress(OSError):
                text += (self.dir / name).read_text(errors="replace")[-3000:]
        return text

    def close(self) -> None:
        _stop(self.process, signal.SIGTERM)
        self.process = None


# -- Prometheus -------------------------------------------------------------------------------

SCRAPE_INTERVAL = "1s"
"""Scrapes and rule evaluations every second, so that a test sees ``up`` and two samples for
``rate()`` within seconds: the one value changed in deploy/prometheus.yml besides targets and
paths."""


class Prometheus:
    """Debian's prometheus with deploy/prometheus.yml and deploy/alerts.yml: targets become
    the nodes' loopback addresses, rule files the repo's paths, and intervals
    :data:`SCRAPE_INTERVAL`."""

    def __init__(self, conf: Path, nodes: Mapping[str, int], directory: Path) -> None:
        self.binary = require("prometheus", "prometheus")
        self.promtool_binary = require("promtool", "prometheus")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.source = conf
        self.config = yaml.safe_load(conf.read_text())
        self.targets: list[str] = []
        self._substitute(nodes)
        self.conf_path = self.dir / "prometheus.yml"
        self.conf_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def _substitute(self, nodes: Mapping[str, int]) -> None:
        config = self.config
        block = config.setdefault("global", {})
        block["scrape_interval"] = block["evaluation_interval"] = SCRAPE_INTERVAL
        block.pop("scrape_timeout", None)  # it may not exceed the interval
        config["rule_files"] = [str(self._rule_path(p)) for p in config.get("rule_files") or []]
        for job in config.get("scrape_configs") or []:
            for key in ("scrape_interval", "scrape_timeout"):
                if key in job:
                    job[key] = SCRAPE_INTERVAL
            for static in job.get("static_configs") or []:
                targets = []
                for target in static.get("targets") or []:
                    host, _, _ = str(target).rpartition(":")
                    if host in nodes:
                        target = f"{LOOPBACK}:{nodes[host]}"
                        self.targets.append(target)
                    elif host in ("localhost", LOOPBACK, "prometheus"):
                        target = f"{LOOPBACK}:{self.port}"
                    targets.append(target)
                static["targets"] = targets

    def _rule_path(self, given: str) -> Path:
        """A rule file as compose mounts it, found in the repo: relative to the config file
        (as Prometheus reads it), or an absolute container path by its name in deploy/."""
        path = Path(given)
        if not path.is_absolute():
            return (self.source.parent / path).resolve()
        local = self.source.parent / path.name
        return local if local.exists() else path

    def start(self, timeout: float = 30.0) -> Prometheus:
        log = open(self.dir / "prometheus.log", "wb")  # noqa: SIM115 (closed with the process)
        self.process = subprocess.Popen(
            [
                self.binary, f"--config.file={self.conf_path}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address={LOOPBACK}:{self.port}", "--log.level=warn",
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()

        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited:\n{self.log()}")
            try:
                return httpx.get(self.url + "/-/ready", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, "prometheus to be ready", timeout, 0.1)
        return self

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result; a query Prometheus refuses raises with its error."""
        response = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        if body.get("status") != "success":
            raise QueryError(f"{expr!r}: {body.get('errorType')}: {body.get('error')}")
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def rules(self) -> list[dict[str, Any]]:
        body = httpx.get(self.url + "/api/v1/rules", timeout=10).json()
        return [rule for group in body["data"]["groups"] for rule in group["rules"]]

    def promtool(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.promtool_binary, *args], capture_output=True, text=True, timeout=60
        )

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "prometheus.log").read_text(errors="replace")[-3000:]
        return ""

    def close(self) -> None:
        _stop(self.process, signal.SIGTERM, 20)
        self.process = None


class QueryError(AssertionError):
    pass


# -- the whole topology ------------------------------------------------------------------------


class Topology:
    """Redis, the compose file's gateway nodes, nginx in front and Prometheus scraping them."""

    def __init__(self, root: Path = ROOT) -> None:
        self.root = root
        self.tmp = Path(tempfile.mkdtemp(prefix="sse-topology-"))
        self.tmp.chmod(0o755)
        self.services = compose_services(root)
        self.node_services = gateway_nodes(self.services)
        self.redis = redis_from_conf(root / "deploy" / "redis.conf", self.tmp / "redis")
        self.ports = {service.name: free_port() for service in self.node_services}
        self.nodes: dict[str, ComposeNode] = {}
        self.nginx: Nginx | None = None
        self.prometheus: Prometheus | None = None

    def start(self) -> Topology:
        assert len(self.node_services) >= 1, "docker-compose.yml has no `sse-gateway serve`"
        self.redis.start()
        for service in self.node_services:
            self.nodes[service.name] = self._node(service)
        self.nginx = Nginx(self.root / "deploy" / "nginx.conf", self.ports, self.tmp / "nginx")
        self.nginx.start()
        self.prometheus = Prometheus(
            self.root / "deploy" / "prometheus.yml", self.ports, self.tmp / "prometheus"
        )
        self.prometheus.start()
        return self

    def _node(self, service: Service) -> ComposeNode:
        node = ComposeNode(service, self.redis, self.ports[service.name], self.tmp)
        try:
            return node.start()
        except BaseException:
            node.close()
            raise

    def restart(self, name: str) -> ComposeNode:
        """A stopped node started again on its port, as compose restarts a container."""
        old = self.nodes[name]
        old.close()
        self.nodes[name] = self._node(old.service)
        return self.nodes[name]

    def logs(self) -> str:
        parts = [f"--- redis\n{self.redis.log_tail()}"]
        parts += [f"--- {name}\n{node.output()[-3000:]}" for name, node in self.nodes.items()]
        if self.nginx is not None:
            parts.append(f"--- nginx\n{self.nginx.log()}")
        if self.prometheus is not None:
            parts.append(f"--- prometheus\n{self.prometheus.log()}")
        return "\n".join(parts)

    def close(self) -> None:
        for part in (self.prometheus, self.nginx):
            if part is not None:
                part.close()
        for node in self.nodes.values():
            with contextlib.suppress(OSError):
                node.close()
        self.redis.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
