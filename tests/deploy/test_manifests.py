"""docker-compose.yml and deploy/k8s/ validate offline against their specifications, and every
setting, port, path and metric they use is one the gateway has: settings are parsed by the
gateway's own CLI parser, paths are requested from real nodes started with the same settings,
and metric names come from the gateway's registry."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from gateway.cli import SHUTDOWN_MARGIN, build_parser
from gateway.config import ENV_PREFIX, Settings, check_exposure, settings_from
from gateway.metrics import Metrics
from tests.deploy.test_dockerfile import exec_form, healthcheck_command, instruction
from tests.support.gateway import GatewayProcess

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE = yaml.safe_load(COMPOSE_FILE.read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]
NGINX = (DEPLOY / "nginx.conf").read_text()
PROMETHEUS = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
ALERTS = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
DASHBOARD = json.loads((DEPLOY / "grafana" / "sse-gateway.json").read_text())
SERVICEMONITOR_SCHEMA = json.loads(
    (Path(__file__).parent / "schemas" / "servicemonitor-v1.json").read_text()
)
K8S_VERSION = "1.30.0"
"""The Kubernetes API the manifests must fit (its schemas ship with kubernetes-validate)."""
SETTING_VARIABLES = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
OFFLINE = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9"}
"""Any network access through a proxy that is not there fails: the validators must not need it."""


def k8s_documents() -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def k8s_kind(kind: str) -> dict[str, Any]:
    (found,) = [d for docs in k8s_documents().values() for d in docs if d["kind"] == kind]
    return found


def gateway_services() -> dict[str, dict[str, Any]]:
    """The compose services that run a node: built from deploy/Dockerfile, its entrypoint."""
    return {
        name: service
        for name, service in SERVICES.items()
        if service.get("build", {}).get("dockerfile") == "deploy/Dockerfile"
        and "entrypoint" not in service
    }


def image_entrypoint() -> list[str]:
    (entrypoint,) = instruction("ENTRYPOINT")
    return exec_form(entrypoint)


@dataclasses.dataclass
class NodeConfig:
    """A node's ``serve`` arguments and ``SSE_GATEWAY_*`` environment, as a deployment gives
    them, and the settings the gateway makes of them."""

    where: str
    args: list[str]
    env: dict[str, str]

    def settings(self) -> Settings:
        unknown_variables = {k for k in self.env if k.startswith(ENV_PREFIX)} - SETTING_VARIABLES
        assert not unknown_variables, f"{self.where}: not settings: {sorted(unknown_variables)}"
        assert self.args[0] == "serve", self.where
        parsed, unknown_flags = build_parser().parse_known_args(self.args)
        assert not unknown_flags, f"{self.where}: not flags of serve: {unknown_flags}"
        settings = settings_from(parsed, environ=self.env)
        check_exposure(settings)
        return settings

    def local_args(self) -> list[str]:
        """The arguments, less the listen address: a test node listens on a free loopback
        port."""
        args, skip = [], False
        for word in self.args[1:]:
            if skip:
                skip = False
            elif word in ("--host", "--port"):
                skip = True
            elif not word.startswith(("--host=", "--port=")):
                args.append(word)
        return args

    def start(self) -> GatewayProcess:
        env = {
            k: v for k, v in self.env.items() if k not in ("SSE_GATEWAY_HOST", "SSE_GATEWAY_PORT")
        }
        return GatewayProcess(*self.local_args(), env=env).start()


def compose_nodes() -> list[NodeConfig]:
    nodes = []
    for name, service in gateway_services().items():
        command = service.get("command")
        assert isinstance(command, list), f"{name}: give the command in exec form"
        environment = service.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        args = image_entrypoint()[1:] + command
        nodes.append(
            NodeConfig(f"compose {name}", args, {k: str(v) for k, v in environment.items()})
        )
    return nodes


def k8s_container() -> dict[str, Any]:
    (container,) = k8s_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return dict(container)


def k8s_node() -> NodeConfig:
    container = k8s_container()
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            config = k8s_kind("ConfigMap")
            assert config["metadata"]["name"] == source["configMapRef"]["name"]
            env.update(config["data"])
        if "secretRef" in source:
            secret = k8s_kind("Secret")
            assert secret["metadata"]["name"] == source["secretRef"]["name"]
            env.update(secret["stringData"])
    for item in container.get("env", []):
        env[item["name"]] = item["value"]
    command = container.get("command") or image_entrypoint()
    args = command[1:] + container.get("args", [])
    return NodeConfig("k8s deployment", args, env)


def seconds(text: str | int) -> float:
    """A duration as compose (``20s``, ``1m30s``) or nginx (``45s``, ``1m``) writes it."""
    if isinstance(text, int):
        return float(text)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)?", text.strip())
    assert "".join(n + (u or "") for n, u in parts) == text.strip(), text
    return sum(float(n) * units[u or "s"] for n, u in parts)


# (a) Compose ------------------------------------------------------------------------------


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    return subprocess.run(
        [*command, str(path)], capture_output=True, text=True, env=OFFLINE, timeout=120
    )


def test_compose_file_validates_against_the_compose_specification_offline() -> None:
    result = check_compose(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_compose_validator_rejects_a_broken_file(tmp_path: Path) -> None:
    broken = copy.deepcopy(COMPOSE)
    broken["services"]["nginx"]["ports"] = "8080:8080"  # a list in the specification
    broken["services"]["redis"]["healthcheck"]["interval"] = ["2s"]
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert check_compose(path).returncode != 0


def test_compose_has_the_stack_the_issue_describes() -> None:
    assert sorted(gateway_services()) == ["gateway1", "gateway2", "gateway3"]
    assert SERVICES["redis"]["image"].startswith("redis:7")
    for name in ("redis", "nginx", "prometheus", "grafana", "demo-publisher"):
        assert name in SERVICES, name
    assert any("redis-server" in word for word in SERVICES["redis"]["command"])
    assert "./deploy/redis.conf" in " ".join(SERVICES["redis"]["volumes"])


def test_every_file_compose_mounts_exists() -> None:
    for name, service in SERVICES.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which is missing"


def test_the_anonymous_demo_stack_is_reachable_from_this_machine_only() -> None:
    """The compose nodes run without keys: they publish no port, and the published ports of
    the others are bound to the loopback interface."""
    for name in gateway_services():
        assert "ports" not in SERVICES[name], name
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} to the network"


def test_compose_waits_for_health_and_stops_after_the_drain() -> None:
    for node in compose_nodes():
        service = SERVICES[node.where.removeprefix("compose ")]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        grace = seconds(service["stop_grace_period"])
        assert grace > node.settings().drain_seconds + SHUTDOWN_MARGIN, node.where
    for name in gateway_services():
        assert SERVICES["nginx"]["depends_on"][name]["condition"] == "service_healthy"


# (b) Kubernetes ---------------------------------------------------------------------------


def validate_k8s(doc: dict[str, Any]) -> None:
    if doc["kind"] == "ServiceMonitor":
        jsonschema.validate(doc, SERVICEMONITOR_SCHEMA)
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("name", sorted(k8s_documents()))
def test_each_k8s_manifest_validates_against_the_kubernetes_schemas_offline(name: str) -> None:
    docs = k8s_documents()[name]
    assert docs, f"{name} holds no resource"
    for doc in docs:
        validate_k8s(doc)


def test_the_k8s_validators_reject_unknown_fields() -> None:
    deployment = copy.deepcopy(k8s_kind("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(deployment)
    monitor = copy.deepcopy(k8s_kind("ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["paht"] = "/metrics"
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(monitor)
    jsonschema.Draft7Validator.check_schema(SERVICEMONITOR_SCHEMA)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(k8s_documents())


def test_k8s_has_the_parts_the_issue_describes() -> None:
    kinds = {d["kind"]: d["apiVersion"] for docs in k8s_documents().values() for d in docs}
    assert kinds == {
        "ConfigMap": "v1",
        "Secret": "v1",
        "Deployment": "apps/v1",
        "Service": "v1",
        "HorizontalPodAutoscaler": "autoscaling/v2",
        "PodDisruptionBudget": "policy/v1",
        "ServiceMonitor": "monitoring.coreos.com/v1",
        "Ingress": "networking.k8s.io/v1",
    }
    secret = k8s_kind("Secret")["stringData"]
    assert {"SSE_GATEWAY_JWT_SECRET", "SSE_GATEWAY_REDIS_URL"} <= set(secret)
    container = k8s_container()
    assert {"requests", "limits"} <= set(container["resources"])
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    pod = k8s_kind("Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    annotations = k8s_kind("Ingress")["metadata"]["annotations"]
    assert annotations["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"


def test_k8s_pod_outlives_its_prestop_and_drain() -> None:
    """The kubelet counts the preStop hook in the grace period; SIGKILL must come only after
    it, the drain and the shutdown that follows."""
    settings = k8s_node().settings()
    pod = k8s_kind("Deployment")["spec"]["template"]["spec"]
    hook = k8s_container()["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[0] == "sleep", hook
    needed = float(hook[1]) + settings.drain_seconds + SHUTDOWN_MARGIN
    assert pod["terminationGracePeriodSeconds"] > needed


def test_k8s_readiness_notices_a_drain_well_within_it() -> None:
    settings = k8s_node().settings()
    probe = k8s_container()["readinessProbe"]
    assert probe["periodSeconds"] * probe.get("failureThreshold", 3) < settings.drain_seconds


# (c) Settings, ports and paths ------------------------------------------------------------


def every_node() -> Iterator[NodeConfig]:
    yield from compose_nodes()
    yield k8s_node()


def test_every_variable_and_flag_is_a_setting_of_the_gateway() -> None:
    """Parsed by the gateway's own CLI parser and settings loader, which also apply its
    checks (--demo without keys, exposure without authentication, ...)."""
    for node in every_node():
        node.settings()
    for name, service in SERVICES.items():
        environment = service.get("environment", {})
        names = (
            environment if isinstance(environment, dict) else [e.split("=")[0] for e in environment]
        )
        unknown = {n for n in names if n.startswith(ENV_PREFIX)} - SETTING_VARIABLES
        assert not unknown, f"{name}: {unknown}"


def test_the_variable_check_rejects_what_is_not_a_setting() -> None:
    (node, *_) = compose_nodes()
    with pytest.raises(AssertionError, match="not settings"):
        NodeConfig("x", node.args, {**node.env, "SSE_GATEWAY_NO_SUCH_THING": "1"}).settings()
    with pytest.raises(AssertionError, match="not flags"):
        NodeConfig("x", [*node.args, "--no-such-flag", "1"], node.env).settings()


def test_compose_nodes_share_one_redis_and_prefix() -> None:
    settings = [node.settings() for node in compose_nodes()]
    assert {(s.redis_url, s.prefix) for s in settings} == {("redis://redis:6379/0", "sse")}
    assert all(s.host == "0.0.0.0" for s in settings)


def nginx_upstream() -> list[tuple[str, int]]:
    block = re.search(r"upstream gateway \{(.*?)\}", NGINX, re.S)
    assert block
    return [(h, int(p)) for h, p in re.findall(r"^\s*server (\S+):(\d+);", block.group(1), re.M)]


def test_every_port_that_reaches_a_compose_node_is_its_port() -> None:
    (port,) = {node.settings().port for node in compose_nodes()}
    names = sorted(gateway_services())
    assert sorted(nginx_upstream()) == [(name, port) for name in names]
    (job,) = PROMETHEUS["scrape_configs"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert sorted(targets) == [f"{name}:{port}" for name in names]
    assert instruction("EXPOSE") == [str(port)]
    # The image's HEALTHCHECK asks the default port unless SSE_GATEWAY_PORT says otherwise.
    assert all("SSE_GATEWAY_PORT" not in node.env for node in compose_nodes())
    assert port == Settings.port
    assert "'8000'" in " ".join(healthcheck_command())


def test_the_balancer_and_the_demo_publisher_meet_on_one_port() -> None:
    (listen,) = re.findall(r"^\s*listen (\d+);", NGINX, re.M)
    assert SERVICES["nginx"]["ports"] == [f"127.0.0.1:{listen}:{listen}"]
    assert SERVICES["demo-publisher"]["environment"]["DEMO_URL"] == f"http://nginx:{listen}"


def test_every_k8s_port_is_the_container_port() -> None:
    settings = k8s_node().settings()
    container = k8s_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": settings.port}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", settings.port)
    (service_port,) = k8s_kind("Service")["spec"]["ports"]
    assert service_port["targetPort"] in ("http", settings.port)
    (endpoint,) = k8s_kind("ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["port"] == service_port["name"]
    (rule,) = k8s_kind("Ingress")["spec"]["rules"]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == k8s_kind("Service")["metadata"]["name"]
    assert backend["port"] == {"name": service_port["name"]}


def nginx_locations() -> list[str]:
    return re.findall(r"^\s*location (?:= )?(/\S*) \{", NGINX, re.M)


def healthcheck_path() -> str:
    match = re.search(r"/[a-z]+'", " ".join(healthcheck_command()))
    assert match
    return match.group(0)[:-1]


def answers(node: GatewayProcess, path: str) -> int:
    """The status of ``GET path`` (``/events`` is a stream: its head is enough)."""
    if path == "/events":
        with httpx.stream("GET", node.url + "/events?topic=demo:chat", timeout=10) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            return response.status_code
    return httpx.get(node.url + path, timeout=10).status_code


def test_every_path_compose_uses_answers_on_a_node_started_like_a_compose_node() -> None:
    (config, *_) = compose_nodes()
    paths = {healthcheck_path(), *nginx_locations(), "/demo"}
    paths |= {job["metrics_path"] for job in PROMETHEUS["scrape_configs"]}
    assert {"/events", "/healthz", "/metrics"} <= paths
    node = config.start()
    try:
        for path in sorted(paths):
            assert answers(node, path) == 200, path
        assert answers(node, "/no-such-route") == 404  # the check can fail
    finally:
        node.close()


def test_every_path_k8s_uses_answers_on_a_node_started_like_a_pod() -> None:
    container = k8s_container()
    liveness = container["livenessProbe"]["httpGet"]["path"]
    readiness = container["readinessProbe"]["httpGet"]["path"]
    assert (liveness, readiness) == ("/healthz", "/readyz")
    (endpoint,) = k8s_kind("ServiceMonitor")["spec"]["endpoints"]
    (rule,) = k8s_kind("Ingress")["spec"]["rules"]
    ingress_paths = [p["path"] for p in rule["http"]["paths"]]
    assert ingress_paths == ["/"]
    node = k8s_node().start()
    try:
        for path in (liveness, readiness, endpoint["path"], *ingress_paths):
            assert answers(node, path) == 200, path
    finally:
        node.close()


def test_proxies_are_sse_safe_and_outlast_the_heartbeat() -> None:
    events = re.search(r"location = /events \{(.*?)\}", NGINX, re.S)
    assert events
    body = events.group(1)
    assert re.search(r"proxy_buffering off;", body)
    assert re.search(r"proxy_cache off;", body)
    (read_timeout,) = re.findall(r"proxy_read_timeout (\S+);", body)
    for node in compose_nodes():
        assert seconds(read_timeout) > 2 * node.settings().heartbeat
    assert "proxy_http_version 1.1;" in NGINX
    assert 'proxy_set_header Connection "";' in NGINX
    assert re.search(r"keepalive \d+;", NGINX)
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in NGINX
    assert all(node.settings().forwarded_allow_ips for node in every_node())
    annotations = k8s_kind("Ingress")["metadata"]["annotations"]
    timeout = float(annotations["nginx.ingress.kubernetes.io/proxy-read-timeout"])
    assert timeout > 2 * k8s_node().settings().heartbeat


# (d) Metrics ------------------------------------------------------------------------------


def exposed_metric_names() -> set[str]:
    """The series names the gateway's registry exposes (a counter ``x`` as ``x_total``)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gauge": ("",),
        "info": ("_info",),
        "summary": ("", "_count", "_sum", "_created"),
    }
    names = set()
    for family in Metrics().registry.collect():
        names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


