"""Stopping background tasks for certain, even when a library swallows the cancellation.

redis-py 8.1 can lose a cancellation that arrives while a pub/sub connection is being set up: the task goes on
to `listen()` and waits there for ever, so a shutdown that awaits it never ends (seen when uvicorn failed to bind
its port a millisecond after start-up: the process then ignored SIGTERM). Cancelling again reaches the task at
its next await, so tasks are cancelled until they end, within a bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)

_RECANCEL_INTERVAL = 0.1


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], within: float = 5.0) -> set[asyncio.Task[Any]]:
    """Cancel `tasks` and wait for them to end, cancelling again any that keep running; returns the tasks still
    running after `within` seconds (logged), which the caller abandons."""
    pending = {task for task in tasks if not task.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            names = ", ".join(sorted(task.get_name() for task in pending))
            logger.error("tasks still running %.0f s after being cancelled, abandoned: %s", within, names)
            break
        _, pending = await asyncio.wait(pending, timeout=min(_RECANCEL_INTERVAL, remaining))
    return pending
