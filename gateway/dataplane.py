"""DataPlane: the Open Inference Protocol's logic, free of HTTP types.

`api/v2.py` turns HTTP into `InferCall`s and `InferAnswer`s back into HTTP; everything between happens here:
route the name to a variant (or a model's default version), decode and check the tensors against that version's
signature, batch and run, encode, then — after the answer is ready — log it and mirror it to shadows.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np

from gateway.errors import ClientClosedRequest, GatewayError, InvalidInput, NotReady
from gateway.metrics import GatewayMetrics
from gateway.protocol.codecs import (
    DecodedRequest,
    RequestedOutput,
    declared_rows,
    decode_request,
    encode_response,
    parse_header,
    split_body,
)
from gateway.records import ROLE_PRIMARY, Exchange, feedback_fields, feedback_stream
from gateway.routing.router import CompiledRoute, Router, predictions_of
from gateway.routing.shadow import PrimaryResult, ShadowMirror
from gateway.runtime.manager import LoadedVersion, ModelManager
from registry_client.base import parse_version_ref

SERVER_NAME = "gatewatch"
SERVER_VERSION = "0.1.0"
EXTENSIONS = ("binary_tensor_data",)
PLATFORM = "onnxruntime_onnx"
DEFAULT_VARIANT = "default"
REQUEST_ID_HEADER = "x-request-id"
_UNKNOWN = "_unknown"  # label for requests that named nothing we serve: keeps label cardinality bounded
_GONE_WHILE_RUNNING = "the client closed the connection while its request ran; the answer went nowhere"


# The per-request values below are NamedTuples: immutable like frozen dataclasses, but built in a fraction of the
# time (a frozen dataclass sets each field through object.__setattr__; at c=64 their __init__s were 2.5 % of CPU).


class InferCall(NamedTuple):
    name: str
    version: str | None
    body: bytes
    header_length: int | None
    request_id: str
    timeout_ms: float | None
    headers: Mapping[str, str] = MappingProxyType({})
    """Request headers (case-insensitive mapping), for sticky routing."""
    connection_gone: Callable[[], bool] | None = None
    """True once the client has gone (when the server can tell): its request is dropped if still queued."""


class InferAnswer(NamedTuple):
    body: bytes
    header_length: int | None
    model: str
    version: int
    variant: str


class _Target(NamedTuple):
    loaded: LoadedVersion
    variant: str
    route: CompiledRoute | None = None


@dataclass
class _Attempt:
    """What one request got as far as, for its metrics and its log record, whether it succeeded or not."""

    target: _Target | None = None
    decoded: DecodedRequest | None = None
    outputs: list[np.ndarray] = field(default_factory=list)
    declared_rows: int = 0  # what a request refused while decoding said its batch size was


class FeedbackRelaySink(Protocol):
    """Where feedback for a request this process did not answer goes (the other processes, through Redis)."""

    def publish(self, endpoint: str, request_id: str, label: object, reward: float | None) -> None: ...


class LogSink(Protocol):
    """Where exchanges and feedback go (the Redis log writer); must never block."""

    def log(self, exchange: Exchange) -> None: ...

    def feedback(self, stream: str, fields: dict[str, str]) -> None: ...


class DataPlane:
    def __init__(self, manager: ModelManager, metrics: GatewayMetrics, router: Router, shadows: ShadowMirror) -> None:
        self._manager = manager
        self._metrics = metrics
        self._router = router
        self._shadows = shadows
        self._log: LogSink | None = None
        self._relay: FeedbackRelaySink | None = None
        self._request_counters: dict[tuple[str, ...], Any] = {}
        self._duration_histograms: dict[tuple[str, ...], Any] = {}
        self._in_flight = 0
        self._in_flight_gauge: Any = None  # set on every change only when it cannot be read at scrape time
        if metrics.gauges_read_at_scrape:
            metrics.in_flight.set_function(lambda: self._in_flight)
        else:
            self._in_flight_gauge = metrics.in_flight

    def attach_relay(self, relay: FeedbackRelaySink | None) -> None:
        self._relay = relay

    def attach_log(self, log: LogSink | None) -> None:
        """Set once the log writer is up (it needs Redis, which the app's lifespan opens)."""
        self._log = log
        self._shadows.log = log

    # -- health and metadata ------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Models loaded (at least one version, when the registry lists any), and every variant of every route
        resolves to a loaded version."""
        if not self._manager.ready or not self._manager.serves_something():
            return False
        for route in self._router.endpoints().values():
            for variant in route.variants:
                try:
                    self._manager.resolve(variant.model, variant.version)
                except GatewayError:
                    return False
        return True

    def server_metadata(self) -> dict[str, Any]:
        return {"name": SERVER_NAME, "version": SERVER_VERSION, "extensions": list(EXTENSIONS)}

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        loaded = self._describe_target(name, version)
        state = self._manager.state(loaded.model)
        if version is not None:
            versions = [str(loaded.version)]
        elif (route := self._router.get(name)) is not None:
            versions = sorted({str(self._manager.resolve(v.model, v.version).version) for v in route.route.variants})
        else:
            versions = [str(v) for v in sorted(state.versions)]
        return {
            "name": name,
            "versions": versions,
            "platform": PLATFORM,
            "inputs": [spec.metadata() for spec in loaded.runner.inputs],
            "outputs": [spec.metadata() for spec in loaded.runner.outputs],
            "aliases": {alias: str(v) for alias, v in sorted(state.aliases.items())},
        }

    def model_ready(self, name: str, version: str | None) -> bool:
        route = self._router.get(name) if version is None else None
        if route is None:
            self._describe_target(name, version)
            return True
        for variant in route.route.variants:
            self._manager.resolve(variant.model, variant.version)
        return True

    def _describe_target(self, name: str, version: str | None) -> LoadedVersion:
        """The version whose signature describes `name`: an endpoint's first variant, else the model's."""
        route = self._router.get(name) if version is None else None
        if route is not None:
            first = route.route.variants[0]
            return self._manager.resolve(first.model, first.version)
        return self._manager.resolve(name, None if version is None else parse_version_ref(version))

    # -- inference ----------------------------------------------------------------------------------------

    async def infer(self, call: InferCall) -> InferAnswer:
        started = time.perf_counter()
        arrived_ms = int(time.time() * 1000)
        self._in_flight += 1
        if self._in_flight_gauge is not None:
            self._in_flight_gauge.inc()
        attempt = _Attempt()
        status, error = 500, ""
        try:
            answer = await self._infer_on(call, attempt)
            status = 200
            if call.connection_gone is not None and call.connection_gone():
                status, error = ClientClosedRequest.status_code, _GONE_WHILE_RUNNING  # answered nobody
            return answer
        except GatewayError as exc:
            status, error = exc.status_code, exc.message
            if attempt.target is not None:
                exc.variant = attempt.target.variant  # so the error response names the variant too
            raise
        finally:
            self._in_flight -= 1
            if self._in_flight_gauge is not None:
                self._in_flight_gauge.dec()
            elapsed = time.perf_counter() - started
            self._record(call.name, attempt.target, str(status), elapsed)
            if attempt.target is not None:
                self._after(call, attempt, arrived_ms, status, elapsed * 1000, error)
            else:
                rows = _stated_rows(call) if self._served_as(call.name) is not None else 0  # logged: parse it
                self.reject(call.name, call.request_id, arrived_ms, status, elapsed * 1000, error, rows)

    def refuse_early(self, name: str, request_id: str, arrived_ms: int, error: GatewayError) -> None:
        """Count and log a request the HTTP layer refused before calling `infer` (body too large, bad headers)."""
        self._record(name, None, str(error.status_code), 0.0)
        self.reject(name, request_id, arrived_ms, error.status_code, 0.0, error.message)

    def reject(
        self, name: str, request_id: str, arrived_ms: int, status: int, latency_ms: float, error: str, rows: int = 0
    ) -> None:
        """Log a request refused before it reached a model version (bad headers, body too large, no such
        version) when `name` is served; requests for unknown names are only counted, so that arbitrary names
        cannot create streams."""
        served = self._served_as(name)
        if self._log is None or served is None:
            return
        model = "" if served == "endpoint" else name
        refused = Exchange(
            request_id, arrived_ms, name, DEFAULT_VARIANT, ROLE_PRIMARY, model, None, rows, status, latency_ms, error
        )
        self._log.log(refused)

    def _after(
        self, call: InferCall, attempt: _Attempt, arrived_ms: int, status: int, latency_ms: float, error: str
    ) -> None:
        """Side effects once the answer is ready: route statistics, log record, bandit memory, shadows."""
        target = attempt.target
        assert target is not None
        if self._log is not None:
            self._log.log(_exchange(call, attempt, arrived_ms, status, latency_ms, error))
        route = target.route
        if route is None:
            return
        route.stats[target.variant].record(status, latency_ms)
        if status != 200 or attempt.decoded is None:
            return
        outputs = list(zip(target.loaded.runner.output_names, attempt.outputs, strict=True))
        if route.route.strategy == "bandit":
            self._router.remember(call.name, call.request_id, target.variant, predictions_of(outputs))
        if route.route.shadow:
            primary = PrimaryResult(
                call.name, call.request_id, arrived_ms, attempt.decoded.rows, attempt.decoded.inputs, dict(outputs)
            )
            self._shadows.mirror(route.route.shadow, primary)

    async def _infer_on(self, call: InferCall, attempt: _Attempt) -> InferAnswer:
        route = self._router.get(call.name) if call.version is None else None
        if route is not None and route.route.sticky == "id" and not call.headers.get(REQUEST_ID_HEADER):
            # The key is the body's `id` (tritonclient's request_id=), not an id generated for this request: read
            # the body before routing. An empty header is none, as in v2.exchange.
            raw_json, binary, header = _read_body(call)
            attempt.target = target = self._target(call, route, header.get("id"))
        else:
            attempt.target = target = self._target(call, route)  # first: a bad body still counts for its variant
            raw_json, binary, header = _read_body(call)
        loaded = target.loaded
        runner = loaded.runner
        try:
            attempt.decoded = decoded = decode_request(
                header, binary, raw_json, runner.inputs, runner.outputs, runner.batched
            )
        except GatewayError:
            attempt.declared_rows = declared_rows(header, runner.batched)
            raise
        timeout_ms = call.timeout_ms if call.timeout_ms is not None else decoded.timeout_ms
        deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1000
        attempt.outputs = outputs = await loaded.batcher.infer(
            decoded.inputs, decoded.rows, deadline, call.connection_gone
        )
        body, header_length = encode_response(
            call.name, loaded.version, decoded.id, _select(decoded.outputs, runner.output_names, outputs)
        )
        return InferAnswer(body, header_length, loaded.model, loaded.version, target.variant)

    def feedback(self, name: str, body: bytes) -> None:
        """Ground truth or a reward for an earlier request: to `gatewatch:feedback:{name}`, and to its bandit."""
        if self._router.get(name) is None:
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
        value = None if reward is None else float(reward)
        if not self._router.reward(name, request_id, payload.get("label"), value) and self._relay is not None:
            route = self._router.get(name)
            if route is not None and route.route.strategy == "bandit":
                self._relay.publish(name, request_id, payload.get("label"), value)  # another process answered it

    def _target(self, call: InferCall, route: CompiledRoute | None, body_id: object = None) -> _Target:
        """An endpoint's route picks a variant; a model name (or a pinned version) bypasses any split."""
        if route is not None:
            sticky_id = body_id if isinstance(body_id, str) and body_id else call.request_id
            _, variant = route.pick(sticky_id, call.headers)
            return _Target(self._manager.resolve(variant.model, variant.version), variant.name, route)
        ref = None if call.version is None else parse_version_ref(call.version)
        return _Target(self._manager.resolve(call.name, ref), DEFAULT_VARIANT)

    def _record(self, name: str, target: _Target | None, code: str, seconds: float) -> None:
        if target is None:
            labels = self._untargeted_labels(name)
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

    def _untargeted_labels(self, name: str) -> tuple[str, str, str, str]:
        """Labels of a request refused before it reached a version (no such version, body too large, bad headers):
        the name called when we serve it, else `_unknown`, so that arbitrary names cannot create series."""
        served = self._served_as(name)
        if served is None:
            return (_UNKNOWN, DEFAULT_VARIANT, _UNKNOWN, _UNKNOWN)
        return (name, DEFAULT_VARIANT, name if served == "model" else _UNKNOWN, _UNKNOWN)

    def _served_as(self, name: str) -> Literal["endpoint", "model"] | None:
        """What a name we serve is (an endpoint wins over a model of the same name); None for names we do not."""
        if self._router.get(name) is not None:
            return "endpoint"
        return "model" if name in self._manager.model_names() else None


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
        rows=decoded.rows if decoded is not None else attempt.declared_rows,
        status=status,
        latency_ms=latency_ms,
        error=error,
        inputs=decoded.inputs if decoded is not None else None,
        input_types=loaded.runner.input_types,
        outputs=outputs,
    )


def _read_body(call: InferCall) -> tuple[bytes, memoryview, dict[str, Any]]:
    """The JSON part (raw and parsed) and the binary part of a request body; 400 when malformed."""
    raw_json, binary = split_body(call.body, call.header_length)
    return raw_json, binary, parse_header(raw_json)


def _stated_rows(call: InferCall) -> int:
    """The batch size a request refused before it reached a version states for itself (0 when unreadable)."""
    try:
        return declared_rows(_read_body(call)[2], True)
    except GatewayError:
        return 0


def _select(
    requested: Sequence[RequestedOutput], names: list[str], outputs: list[np.ndarray]
) -> list[tuple[RequestedOutput, np.ndarray]]:
    by_name = dict(zip(names, outputs, strict=True))
    return [(choice, by_name[choice.name]) for choice in requested]
