"""V2 tensors <-> numpy: the one datatype table, request decoding and response encoding.

Decoding validates against the model's signature rather than a generic schema: the JSON body is parsed once by
orjson, each input's flat `data` list goes to numpy in one call, and the checks that must look at elements one by
one (booleans hiding among numbers) run only when the raw body contains a `true`/`false` literal at all.
Binary tensors (Triton's binary tensor data extension) are views over the request body, not copies.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any, NamedTuple

import numpy as np
import orjson

from gateway.errors import InvalidInput

DATATYPE_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}

ORT_TO_DATATYPE: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

_INTEGER_KINDS = frozenset("iu")
_NUMERIC_KINDS = frozenset("iuf")
_LENGTH_PREFIX = struct.Struct("<I")


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the graph declares it; -1 marks a dynamic dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.name} ({self.datatype} {list(self.shape)})"

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


class RequestedOutput(NamedTuple):
    name: str
    binary: bool


@dataclass
class DecodedRequest:
    """An inference request checked against one model signature."""

    id: str | None
    inputs: dict[str, np.ndarray]
    rows: int
    outputs: Sequence[RequestedOutput]
    timeout_ms: float | None


def split_body(body: bytes, header_length: int | None) -> tuple[bytes, memoryview]:
    """Separate the JSON header from the binary tensor section (`Inference-Header-Content-Length`)."""
    if header_length is None:
        return body, memoryview(b"")
    if header_length < 0 or header_length > len(body):
        raise InvalidInput(f"Inference-Header-Content-Length is {header_length} but the body has {len(body)} bytes")
    view = memoryview(body)
    return bytes(view[:header_length]), view[header_length:]


def parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise InvalidInput("request body must be a JSON object with an 'inputs' list")
    return header


def decode_request(
    header: dict[str, Any],
    binary: memoryview,
    raw_json: bytes,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    batched: bool,
) -> DecodedRequest:
    """Check a parsed V2 request against the model's signature and turn its tensors into numpy arrays."""
    request_inputs = header.get("inputs")
    if not isinstance(request_inputs, list) or not request_inputs:
        raise InvalidInput("'inputs' must be a non-empty list of tensors")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    parameters = _parameters(header, "request")
    by_name = {spec.name: spec for spec in inputs}
    has_bool_literal = b"true" in raw_json or b"false" in raw_json
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in request_inputs:
        spec, shape = _check_tensor_header(tensor, by_name, arrays)
        binary_size = _parameters(tensor, f"input {spec.name!r}").get("binary_data_size")
        if binary_size is None:
            arrays[spec.name] = _from_json(tensor.get("data"), spec, shape, has_bool_literal)
        else:
            chunk, offset = _take_binary(binary, offset, binary_size, spec.name)
            arrays[spec.name] = _from_binary(chunk, spec, shape)
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes of binary data follow the last binary input")
    missing = [spec.describe() for spec in inputs if spec.name not in arrays]
    if missing:
        raise InvalidInput(f"missing input(s): {', '.join(missing)}")
    return DecodedRequest(
        id=request_id,
        inputs=arrays,
        rows=_rows(arrays) if batched else 1,
        outputs=_requested_outputs(header, parameters, outputs),
        timeout_ms=_timeout(parameters),
    )


def declared_rows(header: dict[str, Any], batched: bool) -> int:
    """The batch size a request states for itself (its first input's first dimension), for the log record of a
    request refused while decoding; 0 when it states none."""
    if not batched:
        return 1
    inputs = header.get("inputs")
    first = inputs[0] if isinstance(inputs, list) and inputs else None
    shape = first.get("shape") if isinstance(first, dict) else None
    if isinstance(shape, list) and shape and type(shape[0]) is int and shape[0] > 0:
        return shape[0]
    return 0


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = obj.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise InvalidInput(f"'parameters' of the {where} must be an object")
    return parameters


