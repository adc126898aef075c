"""Every way a request can be wrong, answered with the right status and a `{"error": ...}` that says what and why.

Bad input is never a 500. Overload (429), deadlines (504) and body limits (413) run against dedicated gateways
whose limits are small, with the `slow` model kept busy by large requests; waits are on observed conditions
(the gateway's own `/metrics`), never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import GatewayProcess, start_gateway, write_config

SLOW_WIDTH = 512
BLOCKER_ROWS = 4096  # ~0.5 s of onnxruntime per request on one core: long enough to hold a run slot


def tensor(name: str, shape: list[int], datatype: str, data: Any) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def x3(**overrides: Any) -> dict[str, Any]:
    """A valid `id_fp32` input, one field overridden at a time."""
    return {**tensor("x", [1, 3], "FP32", [1.0, 2.0, 3.0]), **overrides}


def assert_error(response: httpx.Response, status: int, *fragments: str) -> str:
    assert response.status_code == status, f"expected {status}, got {response.status_code}: {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}, body
    message = body["error"]
    assert isinstance(message, str)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in error {message!r}"
    return message


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


async def metric_value(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    response = await client.get("/metrics")
    response.raise_for_status()
    matches = [
        value
        for sample_labels, value in metric_samples(response.text, name)
        if all(sample_labels.get(k) == v for k, v in labels.items())
    ]
    return sum(matches)


async def wait_for_metric(
    client: httpx.AsyncClient, name: str, at_least: float, within: float = 20, **labels: str
) -> float:
    """Poll the gateway's /metrics until `name{labels}` reaches `at_least` (a condition, not a sleep)."""
    deadline = time.monotonic() + within
    while True:
        value = await metric_value(client, name, **labels)
        if value >= at_least:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} stayed at {value}, expected >= {at_least} within {within}s")
        await asyncio.sleep(0.01)


def binary_request(name: str, array: np.ndarray, datatype: str, **extra: Any) -> tuple[bytes, dict[str, str]]:
    """A V2 request with one tensor in Triton's binary tensor extension."""
    blob = array.astype(array.dtype.newbyteorder("<")).tobytes()
    header = {
        "inputs": [
            {"name": name, "shape": list(array.shape), "datatype": datatype,
             "parameters": {"binary_data_size": len(blob)}}
        ],
        "outputs": [{"name": "output", "parameters": {"binary_data": True}}],
        **extra,
    }
    raw = json.dumps(header).encode()
    return raw + blob, {"inference-header-content-length": str(len(raw)), "content-type": "application/octet-stream"}


def blocker() -> tuple[bytes, dict[str, str]]:
    rows = np.random.default_rng(0).normal(size=(BLOCKER_ROWS, SLOW_WIDTH)).astype(np.float32)
    return binary_request("input", rows, "FP32")


def slow_one_row(**extra: Any) -> dict[str, Any]:
    return {"inputs": [tensor("input", [1, SLOW_WIDTH], "FP32", [0.5] * SLOW_WIDTH)], **extra}


@pytest.fixture(scope="module")
def http(gateway_server: GatewayProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway_server.url, timeout=30) as client:
        yield client


# -- 400: the tensors do not match the model's signature ----------------------------------------------------

