"""A local webhook receiver for the demo: checks each delivery's HMAC signature and keeps what arrived."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route


@dataclass(frozen=True)
class Delivery:
    path: str
    event: dict[str, Any]
    signature_ok: bool
    received_at: float


def signature_ok(secret: str, timestamp: str, body: bytes, header: str) -> bool:
    """`X-Gatewatch-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<raw body>">`, compared in constant time."""
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(f"sha256={expected}", header)


@dataclass
class WebhookReceiver:
    secret: str
    deliveries: list[Delivery] = field(default_factory=list)

    async def _receive(self, request: Request) -> Response:
        body = await request.body()
        ok = signature_ok(
            self.secret,
            request.headers.get("x-gatewatch-timestamp", ""),
            body,
            request.headers.get("x-gatewatch-signature", ""),
        )
        self.deliveries.append(Delivery(request.url.path, orjson.loads(body), ok, time.time()))
        return Response(status_code=204 if ok else 401)

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/{kind}", self._receive, methods=["POST"])])

    @contextlib.asynccontextmanager
    async def serving(self, port: int) -> AsyncIterator[str]:
        config = uvicorn.Config(self.app(), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        # `_serve` rather than `serve`: the demo owns SIGINT/SIGTERM (Ctrl+C stops everything), not this server.
        task = asyncio.create_task(server._serve())
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.02)  # waiting for the server to bind
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await task
