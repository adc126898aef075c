"""Errors the gateway answers with, each carrying its HTTP status.

    GatewayError (500)
     ├── InvalidInput (400)        wrong tensor name, shape, datatype, data length or encoding
     ├── Unauthorized (401)        admin API call without the right bearer token
     ├── ModelNotFound (404)       unknown model, version or endpoint
     ├── RequestTimeout (408)      the request body stopped arriving (body_timeout_seconds)
     ├── PayloadTooLarge (413)     body over max_body_bytes
     ├── InvalidRoute (422)        a route that cannot be applied (routing/table.py); the old one stays
     ├── Overloaded (429)          a model version's queue is full       -> Retry-After
     ├── NotReady (503)            nothing loaded to serve this yet        -> Retry-After
     ├── ClientClosedRequest (499) the client closed the connection before its answer (nginx's code; only
     │                             logged and counted: there is nobody left to answer)
     └── DeadlineExceeded (504)    the request's deadline passed while it waited

`gateway/api/errors.py` turns every one of them into `{"error": message}`; nothing else maps errors to HTTP.
"""

from __future__ import annotations


class GatewayError(Exception):
    status_code = 500

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.variant: str | None = None  # set when the request had been routed to a variant


class InvalidInput(GatewayError):
    status_code = 400


class Unauthorized(GatewayError):
    status_code = 401


class ModelNotFound(GatewayError):
    status_code = 404


class RequestTimeout(GatewayError):
    status_code = 408


class PayloadTooLarge(GatewayError):
    status_code = 413


class UnsupportedMediaType(GatewayError):
    status_code = 415


class Overloaded(GatewayError):
    status_code = 429

    def __init__(self, message: str, *, retry_after: float | None = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


class NotReady(GatewayError):
    status_code = 503

    def __init__(self, message: str, *, retry_after: float | None = 1.0) -> None:
        super().__init__(message, retry_after=retry_after)


class ClientClosedRequest(GatewayError):
    status_code = 499


class DeadlineExceeded(GatewayError):
    status_code = 504
