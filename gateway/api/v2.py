"""Open Inference Protocol (KServe V2) REST endpoints: HTTP in, `DataPlane` calls, HTTP out. Nothing else."""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope

from gateway.api.errors import error_body, error_headers
from gateway.api.http_protocol import BODY_STALLED
from gateway.dataplane import DataPlane, InferCall
from gateway.errors import (
    ClientClosedRequest,
    GatewayError,
    InvalidInput,
    NotReady,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
)
from gateway.protocol import types

HEADER_LENGTH = "inference-header-content-length"
REQUEST_ID = "x-request-id"
VARIANT = "x-gatewatch-variant"
TIMEOUT = "x-gatewatch-timeout-ms"
JSON = "application/json"
BINARY = "application/octet-stream"

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": types.ErrorResponse, "description": description}
    for status, description in (
        (400, "Bad input: what was wrong and what was expected"),
        (404, "Unknown model, version or endpoint"),
        (413, "Body over max_body_bytes"),
        (429, "Queue full (Retry-After)"),
        (503, "Not ready (Retry-After)"),
        (504, "Deadline passed"),
    )
}

_INFER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"},
                "description": "JSON header followed by binary tensors (Inference-Header-Content-Length).",
            },
        },
    }
}


# A per-process random prefix and a counter: unique ids without a random draw (a syscall) per request.
_ID_PREFIX = secrets.token_hex(10)
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


class HttpAnswer(NamedTuple):
    status: int
    headers: dict[str, str]
    body: bytes
    media_type: str


async def exchange(
    dataplane: DataPlane,
    name: str,
    version: str | None,
    headers: Mapping[str, str],
    body: Callable[[], Awaitable[bytes]],
    connection_gone: Callable[[], bool] | None = None,
) -> HttpAnswer:
    """One inference over HTTP, whichever server layer carries it (FastAPI route or the ASGI fast path);
    `connection_gone` says whether the client has left, when the server can tell."""
    request_id = headers.get(REQUEST_ID) or new_request_id()
    reply = {REQUEST_ID: request_id}
    call: InferCall | None = None
    try:
        call = InferCall(
            name=name,
            version=version,
            body=await body(),
            header_length=_header_length(headers.get(HEADER_LENGTH)),
            request_id=request_id,
            timeout_ms=_positive_number(headers.get(TIMEOUT), TIMEOUT),
            headers=headers,
            connection_gone=connection_gone,
        )
        answer = await dataplane.infer(call)
    except GatewayError as exc:
        if exc.variant is not None:
            reply[VARIANT] = exc.variant
        elif call is None:  # refused before the dataplane saw it: still logged and counted
            dataplane.refuse_early(name, request_id, int(time.time() * 1000), exc)
        return HttpAnswer(exc.status_code, error_headers(exc, reply), error_body(exc), JSON)
    reply[VARIANT] = answer.variant
    if answer.header_length is None:
        return HttpAnswer(200, reply, answer.body, JSON)
    reply[HEADER_LENGTH] = str(answer.header_length)
    return HttpAnswer(200, reply, answer.body, BINARY)


def _json(payload: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(payload), status, media_type="application/json")


async def read_body(request: Request, limit: int) -> bytes:
    headers = request.headers
    return await receive_body(
        request.scope, request.receive, headers.get("content-length"), limit, headers.get("content-encoding")
    )


