"""`gatewatch monitor` end to end: a real monitor process, a real Redis, a real webhook receiver, and records
written straight into the log streams in the design.md format.

The model is the 32-feature tabular classifier; the records' outputs are computed honestly by running it
(onnxruntime) on the records' inputs, and its registry version has a `reference.npz` drawn from the same
distribution as the stationary traffic. So a shift in one input may also move the outputs (prediction drift):
the tests require the shifted input to be flagged and no other input, and let outputs be flagged or not.
Drift settings are the defaults (1,000-row windows, alpha 0.01, persistence 2, resolve after 3, retrain after 2).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from loadtests import onnx_models as om
from tests.conftest import RedisServer
from tests.monitors.helpers import (
    MonitorProcess,
    WebhookReceiver,
    alert_events,
    log_record,
    start_monitor,
    tensor,
    wait_for,
    window_results,
    write_records,
)

SECRET = "monitor-test-secret"
FEATURES = 32
SLO_MS = 100.0


@dataclass
class Setup:
    client: redis.Redis
    monitor: MonitorProcess
    receiver: WebhookReceiver
    session: ort.InferenceSession


@pytest.fixture(scope="module")
def setup(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    workdir = tmp_path_factory.mktemp("monitor")
    registry = workdir / "models"
    model = om.tabular_classifier(features=FEATURES, seed=1)
    rng = np.random.default_rng(100)
    version = om.write_version(registry, "tabular", 1, model, {"task": "classification"})
    np.savez(version / "reference.npz", input=rng.normal(size=(5000, FEATURES)).astype(np.float32))
    version = om.write_version(registry, "tabcat", 1, model, {"categorical": ["input[5]"]})
    reference = rng.normal(size=(5000, FEATURES)).astype(np.float32)
    reference[:, 5] = rng.integers(0, 4, 5000)
    np.savez(version / "reference.npz", input=reference)
    client = redis_server.client()
    client.flushdb()
    receiver = WebhookReceiver()
    receiver.start()
    config = workdir / "gatewatch.yaml"
    config.write_text("\n".join([
        f"registry: {registry}", f"data_dir: {workdir / 'data'}", f"redis_url: {redis_server.url}",
        f"webhook_urls: {receiver.url}", f"retrain_webhook_url: {receiver.url}?retrain",
        f"webhook_secret: {SECRET}", f"latency_slo_ms: {SLO_MS}", "monitor_discovery_seconds: 0.5",
    ]) + "\n")
    monitor = start_monitor(config, workdir)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    yield Setup(client, monitor, receiver, session)
    code = monitor.terminate()
    receiver.stop()
    assert code == 0, monitor.log()


def send(
    setup: Setup, endpoint: str, x: np.ndarray, model: str = "tabular", rows: int = 1, **fields: Any
) -> list[dict[str, str]]:
    """Log `x` (one record per `rows` rows) with the model's real outputs, as the gateway would."""
    probabilities, labels = setup.session.run(["probabilities", "label"], {"input": x})
    records = [
        log_record(endpoint=endpoint, model=model, version=1, rows=rows,
                   inputs=[tensor("input", x[i:i + rows], "FP32")],
                   outputs=[tensor("probabilities", probabilities[i:i + rows], "FP32"),
                            tensor("label", labels[i:i + rows], "INT64")], **fields)
        for i in range(0, len(x), rows)
    ]
    write_records(setup.client, f"gatewatch:log:{endpoint}", records)
    return records


def normal(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, FEATURES)).astype(np.float32)


def results_for(setup: Setup, endpoint: str) -> list[dict[str, Any]]:
    return sorted((r for r in window_results(setup.client) if r["endpoint"] == endpoint), key=lambda r: r["start_ms"])


def wait_windows(setup: Setup, endpoint: str, count: int, within: float = 60) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        assert setup.monitor.process.poll() is None, setup.monitor.log()
        results = results_for(setup, endpoint)
        return results if len(results) >= count else None

    results: list[dict[str, Any]] = wait_for(ready, within, f"{count} windows of {endpoint}")
    return results


def events_for(setup: Setup, endpoint: str) -> list[dict[str, Any]]:
    return [e for e in alert_events(setup.client) if e["endpoint"] == endpoint]


def drifted_inputs(features: list[dict[str, Any]]) -> set[str]:
    return {f["name"] for f in features if f["drifted"] and f["name"].startswith("input[")}


