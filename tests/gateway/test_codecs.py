"""Unit tests of `gateway/protocol/codecs.py`: V2 tensors (JSON and Triton's binary extension) <-> numpy.

Binary bodies are built, and binary responses read back, with tritonclient's own serialisation code, so the
Triton format is checked against an independent implementation rather than against itself.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as httpclient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from gateway.errors import InvalidInput
from gateway.protocol.codecs import (
    DATATYPE_TO_NUMPY,
    DecodedRequest,
    RequestedOutput,
    TensorSpec,
    decode_request,
    encode_response,
    numpy_datatype,
    parse_header,
    split_body,
)

settings.register_profile(
    "codecs", derandomize=True, deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow]
)
CODEC_SETTINGS = settings.get_profile("codecs")

DATATYPES = tuple(DATATYPE_TO_NUMPY)
INTEGER_TYPES = tuple(d for d in DATATYPES if DATATYPE_TO_NUMPY[d].kind in "iu")
FLOAT_TYPES = ("FP16", "FP32", "FP64")
NUMERIC_TYPES = INTEGER_TYPES + FLOAT_TYPES
WIDTH = 3


def spec(datatype: str, name: str = "x", width: int = WIDTH) -> TensorSpec:
    return TensorSpec(name=name, datatype=datatype, shape=(-1, width))


def decode(
    body: dict[str, Any] | bytes,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec] = (),
    header_length: int | None = None,
    batched: bool = True,
) -> DecodedRequest:
    """The request path of the data plane: split, parse, decode."""
    # The standard library writes integers of any size; orjson reads the ones beyond 64 bits as floats.
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    raw_json, binary = split_body(raw, header_length)
    return decode_request(parse_header(raw_json), binary, raw_json, inputs, outputs, batched)


def json_body(datatype: str, data: list[Any], rows: int, name: str = "x", **extra: Any) -> dict[str, Any]:
    tensor = {"name": name, "shape": [rows, len(data) // rows if rows else WIDTH], "datatype": datatype, "data": data}
    return {"inputs": [tensor], **extra}


def values(datatype: str) -> st.SearchStrategy[Any]:
    """Every value the datatype can hold (finite for floats: JSON has no NaN or infinity)."""
    if datatype == "BOOL":
        return st.booleans()
    if datatype == "BYTES":
        return st.text(max_size=12)
    if datatype == "FP16":
        return st.floats(allow_nan=False, allow_infinity=False, width=16)
    if datatype == "FP32":
        return st.floats(allow_nan=False, allow_infinity=False, width=32)
    if datatype == "FP64":
        return st.floats(allow_nan=False, allow_infinity=False)
    info = np.iinfo(DATATYPE_TO_NUMPY[datatype])
    return st.integers(int(info.min), int(info.max))


@st.composite
def tensors(draw: st.DrawFn, datatype: str) -> np.ndarray:
    """A [rows, WIDTH] array of `datatype` holding arbitrary values, rows in 1..4."""
    rows = draw(st.integers(1, 4))
    flat = draw(st.lists(values(datatype), min_size=rows * WIDTH, max_size=rows * WIDTH))
    return np.array(flat, dtype=DATATYPE_TO_NUMPY[datatype]).reshape(rows, WIDTH)


def same_values(actual: np.ndarray, expected: np.ndarray) -> bool:
    if expected.dtype == object:
        return actual.shape == expected.shape and list(actual.ravel()) == list(expected.ravel())
    return actual.dtype == expected.dtype and np.array_equal(actual, expected)


def triton_body(
    arrays: dict[str, tuple[np.ndarray, str]], binary: bool, outputs: Sequence[tuple[str, bool]] = ()
) -> tuple[bytes, int | None]:
    """A request body exactly as tritonclient's HTTP client would send it."""
    inputs = []
    for name, (array, datatype) in arrays.items():
        tensor = httpclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    requested = [httpclient.InferRequestedOutput(name, binary_data=b) for name, b in outputs] or None
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=requested)
    return body, json_size


