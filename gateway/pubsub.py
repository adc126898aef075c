"""One Redis pub/sub subscription kept alive for a process's lifetime (route changes, relayed feedback)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

_RETRY_SECONDS = 1.0


async def listen_forever(
    redis: Redis,
    channel: str,
    on_message: Callable[[bytes], Awaitable[None]],
    on_subscribed: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Hand every message on `channel` to `on_message`, resubscribing after Redis failures; runs until cancelled.

    `on_subscribed` runs after each (re)subscription: what was published while unsubscribed is not delivered, so
    a listener that must not miss a change catches up there."""
    while True:
        try:
            async with redis.pubsub() as pubsub:
                await pubsub.subscribe(channel)
                if on_subscribed is not None:
                    await on_subscribed()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await on_message(message["data"])
        except (RedisError, OSError) as exc:
            logger.warning("listener on %s lost redis (%s); retrying", channel, exc)
            await asyncio.sleep(_RETRY_SECONDS)