BAD_JSON_REQUESTS: list[tuple[str, str, dict[str, Any], tuple[str, ...]]] = [
    ("wrong_input_name", "id_fp32", {"inputs": [x3(name="z")]}, ("unknown input 'z'", "expects x (FP32 [-1, 3])")),
    ("wrong_shape_rank", "id_fp32", {"inputs": [x3(shape=[3])]}, ("has shape [3]", "expected [-1, 3]")),
    ("wrong_shape_width", "id_fp32", {"inputs": [x3(shape=[1, 4], data=[1, 2, 3, 4])]},
     ("has shape [1, 4]", "expected [-1, 3]")),
    ("negative_dimension", "id_fp32", {"inputs": [x3(shape=[-1, 3])]}, ("'shape' must be a list of non-negative",)),
    ("fixed_model_two_rows", "fixed", {"inputs": [tensor("x", [2, 3], "FP32", [1] * 6)]},
     ("has shape [2, 3]", "expected [1, 3]")),
    ("wrong_datatype", "id_fp32", {"inputs": [x3(datatype="INT32")]}, ("datatype 'INT32'", "expected FP32")),
    ("unknown_datatype", "id_fp32", {"inputs": [x3(datatype="FLOAT")]}, ("datatype 'FLOAT'", "expected FP32")),
    ("too_few_values", "id_fp32", {"inputs": [x3(data=[1.0, 2.0])]}, ("needs 3 values, got 2",)),
    ("too_many_values", "id_fp32", {"inputs": [x3(data=[1.0, 2.0, 3.0, 4.0])]}, ("needs 3 values, got 4",)),
    ("strings_for_numbers", "id_fp32", {"inputs": [x3(data=["1", "2", "3"])]},
     ("is FP32", "flat list of numbers")),
    ("one_string_among_numbers", "id_fp32", {"inputs": [x3(data=[1.0, "two", 3.0])]},
     ("is FP32", "flat list of numbers")),
    ("null_among_numbers", "id_fp32", {"inputs": [x3(data=[1.0, None, 3.0])]}, ("is FP32", "flat list of numbers")),
    ("boolean_among_numbers", "id_fp32", {"inputs": [x3(data=[1.0, True, 3.0])]},
     ("is FP32", "booleans are not numbers")),
    ("boolean_among_integers", "summer", {"inputs": [tensor("input", [1, 4], "INT64", [1, 2, False, 4])]},
     ("is INT64", "booleans are not numbers")),
    ("only_booleans_for_numbers", "id_fp32", {"inputs": [x3(data=[True, False, True])]},
     ("is FP32", "flat list of numbers")),
    ("floats_for_integers", "id_int32", {"inputs": [tensor("x", [1, 3], "INT32", [1, 2.5, 3])]},
     ("is INT32", "flat list of integers")),
    ("integer_out_of_range", "id_int32", {"inputs": [tensor("x", [1, 3], "INT32", [1, 2, 2**31])]},
     ("out of range for INT32",)),
    ("numbers_for_booleans", "id_bool", {"inputs": [tensor("x", [1, 3], "BOOL", [1, 0, 1])]},
     ("is BOOL", "true/false")),
    ("numbers_for_bytes", "id_bytes", {"inputs": [tensor("x", [1, 3], "BYTES", ["a", 2, "c"])]},
     ("is BYTES", "flat list of strings")),
    ("nested_rows", "id_fp32", {"inputs": [x3(shape=[2, 3], data=[[1, 2, 3], [4, 5, 6]])]},
     ("flat list", "not nested lists")),
    ("nested_single_row", "id_fp32", {"inputs": [x3(data=[[1, 2, 3]])]}, ("flat list", "not nested lists")),
    ("nested_columns", "id_fp32", {"inputs": [x3(data=[[1], [2], [3]])]}, ("flat list", "not nested lists")),
    ("ragged_nesting", "id_fp32", {"inputs": [x3(data=[[1, 2], 3, 4])]}, ("flat list", "not nested lists")),
    ("data_not_a_list", "id_fp32", {"inputs": [x3(data=1.0)]}, ("'data' must be a flat list",)),
    ("data_missing", "id_fp32", {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32"}]},
     ("'data' must be a flat list",)),
    ("duplicate_input", "id_fp32", {"inputs": [x3(), x3()]}, ("input 'x' is given more than once",)),
    ("missing_input", "id_fp32", {"inputs": []}, ("'inputs' must be a non-empty list",)),
    ("no_inputs_key", "id_fp32", {"id": "a"}, ("'inputs' must be a non-empty list",)),
    ("missing_one_of_two", "tabular", {"inputs": [x3()]}, ("unknown input 'x'", "expects input (FP32 [-1, 32])")),
    ("zero_rows", "id_fp32", {"inputs": [x3(shape=[0, 3], data=[])]}, ("batch dimension", "at least 1")),
    ("unknown_output", "id_fp32", {"inputs": [x3()], "outputs": [{"name": "nope"}]},
     ("unknown output 'nope'", "outputs y")),
    ("output_without_name", "id_fp32", {"inputs": [x3()], "outputs": [{"parameters": {}}]},
     ("requested output needs a string 'name'",)),
    ("id_not_string", "id_fp32", {"inputs": [x3()], "id": 7}, ("'id' must be a string",)),
    ("parameters_not_object", "id_fp32", {"inputs": [x3()], "parameters": [1]}, ("'parameters'", "object")),
    ("timeout_not_number", "id_fp32", {"inputs": [x3()], "parameters": {"timeout_ms": "soon"}},
     ("timeout_ms must be a positive number",)),
    ("timeout_negative", "id_fp32", {"inputs": [x3()], "parameters": {"timeout_ms": -5}},
     ("timeout_ms must be a positive number",)),
    ("input_not_object", "id_fp32", {"inputs": ["x"]}, ("each input must be an object",)),
    ("binary_size_without_binary_body", "id_fp32",
     {"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "parameters": {"binary_data_size": 12}}]},
     ("declares 12 bytes of binary data but only 0 remain",)),
]


@pytest.mark.parametrize(
    ("model", "body", "fragments"),
    [case[1:] for case in BAD_JSON_REQUESTS],
    ids=[case[0] for case in BAD_JSON_REQUESTS],
)
def test_infer_bad_tensor_is_400(
    http: httpx.Client, model: str, body: dict[str, Any], fragments: tuple[str, ...]
) -> None:
    assert_error(http.post(f"/v2/models/{model}/infer", json=body), 400, *fragments)


RAW_BODIES: list[tuple[str, bytes, tuple[str, ...]]] = [
    ("not_json", b"{not json", ("not valid JSON",)),
    ("empty_body", b"", ("not valid JSON",)),
    ("truncated_json", b'{"inputs": [', ("not valid JSON",)),
    ("json_array", b"[1, 2, 3]", ("must be a JSON object",)),
    ("json_string", b'"inputs"', ("must be a JSON object",)),
    ("nan_literal", b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [NaN, 1, 2]}]}',
     ("not valid JSON",)),
]