def _check_tensor_header(
    tensor: object, by_name: dict[str, TensorSpec], seen: dict[str, np.ndarray]
) -> tuple[TensorSpec, tuple[int, ...]]:
    if not isinstance(tensor, dict):
        raise InvalidInput("each input must be an object with name, shape, datatype and data")
    name = tensor.get("name")
    if not isinstance(name, str):
        raise InvalidInput("each input needs a string 'name'")
    spec = by_name.get(name)
    if spec is None:
        expected = ", ".join(s.describe() for s in by_name.values())
        raise InvalidInput(f"unknown input {name!r}; the model expects {expected}")
    if name in seen:
        raise InvalidInput(f"input {name!r} is given more than once")
    datatype = tensor.get("datatype")
    if datatype != spec.datatype:
        raise InvalidInput(f"input {name!r} has datatype {datatype!r}, expected {spec.datatype}")
    shape = tensor.get("shape")
    if not isinstance(shape, list):
        raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    for dim in shape:  # plain loops: this runs per tensor per request, and generators cost more than the checks
        if type(dim) is not int or dim < 0:
            raise InvalidInput(f"input {name!r}: 'shape' must be a list of non-negative integers")
    declared = spec.shape
    if len(shape) != len(declared):
        raise InvalidInput(f"input {name!r} has shape {shape}, expected {list(declared)} (-1 = any size)")
    for dim, want in zip(shape, declared, strict=True):  # lengths checked just above
        if want != dim and want != -1:
            raise InvalidInput(f"input {name!r} has shape {shape}, expected {list(declared)} (-1 = any size)")
    return spec, tuple(shape)


def _from_json(data: object, spec: TensorSpec, shape: tuple[int, ...], has_bool_literal: bool) -> np.ndarray:
    if not isinstance(data, list):
        raise InvalidInput(f"input {spec.name!r}: 'data' must be a flat list of values in row-major order")
    count = prod(shape)
    if len(data) != count:
        # Nested rows ([[1, 2, 3]]) also miscount; name the real mistake (only on this error path: no cost otherwise).
        if any(isinstance(v, list) for v in data):
            raise InvalidInput(f"input {spec.name!r}: 'data' must be a flat list, not nested lists")
        raise InvalidInput(f"input {spec.name!r} has shape {list(shape)}, so needs {count} values, got {len(data)}")
    if spec.datatype == "BYTES":
        if not all(isinstance(v, str) for v in data):
            raise InvalidInput(f"input {spec.name!r} is BYTES: 'data' must be a flat list of strings")
        return np.array(data, dtype=object).reshape(shape)
    try:
        array = np.asarray(data)
    except ValueError as exc:
        raise InvalidInput(f"input {spec.name!r}: 'data' must be a flat list, not nested lists") from exc
    if array.ndim != 1:
        raise InvalidInput(f"input {spec.name!r}: 'data' must be a flat list, not nested lists")
    if array.dtype.kind == "f" and spec.datatype == "UINT64" and all(type(v) is int for v in data):
        # No numpy integer type holds both ints below 2**63 and above it, so numpy reads such a list as float64
        # (losing precision); UINT64 holds every one of them that is not negative.
        if min(data) < 0:
            raise InvalidInput(f"input {spec.name!r}: values out of range for UINT64")
        array = np.array(data, dtype=np.uint64)
    _check_json_kinds(array, data, spec, has_bool_literal)
    return _cast(array, data, spec).reshape(shape)


def _check_json_kinds(array: np.ndarray, data: list[Any], spec: TensorSpec, has_bool_literal: bool) -> None:
    kind = array.dtype.kind
    if not data:
        return
    if spec.datatype == "BOOL":
        if kind != "b":
            raise InvalidInput(f"input {spec.name!r} is BOOL: 'data' must be a flat list of true/false")
        return
    if kind not in _NUMERIC_KINDS:
        raise InvalidInput(f"input {spec.name!r} is {spec.datatype}: 'data' must be a flat list of numbers")
    if DATATYPE_TO_NUMPY[spec.datatype].kind in _INTEGER_KINDS and kind not in _INTEGER_KINDS:
        raise InvalidInput(f"input {spec.name!r} is {spec.datatype}: 'data' must be a flat list of integers")
    # numpy turns True into 1 silently; only a body holding a boolean literal can hide one.
    if has_bool_literal and any(v is True or v is False for v in data):
        raise InvalidInput(f"input {spec.name!r} is {spec.datatype}: booleans are not numbers")