PROMQL_WORD = re.compile(r'"[^"]*"|\{[^}]*\}|\[[^\]]*\]|\b[a-zA-Z_:][a-zA-Z0-9_:]*\b')
PROMQL_FUNCTIONS_AND_KEYWORDS = {
    "sum", "min", "max", "count", "avg", "by", "without", "rate", "increase", "and", "or",
    "unless", "histogram_quantile", "clamp_min", "on", "ignoring", "group_left", "bool",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (label matchers, ranges and strings skipped;
    a grouping's label list is skipped with the word before it)."""
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    words = {w for w in PROMQL_WORD.findall(expr) if not w.startswith(('"', "{", "["))}
    return words - PROMQL_FUNCTIONS_AND_KEYWORDS


def dashboard_exprs() -> list[str]:
    panels = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
    return [t["expr"] for p in panels for t in p["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in ALERTS["groups"] for rule in group["rules"]]


def test_the_metric_name_reader_finds_names_and_skips_labels() -> None:
    expr = 'sum by (reason) (rate(sse_x_total{reason=~"a|b"}[5m])) / on (instance) up > 1'
    assert metric_names(expr) == {"sse_x_total", "up"}


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_alerts_and_dashboard_use_only_metrics_the_gateway_exposes(source: str) -> None:
    exprs = [r["expr"] for r in alert_rules()] if source == "alerts" else dashboard_exprs()
    exposed = exposed_metric_names() | {"up"}  # Prometheus' own, per target
    assert exprs
    for expr in exprs:
        names = metric_names(expr)
        assert names, expr
        assert names <= exposed, f"{expr}: {sorted(names - exposed)} not exposed"
        assert "$" not in expr, f"{expr}: a Grafana variable cannot run in Prometheus"


def test_alerts_cover_the_issue_and_are_complete() -> None:
    rules = alert_rules()
    exprs = " ".join(r["expr"] for r in rules)
    for needed in (
        "sse_node_ready", "sse_engine_link_up", "sse_publish_to_dispatch_seconds_bucket",
        "slow_consumer", "sse_resets_total", 'up{job="sse-gateway"}',
    ):  # fmt: skip
        assert needed in exprs, needed
    (job,) = PROMETHEUS["scrape_configs"]
    assert job["job_name"] == "sse-gateway"
    assert PROMETHEUS["rule_files"] == ["alerts.yml"]
    for rule in rules:
        assert rule["alert"], rule
        assert rule["for"], rule
        assert rule["labels"]["severity"], rule
        assert rule["annotations"]["summary"], rule


def test_dashboard_covers_the_issue_and_uses_the_provisioned_data_source() -> None:
    exprs = " ".join(dashboard_exprs())
    for needed in (
        "sse_connections", "sse_events_delivered_total", "sse_bytes_delivered_total",
        "histogram_quantile(0.5,", "histogram_quantile(0.9,", "histogram_quantile(0.99,",
        "sse_streams_refused_total", "sse_disconnects_total", "sse_resets_total",
        "sse_engine_reconnects_total", "sse_engine_backfilled_events_total",
        "sse_publish_requests_total", "sse_engine_probe_failures_total",
        "sse_redis_command_seconds_bucket", "sse_hub_topics", "sse_connection_attempts_total",
    ):  # fmt: skip
        assert needed in exprs, needed
    provisioning = DEPLOY / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in SERVICES
    panels = [p for p in DASHBOARD["panels"] if p["type"] != "row"]
    for panel in panels:
        for ds in [panel["datasource"], *(t["datasource"] for t in panel["targets"])]:
            assert ds == {"type": "prometheus", "uid": source["uid"]}, panel["title"]
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "sse-gateway.yml").read_text())[
        "providers"
    ]
    mounts = " ".join(SERVICES["grafana"]["volumes"])
    assert f"./deploy/grafana/sse-gateway.json:{provider['options']['path']}/" in mounts