@pytest.mark.parametrize(("raw", "fragments"), [c[1:] for c in RAW_BODIES], ids=[c[0] for c in RAW_BODIES])
def test_infer_invalid_json_is_400(http: httpx.Client, raw: bytes, fragments: tuple[str, ...]) -> None:
    response = http.post("/v2/models/id_fp32/infer", content=raw, headers={"content-type": "application/json"})
    assert_error(response, 400, *fragments)


# -- 400: Triton's binary tensor extension, malformed ------------------------------------------------------


def binary_body(
    inputs: list[dict[str, Any]], blob: bytes, header_length: int | None = None
) -> tuple[bytes, dict[str, str]]:
    raw = json.dumps({"inputs": inputs}).encode()
    length = len(raw) if header_length is None else header_length
    return raw + blob, {"inference-header-content-length": str(length)}


def binary_input(name: str, shape: list[int], datatype: str, size: int) -> dict[str, Any]:
    return {"name": name, "shape": shape, "datatype": datatype, "parameters": {"binary_data_size": size}}


FP32_3 = np.arange(3, dtype="<f4").tobytes()

BAD_BINARY: list[tuple[str, str, list[dict[str, Any]], bytes, int | None, tuple[str, ...]]] = [
    ("size_smaller_than_shape", "id_fp32", [binary_input("x", [1, 3], "FP32", 8)], FP32_3[:8], None,
     ("needs 12 bytes of binary data, got 8",)),
    ("size_larger_than_body", "id_fp32", [binary_input("x", [1, 3], "FP32", 16)], FP32_3, None,
     ("declares 16 bytes of binary data but only 12 remain",)),
    ("trailing_bytes", "id_fp32", [binary_input("x", [1, 3], "FP32", 12)], FP32_3 + b"\0\0\0\0", None,
     ("4 bytes of binary data follow the last binary input",)),
    ("size_not_integer", "id_fp32",
     [binary_input("x", [1, 3], "FP32", 12) | {"parameters": {"binary_data_size": "12"}}], FP32_3, None,
     ("binary_data_size must be a non-negative integer",)),
    ("header_length_past_body", "id_fp32", [binary_input("x", [1, 3], "FP32", 12)], FP32_3, 10**6,
     ("Inference-Header-Content-Length is 1000000 but the body has",)),
    ("header_length_cuts_json", "id_fp32", [binary_input("x", [1, 3], "FP32", 12)], FP32_3, 7,
     ("not valid JSON",)),
    ("bool_byte_not_0_or_1", "id_bool", [binary_input("x", [1, 3], "BOOL", 3)], b"\x01\x00\x02", None,
     ("is BOOL", "must be 0 or 1")),
    ("bytes_truncated_prefix", "id_bytes", [binary_input("x", [1, 3], "BYTES", 6)], struct.pack("<I", 1) + b"a" + b"\0",
     None, ("truncated BYTES length prefix",)),
    ("bytes_element_past_end", "id_bytes", [binary_input("x", [1, 3], "BYTES", 6)], struct.pack("<I", 9) + b"ab",
     None, ("BYTES element runs past the binary data",)),
    ("bytes_wrong_count", "id_bytes", [binary_input("x", [1, 3], "BYTES", 5)], struct.pack("<I", 1) + b"a",
     None, ("needs 3 BYTES elements, got 1",)),
]