def triton_result(body: bytes, header_length: int | None) -> httpclient.InferResult:
    """A response body read by tritonclient, as a client would."""
    return httpclient.InferResult.from_response_body(body, header_length=header_length)


# -- round trips ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
@given(data=st.data())
@CODEC_SETTINGS
def test_json_round_trip_keeps_every_value(datatype: str, data: st.DataObject) -> None:
    array = data.draw(tensors(datatype))
    rows = array.shape[0]
    request = json_body(datatype, array.ravel().tolist(), rows, id="req-1")
    decoded = decode(request, [spec(datatype)], [spec(datatype, "y")])

    assert decoded.id == "req-1"
    assert decoded.rows == rows
    assert same_values(decoded.inputs["x"], array)

    body, header_length = encode_response("m", 3, decoded.id, [(RequestedOutput("y", False), decoded.inputs["x"])])
    assert header_length is None
    response = orjson.loads(body)
    assert response["model_name"] == "m" and response["model_version"] == "3" and response["id"] == "req-1"
    (output,) = response["outputs"]
    assert output["name"] == "y" and output["datatype"] == datatype and output["shape"] == [rows, WIDTH]
    assert same_values(np.array(output["data"], dtype=DATATYPE_TO_NUMPY[datatype]).reshape(rows, WIDTH), array)


@pytest.mark.parametrize("datatype", DATATYPES)
@given(data=st.data())
@CODEC_SETTINGS
def test_binary_round_trip_with_tritonclient(datatype: str, data: st.DataObject) -> None:
    array = data.draw(tensors(datatype))
    body, json_size = triton_body({"x": (array, datatype)}, binary=True, outputs=[("y", True)])
    assert json_size is not None and json_size < len(body)
    decoded = decode(body, [spec(datatype)], [spec(datatype, "y")], header_length=json_size)

    assert same_values(decoded.inputs["x"], array)
    assert decoded.outputs == [RequestedOutput("y", True)]

    response, header_length = encode_response("m", 1, None, [(decoded.outputs[0], decoded.inputs["x"])])
    assert header_length is not None
    result = triton_result(response, header_length)
    returned = result.as_numpy("y")
    assert returned is not None
    if datatype == "BYTES":
        assert [v.decode() for v in returned.ravel()] == list(array.ravel())
    else:
        assert same_values(returned, array)


@given(
    floats=st.lists(st.floats(-1e6, 1e6, width=32), min_size=WIDTH, max_size=WIDTH),
    flags=st.lists(st.booleans(), min_size=WIDTH, max_size=WIDTH),
    words=st.lists(st.text(max_size=5), min_size=WIDTH, max_size=WIDTH),
)
@CODEC_SETTINGS
def test_mixed_binary_and_json_inputs_in_one_body(floats: list[float], flags: list[bool], words: list[str]) -> None:
    arrays = {
        "f": (np.array([floats], np.float32), "FP32"),
        "b": (np.array([flags], np.bool_), "BOOL"),
        "s": (np.array([words], dtype=object), "BYTES"),
    }
    inputs = [spec("FP32", "f"), spec("BOOL", "b"), spec("BYTES", "s")]
    for binary in (False, True):
        body, json_size = triton_body(arrays, binary=binary)
        decoded = decode(body, inputs, header_length=json_size)
        assert same_values(decoded.inputs["f"], arrays["f"][0])
        assert same_values(decoded.inputs["b"], arrays["b"][0])
        assert list(decoded.inputs["s"].ravel()) == words


def test_every_datatype_has_a_numpy_dtype_and_back() -> None:
    for datatype, dtype in DATATYPE_TO_NUMPY.items():
        assert numpy_datatype(np.zeros(2, dtype=dtype)) == datatype
    assert numpy_datatype(np.array(["a"])) == "BYTES"  # numpy's own unicode strings
    with pytest.raises(ValueError, match="no V2 datatype"):
        numpy_datatype(np.zeros(2, dtype=np.complex64))


