"""RouteStore: routes kept in Redis and broadcast, so every gateway replica serves the same splits.

Layout: hash `gatewatch:routes` (endpoint -> route JSON), set `gatewatch:routes:deleted` (endpoints deleted over
the admin API, so the config file does not bring them back), key `gatewatch:routes:seeded` (the table has been
written), channel `gatewatch:routes` (the endpoint name of each change). A replica applies a change when it hears
of it (pub/sub) and also re-reads the whole hash every `resync_seconds`, which covers messages missed while its
connection was down.

A Redis that lost its data (restarted without persistence, or flushed) has no `seeded` key: then an empty table
does not mean "every route was deleted". The first replica to notice writes back the routes it serves (or, serving
none, the config file's), so replicas keep serving instead of dropping every endpoint to 404.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.cancellation import cancel_and_wait
from gateway.errors import GatewayError, NotReady
from gateway.pubsub import listen_forever
from gateway.routing.table import Route, parse_route

logger = logging.getLogger(__name__)

ROUTES_KEY = "gatewatch:routes"
DELETED_KEY = "gatewatch:routes:deleted"
SEEDED_KEY = "gatewatch:routes:seeded"
CHANNEL = "gatewatch:routes"

class RouteTarget(Protocol):
    """What the store keeps in line with Redis (the gateway's Router)."""

    def apply(self, endpoint: str, route: Route) -> None: ...

    def remove(self, endpoint: str) -> bool: ...

    def endpoints(self) -> dict[str, Route]: ...


class RouteStore:
    def __init__(self, redis: Redis, target: RouteTarget, validate: Callable[[str, Route], None]) -> None:
        self._redis = redis
        self._target = target
        self._validate = validate
        self._tasks: list[asyncio.Task[None]] = []
        self._initial: dict[str, dict[str, Any]] = {}

    async def seed(self, initial: dict[str, dict[str, Any]]) -> None:
        """Store the config file's routes that Redis has never seen (stored ones and deletions win)."""
        self._initial = initial
        members: Any = await self._redis.smembers(DELETED_KEY)
        deleted = {name.decode() for name in members}
        for endpoint, raw in initial.items():
            if endpoint in deleted:
                continue
            route = parse_route(endpoint, raw)
            await self._redis.hsetnx(ROUTES_KEY, endpoint, route.model_dump_json())
        await self._redis.set(SEEDED_KEY, "1")

    async def load_all(self) -> None:
        """Apply every stored route; drop local routes that are gone from Redis."""
        if not await self._redis.exists(SEEDED_KEY):
            await self._restore()
        stored: Any = await self._redis.hgetall(ROUTES_KEY)
        self._apply_all({k.decode(): v for k, v in stored.items()})

    async def _restore(self) -> None:
        """Redis has lost the route table: write back what this replica serves, else the config file's routes.
        Another replica may be doing the same: HSETNX keeps whichever route arrived first."""
        live = self._target.endpoints()
        if not live:
            await self.seed(self._initial)
            return
        logger.warning("redis has lost the route table (restarted empty?): writing back this replica's %d routes",
                       len(live))
        for endpoint, route in live.items():
            await self._redis.hsetnx(ROUTES_KEY, endpoint, route.model_dump_json())
        await self._redis.set(SEEDED_KEY, "1")

    async def put(self, endpoint: str, route: Route) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hset(ROUTES_KEY, endpoint, route.model_dump_json())
                pipe.srem(DELETED_KEY, endpoint)
                pipe.publish(CHANNEL, endpoint)
                await pipe.execute()
        except RedisError as exc:
            raise _store_failure(exc, "change") from exc
        self._target.apply(endpoint, route)

    async def delete(self, endpoint: str) -> None:
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hdel(ROUTES_KEY, endpoint)
                pipe.sadd(DELETED_KEY, endpoint)
                pipe.publish(CHANNEL, endpoint)
                await pipe.execute()
        except RedisError as exc:
            raise _store_failure(exc, "deletion") from exc
        self._target.remove(endpoint)

    def start(self, resync_seconds: float) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="route listener"),
            asyncio.create_task(self._resync(resync_seconds), name="route resync"),
        ]

    async def aclose(self) -> None:
        await cancel_and_wait(self._tasks)

    async def _listen(self) -> None:
        async def reload(data: bytes) -> None:
            await self._reload(data.decode())

        # After each subscription, catch up on anything changed while unsubscribed.
        await listen_forever(self._redis, CHANNEL, reload, on_subscribed=self.load_all)

    async def _resync(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(RedisError, OSError):
                await self.load_all()

    async def _reload(self, endpoint: str) -> None:
        raw: Any = await self._redis.hget(ROUTES_KEY, endpoint)
        if raw is None:
            self._target.remove(endpoint)
        else:
            self._apply_all({endpoint: raw}, only=endpoint)

    def _apply_all(self, stored: dict[str, bytes], only: str | None = None) -> None:
        for endpoint, raw in stored.items():
            try:
                route = parse_route(endpoint, orjson.loads(raw))
                self._validate(endpoint, route)
            except (GatewayError, orjson.JSONDecodeError) as exc:
                logger.error("stored route for %r not applied, keeping the current one: %s", endpoint, exc)
                continue
            self._target.apply(endpoint, route)
        if only is None:
            for endpoint in set(self._target.endpoints()) - set(stored):
                self._target.remove(endpoint)


def _store_failure(exc: RedisError, change: str) -> NotReady:
    """503 for an admin call Redis did not confirm. A timeout is not a refusal: the command may have reached Redis
    and still run (a slow or paused server), so the client is told the outcome is unknown, not that nothing changed."""
    if isinstance(exc, RedisTimeoutError):
        return NotReady(
            f"route store (redis) did not answer in time ({exc}): the {change} may still take effect; "
            "GET the endpoint to see the stored route"
        )
    return NotReady(f"route store (redis) unavailable, nothing changed: {exc}")