@pytest.mark.parametrize(
    ("model", "inputs", "blob", "header_length", "fragments"),
    [c[1:] for c in BAD_BINARY],
    ids=[c[0] for c in BAD_BINARY],
)
def test_infer_bad_binary_tensor_is_400(
    http: httpx.Client,
    model: str,
    inputs: list[dict[str, Any]],
    blob: bytes,
    header_length: int | None,
    fragments: tuple[str, ...],
) -> None:
    content, headers = binary_body(inputs, blob, header_length)
    assert_error(http.post(f"/v2/models/{model}/infer", content=content, headers=headers), 400, *fragments)


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", ""])
def test_infer_bad_header_length_header_is_400(http: httpx.Client, value: str) -> None:
    content, headers = binary_body([binary_input("x", [1, 3], "FP32", 12)], FP32_3)
    headers["inference-header-content-length"] = value
    assert_error(
        http.post("/v2/models/id_fp32/infer", content=content, headers=headers),
        400,
        "Inference-Header-Content-Length must be a non-negative integer",
    )


@pytest.mark.parametrize("value", ["abc", "0", "-5", "nan", "inf", "1e999"])
def test_infer_bad_timeout_header_is_400(http: httpx.Client, value: str) -> None:
    response = http.post(
        "/v2/models/id_fp32/infer", json={"inputs": [x3()]}, headers={"x-gatewatch-timeout-ms": value}
    )
    assert_error(response, 400, "x-gatewatch-timeout-ms must be a positive number", repr(value))


# -- 404: nothing of that name ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "fragments"),
    [
        ("/v2/models/no-such-model/infer", ("unknown model 'no-such-model'", "serving:", "tabular")),
        ("/v2/models/tabular/versions/9/infer", ("no loaded version 9", "loaded: [1, 2]")),
        ("/v2/models/tabular/versions/0/infer", ("no loaded version 0",)),
        ("/v2/models/tabular/versions/staging/infer", ("no alias 'staging'", "challenger, champion")),
        ("/v2/models/tabular/versions/-1/infer", ("no alias '-1'",)),
        ("/v2/models/tabular/versions/²/infer", ("no alias '²'",)),
        ("/v2/models/no-such-model/versions/1/infer", ("unknown model 'no-such-model'",)),
    ],
    ids=["unknown_model", "unknown_version", "version_zero", "unknown_alias", "negative_version",
         "unicode_digit_version", "unknown_model_with_version"],
)
def test_infer_unknown_target_is_404(http: httpx.Client, path: str, fragments: tuple[str, ...]) -> None:
    response = http.post(path, json={"inputs": [x3()]}, headers={"x-request-id": "lost-1"})
    assert_error(response, 404, *fragments)
    assert response.headers["x-request-id"] == "lost-1"


@pytest.mark.parametrize(
    ("path", "fragment"),
    [
        ("/v2/models/no-such-model", "unknown model 'no-such-model'"),
        ("/v2/models/no-such-model/ready", "unknown model 'no-such-model'"),
        ("/v2/models/tabular/versions/9", "no loaded version 9"),
        ("/v2/models/tabular/versions/staging/ready", "no alias 'staging'"),
        ("/v2/models/tabular/versions/²", "no alias '²'"),
    ],
)
def test_metadata_unknown_target_is_404(http: httpx.Client, path: str, fragment: str) -> None:
    assert_error(http.get(path), 404, fragment)


def test_unknown_route_is_json_404(http: httpx.Client) -> None:
    assert_error(http.get("/v2/nothing/here"), 404)


def test_infer_with_get_is_405(http: httpx.Client) -> None:
    assert_error(http.get("/v2/models/id_fp32/infer"), 405)