# -- Triton BYTES format --------------------------------------------------------------------------------------


@given(words=st.lists(st.text(max_size=20), min_size=WIDTH, max_size=WIDTH))
@CODEC_SETTINGS
def test_bytes_binary_is_little_endian_length_prefixed(words: list[str]) -> None:
    raw = b"".join(struct.pack("<I", len(w.encode())) + w.encode() for w in words)
    assert raw == serialize_byte_tensor(np.array(words, dtype=object)).item()  # the format, per tritonclient
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, WIDTH], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
            ]
        }
    )
    decoded = decode(header + raw, [spec("BYTES")], header_length=len(header))
    assert list(decoded.inputs["x"].ravel()) == words

    body, header_length = encode_response("m", 1, None, [(RequestedOutput("y", True), decoded.inputs["x"])])
    assert header_length is not None
    assert body[header_length:] == raw
    assert [v.decode() for v in deserialize_bytes_tensor(body[header_length:])] == words


def _bytes_request(raw: bytes, count: int = WIDTH) -> tuple[bytes, int]:
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "x", "shape": [1, count], "datatype": "BYTES", "parameters": {"binary_data_size": len(raw)}}
            ]
        }
    )
    return header + raw, len(header)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b" + b"\x01\x00", "truncated BYTES length prefix"),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b" + struct.pack("<I", 9) + b"c", "runs past"),
        (struct.pack("<I", 1) + b"a" + struct.pack("<I", 1) + b"b", "needs 3 BYTES elements, got 2"),
        (b"".join(struct.pack("<I", 0) for _ in range(4)), "needs 3 BYTES elements, got 4"),
    ],
    ids=["truncated-prefix", "element-past-end", "too-few", "too-many"],
)
def test_malformed_bytes_binary_is_rejected(raw: bytes, message: str) -> None:
    body, header_length = _bytes_request(raw)
    with pytest.raises(InvalidInput, match=message):
        decode(body, [spec("BYTES")], header_length=header_length)


def test_bytes_binary_invalid_utf8_is_refused_not_replaced() -> None:
    """Replacing undecodable bytes (U+FFFD) would run the model on, and log, something the client never sent."""
    raw = struct.pack("<I", 1) + b"a" + struct.pack("<I", 2) + b"\xff\xfe" + struct.pack("<I", 1) + b"z"
    body, header_length = _bytes_request(raw)
    with pytest.raises(InvalidInput, match=r"BYTES element 1 is not valid UTF-8 \(invalid start byte at byte 0\)"):
        decode(body, [spec("BYTES")], header_length=header_length)
    valid = struct.pack("<I", 2) + "é".encode() + struct.pack("<I", 0) + struct.pack("<I", 1) + b"z"
    body, header_length = _bytes_request(valid)
    assert list(decode(body, [spec("BYTES")], header_length=header_length).inputs["x"].ravel()) == ["é", "", "z"]


# -- binary framing -------------------------------------------------------------------------------------------


def _fp32_binary(payload: bytes, declared: object) -> tuple[bytes, int]:
    parameters = {"binary_data_size": declared}
    header = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "parameters": parameters}]}
    )
    return header + payload, len(header)


def test_binary_size_must_match_shape() -> None:
    body, header_length = _fp32_binary(b"\x00" * 8, 8)
    with pytest.raises(InvalidInput, match="needs 12 bytes of binary data, got 8"):
        decode(body, [spec("FP32")], header_length=header_length)


def test_binary_declared_beyond_body_is_rejected() -> None:
    body, header_length = _fp32_binary(b"\x00" * 12, 24)
    with pytest.raises(InvalidInput, match="declares 24 bytes of binary data but only 12 remain"):
        decode(body, [spec("FP32")], header_length=header_length)


