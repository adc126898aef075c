"""Webhook delivery of the alerts stream, as an outbox: `gatewatch:alerts` read through its own consumer group.

An event is stored (with its window, atomically) before anyone tries to deliver it; the delivery loop reads it
through the group `gatewatch-webhooks`, POSTs it to every receiver in a task of its own (consumption of the log
streams never waits for a webhook), and acknowledges it once every receiver has it or it is dead-lettered. If a
worker dies mid-delivery, another worker claims the event after it has been idle longer than any delivery
can take, and delivers it again under the same event id.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.cancellation import cancel_and_wait
from gateway.records import ALERTS_STREAM
from monitors.alerts import RETRAIN_REQUESTED
from monitors.webhooks import WebhookSender

logger = logging.getLogger(__name__)

DELIVERY_GROUP = "gatewatch-webhooks"
_CLAIM_EVERY_SECONDS = 10.0
_RETRY_SECONDS = 1.0


class AlertDelivery:
    def __init__(
        self,
        redis: Redis,
        sender: WebhookSender,
        urls: list[str],
        retrain_url: str | None,
        consumer: str,
        claim_idle_ms: int,
        max_in_flight: int = 16,
        block_ms: int = 500,
    ) -> None:
        self._redis = redis
        self._sender = sender
        self._urls = list(dict.fromkeys(urls))
        self._retrain_url = retrain_url
        self._consumer = consumer
        self._claim_idle_ms = claim_idle_ms
        self._max_in_flight = max_in_flight
        self._block_ms = block_ms
        self._in_flight: dict[bytes, asyncio.Task[None]] = {}
        self._next_claim = 0.0

    async def prepare(self, start: str = "$") -> None:
        """Create the group at the stream's end: events stored from now on are delivered (before any is stored)."""
        try:
            await self._redis.xgroup_create(ALERTS_STREAM, DELIVERY_GROUP, id=start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _recreate_group(self) -> bool:
        """The stream or its group vanished (Redis restarted empty, a DEL): events stored since are in the stream
        the alert writer re-created, so the group starts at its beginning; receivers de-duplicate on event ids.
        False when that failed too (the caller pauses and the next read tries again)."""
        logger.warning("the alerts stream or its delivery group is gone (Redis restarted empty?); creating it again")
        try:
            await self.prepare(start="0")
        except RedisError as exc:
            logger.warning("creating the delivery group failed (%s)", exc)
            return False
        return True

    def targets(self, event_type: str) -> list[str]:
        urls = list(self._urls)
        if event_type == RETRAIN_REQUESTED and self._retrain_url and self._retrain_url not in urls:
            urls.append(self._retrain_url)
        return urls

    async def run(self, stop: asyncio.Event, grace_seconds: float = 5.0) -> None:
        try:
            while not stop.is_set():
                room = self._max_in_flight - len(self._in_flight)
                if room <= 0:
                    await asyncio.wait(list(self._in_flight.values()), timeout=self._block_ms / 1000,
                                       return_when=asyncio.FIRST_COMPLETED)
                    continue
                try:
                    events = await self._next_events(room)
                except (RedisConnectionError, RedisTimeoutError) as exc:
                    logger.warning("alerts stream unreachable (%s); retrying", exc)
                    await self._pause(stop)
                    continue
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc) or not await self._recreate_group():
                        logger.error("reading the alerts stream failed (%s); retrying", exc)
                        await self._pause(stop)
                    continue
                for entry_id, fields in events:
                    if entry_id not in self._in_flight:
                        task = asyncio.create_task(self._deliver(entry_id, fields))
                        self._in_flight[entry_id] = task
                        task.add_done_callback(functools.partial(self._done, entry_id))
        finally:
            await self._finish(grace_seconds)

    @staticmethod
    async def _pause(stop: asyncio.Event) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), _RETRY_SECONDS)

    async def _next_events(self, room: int) -> list[tuple[bytes, Any]]:
        entries: list[tuple[bytes, Any]] = []
        if time.monotonic() >= self._next_claim:
            self._next_claim = time.monotonic() + _CLAIM_EVERY_SECONDS
            reply: Any = await self._redis.xautoclaim(
                ALERTS_STREAM, DELIVERY_GROUP, self._consumer, self._claim_idle_ms, "0-0", count=room)
            entries += [(i, f) for i, f in reply[1] if i not in self._in_flight]
        read: Any = await self._redis.xreadgroup(
            DELIVERY_GROUP, self._consumer, {ALERTS_STREAM: ">"}, count=room, block=self._block_ms)
        if isinstance(read, dict):
            entries += [entry for batches in read.values() for batch in batches for entry in batch]
        else:
            entries += [entry for _, batch in read or [] for entry in batch]
        return entries

    async def _deliver(self, entry_id: bytes, fields: Any) -> None:
        body = (fields or {}).get(b"event", b"")
        try:
            event = orjson.loads(body)
            event_id, event_type = str(event["event_id"]), str(event["type"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            logger.error("alert %s is not a readable event; skipped", entry_id)
        else:
            await asyncio.gather(*(self._sender.deliver(event_id, body, url) for url in self.targets(event_type)))
        await self._redis.xack(ALERTS_STREAM, DELIVERY_GROUP, entry_id)

    def _done(self, entry_id: bytes, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(entry_id, None)
        if not task.cancelled() and task.exception() is not None:
            # Redis went away mid-delivery: the event stays pending and is claimed again later.
            logger.warning("delivery of alert %s interrupted: %r", entry_id, task.exception())

    async def _finish(self, grace_seconds: float) -> None:
        """Give deliveries in flight a moment; what is cut short stays pending and is claimed again later."""
        tasks = list(self._in_flight.values())
        if not tasks:
            return
        _, unfinished = await asyncio.wait(tasks, timeout=grace_seconds)
        abandoned = await cancel_and_wait(unfinished)
        await asyncio.gather(*(unfinished - abandoned), return_exceptions=True)
