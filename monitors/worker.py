"""A monitor worker: heartbeats, renews its leases, finds streams, keeps its fair share, runs one consumer per
stream it owns and the webhook delivery loop.

Rounds run every third of the lease period, so a lease is renewed twice before it could lapse. A consumer whose
lease could not be renewed is stopped at once; one that failed (Redis unreachable, say) is restarted by a later
round if the lease is still ours, and re-reads its pending entries like any new owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.cancellation import cancel_and_wait
from gateway.records import LOG_STREAM_PREFIX
from monitors.consumer import ConsumerContext, StreamConsumer
from monitors.delivery import AlertDelivery
from monitors.ownership import Ownership, fair_share
from monitors.store import LeaseLost

logger = logging.getLogger(__name__)

_STOP_GRACE_SECONDS = 5.0
_REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError)


class MonitorWorker:
    def __init__(
        self, ctx: ConsumerContext, ownership: Ownership, delivery: AlertDelivery, discovery_seconds: float
    ) -> None:
        self._ctx = ctx
        self._ownership = ownership
        self._delivery = delivery
        self._discovery_seconds = discovery_seconds
        self._consumers: dict[str, tuple[StreamConsumer, asyncio.Task[None]]] = {}
        self._streams: list[str] = []
        self._next_discovery = 0.0
        self._rng = random.Random()

    @property
    def owned(self) -> list[str]:
        return sorted(self._consumers)

    async def run(self, stop: asyncio.Event) -> None:
        await self._delivery.prepare()
        delivery = asyncio.create_task(self._delivery.run(stop), name="webhook-delivery")
        round_seconds = self._ownership.lease_ms / 3000
        try:
            while not stop.is_set():
                try:
                    await self._round()
                except _REDIS_ERRORS as exc:
                    logger.warning("redis unavailable (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), round_seconds)
        finally:
            await self._shutdown()
            await delivery

    async def _round(self) -> None:
        live = await self._ownership.heartbeat()
        await self._reap()
        for stream in list(self._consumers):
            if not await self._ownership.renew(stream):
                logger.warning("%s: lease lost; another worker owns it now", stream)
                await self._drop(stream, release=False)
        if time.monotonic() >= self._next_discovery:
            self._streams = await self._ownership.discover()
            self._next_discovery = time.monotonic() + self._discovery_seconds
        share = fair_share(len(self._streams), live)
        if len(self._consumers) > share:
            stream = self._rng.choice(sorted(self._consumers))
            logger.info("%s: handing over (own %d, fair share %d)", stream, len(self._consumers), share)
            await self._drop(stream, release=True)
            return
        unowned = [stream for stream in self._streams if stream not in self._consumers]
        self._rng.shuffle(unowned)  # workers starting together should not all race for the same stream
        for stream in unowned:
            if len(self._consumers) >= share:
                break
            if await self._ownership.acquire(stream):
                self._start(stream)

    def _start(self, stream: str) -> None:
        consumer = StreamConsumer(stream, self._ctx)
        self._consumers[stream] = (consumer, asyncio.create_task(consumer.run(), name=f"consume {stream}"))
        logger.info("%s: now consuming it", stream)

    async def _reap(self) -> None:
        """Clean up consumers that ended on their own; restart those whose stream is still ours."""
        for stream, (_, task) in list(self._consumers.items()):
            if not task.done():
                continue
            del self._consumers[stream]
            self._ctx.metrics.forget_endpoint(_endpoint(stream))
            error = None if task.cancelled() else task.exception()
            if isinstance(error, LeaseLost):
                continue
            if error is not None:
                logger.warning("%s: consumer failed (%r); restarting it", stream, error)
            if await self._ownership.renew(stream):
                self._start(stream)

    async def _drop(self, stream: str, release: bool) -> None:
        consumer, task = self._consumers.pop(stream)
        consumer.stop()
        _, pending = await asyncio.wait([task], timeout=_STOP_GRACE_SECONDS)
        if not await cancel_and_wait(pending):
            await asyncio.gather(task, return_exceptions=True)  # collects its exception, if it ended on one
        self._ctx.metrics.forget_endpoint(_endpoint(stream))
        if release:
            # Its open windows were never committed: their entries stay pending for the next owner to re-read.
            await self._ownership.release(stream)

    async def _shutdown(self) -> None:
        outcomes = await asyncio.gather(
            *(self._drop(stream, release=True) for stream in list(self._consumers)), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                logger.warning("could not release a lease (%r); it expires by itself", outcome)
        with contextlib.suppress(*_REDIS_ERRORS):
            await self._ownership.leave()


def _endpoint(stream: str) -> str:
    return stream.removeprefix(LOG_STREAM_PREFIX)
