"""The stream records other processes read (design.md, "Streams"): names, fields and their encoding.

Kept free of FastAPI and onnxruntime so that `monitors` and outside consumers can import it cheaply.
Every field value is a string; tensors are JSON lists of V2 tensors with flat, row-major `data`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

LOG_STREAM_PREFIX = "gatewatch:log:"
FEEDBACK_STREAM_PREFIX = "gatewatch:feedback:"
ALERTS_STREAM = "gatewatch:alerts"
DEADLETTER_STREAM = "gatewatch:deadletter"
MONITOR_GROUP = "gatewatch-monitor"

PAYLOAD_FULL = "full"
PAYLOAD_SAMPLED_OUT = "sampled_out"
PAYLOAD_TRUNCATED = "truncated"

ROLE_PRIMARY = "primary"
ROLE_SHADOW = "shadow"


def log_stream(name: str) -> str:
    return f"{LOG_STREAM_PREFIX}{name}"


def feedback_stream(name: str) -> str:
    return f"{FEEDBACK_STREAM_PREFIX}{name}"


@dataclass(frozen=True)
class PayloadPolicy:
    """What of a request's tensors is written: a sampled share, never the redacted inputs, at most a size cap."""

    sample: float = 1.0
    redact: frozenset[str] = frozenset()
    max_tensor_bytes: int = 65536


@dataclass(slots=True)
class Exchange:
    """One request and its answer as the gateway saw them, before encoding (encoding happens off the hot path)."""

    request_id: str
    arrived_ms: int
    endpoint: str
    variant: str
    role: str
    model: str
    version: int | None
    rows: int
    status: int
    latency_ms: float
    error: str = ""
    inputs: Mapping[str, np.ndarray] | None = None
    input_types: Mapping[str, str] = field(default_factory=dict)
    outputs: list[tuple[str, np.ndarray]] | None = None


# The fields of a log record, in the order they are written.
LOG_FIELDS = (
    "uid", "id", "ts", "endpoint", "variant", "role", "model", "version", "rows",
    "inputs", "outputs", "payload", "redacted", "status", "latency_ms", "error",
)


def encode_exchange(exchange: Exchange, uid: str, policy: PayloadPolicy, sampled_in: bool) -> dict[str, str]:
    """The stream entry's fields for one exchange."""
    return dict(zip(LOG_FIELDS, exchange_values(exchange, uid, policy, sampled_in), strict=True))


def exchange_values(exchange: Exchange, uid: str, policy: PayloadPolicy, sampled_in: bool) -> tuple[str, ...]:
    """The values of `LOG_FIELDS` for one exchange (the writer's hot path: no dict per record)."""
    payload = PAYLOAD_FULL if sampled_in else PAYLOAD_SAMPLED_OUT
    redacted: list[str] = []
    inputs_json = outputs_json = "[]"
    if sampled_in:
        input_tensors = []
        for name, array in (exchange.inputs or {}).items():
            if name in policy.redact:
                redacted.append(name)
                input_tensors.append(_tensor(name, exchange.input_types.get(name), array, None))
                continue
            tensor, truncated = _tensor_with_cap(name, exchange.input_types.get(name), array, policy.max_tensor_bytes)
            if truncated:
                payload = PAYLOAD_TRUNCATED
            input_tensors.append(tensor)
        output_tensors = []
        for name, array in exchange.outputs or ():
            tensor, truncated = _tensor_with_cap(name, None, array, policy.max_tensor_bytes)
            if truncated:
                payload = PAYLOAD_TRUNCATED
            output_tensors.append(tensor)
        inputs_json = orjson.dumps(input_tensors, option=orjson.OPT_SERIALIZE_NUMPY).decode()
        outputs_json = orjson.dumps(output_tensors, option=orjson.OPT_SERIALIZE_NUMPY).decode()
    version = exchange.version
    return (
        uid,
        exchange.request_id,
        str(exchange.arrived_ms),
        exchange.endpoint,
        exchange.variant,
        exchange.role,
        exchange.model,
        "" if version is None else str(version),
        str(exchange.rows),
        inputs_json,
        outputs_json,
        payload,
        ",".join(redacted),
        str(exchange.status),
        f"{exchange.latency_ms:.3f}",
        exchange.error,
    )


