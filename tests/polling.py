"""Waiting for a condition in tests: poll it with a deadline, never sleep a fixed time."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import time
from collections.abc import Awaitable, Callable

import httpx
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


def wait_until_serving(
    process: subprocess.Popen[bytes], url: str, within: float, what: str, log: Callable[[], str], interval: float = 0.05
) -> None:
    """Poll `url` until it answers 200; RuntimeError with the process's log if it exits or `within` passes."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log()}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)  # polling a condition: the server's readiness
    raise RuntimeError(f"{what} not ready after {within}s:\n{log()}")
