"""DataPlane: the Open Inference Protocol's logic, free of HTTP types.

`api/v2.py` turns HTTP into `InferCall`s and `InferAnswer`s back into HTTP; everything between (resolve the
target, decode and check the tensors, batch, run, encode) happens here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.protocol.codecs import (
    RequestedOutput,
    decode_request,
    encode_response,
    parse_header,
    split_body,
)
from gateway.runtime.manager import LoadedVersion, ModelManager
from registry_client.base import parse_version_ref

SERVER_NAME = "gatewatch"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data",)
PLATFORM = "onnxruntime_onnx"
DEFAULT_VARIANT = "default"
_UNKNOWN = "_unknown"  # label for requests that named nothing we serve: keeps label cardinality bounded


@dataclass(frozen=True)
class InferCall:
    name: str
    version: str | None
    body: bytes
    header_length: int | None
    request_id: str
    timeout_ms: float | None


@dataclass(frozen=True)
class InferAnswer:
    body: bytes
    header_length: int | None
    model: str
    version: int
    variant: str


@dataclass(frozen=True)
class _Target:
    loaded: LoadedVersion
    variant: str


class DataPlane:
    def __init__(self, manager: ModelManager, metrics: GatewayMetrics) -> None:
        self._manager = manager
        self._metrics = metrics
        self._request_counters: dict[tuple[str, ...], Any] = {}
        self._duration_histograms: dict[tuple[str, ...], Any] = {}

    # -- health and metadata ------------------------------------------------------------------------------

    def ready(self) -> bool:
        return self._manager.ready

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        loaded = self._resolve(name, version).loaded
        state = self._manager.state(loaded.model)
        versions = [version] if version is not None else [str(v) for v in sorted(state.versions)]
        return {
            "name": name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [spec.metadata() for spec in loaded.runner.inputs],
            "outputs": [spec.metadata() for spec in loaded.runner.outputs],
            "aliases": {alias: str(v) for alias, v in sorted(state.aliases.items())},
        }

    def model_ready(self, name: str, version: str | None) -> bool:
        self._resolve(name, version)
        return True

    # -- inference ----------------------------------------------------------------------------------------

    async def infer(self, call: InferCall) -> InferAnswer:
        started = time.perf_counter()
        self._metrics.in_flight.inc()
        labels = (_UNKNOWN, DEFAULT_VARIANT, _UNKNOWN, _UNKNOWN)
        code = "500"
        try:
            target = self._resolve(call.name, call.version)
            labels = (call.name, target.variant, target.loaded.model, str(target.loaded.version))
            answer = await self._infer_on(target, call)
            code = "200"
            return answer
        except GatewayError as exc:
            code = str(exc.status_code)
            raise
        finally:
            self._metrics.in_flight.dec()
            self._record(labels, code, time.perf_counter() - started)

    async def _infer_on(self, target: _Target, call: InferCall) -> InferAnswer:
        loaded = target.loaded
        runner = loaded.runner
        raw_json, binary = split_body(call.body, call.header_length)
        header = parse_header(raw_json)
        decoded = decode_request(header, binary, raw_json, runner.inputs, runner.outputs, runner.batched)
        timeout_ms = call.timeout_ms if call.timeout_ms is not None else decoded.timeout_ms
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        outputs = await loaded.batcher.infer(decoded.inputs, decoded.rows, deadline)
        body, header_length = encode_response(
            call.name, loaded.version, decoded.id, _select(decoded.outputs, runner.output_names, outputs)
        )
        return InferAnswer(body, header_length, loaded.model, loaded.version, target.variant)

    def _resolve(self, name: str, version: str | None) -> _Target:
        ref = None if version is None else parse_version_ref(version)
        return _Target(self._manager.resolve(name, ref), DEFAULT_VARIANT)

    def _record(self, labels: tuple[str, str, str, str], code: str, seconds: float) -> None:
        key = (*labels, code)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self._metrics.requests.labels(*key)
        counter.inc()
        histogram = self._duration_histograms.get(labels)
        if histogram is None:
            histogram = self._duration_histograms[labels] = self._metrics.request_duration.labels(*labels)
        histogram.observe(seconds)


def _select(
    requested: list[RequestedOutput], names: list[str], outputs: list[np.ndarray]
) -> list[tuple[RequestedOutput, np.ndarray]]:
    by_name = dict(zip(names, outputs, strict=True))
    return [(choice, by_name[choice.name]) for choice in requested]
