"""The Open Inference Protocol as real clients speak it: tritonclient's HTTP client and raw HTTP (httpx).

Every answer is checked against onnxruntime run directly on the same `model.onnx` the gateway serves.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient

from tests.conftest import GatewayProcess

TABULAR_FEATURES = 32


@pytest.fixture(scope="module")
def triton(gateway_server: GatewayProcess) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(gateway_server.url.removeprefix("http://"), network_timeout=30)
    yield client
    client.close()


@pytest.fixture(scope="module")
def http(gateway_server: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_server.url, timeout=30) as client:
        yield client


def run_onnx(registry: Path, model: str, version: int, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference answer: onnxruntime on the registry's file, no gateway in between."""
    session = ort.InferenceSession(str(registry / model / str(version) / "model.onnx"))
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def tabular_rows(rows: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, TABULAR_FEATURES)).astype(np.float32)


def infer_input(name: str, array: np.ndarray, datatype: str, binary: bool) -> httpclient.InferInput:
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    return tensor


def json_request(name: str, array: np.ndarray, datatype: str, **extra: Any) -> dict[str, Any]:
    data = array.ravel().tolist()
    return {"inputs": [{"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}], **extra}


# -- health and metadata ------------------------------------------------------------------------------------


def test_server_live_and_ready_report_true(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_server_live() is True
    assert triton.is_server_ready() is True


def test_server_metadata_names_gatewatch_and_binary_extension(triton: httpclient.InferenceServerClient) -> None:
    metadata = triton.get_server_metadata()
    assert metadata["name"] == "gatewatch"
    assert isinstance(metadata["version"], str) and metadata["version"]
    assert "binary_tensor_data" in metadata["extensions"]


def test_server_metadata_served_with_and_without_trailing_slash(http: httpx.Client) -> None:
    assert http.get("/v2").json() == http.get("/v2/").json()


def test_model_metadata_lists_versions_signature_and_aliases(triton: httpclient.InferenceServerClient) -> None:
    metadata = triton.get_model_metadata("tabular")
    assert metadata["name"] == "tabular"
    assert metadata["versions"] == ["1", "2"]
    assert metadata["platform"] == "onnxruntime_onnx"
    assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, TABULAR_FEATURES]}]
    assert metadata["outputs"] == [
        {"name": "probabilities", "datatype": "FP32", "shape": [-1, 2]},
        {"name": "label", "datatype": "INT64", "shape": [-1]},
    ]
    assert metadata["aliases"] == {"champion": "1", "challenger": "2"}


def test_model_metadata_for_one_version_lists_only_it(triton: httpclient.InferenceServerClient) -> None:
    metadata = triton.get_model_metadata("tabular", model_version="2")
    assert metadata["name"] == "tabular"
    assert metadata["versions"] == ["2"]


@pytest.mark.parametrize(("ref", "version"), [("champion", "1"), ("challenger", "2"), ("latest", "2")])
def test_model_metadata_for_alias_lists_the_version_it_names(
    triton: httpclient.InferenceServerClient, ref: str, version: str
) -> None:
    assert triton.get_model_metadata("tabular", model_version=ref)["versions"] == [version]


def test_model_metadata_of_non_batched_model_keeps_fixed_shape(triton: httpclient.InferenceServerClient) -> None:
    metadata = triton.get_model_metadata("fixed")
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [1, 3]}]
    assert metadata["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [1, 3]}]


def test_model_ready_true_for_served_versions_false_otherwise(triton: httpclient.InferenceServerClient) -> None:
    assert triton.is_model_ready("tabular") is True
    assert triton.is_model_ready("tabular", model_version="2") is True
    assert triton.is_model_ready("tabular", model_version="champion") is True
    assert triton.is_model_ready("tabular", model_version="7") is False
    assert triton.is_model_ready("no-such-model") is False
    assert triton.is_model_ready("broken") is False


def test_model_ready_body_names_the_model(http: httpx.Client) -> None:
    response = http.get("/v2/models/tabular/versions/1/ready")
    assert response.status_code == 200
    assert response.json() == {"name": "tabular", "ready": True}


# -- inference: numeric models against onnxruntime ----------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_tabular_matches_onnxruntime(
    triton: httpclient.InferenceServerClient, model_registry: Path, binary: bool
) -> None:
    x = tabular_rows(5)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("probabilities", "label")]
    result = triton.infer("tabular", [infer_input("input", x, "FP32", binary)], outputs=outputs)
    expected = run_onnx(model_registry, "tabular", 1, {"input": x})
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float32 and probabilities.shape == (5, 2)
    assert np.allclose(probabilities, expected["probabilities"], rtol=1e-6, atol=1e-7)
    label = result.as_numpy("label")
    assert label.dtype == np.int64
    assert np.array_equal(label, expected["label"])
    response = result.get_response()
    assert response["model_name"] == "tabular"
    assert response["model_version"] == "1"
    by_name = {output["name"]: output for output in response["outputs"]}
    assert by_name["probabilities"]["datatype"] == "FP32"
    assert by_name["label"]["datatype"] == "INT64"
    assert by_name["label"]["shape"] == [5]
    for output in by_name.values():
        assert ("binary_data_size" in output.get("parameters", {})) is binary
        assert ("data" in output) is not binary


