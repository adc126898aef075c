"""InferenceFastPath: the two inference routes served straight from ASGI, ahead of FastAPI's routing.

Profiling a c=64 load showed almost half the server's CPU in FastAPI/Starlette machinery (route matching,
dependency solving, exit-stack and body-limit middlewares, Request/Response objects) for a request whose own work
is a dictionary lookup, a numpy conversion and a 10 µs model run. Inference requests are therefore matched here by
one regular expression and answered with raw ASGI messages; everything else — metadata, health, admin, docs —
goes on to FastAPI, where the same routes stay declared (they document the API and serve any request this layer
passes on). Both paths share `v2.exchange`, so behaviour cannot drift between them.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from gateway.api.http_protocol import CONNECTION_GONE, DEFAULT_BODY_TIMEOUT
from gateway.api.v2 import HttpAnswer, exchange, receive_body
from gateway.dataplane import DataPlane

_INFER_PATH = re.compile(r"^/v2/models/([^/]+)(?:/versions/([^/]+))?/infer$")


class InferenceFastPath:
    """Answers `scope` when it is an inference request (True), else leaves it to the caller (False)."""

    def __init__(self, dataplane: DataPlane, max_body_bytes: int) -> None:
        self._dataplane = dataplane
        self._limit = max_body_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> bool:
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.match(scope["path"])
            if match is not None:
                await self._infer(scope, receive, send, match.group(1), match.group(2))
                return True
        return False

    async def _infer(self, scope: Scope, receive: Receive, send: Send, name: str, version: str | None) -> None:
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
        gone: Callable[[], bool] | None = scope.get(CONNECTION_GONE)
        length = headers.get("content-length")
        encoding = headers.get("content-encoding")
        body = lambda: receive_body(scope, receive, length, self._limit, encoding)  # noqa: E731
        answer = await exchange(self._dataplane, name, version, headers, body, gone)
        await _send(send, answer)  # to a client that has gone, uvicorn drops it


class GatewayApp(FastAPI):
    """FastAPI, with inference requests taken before any of its middleware (see the module docstring)."""

    fast_path: InferenceFastPath | None = None
    body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT  # read by GatewayHttpProtocol

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_path is not None and await self.fast_path.handle(scope, receive, send):
            return
        await super().__call__(scope, receive, send)


async def _send(send: Send, answer: HttpAnswer) -> None:
    raw_headers = [
        (b"content-type", answer.media_type.encode()),
        (b"content-length", str(len(answer.body)).encode()),
    ]
    raw_headers += [(key.encode("latin-1"), value.encode("latin-1")) for key, value in answer.headers.items()]
    await send({"type": "http.response.start", "status": answer.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": answer.body})
