"""The one place where errors become HTTP responses: `{"error": "<what was wrong and what was expected>"}`."""

from __future__ import annotations

import math

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import Response

from gateway.errors import GatewayError


def error_headers(exc: GatewayError, headers: dict[str, str] | None = None) -> dict[str, str]:
    merged = dict(headers or {})
    if exc.retry_after is not None:
        merged["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
    if exc.status_code == 401:
        merged["www-authenticate"] = "Bearer"
    elif exc.status_code == 408:
        merged["connection"] = "close"  # the rest of a stalled body may still come: do not read it as a request
    return merged


def error_body(exc: GatewayError) -> bytes:
    return orjson.dumps({"error": exc.message})


def error_response(exc: GatewayError, headers: dict[str, str] | None = None) -> Response:
    merged = error_headers(exc, headers)
    return Response(error_body(exc), exc.status_code, headers=merged, media_type="application/json")


async def _gateway_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return Response(orjson.dumps({"error": problems}), 400, media_type="application/json")


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return Response(
        orjson.dumps({"error": str(exc.detail)}), exc.status_code, headers=exc.headers,
        media_type="application/json",
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