def test_stationary_traffic_raises_no_alert(setup: Setup) -> None:
    for part in range(5):  # 50 windows of 1,000 records, written while the monitor reads
        send(setup, "steady", normal(10_000, seed=part))
    results = wait_windows(setup, "steady", 50, within=180)
    assert [r["rows"] for r in results] == [1000] * 50
    assert all(r["drift"] is not None and r["reference"].startswith("reference.npz") for r in results)
    flagged = [r for r in results if r["drift"]["drifted"]]
    assert len(flagged) <= 1, [drifted_inputs(r["drift"]["features"]) for r in flagged]
    assert events_for(setup, "steady") == []
    assert [e for e in setup.receiver.events() if e["endpoint"] == "steady"] == []


def test_mean_shift_detected_signed_webhook_and_one_retrain(setup: Setup) -> None:
    send(setup, "shifted", normal(3000, seed=11))
    shifted = normal(5000, seed=12)
    shifted[:, 7] += 0.5  # half a standard deviation, from the 4th window on
    send(setup, "shifted", shifted)
    results = wait_windows(setup, "shifted", 8)
    detected = [e for e in events_for(setup, "shifted") if e["type"] == "drift.detected"]
    assert len(detected) == 1
    event = detected[0]
    [window] = [i for i, r in enumerate(results) if event["event_id"] in {e["event_id"] for e in r["events"]}]
    assert 3 <= window <= 5, "detected within 3 windows of the shift start"
    assert drifted_inputs(event["features"]) == {"input[7]"}
    for result in results[3:]:
        assert "input[7]" in drifted_inputs(result["drift"]["features"])
        assert drifted_inputs(result["drift"]["features"]) == {"input[7]"}

    delivered = wait_for(lambda: [r for r in setup.receiver.delivered()
                                  if r.headers["X-Gatewatch-Event-Id"] == event["event_id"]], 20, "the webhook")
    [request] = delivered
    timestamp = request.headers["X-Gatewatch-Timestamp"]
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + request.body, hashlib.sha256).hexdigest()
    assert request.headers["X-Gatewatch-Signature"] == f"sha256={expected}"
    assert json.loads(request.body) == event

    retrains = [e for e in events_for(setup, "shifted") if e["type"] == "retrain.requested"]
    assert len(retrains) == 1
    assert drifted_inputs(retrains[0]["features"]) == {"input[7]"}
    wait_for(lambda: any(r.path.endswith("?retrain") and json.loads(r.body)["type"] == "retrain.requested"
                         for r in setup.receiver.delivered()), 20, "the retrain webhook")


def test_categorical_frequency_change_caught_by_chi2(setup: Setup) -> None:
    rng = np.random.default_rng(21)
    x = normal(5000, seed=22)
    x[:2000, 5] = rng.integers(0, 4, 2000)
    x[2000:, 5] = rng.choice(4, 3000, p=[0.4, 0.3, 0.2, 0.1])
    send(setup, "colours", x, model="tabcat", rows=10)
    results = wait_windows(setup, "colours", 5)
    for result in results:
        [colour] = [f for f in result["drift"]["features"] if f["name"] == "input[5]"]
        assert colour["test"] == "chi2" and set(colour["scores"]) == {"chi2", "psi"}
    assert not any(f["drifted"] for f in results[0]["drift"]["features"] if f["name"] == "input[5]")
    detected = wait_for(lambda: [e for e in events_for(setup, "colours") if e["type"] == "drift.detected"], 10,
                        "drift.detected for the categorical feature")
    assert drifted_inputs(detected[0]["features"]) == {"input[5]"}


def test_latency_slo_breach_resolution_and_error_rate(setup: Setup) -> None:
    send(setup, "slow", normal(2000, seed=31), rows=10, latency_ms=300.0)
    send(setup, "slow", normal(200, seed=32), rows=10, status=500, latency_ms=20.0)  # 20 errors in window 3
    send(setup, "slow", normal(2800, seed=33), rows=10, latency_ms=20.0)
    results = wait_windows(setup, "slow", 5)
    assert [r["rows"] for r in results] == [1000] * 5
    assert results[0]["latency_ms"]["p99"] == pytest.approx(300.0)
    assert results[2]["error_rate"] == pytest.approx(20 / 100)
    types = [e["type"] for e in events_for(setup, "slow")]
    assert types == ["latency.slo_breach", "latency.slo_resolved"]
    [breach] = [e for e in events_for(setup, "slow") if e["type"] == "latency.slo_breach"]
    assert breach["features"][0]["threshold"] == SLO_MS and breach["features"][0]["statistic"] > SLO_MS


