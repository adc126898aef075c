"""Deployment files: Kubernetes manifests (schema-validated offline), compose stack, Grafana dashboard, and the
metric names they use, checked against the metrics the code actually defines."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import typer
import yaml

from gateway.cli import app as cli_app
from gateway.settings import Settings, load_settings
from tests.deploy.helpers import (
    COMPOSE,
    DASHBOARD,
    DEPLOY,
    DESIGN_MONITOR_METRICS,
    DOCKERFILE,
    K8S,
    PROMETHEUS_DIR,
    dashboard,
    dashboard_queries,
    find_tool,
    gateway_sample_names,
    iter_containers,
    kubernetes_manifests,
    load_yaml,
    load_yaml_documents,
    monitor_sample_names,
    monitoring_files,
    referenced_metric_names,
)

# A Kubernetes version whose schemas kubernetes-validate ships (every release since 1.28 ships 1.25 onwards).
KUBERNETES_VERSION = "1.30.0"

SETTINGS_ENV_NAMES = {f"GATEWATCH_{name.upper()}" for name in Settings.model_fields} | {"GATEWATCH_CONFIG"}


def resource(kind: str, name: str) -> dict[str, Any]:
    matches = [doc for _, doc in kubernetes_manifests() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    found: dict[str, Any] = containers[0]
    return found


def option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def parse_cli(command: list[str]) -> None:
    """Parse a `gatewatch …` command line with the real CLI (without running it): unknown options fail."""
    assert command[0] == "gatewatch", command
    group = typer.main.get_command(cli_app)
    assert hasattr(group, "commands")
    subcommand = group.commands[command[1]]
    subcommand.make_context(command[1], list(command[2:]))


def k8s_config() -> Settings:
    return load_settings(K8S / "gatewatch.yaml")


# --- Kubernetes ------------------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_and_generates_the_config() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    manifest_files = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml", "gatewatch.yaml"}
    assert set(kustomization["resources"]) == manifest_files
    assert kustomization["namespace"] == "gatewatch"
    generators = {gen["name"]: gen for gen in kustomization["configMapGenerator"]}
    assert generators["gatewatch-config"]["files"] == ["gatewatch.yaml"]
    assert (K8S / "gatewatch.yaml").is_file()


def test_manifests_have_the_expected_kinds() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in kubernetes_manifests()}
    assert kinds >= {
        ("Namespace", "gatewatch"),
        ("Secret", "gatewatch-secrets"),
        ("PersistentVolumeClaim", "gatewatch-models"),
        ("Deployment", "gatewatch-gateway"),
        ("Service", "gatewatch-gateway"),
        ("HorizontalPodAutoscaler", "gatewatch-gateway"),
        ("Deployment", "gatewatch-monitor"),
        ("Service", "gatewatch-monitor"),
        ("StatefulSet", "redis"),
        ("Service", "redis"),
    }


@pytest.mark.parametrize(
    ("filename", "index"),
    [(name, index) for name in load_yaml(K8S / "kustomization.yaml")["resources"]
     for index, _ in enumerate(load_yaml_documents(K8S / name))],
)
def test_manifest_passes_strict_schema_validation(filename: str, index: int) -> None:
    doc = load_yaml_documents(K8S / filename)[index]
    assert kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True) == "1.30"


def test_schema_validation_rejects_a_misspelt_field() -> None:
    """Negative control: the validator is not a no-op on these documents."""
    broken = copy.deepcopy(resource("Deployment", "gatewatch-gateway"))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(resource("HorizontalPodAutoscaler", "gatewatch-gateway"))
    wrong_type["spec"]["minReplicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)


def test_gateway_deployment() -> None:
    deployment = resource("Deployment", "gatewatch-gateway")
    pod = deployment["spec"]["template"]
    gateway = container(deployment)
    command = gateway["command"]
    parse_cli(command)
    assert command[:2] == ["gatewatch", "serve"]
    assert option(command, "--host") == "0.0.0.0"
    port = int(option(command, "--port"))
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()

    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"http": port}
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}

    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"

    # One uvicorn worker per pod: the environment wins over the file, and the file says 1 as well.
    env = {item["name"]: item.get("value") for item in gateway.get("env", [])}
    assert env.get("GATEWATCH_WORKERS") == "1"
    assert k8s_config().workers == 1

    # Graceful drain: the preStop pause and the server's own drain fit in the grace period.
    pause = gateway["lifecycle"]["preStop"]["exec"]["command"]
    assert pause[0] == "sleep"
    grace = pod["spec"]["terminationGracePeriodSeconds"]
    assert grace > int(pause[1]) + k8s_config().shutdown_timeout_seconds


@pytest.mark.parametrize("name", ["gatewatch-gateway", "gatewatch-monitor", "redis"])
def test_workloads_have_resources_and_run_as_non_root(name: str) -> None:
    workload = next(doc for _, doc in kubernetes_manifests()
                    if doc["kind"] in ("Deployment", "StatefulSet") and doc["metadata"]["name"] == name)
    pod_spec = workload["spec"]["template"]["spec"]
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["runAsUser"] > 0
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for spec in iter_containers(workload):
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(spec["resources"][kind]), (spec["name"], kind)
        security = spec["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        assert "readinessProbe" in spec and "livenessProbe" in spec


def test_gateway_image_user_matches_the_pod_security_context() -> None:
    arg = re.search(r"^ARG UID=(\d+)$", DOCKERFILE.read_text(), re.MULTILINE)
    assert arg is not None
    for name in ("gatewatch-gateway", "gatewatch-monitor"):
        assert resource("Deployment", name)["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(
            arg.group(1)
        )


@pytest.mark.parametrize("name", ["gatewatch-gateway", "gatewatch-monitor"])
def test_gatewatch_pods_mount_config_models_and_a_writable_data_dir(name: str) -> None:
    deployment = resource("Deployment", name)
    pod_spec = deployment["spec"]["template"]["spec"]
    spec = container(deployment)
    settings = k8s_config()
    mounts = {m["mountPath"]: m for m in spec["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec["volumes"]}

    config_path = Path(option(spec["command"], "--config"))
    config_volume = volumes[mounts[str(config_path.parent)]["name"]]
    assert config_volume["configMap"]["name"] == "gatewatch-config"  # the generator's name (kustomize adds a hash)

    models = mounts[settings.registry]
    assert models["readOnly"] is True
    assert volumes[models["name"]]["persistentVolumeClaim"]["claimName"] == "gatewatch-models"

    data = mounts[str(settings.data_dir)]  # root filesystem is read-only: the spool needs a volume
    assert "emptyDir" in volumes[data["name"]]
    assert data.get("readOnly") is not True

    secret_refs = [ref["secretRef"]["name"] for ref in spec["envFrom"]]
    assert secret_refs == ["gatewatch-secrets"]


def test_monitor_deployment() -> None:
    deployment = resource("Deployment", "gatewatch-monitor")
    spec = container(deployment)
    command = spec["command"]
    parse_cli(command)
    assert command[:2] == ["gatewatch", "monitor"]
    assert deployment["spec"]["replicas"] == 2
    port = int(option(command, "--metrics-port"))
    assert port == 9100
    assert option(command, "--metrics-host") == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in spec["ports"]} == {"metrics": port}
    for probe in ("readinessProbe", "livenessProbe"):
        assert spec[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/scrape"] == "true"


@pytest.mark.parametrize("name", ["gatewatch-gateway", "gatewatch-monitor", "redis"])
def test_services_select_their_pods_and_target_named_ports(name: str) -> None:
    service = resource("Service", name)
    workload = next(doc for _, doc in kubernetes_manifests()
                    if doc["kind"] in ("Deployment", "StatefulSet") and doc["metadata"]["name"] == name)
    pod_labels = workload["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for spec in iter_containers(workload) for p in spec.get("ports", [])}
    for port in service["spec"]["ports"]:
        assert port["targetPort"] in port_names


def test_gateway_hpa_scales_the_deployment_on_cpu() -> None:
    hpa = resource("HorizontalPodAutoscaler", "gatewatch-gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", "gatewatch-gateway")
    assert hpa["spec"]["minReplicas"] >= 2
    assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert 0 < metric["resource"]["target"]["averageUtilization"] <= 100


def test_redis_statefulset_is_persistent_behind_a_headless_service() -> None:
    statefulset = resource("StatefulSet", "redis")
    service = resource("Service", "redis")
    assert service["spec"]["clusterIP"] == "None"
    assert statefulset["spec"]["serviceName"] == "redis"
    redis = container(statefulset)
    assert redis["image"].startswith("redis:7")
    assert option(redis["args"], "--appendonly") == "yes"
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": option(redis["args"], "--dir")} in redis["volumeMounts"]
    # The Secret's default redis_url points at this Service.
    secret = resource("Secret", "gatewatch-secrets")
    assert secret["stringData"]["GATEWATCH_REDIS_URL"].startswith(f"redis://{service['metadata']['name']}:6379/")


def test_secret_holds_marked_placeholders_under_settings_env_names() -> None:
    secret = resource("Secret", "gatewatch-secrets")
    data = secret["stringData"]
    assert set(data) == {"GATEWATCH_ADMIN_TOKEN", "GATEWATCH_WEBHOOK_SECRET", "GATEWATCH_REDIS_URL"}
    assert set(data) <= SETTINGS_ENV_NAMES
    assert "REPLACE-ME" in data["GATEWATCH_ADMIN_TOKEN"]
    assert "REPLACE-ME" in data["GATEWATCH_WEBHOOK_SECRET"]
    # Together with the ConfigMap the values make valid settings.
    settings = load_settings(K8S / "gatewatch.yaml", redis_url=data["GATEWATCH_REDIS_URL"],
                             admin_token=data["GATEWATCH_ADMIN_TOKEN"], webhook_secret=data["GATEWATCH_WEBHOOK_SECRET"])
    assert settings.redis_url == "redis://redis:6379/0"


def test_kubernetes_env_names_are_settings() -> None:
    for _, doc in kubernetes_manifests():
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for spec in iter_containers(doc):
            for item in spec.get("env", []):
                if item["name"].startswith("GATEWATCH_"):
                    assert item["name"] in SETTINGS_ENV_NAMES, item["name"]


def test_models_pvc_can_be_shared_by_replicas() -> None:
    pvc = resource("PersistentVolumeClaim", "gatewatch-models")
    assert pvc["spec"]["accessModes"] in (["ReadWriteMany"], ["ReadOnlyMany"])


def test_kustomize_build_renders_valid_resources() -> None:
    """The rendered output (what `kubectl apply -k` sends): generated ConfigMap, namespace, image, all valid."""
    kubectl = find_tool("kubectl")
    kustomize = find_tool("kustomize")
    if kubectl is None and kustomize is None:
        pytest.skip("neither kubectl nor kustomize is installed: the rendered output is not checked here")
    command = [kustomize, "build", str(K8S)] if kustomize else [str(kubectl), "kustomize", str(K8S)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "gatewatch", doc["metadata"]
    [config_map] = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    assert re.fullmatch(r"gatewatch-config-[a-z0-9]{10}", config_map["metadata"]["name"])
    assert config_map["data"]["gatewatch.yaml"] == (K8S / "gatewatch.yaml").read_text()
    for doc in docs:
        if doc["kind"] == "Deployment":
            volumes = doc["spec"]["template"]["spec"]["volumes"]
            assert {"name": "config", "configMap": {"name": config_map["metadata"]["name"]}} in volumes
            assert container(doc)["image"] == "gatewatch:0.1.0"


# --- configuration files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [DEPLOY / "gatewatch.yaml", K8S / "gatewatch.yaml"], ids=["compose", "k8s"])
def test_config_files_are_valid_settings(path: Path) -> None:
    settings = load_settings(path)
    assert settings.registry == "/models"
    assert str(settings.data_dir) == "/var/lib/gatewatch"
    assert settings.workers == 1
    assert settings.latency_slo_ms == 250  # mirrored by the GatewatchLatencyP99OverSLO alert (0.25 s)


def test_latency_alert_threshold_matches_the_slo_setting() -> None:
    rules = {r["alert"]: r for g in load_yaml(PROMETHEUS_DIR / "alerts.yaml")["groups"] for r in g["rules"]}
    threshold = float(rules["GatewatchLatencyP99OverSLO"]["expr"].rsplit(">", 1)[1])
    for path in (DEPLOY / "gatewatch.yaml", K8S / "gatewatch.yaml"):
        slo = load_settings(path).latency_slo_ms
        assert slo is not None and threshold == slo / 1000


# --- compose ---------------------------------------------------------------------------------------------------


def host_path(spec: str) -> Path:
    """The host side of a compose bind mount, with `${VAR:-default}` taken at its default."""
    source = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", spec).split(":")[0]
    return (DEPLOY / source).resolve()


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host source (or "" for an anonymous volume, the volume name for a named one)."""
    found: dict[str, str] = {}
    for spec in service.get("volumes", []):
        parts = re.sub(r"\$\{[^}]*\}", "X", spec).split(":")
        if len(parts) == 1:
            found[spec] = ""
        else:
            found[parts[-2] if parts[-1] in ("ro", "rw") else parts[-1]] = spec
    return found