def test_binary_left_over_is_rejected() -> None:
    body, header_length = _fp32_binary(b"\x00" * 16, 12)
    with pytest.raises(InvalidInput, match="4 bytes of binary data follow the last binary input"):
        decode(body, [spec("FP32")], header_length=header_length)


@pytest.mark.parametrize("size", [-1, 1.5, "12", True])
def test_binary_data_size_must_be_a_non_negative_integer(size: object) -> None:
    body, header_length = _fp32_binary(b"\x00" * 12, size)
    with pytest.raises(InvalidInput, match="binary_data_size must be a non-negative integer"):
        decode(body, [spec("FP32")], header_length=header_length)


@pytest.mark.parametrize("length", [-1, 10_000])
def test_header_length_outside_the_body_is_rejected(length: int) -> None:
    with pytest.raises(InvalidInput, match="Inference-Header-Content-Length"):
        split_body(b"{}", length)


def test_bool_binary_bytes_must_be_zero_or_one() -> None:
    header = orjson.dumps(
        {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "BOOL", "parameters": {"binary_data_size": 3}}]}
    )
    ok = decode(header + b"\x01\x00\x01", [spec("BOOL")], header_length=len(header))
    assert ok.inputs["x"].tolist() == [[True, False, True]]
    with pytest.raises(InvalidInput, match="binary bytes must be 0 or 1"):
        decode(header + b"\x01\x02\x01", [spec("BOOL")], header_length=len(header))


# -- value checks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", INTEGER_TYPES)
@given(data=st.data())
@CODEC_SETTINGS
def test_integers_out_of_range_are_rejected(datatype: str, data: st.DataObject) -> None:
    info = np.iinfo(DATATYPE_TO_NUMPY[datatype])
    # JSON integers beyond what orjson reads as int64/uint64 arrive as floats: rejected as well.
    outside = data.draw(
        st.one_of(
            st.integers(min_value=-(2**70), max_value=int(info.min) - 1),
            st.integers(min_value=int(info.max) + 1, max_value=2**70),
        ),
        label="outside",
    )
    fine = data.draw(st.integers(int(info.min), int(info.max)), label="fine")
    position = data.draw(st.integers(0, WIDTH - 1), label="position")
    row = [fine] * WIDTH
    row[position] = outside
    with pytest.raises(InvalidInput, match=f"out of range for {datatype}|must be a flat list of integers"):
        decode(json_body(datatype, row, 1), [spec(datatype)])


@pytest.mark.parametrize("datatype", INTEGER_TYPES)
def test_integer_range_edges_are_accepted(datatype: str) -> None:
    info = np.iinfo(DATATYPE_TO_NUMPY[datatype])
    row = [int(info.min), 0, int(info.max)]
    decoded = decode(json_body(datatype, row, 1), [spec(datatype)])
    assert decoded.inputs["x"].tolist() == [row]
    assert decoded.inputs["x"].dtype == DATATYPE_TO_NUMPY[datatype]


@pytest.mark.parametrize("datatype", INTEGER_TYPES)
def test_floats_are_not_integers(datatype: str) -> None:
    with pytest.raises(InvalidInput, match="must be a flat list of integers"):
        decode(json_body(datatype, [1, 2.5, 3], 1), [spec(datatype)])


@pytest.mark.parametrize(("datatype", "value"), [("FP16", 70000.0), ("FP16", -1e5), ("FP32", 1e39), ("FP32", -3.5e38)])
def test_floats_that_overflow_the_datatype_are_rejected(datatype: str, value: float) -> None:
    with pytest.raises(InvalidInput, match=f"out of range for {datatype}"):
        decode(json_body(datatype, [0.0, value, 1.0], 1), [spec(datatype)])


# The largest doubles that still round to a finite float, and the smallest that round to infinity.
FLOAT_EDGES = {
    "FP16": (float(np.nextafter(65520.0, 0)), 65520.0),
    "FP32": (float(np.nextafter(2.0**128 - 2.0**103, 0)), 2.0**128 - 2.0**103),
}