async def receive_body(
    scope: Scope, receive: Receive, declared: str | None, limit: int, encoding: str | None = None
) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed `limit` (never buffered whole), with
    408 when it stopped arriving (`BODY_STALLED`) and 499 when the client left before sending it all; a gzip or
    deflate body (`Content-Encoding`, as tritonclient's request compression sends) comes back decompressed."""
    raw = await _receive_raw(scope, receive, declared, limit)
    coding = "" if encoding is None else encoding.strip().lower()
    return raw if coding in ("", "identity") else await _decompressed(raw, coding, limit)


async def _receive_raw(scope: Scope, receive: Receive, declared: str | None, limit: int) -> bytes:
    if declared is not None and _is_ascii_integer(declared) and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds max_body_bytes={limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientClosedRequest(f"the client closed the connection after {size} bytes of its request body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds max_body_bytes={limit}")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        stalled = scope.get(BODY_STALLED)
        if stalled is not None:
            raise RequestTimeout(f"the request body stopped arriving: nothing for {stalled:g} s after {size} bytes")


_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Compressed bytes inflated on the event loop; larger bodies go to a thread. The bound is on the input because the
# output is unknown until inflated: deflate expands at most ~1032:1, so this is ~1 MiB of work at worst.
_INLINE_DECOMPRESSION = 1024


async def _decompressed(raw: bytes, encoding: str, limit: int) -> bytes:
    wbits = _WBITS.get(encoding)
    if wbits is None:
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or identity")
    if len(raw) <= _INLINE_DECOMPRESSION:
        return _inflate(raw, wbits, encoding, limit)
    return await asyncio.to_thread(_inflate, raw, wbits, encoding, limit)


def _inflate(raw: bytes, wbits: int, encoding: str, limit: int) -> bytes:
    """The whole body: every gzip member in turn (as gzip tools write them), never more than `limit` in memory."""
    parts: list[bytes] = []
    size, data = 0, raw
    while True:
        inflater = zlib.decompressobj(wbits)
        try:
            part = inflater.decompress(data, limit + 1 - size)  # a small bomb stays small
        except zlib.error as exc:
            raise InvalidInput(f"the request body is not valid {encoding} data ({exc})") from None
        size += len(part)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds max_body_bytes={limit} once decompressed")
        if not inflater.eof:
            raise InvalidInput(f"the request body ends before its {encoding} data does")
        parts.append(part)
        data = inflater.unused_data
        if not data:
            return b"".join(parts)
        if wbits == zlib.MAX_WBITS:  # deflate has no members: anything after its end is not part of the body
            raise InvalidInput(f"the request body has {len(data)} bytes after the end of its deflate data")


def _positive_number(raw: str | None, header: str) -> float | None:
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:
        raise InvalidInput(f"header {header} must be a positive number, got {raw!r}")
    return value


def _is_ascii_integer(raw: str) -> bool:
    # str.isdigit() alone also accepts digits such as "²" (latin-1, so valid in a header) that int() refuses.
    return raw.isascii() and raw.isdigit()


def _header_length(raw: str | None) -> int | None:
    if raw is None:
        return None
    if not _is_ascii_integer(raw):
        raise InvalidInput(f"header Inference-Header-Content-Length must be a non-negative integer, got {raw!r}")
    return int(raw)


def build_v2_router(dataplane: DataPlane, max_body_bytes: int) -> APIRouter:
    router = APIRouter(prefix="/v2", tags=["Open Inference Protocol"])

    @router.get("/health/live", response_model=types.LiveResponse)
    async def server_live() -> Response:
        return _json({"live": True})

    @router.get("/health/ready", response_model=types.ReadyResponse, responses={503: _ERRORS[503]})
    async def server_ready() -> Response:
        if not dataplane.ready():
            raise NotReady("models are still loading")
        return _json({"ready": True})

    @router.get("", response_model=types.ServerMetadata)
    @router.get("/", response_model=types.ServerMetadata, include_in_schema=False)
    async def server_metadata() -> Response:
        return _json(dataplane.server_metadata())

    @router.get("/models/{name}", response_model=types.ModelMetadata, responses={404: _ERRORS[404]})
    async def model_metadata(name: str) -> Response:
        return _json(dataplane.model_metadata(name, None))

    @router.get("/models/{name}/versions/{version}", response_model=types.ModelMetadata, responses={404: _ERRORS[404]})
    async def model_version_metadata(name: str, version: str) -> Response:
        return _json(dataplane.model_metadata(name, version))

    @router.get("/models/{name}/ready", response_model=types.ModelReadyResponse, responses={404: _ERRORS[404]})
    async def model_ready(name: str) -> Response:
        return _json({"name": name, "ready": dataplane.model_ready(name, None)})

    @router.get(
        "/models/{name}/versions/{version}/ready",
        response_model=types.ModelReadyResponse,
        responses={404: _ERRORS[404]},
    )
    async def model_version_ready(name: str, version: str) -> Response:
        return _json({"name": name, "ready": dataplane.model_ready(name, version)})

    async def infer(request: Request, name: str, version: str | None) -> Response:
        answer = await exchange(dataplane, name, version, request.headers, lambda: read_body(request, max_body_bytes))
        return Response(answer.body, answer.status, headers=answer.headers, media_type=answer.media_type)

    infer_docs: dict[str, Any] = {
        "response_model": types.InferenceResponse,
        "responses": _ERRORS,
        "openapi_extra": _INFER_BODY,
    }

    @router.post("/models/{name}/infer", **infer_docs)
    async def model_infer(name: str, request: Request) -> Response:
        return await infer(request, name, None)

    @router.post("/models/{name}/versions/{version}/infer", **infer_docs)
    async def model_version_infer(name: str, version: str, request: Request) -> Response:
        return await infer(request, name, version)

    @router.post(
        "/models/{name}/feedback",
        response_model=types.FeedbackAccepted,
        responses={400: _ERRORS[400], 404: _ERRORS[404], 503: _ERRORS[503]},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Feedback"}}},
            }
        },
    )
    async def model_feedback(name: str, request: Request) -> Response:
        """Ground truth (`label`) or a reward observed later for request `id`; written to the feedback stream."""
        body = await read_body(request, max_body_bytes)
        dataplane.feedback(name, body)
        return _json({"accepted": True})

    return router
