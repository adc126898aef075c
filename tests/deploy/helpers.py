"""Shared by the deployment tests: file locations, YAML loading, metric names of the code, and real Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client import CollectorRegistry

from tests.polling import wait_until_serving

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "gatewatch.json"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"

# The monitor's metrics as design.md names them (sample names, as Prometheus stores them).
DESIGN_MONITOR_METRICS = frozenset({
    "gatewatch_drift_score", "gatewatch_drift_p_value", "gatewatch_drift_detected", "gatewatch_window_rows_total",
    "gatewatch_latency_quantile_seconds", "gatewatch_error_rate", "gatewatch_accuracy", "gatewatch_mae",
    "gatewatch_stream_lag_entries", "gatewatch_webhook_deliveries_total",
})

METRIC_NAME = re.compile(r"\bgatewatch_[a-z0-9_]*[a-z0-9]\b")

SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}


def sample_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name a registry's metrics can expose (counters `_total`, histograms `_bucket/_sum/_count`),
    whether or not a labelled child exists yet."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in SAMPLE_SUFFIXES.get(family.type, ("",)))
        if family.type == "histogram":
            names.add(family.name)  # a histogram is named by its family in prose (runbooks, descriptions)
    return names


def gateway_sample_names() -> set[str]:
    from gateway.metrics import GatewayMetrics

    registry = CollectorRegistry()
    GatewayMetrics(registry)
    return sample_names(registry)


def monitor_sample_names() -> set[str]:
    from monitors.metrics import MonitorMetrics  # the monitor worker's metrics (monitors/metrics.py)

    registry = CollectorRegistry()
    MonitorMetrics(registry)
    return sample_names(registry)


def referenced_metric_names(paths: Iterable[Path]) -> dict[str, set[str]]:
    """metric name -> the files (relative to the repo) that mention it."""
    found: dict[str, set[str]] = {}
    for path in paths:
        for name in METRIC_NAME.findall(path.read_text()):
            found.setdefault(name, set()).add(str(path.relative_to(ROOT)))
    return found


def monitoring_files() -> list[Path]:
    """Every deployment file that may name a metric."""
    files = [DASHBOARD, COMPOSE, DEPLOY / "gatewatch.yaml", DEPLOY / "README.md"]
    files += sorted(PROMETHEUS_DIR.glob("*.y*ml"))
    files += sorted(K8S.glob("*.yaml"))
    files += sorted((DEPLOY / "grafana" / "provisioning").rglob("*.yaml"))
    return files


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def kubernetes_manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, resource) for every resource in the files that kustomization.yaml lists."""
    kustomization = load_yaml(K8S / "kustomization.yaml")
    return [(name, doc) for name in kustomization["resources"] for doc in load_yaml_documents(K8S / name)]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of the dashboard, Grafana's variables still in it."""
    return [
        (panel["title"], target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", [])
    ]


def as_plain_promql(expr: str) -> str:
    """A dashboard query as Prometheus itself would get it: Grafana's variables replaced by what they mean."""
    return expr.replace("$__rate_interval", "1m").replace("$__interval", "1m").replace('"$endpoint"', '".*"')


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(path) for path in (Path("/usr/bin") / name, Path("/usr/local/bin") / name) if path.is_file()), None
    )


@dataclass
class PrometheusServer:
    """A real `prometheus` process on a free loopback port (Debian's prometheus package)."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def query(self, promql: str) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        body: dict[str, Any] = response.json()
        return body

    def wait_for(self, promql: str, timeout: float, accept: Any = bool) -> list[dict[str, Any]]:
        """Poll an instant query until its result satisfies `accept` (non-empty by default); the last result."""
        deadline = time.monotonic() + timeout
        result: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            body = self.query(promql)
            assert body["status"] == "success", (promql, body)
            result = body["data"]["result"]
            if accept(result):
                return result
            time.sleep(0.25)  # polling a condition: Prometheus having scraped what we wait for
        raise AssertionError(f"{promql!r} not satisfied within {timeout}s; last result {result}\n{self.log()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_prometheus(binary: str, config: Path, workdir: Path, port: int, timeout: float = 30) -> PrometheusServer:
    log_path = workdir / "prometheus.log"
    command = [
        binary, f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}",
        f"--storage.tsdb.path={workdir / 'tsdb'}", "--storage.tsdb.retention.time=1h", "--log.level=info",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
    server = PrometheusServer(process, f"http://127.0.0.1:{port}", log_path)
    try:
        wait_until_serving(process, f"{server.url}/-/ready", timeout, "prometheus", server.log, interval=0.1)
    except RuntimeError:
        server.stop()
        raise
    return server


def iter_containers(resource: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = resource["spec"]["template"]["spec"]
    yield from spec.get("initContainers", [])
    yield from spec["containers"]
