"""Admin API over HTTP: bearer-token authentication, then `RouteAdmin` calls. Nothing else."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from starlette.responses import Response

from gateway.api.v2 import read_body
from gateway.errors import InvalidInput
from gateway.protocol import types
from gateway.routing.admin import RouteAdmin

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": types.ErrorResponse, "description": "Missing or wrong bearer token"},
    404: {"model": types.ErrorResponse, "description": "No such endpoint"},
    422: {"model": types.ErrorResponse, "description": "Invalid route; the old route stays in force"},
    503: {"model": types.ErrorResponse, "description": "Route store (Redis) unavailable"},
}
_ROUTE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Route"}},
            "application/yaml": {"schema": {"$ref": "#/components/schemas/Route"}},
        },
    }
}
_MAX_ROUTE_BYTES = 1 << 20
_BAD_SCOPE = {"model": types.ErrorResponse, "description": "scope is neither 'all' nor 'process'"}


def _json(payload: dict[str, Any]) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


def build_admin_router(admin: RouteAdmin) -> APIRouter:
    router = APIRouter(prefix="/admin", tags=["Admin"], responses=_ERRORS)

    @router.get("/endpoints")
    async def list_endpoints(request: Request) -> Response:
        admin.authorize(request.headers.get("authorization"))
        return _json(admin.list())

    @router.get("/endpoints/{endpoint}")
    async def get_endpoint(endpoint: str, request: Request) -> Response:
        admin.authorize(request.headers.get("authorization"))
        return _json(admin.get(endpoint))

    @router.put("/endpoints/{endpoint}", openapi_extra=_ROUTE_BODY)
    async def put_endpoint(endpoint: str, request: Request) -> Response:
        admin.authorize(request.headers.get("authorization"))
        body = await read_body(request, _MAX_ROUTE_BYTES)
        return _json(await admin.put(endpoint, body, request.headers.get("content-type")))

    @router.delete("/endpoints/{endpoint}")
    async def delete_endpoint(endpoint: str, request: Request) -> Response:
        admin.authorize(request.headers.get("authorization"))
        return _json(await admin.delete(endpoint))

    @router.get("/endpoints/{endpoint}/stats", responses={400: _BAD_SCOPE})
    async def endpoint_stats(endpoint: str, request: Request, scope: str = "all") -> Response:
        """Per-variant statistics over every gateway process (`scope=process`: the answering process only)."""
        admin.authorize(request.headers.get("authorization"))  # before anything else is looked at
        if scope not in ("all", "process"):
            raise InvalidInput(f"scope must be 'all' or 'process', got {scope!r}")
        return _json(await admin.stats(endpoint, this_process_only=scope == "process"))

    return router
