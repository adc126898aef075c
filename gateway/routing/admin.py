"""RouteAdmin: the admin API's logic (list, read, replace, delete routes; statistics), free of HTTP types."""

from __future__ import annotations

import hmac
from typing import Any

import orjson
import yaml

from gateway.errors import ModelNotFound, NotReady, Unauthorized
from gateway.routing.router import Router
from gateway.routing.shared_stats import SharedVariantStats
from gateway.routing.store import RouteStore
from gateway.routing.table import InvalidRoute, Route, Signature, check_route, parse_route

YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


class RouteAdmin:
    def __init__(self, router: Router, signature: Signature, token: str | None) -> None:
        self._router = router
        self._store: RouteStore | None = None
        self._shared: SharedVariantStats | None = None
        self._signature = signature
        self._token = token.encode() if token else None

    def attach_store(self, store: RouteStore) -> None:
        """Set once Redis is open (in the app's lifespan)."""
        self._store = store

    def _require_store(self) -> RouteStore:
        if self._store is None:
            raise NotReady("the route store is not open yet")
        return self._store

    def authorize(self, authorization: str | None) -> None:
        """Bearer token check in constant time; with no admin_token configured, every call is refused."""
        if self._token is None:
            raise Unauthorized("the admin API is disabled: set admin_token (GATEWATCH_ADMIN_TOKEN) to enable it")
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), self._token):
            raise Unauthorized("missing or wrong bearer token")

    def list(self) -> dict[str, Any]:
        return {"endpoints": {name: _dump(route) for name, route in self._router.endpoints().items()}}

    def get(self, endpoint: str) -> dict[str, Any]:
        compiled = self._router.get(endpoint)
        if compiled is None:
            raise ModelNotFound(f"no endpoint {endpoint!r}")
        return _dump(compiled.route)

    async def put(self, endpoint: str, body: bytes, content_type: str | None) -> dict[str, Any]:
        route = parse_route(endpoint, _decode(body, content_type))
        check_route(endpoint, route, self._signature)
        await self._require_store().put(endpoint, route)
        return _dump(route)

    async def delete(self, endpoint: str) -> dict[str, Any]:
        if self._router.get(endpoint) is None:
            raise ModelNotFound(f"no endpoint {endpoint!r}")
        await self._require_store().delete(endpoint)
        return {"deleted": endpoint}

    def attach_shared_stats(self, shared: SharedVariantStats) -> None:
        """Set once Redis is open: statistics then cover every process, not only this one."""
        self._shared = shared

    async def stats(self, endpoint: str, this_process_only: bool = False) -> dict[str, Any]:
        """Per-variant statistics of every gateway process sharing this Redis, or of the answering one only."""
        if self._shared is not None and not this_process_only:
            stats = await self._shared.stats(endpoint)
        else:
            local = self._router.stats(endpoint)
            stats = None if local is None else {**local, "processes": 1}
        if stats is None:
            raise ModelNotFound(f"no endpoint {endpoint!r}")
        return stats


def _decode(body: bytes, content_type: str | None) -> object:
    media_type = (content_type or "application/json").split(";", 1)[0].strip().lower()
    try:
        if media_type in YAML_TYPES:
            return yaml.safe_load(body)
        return orjson.loads(body)
    except (yaml.YAMLError, orjson.JSONDecodeError) as exc:
        raise InvalidRoute(f"route body is not valid {'YAML' if media_type in YAML_TYPES else 'JSON'}: {exc}") from exc


def _dump(route: Route) -> dict[str, Any]:
    return route.model_dump(mode="json", exclude_none=True)
