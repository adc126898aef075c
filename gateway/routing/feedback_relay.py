"""FeedbackRelay: bandit rewards for requests another process answered.

A bandit remembers which variant answered which request in the process that answered it, but feedback may reach
any replica or worker. A process that does not know the request id publishes the feedback on a Redis channel;
the process that answered it scores it. Best effort, like the pub/sub it rides on: feedback published while no
process listens is not replayed (it is still in `gatewatch:feedback:{name}` for the monitor).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.cancellation import cancel_and_wait
from gateway.pubsub import listen_forever
from gateway.routing.router import Router

logger = logging.getLogger(__name__)

CHANNEL = "gatewatch:feedback-relay"


class FeedbackRelay:
    def __init__(self, redis: Redis, router: Router) -> None:
        self._redis = redis
        self._router = router
        self._origin = secrets.token_hex(8)  # a process ignores what it published itself
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None

    def publish(self, endpoint: str, request_id: str, label: object, reward: float | None) -> None:
        """Hand the feedback to the other processes; returns at once."""
        message = orjson.dumps(
            {"origin": self._origin, "endpoint": endpoint, "id": request_id, "label": label, "reward": reward}
        )
        task = asyncio.get_running_loop().create_task(self._send(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="feedback relay")

    async def aclose(self) -> None:
        await cancel_and_wait([*self._tasks, *([self._listener] if self._listener else [])])

    async def _send(self, message: bytes) -> None:
        try:
            await self._redis.publish(CHANNEL, message)
        except (RedisError, OSError) as exc:
            logger.warning("feedback for another process not relayed (redis: %s)", exc)

    async def _listen(self) -> None:
        await listen_forever(self._redis, CHANNEL, self._apply)

    async def _apply(self, data: bytes) -> None:
        try:
            feedback = orjson.loads(data)
            if feedback["origin"] == self._origin:
                return
            reward = feedback.get("reward")
            self._router.reward(
                str(feedback["endpoint"]), str(feedback["id"]), feedback.get("label"),
                None if reward is None else float(reward),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            logger.warning("unreadable relayed feedback ignored: %s", exc)