def _tensor_with_cap(
    name: str, datatype: str | None, array: np.ndarray, max_bytes: int
) -> tuple[dict[str, Any], bool]:
    if array.dtype.kind in "OUS":
        return _text_tensor_with_cap(name, datatype, array, max_bytes)
    flat = array.ravel()  # C-contiguous (copied only if needed): orjson writes it natively, no object per element
    if flat.dtype.char == "e":  # float16: written as float32, which orjson prints exactly
        flat = flat.astype(np.float32)
    limit = max_bytes // array.dtype.itemsize
    truncated = flat.size > limit
    return _tensor(name, datatype, array, flat[:limit] if truncated else flat), truncated


def _text_tensor_with_cap(
    name: str, datatype: str | None, array: np.ndarray, max_bytes: int
) -> tuple[dict[str, Any], bool]:
    kept: list[str] = []
    used = 0
    for value in array.reshape(-1):
        if isinstance(value, bytes):
            used += len(value)
            text = value.decode("utf-8", "replace")
        else:
            text = str(value)
            used += len(text.encode("utf-8", "replace"))  # the cap is in bytes, like a numeric tensor's
        if used > max_bytes:
            return _tensor(name, datatype or "BYTES", array, kept), True
        kept.append(text)
    return _tensor(name, datatype or "BYTES", array, kept), False


def _tensor(name: str, datatype: str | None, array: np.ndarray, data: object) -> dict[str, Any]:
    return {
        "name": name,
        "shape": array.shape,
        "datatype": datatype or _datatype(array),
        "data": data,
    }


_KIND_DATATYPES = {("b", 1): "BOOL", ("f", 2): "FP16", ("f", 4): "FP32", ("f", 8): "FP64"}
_DATATYPES: dict[np.dtype[Any], str] = {}  # filled lazily: one lookup per tensor instead of string building


def _datatype(array: np.ndarray) -> str:
    known = _DATATYPES.get(array.dtype)
    if known is None:
        known = _DATATYPES[array.dtype] = _datatype_of(array.dtype)
    return known


def _datatype_of(dtype: np.dtype[Any]) -> str:
    kind, size = dtype.kind, dtype.itemsize
    if kind in "iu":
        return f"{'UINT' if kind == 'u' else 'INT'}{size * 8}"
    return _KIND_DATATYPES.get((kind, size), "BYTES")


def decode_tensors(raw: str | bytes) -> dict[str, np.ndarray]:
    """A logged `inputs`/`outputs` field back to arrays; redacted or truncated tensors come back flat/partial."""
    result: dict[str, np.ndarray] = {}
    for tensor in orjson.loads(raw):
        data = tensor.get("data")
        if data is None:
            continue
        array = np.asarray(data)
        shape = tensor.get("shape") or []
        if array.size == int(np.prod(shape)):
            array = array.reshape(shape)
        result[tensor["name"]] = array
    return result


def feedback_fields(request_id: str, ts_ms: int, label: object = None, reward: float | None = None) -> dict[str, str]:
    fields = {"id": request_id, "ts": str(ts_ms)}
    if label is not None:
        fields["label"] = orjson.dumps(label).decode()
    if reward is not None:
        fields["reward"] = repr(float(reward))
    return fields


def as_text(fields: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """Redis returns bytes; consumers want the text fields."""
    return {_text(k): _text(v) for k, v in fields.items()}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def uids(entries: Iterable[tuple[Any, Mapping[bytes, bytes]]]) -> set[str]:
    return {fields[b"uid"].decode() for _, fields in entries if b"uid" in fields}