def _cast(array: np.ndarray, data: list[Any], spec: TensorSpec) -> np.ndarray:
    """`array` (what numpy made of the JSON list `data`) as the input's dtype; values it cannot hold are refused
    before casting, so a cast never overflows (JSON numbers are finite: only FP16/FP32 and integers can)."""
    target = DATATYPE_TO_NUMPY[spec.datatype]
    bounds = _RANGES.get(spec.datatype)
    if bounds is not None and array.size:
        low, high = _extremes(array, data)
        if low < bounds[0] or high > bounds[1]:
            raise InvalidInput(f"input {spec.name!r}: values out of range for {spec.datatype}")
    return array.astype(target, copy=False)


def _float_range(smallest_overflow: float) -> tuple[float, float]:
    """The closed range of finite values that round to a finite float (beyond it, the cast gives ±inf)."""
    largest = float(np.nextafter(smallest_overflow, 0))
    return -largest, largest


# Values each datatype can hold. The float bounds are the largest doubles that do not round to infinity:
# 2**128 - 2**103 is half an ulp above FP32's maximum (a tie rounds to even, which is infinity), 65520 FP16's.
_RANGES: dict[str, tuple[float, float]] = {
    **{
        name: (int(np.iinfo(dtype).min), int(np.iinfo(dtype).max))
        for name, dtype in DATATYPE_TO_NUMPY.items()
        if dtype.kind in _INTEGER_KINDS
    },
    "FP16": _float_range(65520.0),
    "FP32": _float_range(2.0**128 - 2.0**103),
}
_PYTHON_EXTREMES_UP_TO = 64  # elements: below this, min()/max() over the list beat numpy's reductions (~1 µs each)


def _extremes(array: np.ndarray, data: list[Any]) -> tuple[Any, Any]:
    if len(data) <= _PYTHON_EXTREMES_UP_TO:
        return min(data), max(data)
    return array.min(), array.max()


def _take_binary(binary: memoryview, offset: int, size: object, name: str) -> tuple[memoryview, int]:
    if type(size) is not int or size < 0:
        raise InvalidInput(f"input {name!r}: binary_data_size must be a non-negative integer")
    end = offset + size
    if end > len(binary):
        raise InvalidInput(
            f"input {name!r} declares {size} bytes of binary data but only {len(binary) - offset} remain"
        )
    return binary[offset:end], end


def _from_binary(chunk: memoryview, spec: TensorSpec, shape: tuple[int, ...]) -> np.ndarray:
    count = prod(shape)
    if spec.datatype == "BYTES":
        return np.array(_unpack_bytes(chunk, count, spec.name), dtype=object).reshape(shape)
    dtype = DATATYPE_TO_NUMPY[spec.datatype]
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {spec.name!r} has shape {list(shape)} of {spec.datatype}, so needs "
            f"{count * dtype.itemsize} bytes of binary data, got {len(chunk)}"
        )
    if spec.datatype == "BOOL":
        raw = np.frombuffer(chunk, dtype=np.uint8)
        if raw.size and raw.max() > 1:
            raise InvalidInput(f"input {spec.name!r} is BOOL: binary bytes must be 0 or 1")
        return raw.view(np.bool_).reshape(shape)
    return np.frombuffer(chunk, dtype=dtype.newbyteorder("<")).reshape(shape)


def _unpack_bytes(chunk: memoryview, count: int, name: str) -> list[str]:
    values: list[str] = []
    position = 0
    while position < len(chunk):
        if position + 4 > len(chunk):
            raise InvalidInput(f"input {name!r}: truncated BYTES length prefix")
        (length,) = _LENGTH_PREFIX.unpack_from(chunk, position)
        position += 4
        if position + length > len(chunk):
            raise InvalidInput(f"input {name!r}: BYTES element runs past the binary data")
        try:
            values.append(bytes(chunk[position : position + length]).decode("utf-8"))
        except UnicodeDecodeError as exc:
            # ONNX string tensors hold text: replacing the bytes would run the model on something else than sent.
            raise InvalidInput(
                f"input {name!r}: BYTES element {len(values)} is not valid UTF-8 ({exc.reason} at byte {exc.start}); "
                "the model's string tensors take UTF-8 text"
            ) from None
        position += length
    if len(values) != count:
        raise InvalidInput(f"input {name!r} needs {count} BYTES elements, got {len(values)}")
    return values