def test_compose_has_the_services() -> None:
    compose = load_yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"gateway", "monitor", "redis", "prometheus", "grafana"}
    assert services["gateway"]["image"] == services["monitor"]["image"]
    assert services["gateway"]["build"]["dockerfile"] == "Dockerfile"
    assert (DEPLOY / services["gateway"]["build"]["context"] / "Dockerfile").resolve() == DOCKERFILE
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    assert option(redis["command"], "--appendonly") == "yes"
    assert any(spec.endswith(":/data") for spec in redis["volumes"])
    assert "healthcheck" in redis
    for name in ("gateway", "monitor"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", ["gateway", "monitor"])
def test_compose_gatewatch_services(name: str) -> None:
    service = load_yaml(COMPOSE)["services"][name]
    command = service["command"]
    parse_cli(command)
    config_path = option(command, "--config")
    settings = load_settings(DEPLOY / "gatewatch.yaml")
    found = mounts(service)
    assert host_path(found[config_path]) == (DEPLOY / "gatewatch.yaml").resolve()
    assert host_path(found[settings.registry]).is_dir()
    assert str(settings.data_dir) in found  # read_only root: the spool needs a volume
    assert settings.redis_url == "redis://redis:6379/0"
    assert service["read_only"] is True
    for key in service["environment"]:
        if key.startswith("GATEWATCH_"):
            assert key in SETTINGS_ENV_NAMES, key


def test_compose_bind_mounts_exist() -> None:
    for name, service in load_yaml(COMPOSE)["services"].items():
        for target, spec in mounts(service).items():
            if spec.startswith((".", "$")):
                assert host_path(spec).exists(), (name, target, spec)


def test_compose_prometheus_and_grafana_wiring() -> None:
    services = load_yaml(COMPOSE)["services"]
    prometheus = services["prometheus"]
    config_target = next(arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file="))
    found = mounts(prometheus)
    assert host_path(found[config_target]) == PROMETHEUS_DIR / "prometheus.yml"
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    for rule_file in config["rule_files"]:  # relative to the config file, in the container as here
        container_path = str(Path(config_target).parent / rule_file)
        assert host_path(found[container_path]) == PROMETHEUS_DIR / rule_file

    # Scrape targets: compose service names and the ports the commands bind.
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    ports = {"gateway": option(services["gateway"]["command"], "--port"),
             "monitor": option(services["monitor"]["command"], "--metrics-port")}
    for job_name, service in (("gatewatch-gateway", "gateway"), ("gatewatch-monitor", "monitor")):
        [sd] = jobs[job_name]["dns_sd_configs"]
        assert sd["names"] == [service]
        assert str(sd["port"]) == ports[service]

    grafana = services["grafana"]
    found = mounts(grafana)
    assert host_path(found["/etc/grafana/provisioning"]) == DEPLOY / "grafana" / "provisioning"
    [provider] = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "gatewatch.yaml")["providers"]
    assert host_path(found[provider["options"]["path"]]) == DASHBOARD.parent
    [datasource] = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yaml")["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    variable = next(v for v in dashboard()["templating"]["list"] if v["type"] == "datasource")
    assert variable["current"]["value"] == datasource["uid"]


# --- Grafana dashboard -----------------------------------------------------------------------------------------


def test_dashboard_layout() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        area = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not area & cells, f"panel {panel['title']!r} overlaps another"
        cells |= area
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["targets"], panel["title"]
            refs = [target["refId"] for target in panel["targets"]]
            assert len(refs) == len(set(refs))


def test_dashboard_has_the_required_panels() -> None:
    queries = [expr for _, expr in dashboard_queries()]
    text = "\n".join(queries)
    for metric in ("gatewatch_requests_total", "gatewatch_batch_size_bucket", "gatewatch_shadow_disagreements_total",
                   "gatewatch_drift_score", "gatewatch_drift_detected", "gatewatch_stream_lag_entries",
                   "gatewatch_webhook_deliveries_total", "gatewatch_log_records_total", "gatewatch_log_spool_bytes",
                   "gatewatch_model_loaded"):
        assert metric in text, metric
    for quantile in ("0.5", "0.99"):
        wanted = f"histogram_quantile({quantile}, sum by (le, endpoint, variant) (rate("
        assert any(wanted + "gatewatch_request_duration_seconds_bucket" in expr for expr in queries), quantile
    assert any("sum by (endpoint, variant) (rate(gatewatch_requests_total" in expr and "code=~\"5..\"" in expr
               for expr in queries)


# --- metric names ----------------------------------------------------------------------------------------------


def referenced() -> dict[str, set[str]]:
    names = referenced_metric_names(monitoring_files())
    assert names, "no gatewatch_* metric referenced anywhere: the extraction is broken"
    return names


def test_gateway_metrics_used_by_the_deployment_exist_in_the_code() -> None:
    """Dashboard, alerts, alert tests, compose, k8s: every gateway metric named there is one GatewayMetrics defines."""
    gateway = gateway_sample_names()
    assert {"gatewatch_requests_total", "gatewatch_request_duration_seconds_bucket"} <= gateway  # extraction works
    unknown = {name: files for name, files in referenced().items()
               if name not in gateway and name not in DESIGN_MONITOR_METRICS}
    assert not unknown, f"metric names not defined by gateway/metrics.py (nor design.md's monitor): {unknown}"


def test_monitor_metrics_used_by_the_deployment_exist_in_the_code() -> None:
    """Every metric named in the deployment files is defined by GatewayMetrics or MonitorMetrics
    (monitors/metrics.py): a rename in the code cannot silently break the dashboard or an alert."""
    known = gateway_sample_names() | monitor_sample_names()
    unknown = {name: files for name, files in referenced().items() if name not in known}
    assert not unknown, f"metric names defined by neither gateway/metrics.py nor monitors/metrics.py: {unknown}"


def test_alerts_and_dashboard_use_the_monitor_metrics() -> None:
    names = referenced()
    for metric in ("gatewatch_drift_detected", "gatewatch_stream_lag_entries", "gatewatch_webhook_deliveries_total"):
        assert str(PROMETHEUS_DIR.relative_to(DEPLOY.parent) / "alerts.yaml") in names[metric]
        assert str(DASHBOARD.relative_to(DEPLOY.parent)) in names[metric]


def test_dockerfile_and_compose_commands_parse() -> None:
    compose = load_yaml(COMPOSE)
    for name in ("gateway", "monitor"):
        parse_cli(compose["services"][name]["command"])
    with pytest.raises(Exception, match="No such option"):  # negative control: parsing is strict
        parse_cli(["gatewatch", "serve", "--no-such-flag"])
    documented = re.findall(r"`(gatewatch (?:serve|monitor) [^`]*)`", (DEPLOY / "README.md").read_text())
    assert len(documented) >= 2
    for line in documented:
        parse_cli(shlex.split(line))