def test_bad_input_counted_as_400_not_500(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    assert_error(http.post("/v2/models/id_fp32/infer", json={"inputs": [x3(name="z")]}), 400)
    after = http.get("/metrics").text

    def count(text: str, code: str) -> float:
        return sum(
            value
            for labels, value in metric_samples(text, "gatewatch_requests_total")
            if labels["endpoint"] == "id_fp32" and labels["code"] == code
        )

    assert count(after, "400") == count(before, "400") + 1
    assert count(after, "500") == 0


def test_refusals_before_routing_are_counted_under_the_name_only_when_it_is_served(http: httpx.Client) -> None:
    def count(endpoint: str, model: str) -> float:
        return sum(
            value
            for labels, value in metric_samples(http.get("/metrics").text, "gatewatch_requests_total")
            if (labels["endpoint"], labels["model"], labels["code"]) == (endpoint, model, "404")
        )

    served, unknown = count("tabular", "tabular"), count("_unknown", "_unknown")
    assert_error(http.post("/v2/models/tabular/versions/9/infer", json={"inputs": [x3()]}), 404)
    assert count("tabular", "tabular") == served + 1  # a served model: its name, the version unknown
    for name in ("no-such-model", "another-made-up-name"):  # arbitrary names create no series of their own
        assert_error(http.post(f"/v2/models/{name}/infer", json={"inputs": [x3()]}), 404)
    assert count("_unknown", "_unknown") == unknown + 2


# -- 413: body over max_body_bytes --------------------------------------------------------------------------

MAX_BODY = 2048


@pytest.fixture(scope="module")
def small_body_gateway(model_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("small-body")
    config = write_config(workdir / "gatewatch.yaml", model_registry, max_body_bytes=MAX_BODY)
    gateway = start_gateway(config, workdir)
    yield gateway
    gateway.terminate()


def padded_request(size: int) -> bytes:
    """A valid `id_fp32` request padded with JSON whitespace to exactly `size` bytes."""
    raw = json.dumps({"inputs": [x3()]}).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


async def test_infer_body_at_limit_is_accepted(small_body_gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=small_body_gateway.url) as client:
        response = await client.post("/v2/models/id_fp32/infer", content=padded_request(MAX_BODY))
    assert response.status_code == 200, response.text


async def test_infer_body_over_limit_is_413(small_body_gateway: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=small_body_gateway.url) as client:
        response = await client.post(
            "/v2/models/id_fp32/infer", content=padded_request(MAX_BODY + 1), headers={"x-request-id": "big-1"}
        )
    assert_error(response, 413, f"{MAX_BODY + 1} bytes", f"max_body_bytes={MAX_BODY}")
    assert response.headers["x-request-id"] == "big-1"


async def test_infer_chunked_body_over_limit_is_413(small_body_gateway: GatewayProcess) -> None:
    """No Content-Length: the limit is enforced while the body streams in."""
    sent: list[int] = []

    async def chunks() -> AsyncIterator[bytes]:
        body = padded_request(4 * MAX_BODY)
        for start in range(0, len(body), 512):
            sent.append(start)
            yield body[start : start + 512]

    async with httpx.AsyncClient(base_url=small_body_gateway.url) as client:
        response = await client.post("/v2/models/id_fp32/infer", content=chunks())
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_error(response, 413, f"exceeds max_body_bytes={MAX_BODY}")


async def test_infer_chunked_body_under_limit_is_accepted(small_body_gateway: GatewayProcess) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        body = padded_request(MAX_BODY)
        for start in range(0, len(body), 100):
            yield body[start : start + 100]

    async with httpx.AsyncClient(base_url=small_body_gateway.url) as client:
        response = await client.post("/v2/models/id_fp32/infer", content=chunks())
    assert response.status_code == 200, response.text


# -- 429 and 504: the `slow` model kept busy ----------------------------------------------------------------

MAX_QUEUE = 3


@pytest.fixture(scope="module")
def busy_gateway(model_registry: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """Two run slots (inference_threads) and room for MAX_QUEUE waiting requests per model version."""
    workdir = tmp_path_factory.mktemp("busy")
    config = write_config(
        workdir / "gatewatch.yaml", model_registry, max_queue_size=MAX_QUEUE, inference_threads=2,
        max_queue_delay_ms=0,
    )
    gateway = start_gateway(config, workdir)
    yield gateway
    gateway.terminate()


@pytest.fixture
async def busy_client(busy_gateway: GatewayProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=busy_gateway.url, timeout=60) as client:
        yield client
        # Leave the gateway idle for the next test.
        deadline = time.monotonic() + 30
        while await metric_value(client, "gatewatch_requests_in_flight") > 0:
            assert time.monotonic() < deadline, "busy gateway never drained"
            await asyncio.sleep(0.01)


async def occupy_run_slots(client: httpx.AsyncClient, count: int = 2) -> list[asyncio.Task[httpx.Response]]:
    """Start `count` large requests on `slow` and return once the gateway holds them all."""
    content, headers = blocker()
    before = await metric_value(client, "gatewatch_requests_in_flight")
    tasks = [
        asyncio.create_task(client.post("/v2/models/slow/infer", content=content, headers=headers))
        for _ in range(count)
    ]
    await wait_for_metric(client, "gatewatch_requests_in_flight", before + count)
    return tasks


async def test_infer_queue_full_is_429_with_retry_after(busy_client: httpx.AsyncClient) -> None:
    running = await occupy_run_slots(busy_client)
    # Both run slots are busy for ~0.5 s; these wait in the queue until it is full.
    queued = [
        asyncio.create_task(busy_client.post("/v2/models/slow/infer", json=slow_one_row()))
        for _ in range(MAX_QUEUE)
    ]
    await wait_for_metric(busy_client, "gatewatch_queue_depth", MAX_QUEUE, model="slow", version="1")

    response = await busy_client.post("/v2/models/slow/infer", json=slow_one_row(), headers={"x-request-id": "q-1"})
    assert_error(response, 429, "queue full", "retry later")
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-request-id"] == "q-1"

    # Every request the gateway accepted is answered, and the queue serves again once it drains.
    results = await asyncio.gather(*running, *queued)
    assert [r.status_code for r in results] == [200] * (2 + MAX_QUEUE)
    after = await busy_client.post("/v2/models/slow/infer", json=slow_one_row())
    assert after.status_code == 200, after.text


@pytest.mark.parametrize("via", ["header", "parameter"])
async def test_infer_deadline_passed_while_queued_is_504(busy_client: httpx.AsyncClient, via: str) -> None:
    running = await occupy_run_slots(busy_client)
    if via == "header":
        request = busy_client.post(
            "/v2/models/slow/infer", json=slow_one_row(), headers={"x-gatewatch-timeout-ms": "100"}
        )
    else:
        request = busy_client.post("/v2/models/slow/infer", json=slow_one_row(parameters={"timeout_ms": 100}))
    started = time.monotonic()
    response = await request
    elapsed = time.monotonic() - started
    assert_error(response, 504, "deadline passed")
    # Answered at its deadline, not after the work ahead of it: the blockers are still running.
    assert not any(task.done() for task in running), "the 504 came only after the blocking requests finished"
    assert 0.1 <= elapsed < 5
    assert all(r.status_code == 200 for r in await asyncio.gather(*running))


async def test_infer_expired_requests_leave_the_queue(busy_client: httpx.AsyncClient) -> None:
    """Requests past their deadline are dropped from the queue at once: they neither show in the queue depth
    nor take the room of requests that are still waiting (no 429 from a queue full of expired requests)."""
    running = await occupy_run_slots(busy_client)
    expired = await asyncio.gather(
        *(
            busy_client.post("/v2/models/slow/infer", json=slow_one_row(), headers={"x-gatewatch-timeout-ms": "50"})
            for _ in range(MAX_QUEUE)
        )
    )
    for response in expired:
        assert_error(response, 504, "deadline passed")
    assert not any(task.done() for task in running), "the blockers must still hold the run slots"
    assert await metric_value(busy_client, "gatewatch_queue_depth", model="slow", version="1") == 0
    waiting = await busy_client.post("/v2/models/slow/infer", json=slow_one_row())
    assert waiting.status_code == 200, waiting.text
    assert all(r.status_code == 200 for r in await asyncio.gather(*running))


async def test_infer_deadline_header_wins_over_parameter(busy_client: httpx.AsyncClient) -> None:
    running = await occupy_run_slots(busy_client)
    response = await busy_client.post(
        "/v2/models/slow/infer",
        json=slow_one_row(parameters={"timeout_ms": 60_000}),
        headers={"x-gatewatch-timeout-ms": "50"},
    )
    assert_error(response, 504, "deadline passed")
    assert not any(task.done() for task in running)
    assert all(r.status_code == 200 for r in await asyncio.gather(*running))


async def test_infer_generous_deadline_is_met(busy_client: httpx.AsyncClient) -> None:
    response = await busy_client.post(
        "/v2/models/slow/infer", json=slow_one_row(), headers={"x-gatewatch-timeout-ms": "30000"}
    )
    assert response.status_code == 200, response.text


async def test_infer_expired_request_counted_as_504(busy_client: httpx.AsyncClient) -> None:
    before = await metric_value(busy_client, "gatewatch_requests_total", endpoint="slow", code="504")
    running = await occupy_run_slots(busy_client)
    response = await busy_client.post(
        "/v2/models/slow/infer", json=slow_one_row(), headers={"x-gatewatch-timeout-ms": "20"}
    )
    assert_error(response, 504)
    await asyncio.gather(*running)
    assert await metric_value(busy_client, "gatewatch_requests_total", endpoint="slow", code="504") == before + 1