@pytest.mark.parametrize("datatype", sorted(FLOAT_EDGES))
@pytest.mark.parametrize("width", [3, 300])  # short lists and long ones are range-checked differently
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_float_range_edges_match_numpy_rounding(datatype: str, width: int, sign: float) -> None:
    finite, overflowing = FLOAT_EDGES[datatype]
    dtype = DATATYPE_TO_NUMPY[datatype]
    with np.errstate(over="ignore"):  # the oracle: what numpy's own cast makes of each edge
        assert np.isfinite(np.array([sign * finite]).astype(dtype)).all()
        assert not np.isfinite(np.array([sign * overflowing]).astype(dtype)).any()
    row = [0.5] * width
    row[width // 2] = sign * finite
    decoded = decode(json_body(datatype, row, 1), [spec(datatype, width=width)])
    assert np.isfinite(decoded.inputs["x"]).all()
    row[width // 2] = sign * overflowing
    with pytest.raises(InvalidInput, match=f"out of range for {datatype}"):
        decode(json_body(datatype, row, 1), [spec(datatype, width=width)])


@pytest.mark.parametrize("datatype", NUMERIC_TYPES)
@given(position=st.integers(0, WIDTH - 1), flag=st.booleans(), fill=st.integers(0, 100))
@CODEC_SETTINGS
def test_booleans_among_numbers_are_rejected(datatype: str, position: int, flag: bool, fill: int) -> None:
    row: list[Any] = [fill] * WIDTH
    row[position] = flag
    with pytest.raises(InvalidInput, match="booleans are not numbers|must be a flat list of"):
        decode(json_body(datatype, row, 1), [spec(datatype)])


@pytest.mark.parametrize("datatype", NUMERIC_TYPES)
def test_all_booleans_are_not_numbers(datatype: str) -> None:
    with pytest.raises(InvalidInput, match=f"is {datatype}: 'data' must be a flat list of numbers"):
        decode(json_body(datatype, [True, False, True], 1), [spec(datatype)])


@pytest.mark.parametrize("datatype", NUMERIC_TYPES)
@given(position=st.integers(0, WIDTH - 1), text=st.text(max_size=4), fill=st.integers(0, 100))
@CODEC_SETTINGS
def test_strings_are_rejected_for_numeric_types(datatype: str, position: int, text: str, fill: int) -> None:
    row: list[Any] = [fill] * WIDTH
    row[position] = text  # even "1" or "2.5": numbers must be JSON numbers
    with pytest.raises(InvalidInput, match=f"is {datatype}: 'data' must be a flat list of numbers"):
        decode(json_body(datatype, row, 1), [spec(datatype)])


@pytest.mark.parametrize("datatype", NUMERIC_TYPES)
@pytest.mark.parametrize("intruder", [None, {"v": 1}], ids=["null", "object"])
def test_null_and_objects_are_rejected_for_numeric_types(datatype: str, intruder: object) -> None:
    with pytest.raises(InvalidInput, match="must be a flat list of numbers"):
        decode(json_body(datatype, [1, intruder, 2], 1), [spec(datatype)])


@pytest.mark.parametrize(
    "row", [[1, 0, 1], [True, 0, False], ["true", "false", "true"], [1.0, 0.0, 1.0], [True, None, False]]
)
def test_bool_requires_booleans(row: list[Any]) -> None:
    with pytest.raises(InvalidInput, match="is BOOL: 'data' must be a flat list of true/false"):
        decode(json_body("BOOL", row, 1), [spec("BOOL")])


@pytest.mark.parametrize("row", [[1, 2, 3], ["a", 1, "b"], ["a", None, "b"], [True, "a", "b"]])
def test_bytes_requires_strings(row: list[Any]) -> None:
    with pytest.raises(InvalidInput, match="is BYTES: 'data' must be a flat list of strings"):
        decode(json_body("BYTES", row, 1), [spec("BYTES")])


@pytest.mark.parametrize("data", [[[1, 2, 3]], [[1], [2], [3]], [1, [2], 3]], ids=["one-row", "columns", "mixed"])
def test_nested_lists_are_rejected(data: list[Any]) -> None:
    request = {"inputs": [{"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": data}]}
    with pytest.raises(InvalidInput, match="flat list|so needs 3 values, got 1"):
        decode(request, [spec("FP32")])


def test_data_length_must_match_shape() -> None:
    request = {"inputs": [{"name": "x", "shape": [2, WIDTH], "datatype": "FP32", "data": [1, 2, 3]}]}
    with pytest.raises(InvalidInput, match=r"has shape \[2, 3\], so needs 6 values, got 3"):
        decode(request, [spec("FP32")])


# -- signature checks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        ({"name": "z", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}, "unknown input 'z'"),
        ({"name": "x", "shape": [1, 3], "datatype": "FP64", "data": [1, 2, 3]}, "has datatype 'FP64', expected FP32"),
        ({"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}, r"expected \[-1, 3\]"),
        ({"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]}, r"expected \[-1, 3\]"),
        ({"name": "x", "shape": [1, True], "datatype": "FP32", "data": [1]}, "non-negative integers"),
        ({"name": "x", "shape": [1, -3], "datatype": "FP32", "data": []}, "non-negative integers"),
        ({"name": "x", "shape": [0, 3], "datatype": "FP32", "data": []}, "must be at least 1"),
        ({"name": 7, "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}, "string 'name'"),
        ({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": "123"}, "'data' must be a flat list"),
        ({"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3], "parameters": []}, "must be an object"),
    ],
)
def test_tensor_header_is_checked_against_the_signature(tensor: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode({"inputs": [tensor]}, [spec("FP32")])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"[1, 2]", "must be a JSON object"),
        (b"{not json", "not valid JSON"),
        (b"{}", "'inputs' must be a non-empty list"),
        (b'{"inputs": []}', "'inputs' must be a non-empty list"),
        (b'{"inputs": {}}', "'inputs' must be a non-empty list"),
        (b'{"inputs": [1]}', "each input must be an object"),
        (b'{"id": 5, "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}', "'id'"),
    ],
)
def test_request_envelope_is_checked(body: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        decode(body, [spec("FP32")])


def test_each_input_once_and_all_inputs_present() -> None:
    two = [spec("FP32", "a"), spec("FP32", "b")]
    a = {"name": "a", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}
    with pytest.raises(InvalidInput, match="given more than once"):
        decode({"inputs": [a, a]}, two)
    with pytest.raises(InvalidInput, match=r"missing input\(s\): b \(FP32 \[-1, 3\]\)"):
        decode({"inputs": [a]}, two)
    b = {"name": "b", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}
    with pytest.raises(InvalidInput, match="same batch size"):
        decode({"inputs": [a, b]}, two)
    assert decode({"inputs": [a, b]}, two, batched=False).rows == 1


def test_requested_outputs() -> None:
    outputs = [spec("FP32", "y"), spec("INT64", "label")]
    base = json_body("FP32", [1, 2, 3], 1)
    assert decode(base, [spec("FP32")], outputs).outputs == [
        RequestedOutput("y", False),
        RequestedOutput("label", False),
    ]
    every_binary = {**base, "parameters": {"binary_data_output": True}}
    assert decode(every_binary, [spec("FP32")], outputs).outputs == [
        RequestedOutput("y", True),
        RequestedOutput("label", True),
    ]
    chosen = {**every_binary, "outputs": [{"name": "label", "parameters": {"binary_data": False}}]}
    assert decode(chosen, [spec("FP32")], outputs).outputs == [RequestedOutput("label", False)]
    with pytest.raises(InvalidInput, match="unknown output 'nope'; the model has outputs label, y"):
        decode({**base, "outputs": [{"name": "nope"}]}, [spec("FP32")], outputs)
    with pytest.raises(InvalidInput, match="'outputs' must be a list"):
        decode({**base, "outputs": {"name": "y"}}, [spec("FP32")], outputs)


def test_empty_outputs_list_means_every_output_as_in_triton() -> None:
    outputs = [spec("FP32", "y"), spec("INT64", "label")]
    base = json_body("FP32", [1, 2, 3], 1)
    assert [o.name for o in decode({**base, "outputs": []}, [spec("FP32")], outputs).outputs] == ["y", "label"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"outputs": [{"name": "y"}, {"name": "y"}]}, "output 'y' is requested more than once"),
        ({"outputs": [{"name": "y", "parameters": {"binary_data": "yes"}}]}, r"binary_data must be true or false"),
        ({"parameters": {"binary_data_output": 1}}, r"parameters.binary_data_output must be true or false, got 1"),
    ],
)
def test_requested_outputs_refused(extra: dict[str, object], message: str) -> None:
    outputs = [spec("FP32", "y"), spec("INT64", "label")]
    with pytest.raises(InvalidInput, match=message):
        decode({**json_body("FP32", [1, 2, 3], 1), **extra}, [spec("FP32")], outputs)


@pytest.mark.parametrize(
    ("value", "ok"), [(250, True), (0.5, True), (0, False), (-1, False), (True, False), ("9", False)]
)
def test_timeout_parameter(value: object, ok: bool) -> None:
    body = json_body("FP32", [1, 2, 3], 1, parameters={"timeout_ms": value})
    if ok:
        assert decode(body, [spec("FP32")]).timeout_ms == float(value)  # type: ignore[arg-type]
    else:
        with pytest.raises(InvalidInput, match="timeout_ms must be a positive number"):
            decode(body, [spec("FP32")])


# -- response encoding ----------------------------------------------------------------------------------------


@given(
    probabilities=st.lists(st.floats(0, 1, width=32), min_size=2, max_size=8),
    words=st.lists(st.text(max_size=6), min_size=1, max_size=4),
    binary=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    request_id=st.one_of(st.none(), st.text(max_size=8)),
)
@CODEC_SETTINGS
def test_encode_response_binary_header_length(
    probabilities: list[float], words: list[str], binary: tuple[bool, bool, bool], request_id: str | None
) -> None:
    arrays: dict[str, np.ndarray] = {
        "p": np.array(probabilities, np.float32),
        "label": np.arange(len(probabilities), dtype=np.int64)[::-1],  # not contiguous: must still be row-major
        "s": np.array(words, dtype=object),
    }
    results = [(RequestedOutput(name, flag), arrays[name]) for name, flag in zip(arrays, binary, strict=True)]
    body, header_length = encode_response("model", 7, request_id, results)

    if not any(binary):
        assert header_length is None
        header = orjson.loads(body)
    else:
        assert header_length is not None
        header = orjson.loads(body[:header_length])  # exactly the JSON part
        sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"] if "parameters" in o]
        assert header_length + sum(sizes) == len(body)
    assert header["model_name"] == "model" and header["model_version"] == "7"
    assert header.get("id") == request_id
    assert [o["name"] for o in header["outputs"]] == list(arrays)

    result = triton_result(body, header_length)
    for name, array in arrays.items():
        returned = result.as_numpy(name)
        assert returned is not None
        if name == "s":
            assert [v.decode() if isinstance(v, bytes) else v for v in returned.ravel()] == words
        else:
            assert same_values(returned, array)


def test_encode_response_byte_layout_is_little_endian() -> None:
    array = np.array([[1, 256]], dtype=np.int32)
    body, header_length = encode_response("m", 1, None, [(RequestedOutput("y", True), array)])
    assert header_length is not None
    header = orjson.loads(body[:header_length])
    assert header["outputs"] == [
        {"name": "y", "datatype": "INT32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}
    ]
    assert body[header_length:] == struct.pack("<ii", 1, 256)
