"""Prometheus files checked by Prometheus itself: promtool (syntax, rule unit tests, dashboard PromQL) and a real
Prometheus scraping a real gateway (and a real monitor, once `gatewatch monitor` can run)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
import yaml

from tests.conftest import GatewayProcess, RedisServer, free_port, start_gateway, write_config
from tests.deploy.helpers import (
    PROMETHEUS_DIR,
    PrometheusServer,
    as_plain_promql,
    dashboard_queries,
    find_tool,
    load_yaml,
    start_prometheus,
)
from tests.polling import wait_until_serving

INSTALL_HINT = (
    "install Debian's prometheus package: apt-get install -y --no-install-recommends prometheus (.ci/run does)"
)


@pytest.fixture(scope="module")
def promtool() -> str:
    found = find_tool("promtool")
    if found is None:
        pytest.skip(f"promtool not found: {INSTALL_HINT}")
    return found


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    found = find_tool("prometheus")
    if found is None:
        pytest.skip(f"prometheus not found: {INSTALL_HINT}")
    return found


def run(command: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=cwd)


def alert_rules() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in load_yaml(PROMETHEUS_DIR / "alerts.yaml")["groups"]
            for rule in group["rules"]}


def test_promtool_check_rules(promtool: str) -> None:
    result = run([promtool, "check", "rules", str(PROMETHEUS_DIR / "alerts.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_check_config(promtool: str) -> None:
    result = run([promtool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_rejects_a_broken_rule(promtool: str, tmp_path: Path) -> None:
    """Negative control: promtool really parses the PromQL."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "g", "rules": [
        {"alert": "Broken", "expr": "sum by (endpoint (rate(gatewatch_requests_total[5m]))"}]}]}))
    assert run([promtool, "check", "rules", str(broken)]).returncode != 0


def test_alert_rule_unit_tests(promtool: str) -> None:
    """alerts_test.yaml feeds series to the rules and says which alerts fire (with labels and annotations)."""
    result = run([promtool, "test", "rules", "alerts_test.yaml"], cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_unit_test() -> None:
    tests = load_yaml(PROMETHEUS_DIR / "alerts_test.yaml")["tests"]
    firing = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    assert set(alert_rules()) == firing


def test_alert_rules_have_severity_duration_and_annotations() -> None:
    rules = alert_rules()
    assert {"GatewatchGatewayDown", "GatewatchDriftDetected", "GatewatchLatencyP99OverSLO", "GatewatchHighErrorRate",
            "GatewatchStreamLagGrowing", "GatewatchWebhookDeadLettered", "GatewatchNoModelLoaded",
            "GatewatchLogRecordsDropped", "GatewatchLogSpooling"} <= set(rules)
    for name, rule in rules.items():
        assert "for" in rule, name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        assert {"summary", "description", "runbook"} <= set(rule["annotations"]), name
    assert rules["GatewatchGatewayDown"]["expr"].startswith('up{job="gatewatch-gateway"} == 0')


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Each dashboard query (Grafana variables substituted) as a recording rule: promtool parses every one."""
    queries = dashboard_queries()
    rules = [{"record": f"dashboard:query_{index}", "expr": as_plain_promql(expr)}
             for index, (_, expr) in enumerate(queries)]
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


# --- a real Prometheus -----------------------------------------------------------------------------------------


def scrape_config(targets: dict[str, str], rules: Path) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with 1 s intervals, absolute rule files and static loopback targets in
    place of the compose DNS names: same job names, same metrics paths."""
    config: dict[str, Any] = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    config["rule_files"] = [str(rules)]
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] in targets:
            job.pop("dns_sd_configs", None)
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
            jobs.append(job)
    assert {job["job_name"] for job in jobs} == set(targets)
    config["scrape_configs"] = jobs
    return config


def run_prometheus(binary: str, workdir: Path, targets: dict[str, str]) -> PrometheusServer:
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(targets, PROMETHEUS_DIR / "alerts.yaml")))
    return start_prometheus(binary, config, workdir, free_port())


def infer(gateway: GatewayProcess, rows: np.ndarray[Any, Any], model: str = "tabular") -> None:
    body = {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32",
                        "data": rows.astype(np.float32).ravel().tolist()}]}
    response = httpx.post(f"{gateway.url}/v2/models/{model}/infer", json=body, timeout=10)
    assert response.status_code == 200, response.text


@pytest.fixture
def gateway_for_prometheus(model_registry: Path, tmp_path: Path) -> Iterator[GatewayProcess]:
    config = write_config(tmp_path / "gatewatch.yaml", model_registry)
    gateway = start_gateway(config, tmp_path)
    yield gateway
    gateway.terminate()


