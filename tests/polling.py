"""Waiting for a condition in async tests: poll it with a deadline, never sleep a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

import pytest


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], within: float, what: str, interval: float = 0.05
) -> None:
    """Poll `condition` (sync or async) until it holds; fail with `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)  # polling interval, not synchronisation