def _rows(arrays: dict[str, np.ndarray]) -> int:
    sizes = {array.shape[0] for array in arrays.values()}
    if len(sizes) != 1:
        raise InvalidInput(f"all inputs must have the same batch size (first dimension), got {sorted(sizes)}")
    rows = int(sizes.pop())
    if rows < 1:
        raise InvalidInput("the batch dimension (first dimension) must be at least 1")
    return rows


def _requested_outputs(
    header: dict[str, Any], parameters: dict[str, Any], outputs: Sequence[TensorSpec]
) -> list[RequestedOutput]:
    default_binary = _flag(parameters, "binary_data_output", False, "parameters")
    requested = header.get("outputs")
    if requested is not None and not isinstance(requested, list):
        raise InvalidInput("'outputs' must be a list of {name, parameters} objects")
    if not requested:  # absent or [] (as Triton and KServe read it): every output
        return [RequestedOutput(spec.name, default_binary) for spec in outputs]
    known = {spec.name for spec in outputs}
    chosen: list[RequestedOutput] = []
    for entry in requested:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise InvalidInput("each requested output needs a string 'name'")
        name = entry["name"]
        if name not in known:
            raise InvalidInput(f"unknown output {name!r}; the model has outputs {', '.join(sorted(known))}")
        if any(earlier.name == name for earlier in chosen):
            raise InvalidInput(f"output {name!r} is requested more than once")
        parameters = _parameters(entry, f"output {name!r}")
        binary = _flag(parameters, "binary_data", default_binary, f"output {name!r} parameters")
        chosen.append(RequestedOutput(name, binary))
    return chosen


def _flag(parameters: dict[str, Any], key: str, default: bool, where: str) -> bool:
    value = parameters.get(key, default)
    if type(value) is not bool:
        raise InvalidInput(f"{where}.{key} must be true or false, got {value!r}")
    return value


def _timeout(parameters: dict[str, Any]) -> float | None:
    value = parameters.get("timeout_ms")
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 < value < math.inf:
        raise InvalidInput("parameters.timeout_ms must be a positive number of milliseconds")
    return float(value)


def encode_response(
    model_name: str,
    model_version: int,
    request_id: str | None,
    results: Iterable[tuple[RequestedOutput, np.ndarray]],
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the JSON header's length."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for requested, array in results:
        entry: dict[str, Any] = {
            "name": requested.name,
            "datatype": numpy_datatype(array),
            "shape": list(array.shape),
        }
        if requested.binary:
            blob = _binary_blob(array)
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = _json_data(array)
        described.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": str(model_version)}
    if request_id is not None:
        response["id"] = request_id
    response["outputs"] = described
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return header + b"".join(blobs), len(header)


def numpy_datatype(array: np.ndarray) -> str:
    datatype = _NUMPY_TO_DATATYPE.get(array.dtype)
    if datatype is None:
        if array.dtype.kind not in "OUS":
            raise ValueError(f"no V2 datatype for numpy dtype {array.dtype}")
        datatype = "BYTES"
    return datatype


# numpy dtypes hash and compare by value, so outputs in either byte order find their datatype in one lookup.
_NUMPY_TO_DATATYPE: dict[np.dtype[Any], str] = {
    dtype.newbyteorder(order): name
    for name, dtype in DATATYPE_TO_NUMPY.items()
    if name != "BYTES"
    for order in ("<", ">")
}


def _json_data(array: np.ndarray) -> object:
    if array.dtype.kind in "OUS":
        return [v.decode("utf-8", errors="replace") if isinstance(v, bytes) else str(v) for v in array.ravel()]
    return np.ascontiguousarray(array).ravel()


def _binary_blob(array: np.ndarray) -> bytes:
    if array.dtype.kind in "OUS":
        parts: list[bytes] = []
        for value in array.ravel():
            raw = value if isinstance(value, bytes) else str(value).encode("utf-8")
            parts.append(_LENGTH_PREFIX.pack(len(raw)) + raw)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
