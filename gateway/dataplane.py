"""DataPlane: the Open Inference Protocol's logic, free of HTTP types.

`api/v2.py` turns HTTP into `InferCall`s and `InferAnswer`s back into HTTP; everything between (resolve the
target, decode and check the tensors, batch, run, encode) happens here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from gateway.errors import GatewayError, InvalidInput, NotReady
from gateway.metrics import GatewayMetrics
from gateway.protocol.codecs import (
    DecodedRequest,
    RequestedOutput,
    decode_request,
    encode_response,
    parse_header,
    split_body,
)
from gateway.records import ROLE_PRIMARY, Exchange, feedback_fields, feedback_stream
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


@dataclass
class _Attempt:
    """What one request got as far as, for its metrics and its log record, whether it succeeded or not."""

    target: _Target | None = None
    decoded: DecodedRequest | None = None
    outputs: list[np.ndarray] = field(default_factory=list)


class LogSink(Protocol):
    """Where exchanges and feedback go (the Redis log writer); must never block."""

    def log(self, exchange: Exchange) -> None: ...

    def feedback(self, stream: str, fields: dict[str, str]) -> None: ...


class DataPlane:
    def __init__(self, manager: ModelManager, metrics: GatewayMetrics, log: LogSink | None = None) -> None:
        self._manager = manager
        self._metrics = metrics
        self._log = log
        self._request_counters: dict[tuple[str, ...], Any] = {}
        self._duration_histograms: dict[tuple[str, ...], Any] = {}

    def attach_log(self, log: LogSink | None) -> None:
        """Set once the log writer is up (it needs Redis, which the app's lifespan opens)."""
        self._log = log

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
        arrived_ms = int(time.time() * 1000)
        self._metrics.in_flight.inc()
        attempt = _Attempt()
        status, error = 500, ""
        try:
            answer = await self._infer_on(call, attempt)
            status = 200
            return answer
        except GatewayError as exc:
            status, error = exc.status_code, exc.message
            raise
        finally:
            self._metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            self._record(call.name, attempt.target, str(status), elapsed)
            if self._log is not None and attempt.target is not None:
                self._log.log(_exchange(call, attempt, arrived_ms, status, elapsed * 1000, error))

    async def _infer_on(self, call: InferCall, attempt: _Attempt) -> InferAnswer:
        attempt.target = target = self._resolve(call.name, call.version)
        loaded = target.loaded
        runner = loaded.runner
        raw_json, binary = split_body(call.body, call.header_length)
        header = parse_header(raw_json)
        attempt.decoded = decoded = decode_request(
            header, binary, raw_json, runner.inputs, runner.outputs, runner.batched
        )
        timeout_ms = call.timeout_ms if call.timeout_ms is not None else decoded.timeout_ms
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        attempt.outputs = outputs = await loaded.batcher.infer(decoded.inputs, decoded.rows, deadline)
        body, header_length = encode_response(
            call.name, loaded.version, decoded.id, _select(decoded.outputs, runner.output_names, outputs)
        )
        return InferAnswer(body, header_length, loaded.model, loaded.version, target.variant)

    def feedback(self, name: str, body: bytes) -> None:
        """Ground truth or a reward for an earlier request, queued for `gatewatch:feedback:{name}`."""
        self._manager.state(name)  # 404 for a name we do not serve
        if self._log is None:
            raise NotReady("prediction logging is disabled (log_enabled: false): feedback has nowhere to go")
        payload = parse_header(body)
        request_id = payload.get("id")
        if not isinstance(request_id, str) or not request_id:
            raise InvalidInput("feedback needs 'id': the x-request-id of the request it refers to")
        reward = payload.get("reward")
        if "label" not in payload and reward is None:
            raise InvalidInput("feedback needs 'label' (ground truth) or 'reward' (a number)")
        if reward is not None and (type(reward) not in (int, float) or not np.isfinite(reward)):
            raise InvalidInput(f"'reward' must be a finite number, got {reward!r}")
        fields = feedback_fields(request_id, int(time.time() * 1000), payload.get("label"), reward)
        self._log.feedback(feedback_stream(name), fields)

    def _resolve(self, name: str, version: str | None) -> _Target:
        ref = None if version is None else parse_version_ref(version)
        return _Target(self._manager.resolve(name, ref), DEFAULT_VARIANT)

    def _record(self, name: str, target: _Target | None, code: str, seconds: float) -> None:
        if target is None:
            labels = (_UNKNOWN, DEFAULT_VARIANT, _UNKNOWN, _UNKNOWN)
        else:
            labels = (name, target.variant, target.loaded.model, str(target.loaded.version))
        key = (*labels, code)
        counter = self._request_counters.get(key)
        if counter is None:
            counter = self._request_counters[key] = self._metrics.requests.labels(*key)
        counter.inc()
        histogram = self._duration_histograms.get(labels)
        if histogram is None:
            histogram = self._duration_histograms[labels] = self._metrics.request_duration.labels(*labels)
        histogram.observe(seconds)


def _exchange(
    call: InferCall, attempt: _Attempt, arrived_ms: int, status: int, latency_ms: float, error: str
) -> Exchange:
    assert attempt.target is not None
    loaded, decoded = attempt.target.loaded, attempt.decoded
    outputs = list(zip(loaded.runner.output_names, attempt.outputs, strict=True)) if attempt.outputs else None
    return Exchange(
        request_id=call.request_id,
        arrived_ms=arrived_ms,
        endpoint=call.name,
        variant=attempt.target.variant,
        role=ROLE_PRIMARY,
        model=loaded.model,
        version=loaded.version,
        rows=decoded.rows if decoded is not None else 0,
        status=status,
        latency_ms=latency_ms,
        error=error,
        inputs=decoded.inputs if decoded is not None else None,
        input_types=loaded.runner.input_types,
        outputs=outputs,
    )


def _select(
    requested: list[RequestedOutput], names: list[str], outputs: list[np.ndarray]
) -> list[tuple[RequestedOutput, np.ndarray]]:
    by_name = dict(zip(names, outputs, strict=True))
    return [(choice, by_name[choice.name]) for choice in requested]
