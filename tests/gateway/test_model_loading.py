"""Versions that must not be served are refused at load, visibly, while every other model serves.

The session registry holds `broken` (not an ONNX file), `tampered` (model.onnx differs from meta.json's sha256)
and `mixed` (v1 good, v2 corrupt).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GatewayProcess


@pytest.fixture(scope="module")
def http(gateway_server: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_server.url, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def metrics(http: httpx.Client) -> dict[str, list[tuple[dict[str, str], float]]]:
    response = http.get("/metrics")
    assert response.status_code == 200
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def sample(
    metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str
) -> float | None:
    matches = [value for found, value in metrics.get(name, []) if found == labels]
    assert len(matches) <= 1, (name, labels, matches)
    return matches[0] if matches else None


def x3() -> dict[str, object]:
    return {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1.0, 2.0, 3.0]}]}


def error_of(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str)
    return message


# -- refused models answer 404 and say why ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "reason"), [("broken", "invalid_model"), ("tampered", "sha256_mismatch")]
)
def test_refused_model_infer_is_404_naming_the_refusal(http: httpx.Client, model: str, reason: str) -> None:
    message = error_of(http.post(f"/v2/models/{model}/infer", json=x3()), 404)
    assert f"model {model!r} has no loaded version" in message
    assert f"refused: v1 ({reason})" in message


@pytest.mark.parametrize(
    "path",
    ["/v2/models/{m}", "/v2/models/{m}/ready", "/v2/models/{m}/versions/1", "/v2/models/{m}/versions/1/ready",
     "/v2/models/{m}/versions/1/infer"],
)
@pytest.mark.parametrize(("model", "reason"), [("broken", "invalid_model"), ("tampered", "sha256_mismatch")])
def test_refused_model_every_route_is_404(http: httpx.Client, path: str, model: str, reason: str) -> None:
    url = path.format(m=model)
    response = http.post(url, json=x3()) if url.endswith("/infer") else http.get(url)
    assert f"v1 ({reason})" in error_of(response, 404)


def test_refused_models_do_not_stop_the_others(http: httpx.Client) -> None:
    assert http.get("/v2/health/ready").json() == {"ready": True}
    response = http.post("/v2/models/id_fp32/infer", json=x3())
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]


# -- a model with one good and one corrupt version ----------------------------------------------------------


def test_mixed_serves_good_v1_as_latest(http: httpx.Client) -> None:
    paths = ("/v2/models/mixed/infer", "/v2/models/mixed/versions/latest/infer", "/v2/models/mixed/versions/1/infer")
    for path in paths:
        response = http.post(path, json=x3())
        assert response.status_code == 200, (path, response.text)
        assert response.json()["model_version"] == "1", path
        assert response.json()["outputs"][0]["data"] == [1.0, 2.0, 3.0]


def test_mixed_corrupt_v2_is_404_naming_the_refusal(http: httpx.Client) -> None:
    message = error_of(http.post("/v2/models/mixed/versions/2/infer", json=x3()), 404)
    assert "no loaded version 2" in message
    assert "loaded: [1]" in message
    assert "refused: v2 (invalid_model)" in message
    assert http.get("/v2/models/mixed/versions/2/ready").status_code == 404


def test_mixed_metadata_lists_only_the_loaded_version(http: httpx.Client) -> None:
    metadata = http.get("/v2/models/mixed").json()
    assert metadata["versions"] == ["1"]
    assert http.get("/v2/models/mixed/ready").json() == {"name": "mixed", "ready": True}


# -- metrics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "version", "reason"),
    [("broken", "1", "invalid_model"), ("tampered", "1", "sha256_mismatch"), ("mixed", "2", "invalid_model")],
)
def test_metrics_count_load_failure_with_reason(
    metrics: dict[str, list[tuple[dict[str, str], float]]], model: str, version: str, reason: str
) -> None:
    failures = sample(metrics, "gatewatch_model_load_failures_total", model=model, version=version, reason=reason)
    assert failures is not None and failures >= 1
    loaded = sample(metrics, "gatewatch_model_loaded", model=model, version=version)
    assert loaded in (None, 0.0)


@pytest.mark.parametrize(("model", "version"), [("tabular", "1"), ("tabular", "2"), ("mixed", "1"), ("slow", "1")])
def test_metrics_show_loaded_versions(
    metrics: dict[str, list[tuple[dict[str, str], float]]], model: str, version: str
) -> None:
    assert sample(metrics, "gatewatch_model_loaded", model=model, version=version) == 1.0


def test_metrics_record_no_failure_for_good_versions(metrics: dict[str, list[tuple[dict[str, str], float]]]) -> None:
    failed = {
        (labels["model"], labels["version"])
        for labels, value in metrics.get("gatewatch_model_load_failures_total", [])
        if value > 0
    }
    assert failed == {("broken", "1"), ("tampered", "1"), ("mixed", "2")}


def test_metrics_exposition_has_loaded_gauge_line(http: httpx.Client) -> None:
    """The literal exposition line dashboards query."""
    assert 'gatewatch_model_loaded{model="tabular",version="1"} 1.0' in http.get("/metrics").text


# -- the log ------------------------------------------------------------------------------------------------


def test_log_explains_each_refusal(gateway_server: GatewayProcess) -> None:
    log = gateway_server.log()
    assert re.search(r"ERROR .*refused broken v1 \[invalid_model\]: onnxruntime cannot load it", log), log
    assert re.search(r"ERROR .*refused mixed v2 \[invalid_model\]: onnxruntime cannot load it", log), log
    tampered = re.search(r"ERROR .*refused tampered v1 \[sha256_mismatch\]: (?P<detail>.*)", log)
    assert tampered is not None, log
    assert re.search(r"sha256 is [0-9a-f]{64}, meta\.json expects 0{64}", tampered["detail"])


def test_log_reports_good_versions_loaded(gateway_server: GatewayProcess) -> None:
    log = gateway_server.log()
    assert re.search(r"loaded tabular v1 \(.*tabular/1, batching on\)", log), log
    assert re.search(r"loaded fixed v1 \(.*fixed/1, batching off\)", log), log
    assert "loaded mixed v1" in log
    assert "loaded mixed v2" not in log