def test_infer_tabular_default_request_returns_binary_outputs(
    triton: httpclient.InferenceServerClient, model_registry: Path
) -> None:
    """tritonclient's defaults: binary inputs, no `outputs` (so `binary_data_output`: every output binary)."""
    x = tabular_rows(3, seed=1)
    result = triton.infer("tabular", [infer_input("input", x, "FP32", binary=True)])
    expected = run_onnx(model_registry, "tabular", 1, {"input": x})
    assert np.allclose(result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6, atol=1e-7)
    assert np.array_equal(result.as_numpy("label"), expected["label"])
    assert all("binary_data_size" in output["parameters"] for output in result.get_response()["outputs"])


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_compressed_request_from_tritonclient(
    triton: httpclient.InferenceServerClient, model_registry: Path, algorithm: str, binary: bool
) -> None:
    """tritonclient's `request_compression_algorithm`: a gzip or deflate body with `Content-Encoding`."""
    x = tabular_rows(4, seed=2)
    result = triton.infer("tabular", [infer_input("input", x, "FP32", binary)], request_compression_algorithm=algorithm)
    expected = run_onnx(model_registry, "tabular", 1, {"input": x})
    assert np.allclose(result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6, atol=1e-7)


def test_infer_gzip_body_of_several_members_is_read_whole(http: httpx.Client, model_registry: Path) -> None:
    """`cat a.gz b.gz` is a valid gzip file: every member is part of the body, not just the first."""
    x = tabular_rows(1, seed=4)
    body = json.dumps(json_request("input", x, "FP32")).encode()
    half = len(body) // 2
    response = http.post(
        "/v2/models/tabular/infer",
        content=gzip.compress(body[:half]) + gzip.compress(body[half:]),
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert response.status_code == 200, response.text
    expected = run_onnx(model_registry, "tabular", 1, {"input": x})["probabilities"]
    got = next(o for o in response.json()["outputs"] if o["name"] == "probabilities")["data"]
    assert np.allclose(got, expected.ravel(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("encoding", "body", "status", "message"),
    [
        ("br", b"anything", 415, "Content-Encoding 'br' is not supported; send gzip, deflate or identity"),
        ("gzip", b"not gzip at all", 400, "the request body is not valid gzip data"),
        ("gzip", gzip.compress(b'{"inputs": []}')[:-12], 400, "ends before its gzip data does"),
        ("gzip", gzip.compress(bytes(64 * 1024 * 1024 + 1)), 413, "exceeds max_body_bytes=67108864 once decompressed"),
        ("gzip", gzip.compress(b'{"inputs": []}') + b"trailing junk", 400, "is not valid gzip data"),
        ("deflate", zlib.compress(b'{"inputs": []}') + b"x", 400, "1 bytes after the end of its deflate data"),
    ],
    ids=["unsupported", "corrupt", "truncated", "bomb", "gzip-trailing", "deflate-trailing"],
)
def test_infer_compressed_request_refused(
    http: httpx.Client, encoding: str, body: bytes, status: int, message: str
) -> None:
    response = http.post(
        "/v2/models/tabular/infer",
        content=body,
        headers={"content-type": "application/json", "content-encoding": encoding},
    )
    assert response.status_code == status, response.text
    assert message in response.json()["error"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_summer_int64_matches_onnxruntime(
    triton: httpclient.InferenceServerClient, model_registry: Path, binary: bool
) -> None:
    x = np.array([[1, 2, 3, 4], [-5, 0, 7, 2**40], [9, -9, 10, -10]], dtype=np.int64)
    outputs = [httpclient.InferRequestedOutput(name, binary_data=binary) for name in ("sum", "doubled")]
    result = triton.infer("summer", [infer_input("input", x, "INT64", binary)], outputs=outputs)
    expected = run_onnx(model_registry, "summer", 1, {"input": x})
    for name in ("sum", "doubled"):
        actual = result.as_numpy(name)
        assert actual.dtype == np.int64
        assert np.array_equal(actual, expected[name]), name
    assert result.as_numpy("sum").ravel().tolist() == [10, 2**40 + 2, 0]


# -- inference: identity roundtrips per datatype ------------------------------------------------------------

ROUNDTRIPS: list[tuple[str, str, np.ndarray]] = [
    ("id_bool", "BOOL", np.array([[True, False, True], [False, False, True]])),
    ("id_bytes", "BYTES", np.array([[b"alpha", b"", b"caf\xc3\xa9"], [b"x y", b"\xe2\x9c\x93", b"z"]], dtype=object)),
    ("id_fp64", "FP64", np.array([[0.1, -2.5e300, 1 / 3], [np.pi, -0.0, 5e-324]], dtype=np.float64)),
    ("id_int32", "INT32", np.array([[0, -(2**31), 2**31 - 1], [7, -7, 123456]], dtype=np.int32)),
    ("id_fp32", "FP32", np.array([[1.5, -0.25, 3.4e38], [1e-38, 0.0, -1.0]], dtype=np.float32)),
]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize(("model", "datatype", "values"), ROUNDTRIPS, ids=[r[1] for r in ROUNDTRIPS])
def test_infer_identity_roundtrips_datatype(
    triton: httpclient.InferenceServerClient, model: str, datatype: str, values: np.ndarray, binary: bool
) -> None:
    result = triton.infer(
        model,
        [infer_input("x", values, datatype, binary)],
        outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)],
    )
    (output,) = result.get_response()["outputs"]
    assert output["datatype"] == datatype
    assert output["shape"] == list(values.shape)
    actual = result.as_numpy("y")
    assert actual.shape == values.shape
    if datatype == "BYTES":
        # Binary BYTES come back as bytes; JSON BYTES as the strings they encode.
        as_bytes = [v if isinstance(v, bytes) else str(v).encode() for v in actual.ravel()]
        assert as_bytes == values.ravel().tolist()
    else:
        assert actual.dtype == values.dtype
        assert np.array_equal(actual, values)


def test_infer_identity_fp64_json_keeps_full_precision(http: httpx.Client) -> None:
    values = np.array([[0.1, 1 / 3, 2**-1074]])
    response = http.post("/v2/models/id_fp64/infer", json=json_request("x", values, "FP64"))
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["data"] == values.ravel().tolist()


# -- requested outputs --------------------------------------------------------------------------------------


def test_infer_outputs_field_selects_one_output(triton: httpclient.InferenceServerClient, model_registry: Path) -> None:
    x = tabular_rows(4, seed=2)
    result = triton.infer(
        "tabular",
        [infer_input("input", x, "FP32", binary=False)],
        outputs=[httpclient.InferRequestedOutput("label", binary_data=False)],
    )
    response = result.get_response()
    assert [output["name"] for output in response["outputs"]] == ["label"]
    assert result.as_numpy("probabilities") is None
    expected = run_onnx(model_registry, "tabular", 1, {"input": x})
    assert response["outputs"][0]["data"] == expected["label"].tolist()


def test_infer_outputs_field_mixes_binary_and_json(
    triton: httpclient.InferenceServerClient, model_registry: Path
) -> None:
    x = tabular_rows(4, seed=3)
    result = triton.infer(
        "tabular",
        [infer_input("input", x, "FP32", binary=True)],
        outputs=[
            httpclient.InferRequestedOutput("probabilities", binary_data=True),
            httpclient.InferRequestedOutput("label", binary_data=False),
        ],
    )
    by_name = {output["name"]: output for output in result.get_response()["outputs"]}
    assert by_name["probabilities"]["parameters"] == {"binary_data_size": 4 * 2 * 4}
    assert "data" not in by_name["probabilities"]
    assert "data" in by_name["label"] and "parameters" not in by_name["label"]
    expected = run_onnx(model_registry, "tabular", 1, {"input": x})
    assert np.allclose(result.as_numpy("probabilities"), expected["probabilities"], rtol=1e-6, atol=1e-7)
    assert by_name["label"]["data"] == expected["label"].tolist()


def test_infer_outputs_order_follows_the_request(http: httpx.Client) -> None:
    body = json_request("input", tabular_rows(1), "FP32", outputs=[{"name": "label"}, {"name": "probabilities"}])
    response = http.post("/v2/models/tabular/infer", json=body)
    assert response.status_code == 200, response.text
    assert [output["name"] for output in response.json()["outputs"]] == ["label", "probabilities"]


def test_infer_raw_binary_response_has_header_length_and_tensor_bytes(http: httpx.Client) -> None:
    x = np.array([[1.0, -2.0, 3.5]], dtype=np.float32)
    body = json_request("x", x, "FP32", parameters={"binary_data_output": True})
    response = http.post("/v2/models/id_fp32/infer", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    header_length = int(response.headers["inference-header-content-length"])
    header = json.loads(response.content[:header_length])
    assert header["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 12}}
    ]
    assert np.array_equal(np.frombuffer(response.content[header_length:], dtype="<f4").reshape(1, 3), x)


def test_infer_raw_binary_request_is_accepted(http: httpx.Client) -> None:
    """A hand-built binary request, the JSON header deliberately an odd length (tensor bytes unaligned)."""
    x = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    header = {
        "id": "odd",
        "inputs": [{"name": "x", "shape": [2, 3], "datatype": "INT32", "parameters": {"binary_data_size": 24}}],
    }
    raw = json.dumps(header).encode()
    if len(raw) % 2 == 0:
        raw += b" "
    response = http.post(
        "/v2/models/id_int32/infer",
        content=raw + x.astype("<i4").tobytes(),
        headers={"inference-header-content-length": str(len(raw)), "content-type": "application/octet-stream"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["outputs"][0]["data"] == x.ravel().tolist()


# -- versions and aliases -----------------------------------------------------------------------------------


def test_infer_version_path_pins_that_version(triton: httpclient.InferenceServerClient, model_registry: Path) -> None:
    x = tabular_rows(6, seed=4)
    v1 = run_onnx(model_registry, "tabular", 1, {"input": x})["probabilities"]
    v2 = run_onnx(model_registry, "tabular", 2, {"input": x})["probabilities"]
    assert not np.allclose(v1, v2), "the two versions must answer differently for this test to mean anything"
    pinned = triton.infer("tabular", [infer_input("input", x, "FP32", binary=True)], model_version="2")
    assert pinned.get_response()["model_version"] == "2"
    assert np.allclose(pinned.as_numpy("probabilities"), v2, rtol=1e-6, atol=1e-7)
    default = triton.infer("tabular", [infer_input("input", x, "FP32", binary=True)])
    assert default.get_response()["model_version"] == "1"
    assert np.allclose(default.as_numpy("probabilities"), v1, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("ref", "version"), [("champion", "1"), ("challenger", "2"), ("latest", "2"), ("1", "1")])
def test_infer_version_path_resolves_alias(http: httpx.Client, ref: str, version: str) -> None:
    body = json_request("input", tabular_rows(1), "FP32")
    response = http.post(f"/v2/models/tabular/versions/{ref}/infer", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == version
    assert response.json()["model_name"] == "tabular"


def test_infer_model_without_aliases_serves_latest(http: httpx.Client) -> None:
    response = http.post("/v2/models/id_int32/infer", json=json_request("x", np.zeros((1, 3), np.int32), "INT32"))
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "1"


# -- identity, headers --------------------------------------------------------------------------------------


def test_infer_echoes_request_id_in_body(triton: httpclient.InferenceServerClient) -> None:
    x = np.ones((1, 3), np.float32)
    result = triton.infer("id_fp32", [infer_input("x", x, "FP32", binary=True)], request_id="req-42")
    assert result.get_response()["id"] == "req-42"


def test_infer_without_id_omits_it(http: httpx.Client) -> None:
    response = http.post("/v2/models/id_fp32/infer", json=json_request("x", np.ones((1, 3)), "FP32"))
    assert response.status_code == 200, response.text
    assert "id" not in response.json()


def test_infer_keeps_client_request_id_header(http: httpx.Client) -> None:
    response = http.post(
        "/v2/models/id_fp32/infer",
        json=json_request("x", np.ones((1, 3)), "FP32"),
        headers={"x-request-id": "client-chosen-7"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-request-id"] == "client-chosen-7"
    assert response.headers["x-gatewatch-variant"] == "default"


def test_infer_generates_unique_request_id_header(http: httpx.Client) -> None:
    body = json_request("x", np.ones((1, 3)), "FP32")
    ids = []
    for _ in range(5):
        response = http.post("/v2/models/id_fp32/infer", json=body)
        assert response.status_code == 200, response.text
        assert response.headers["x-gatewatch-variant"] == "default"
        ids.append(response.headers["x-request-id"])
    assert all(len(request_id) >= 16 for request_id in ids)
    assert len(set(ids)) == len(ids)


def test_infer_error_keeps_request_id_header(http: httpx.Client) -> None:
    response = http.post(
        "/v2/models/id_fp32/infer",
        json=json_request("x", np.ones((1, 4)), "FP32"),
        headers={"x-request-id": "failing-1"},
    )
    assert response.status_code == 400
    assert response.headers["x-request-id"] == "failing-1"


def test_infer_model_name_is_the_name_called(http: httpx.Client) -> None:
    body = json_request("input", tabular_rows(1), "FP32")
    pinned = http.post("/v2/models/tabular/versions/challenger/infer", json=body)
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["model_name"] == "tabular"


# -- a non-batched model ------------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_fixed_shape_model(triton: httpclient.InferenceServerClient, binary: bool) -> None:
    x = np.array([[0.5, -1.5, 2.25]], dtype=np.float32)
    result = triton.infer(
        "fixed",
        [infer_input("x", x, "FP32", binary)],
        outputs=[httpclient.InferRequestedOutput("y", binary_data=binary)],
    )
    assert np.array_equal(result.as_numpy("y"), x)
    assert result.get_response()["outputs"][0]["shape"] == [1, 3]