def test_feedback_joined_to_predictions_gives_accuracy(setup: Setup) -> None:
    x = normal(1000, seed=41)
    _, labels = setup.session.run(["probabilities", "label"], {"input": x})
    ids = [f"fb-{i}" for i in range(1000)]
    feedback = setup.client.pipeline(transaction=False)
    for i in range(200):  # ground truth for 200 requests (right for 150), ahead of their predictions
        truth = int(labels[i]) if i < 150 else 1 - int(labels[i])
        feedback.xadd("gatewatch:feedback:fb", {"id": ids[i], "ts": "0", "label": json.dumps(truth)})
    feedback.xadd("gatewatch:feedback:fb", {"id": ids[0], "ts": "0", "reward": "1.0"})  # rewards are not labels
    feedback.execute()
    probabilities, _ = setup.session.run(["probabilities", "label"], {"input": x})
    records = [log_record(endpoint="fb", model="tabular", version=1, request_id=ids[i],
                          inputs=[tensor("input", x[i:i + 1], "FP32")],
                          outputs=[tensor("probabilities", probabilities[i:i + 1], "FP32"),
                                   tensor("label", labels[i:i + 1], "INT64")]) for i in range(1000)]
    write_records(setup.client, "gatewatch:log:fb", records)
    [result] = wait_windows(setup, "fb", 1)
    assert result["performance"] == {"task": "classification", "rows": 200, "accuracy": 0.75, "mae": None}


def metric_samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=5).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_match_the_window_results(setup: Setup) -> None:
    results = window_results(setup.client)
    samples = wait_for(lambda: _settled(setup, results), 15, "metrics reflecting every stored window")

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    last: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for result in sorted(results, key=lambda r: r["start_ms"]):
        last[(result["endpoint"], result["model"], result["version"], result["role"])] = result
    for (endpoint, model, version, role), result in last.items():
        key = {"endpoint": endpoint, "model": model, "version": version, "role": role}
        for feature in result["drift"]["features"]:
            for test, statistic in feature["scores"].items():
                assert value("gatewatch_drift_score", **key, feature=feature["name"], test=test) == \
                    pytest.approx(statistic), (endpoint, feature["name"], test)
            assert value("gatewatch_drift_p_value", **key, feature=feature["name"], test=feature["test"]) == \
                pytest.approx(feature["p_value"])
        short = {"endpoint": endpoint, "model": model, "version": version}
        for quantile, name in (("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")):
            assert value("gatewatch_latency_quantile_seconds", **short, quantile=quantile) == \
                pytest.approx(result["latency_ms"][name] / 1000)
        assert value("gatewatch_error_rate", **short) == pytest.approx(result["error_rate"])
    assert value("gatewatch_drift_detected", endpoint="shifted", model="tabular", version="1", role="primary") == 1
    assert value("gatewatch_drift_detected", endpoint="steady", model="tabular", version="1", role="primary") == 0
    assert value("gatewatch_accuracy", endpoint="fb", model="tabular", version="1") == pytest.approx(0.75)
    for endpoint in ("steady", "shifted", "colours", "slow", "fb"):
        assert value("gatewatch_stream_lag_entries", endpoint=endpoint) == 0
    assert (value("gatewatch_webhook_deliveries_total", outcome="delivered") or 0) >= 4


def _settled(
    setup: Setup, results: list[dict[str, Any]]
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
    samples = metric_samples(setup.monitor.metrics_url)
    for key in {(r["endpoint"], r["model"], r["version"], r["role"]) for r in results}:
        rows = sum(r["rows"] for r in results if (r["endpoint"], r["model"], r["version"], r["role"]) == key)
        labels = tuple(sorted(zip(("endpoint", "model", "version", "role"), key, strict=True)))
        if samples.get(("gatewatch_window_rows_total", labels)) != rows:
            return None
    lags = [v for (name, _), v in samples.items() if name == "gatewatch_stream_lag_entries"]
    return samples if len(lags) == 5 and not any(lags) else None