def test_real_prometheus_scrapes_the_gateway_and_loads_the_alerts(
    prometheus_binary: str, gateway_for_prometheus: GatewayProcess, tmp_path: Path
) -> None:
    gateway = gateway_for_prometheus
    prometheus = run_prometheus(prometheus_binary, tmp_path, {"gatewatch-gateway": gateway.url.removeprefix("http://")})
    try:
        rng = np.random.default_rng(0)
        for _ in range(12):
            infer(gateway, rng.random((4, 32)))

        prometheus.wait_for('up{job="gatewatch-gateway"} == 1', timeout=20)
        result = prometheus.wait_for(
            'gatewatch_requests_total{job="gatewatch-gateway", endpoint="tabular", code="200"}', timeout=20,
            accept=lambda r: sum(float(s["value"][1]) for s in r) >= 12,
        )
        assert {s["metric"]["version"] for s in result} == {"1"}  # the champion answered

        # The dashboard's queries run on real data: valid for Prometheus, and traffic panels show it.
        prometheus.wait_for(
            as_plain_promql(next(expr for title, expr in dashboard_queries()
                                 if title == "Requests/s per endpoint and variant")), timeout=20)
        for title, expr in dashboard_queries():
            body = prometheus.query(as_plain_promql(expr))
            assert body["status"] == "success", (title, body)
        loaded = prometheus.query('max by (model, version) (gatewatch_model_loaded{model="tabular"})')
        assert {s["metric"]["version"] for s in loaded["data"]["result"]} == {"1", "2"}

        # The alert rules loaded and evaluate without errors; nothing fires on a healthy gateway.
        def rules_evaluated(_: object) -> bool:
            groups = httpx.get(f"{prometheus.url}/api/v1/rules", timeout=5).json()["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            return len(rules) == len(alert_rules()) and all(rule["health"] == "ok" for rule in rules)

        prometheus.wait_for("vector(1)", timeout=20, accept=rules_evaluated)
        # Each expression evaluated on the real data: the session registry's versions refused at start-up (`broken`,
        # `tampered`, `mixed` v2) are what GatewatchModelLoadFailures is for, though their counters were born at 1;
        # no other alert condition holds on this healthy gateway.
        for name, rule in alert_rules().items():
            body = prometheus.query(rule["expr"])
            assert body["status"] == "success", (name, body)
            firing = {(s["metric"]["model"], s["metric"]["reason"]) for s in body["data"]["result"]}
            expected = {("broken", "invalid_model"), ("tampered", "sha256_mismatch"), ("mixed", "invalid_model")}
            assert firing == (expected if name == "GatewatchModelLoadFailures" else set()), (name, body)
    finally:
        prometheus.stop()


def monitor_can_run() -> str | None:
    """Why `gatewatch monitor` cannot run here, or None when it can."""
    from typer.main import get_command

    from gateway.cli import app

    group = get_command(app)
    if "monitor" not in getattr(group, "commands", {}):
        return "`gatewatch monitor` does not exist yet"
    for module in ("monitors.service", "monitors.metrics"):
        if importlib.util.find_spec(module) is None:
            return f"`gatewatch monitor` is not complete yet: {module} does not exist"
    return None


def test_real_prometheus_sees_the_monitors_drift_scores(
    prometheus_binary: str, model_registry: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Gateway and monitor on one Redis, both scraped: the monitor's gatewatch_drift_score reaches Prometheus."""
    reason = monitor_can_run()
    if reason:
        pytest.skip(reason)
    redis_url = f"redis://127.0.0.1:{redis_server.port}/5"  # a database of its own on the shared test server
    redis.Redis.from_url(redis_url).flushdb()
    config = write_config(
        tmp_path / "gatewatch.yaml", model_registry, redis_url=redis_url, window_rows=100, min_window_rows=50,
        window_seconds=1, reference_rows=100, drift_persistence=1, monitor_discovery_seconds=0.5,
    )
    metrics_port = free_port()
    monitor_log = (tmp_path / "monitor.log").open("wb")
    monitor = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "monitor", "--metrics-host", "127.0.0.1",
         "--metrics-port", str(metrics_port), "--config", str(config)],
        stdout=monitor_log, stderr=subprocess.STDOUT, cwd=tmp_path, env=dict(os.environ),
    )  # started first: it boots while the gateway loads its models
    gateway: GatewayProcess | None = None
    prometheus: PrometheusServer | None = None
    try:
        gateway = start_gateway(config, tmp_path)
        wait_until_serving(monitor, f"http://127.0.0.1:{metrics_port}/metrics", 60, "monitor",
                           lambda: (tmp_path / "monitor.log").read_text(errors="replace"))
        prometheus = run_prometheus(prometheus_binary, tmp_path, {
            "gatewatch-gateway": gateway.url.removeprefix("http://"),
            "gatewatch-monitor": f"127.0.0.1:{metrics_port}",
        })
        prometheus.wait_for('up{job="gatewatch-monitor"} == 1', timeout=20)
        rng = np.random.default_rng(1)
        for _ in range(10):  # the first 100 live rows become the drift reference (reference_rows)
            infer(gateway, rng.normal(0, 1, (10, 32)))
        # Then shifted traffic, kept flowing (as in production) until a window's drift scores reach Prometheus.
        query = 'gatewatch_drift_score{job="gatewatch-monitor", endpoint="tabular"}'
        scores: list[dict[str, Any]] = []
        deadline = time.monotonic() + 60
        while not scores and time.monotonic() < deadline:
            infer(gateway, rng.normal(3, 1, (20, 32)))
            body = prometheus.query(query)
            assert body["status"] == "success", body
            scores = body["data"]["result"]
            time.sleep(0.2)  # pacing the traffic; the loop ends on the condition (scores in Prometheus)
        assert scores, f"no drift score in Prometheus after 60 s\n{(tmp_path / 'monitor.log').read_text()[-3000:]}"
        assert {s["metric"]["test"] for s in scores} <= {"ks", "chi2", "psi", "wasserstein"}
        assert {s["metric"]["model"] for s in scores} == {"tabular"}
        prometheus.wait_for('gatewatch_stream_lag_entries{job="gatewatch-monitor"}', timeout=20)
    finally:
        if prometheus is not None:
            prometheus.stop()
        if monitor.poll() is None:
            monitor.terminate()
            try:
                monitor.wait(timeout=30)
            except subprocess.TimeoutExpired:
                monitor.kill()
                monitor.wait(timeout=10)
        monitor_log.close()
        if gateway is not None:
            gateway.terminate()
