"""Which worker consumes which log stream: renewable leases, heartbeats, discovery, fair shares.

A stream belongs to the worker holding `gatewatch:monitor:lease:{stream}` (SET NX PX; renewed, or released, only
by its holder, atomically, in Lua). Workers heartbeat in the sorted set `gatewatch:monitor:workers` (score: last
beat, ms); those seen within a lease period are live. A worker takes unowned streams only while it holds fewer
than its fair share, ceil(streams / live workers), and gives one back per round while it holds more, so a newly
started worker gets streams without anyone crashing. A dead worker's leases expire and its streams move on.
"""

from __future__ import annotations

import math
import time

from redis.asyncio import Redis

from gateway.records import LOG_STREAM_PREFIX

WORKERS_KEY = "gatewatch:monitor:workers"
_LEASE_KEY = "gatewatch:monitor:lease:{stream}"

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def lease_key(stream: str) -> str:
    return _LEASE_KEY.format(stream=stream)


def fair_share(streams: int, live_workers: int) -> int:
    return math.ceil(streams / max(live_workers, 1))


class Ownership:
    def __init__(self, redis: Redis, worker_id: str, lease_seconds: float) -> None:
        self._redis = redis
        self.worker_id = worker_id
        self.lease_ms = max(int(lease_seconds * 1000), 1)
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)

    async def heartbeat(self) -> int:
        """Beat, forget workers silent for long, and return how many are live (this one included)."""
        now = int(time.time() * 1000)
        pipe = self._redis.pipeline(transaction=False)
        pipe.zadd(WORKERS_KEY, {self.worker_id: now})
        pipe.zremrangebyscore(WORKERS_KEY, "-inf", now - 10 * self.lease_ms)
        pipe.zcount(WORKERS_KEY, now - self.lease_ms, "+inf")
        _, _, live = await pipe.execute()
        return max(int(live), 1)

    async def leave(self) -> None:
        await self._redis.zrem(WORKERS_KEY, self.worker_id)

    async def discover(self) -> list[str]:
        """Every log stream now in Redis (SCAN: never blocks the server the way KEYS would)."""
        found = {
            key.decode() if isinstance(key, bytes) else str(key)
            async for key in self._redis.scan_iter(match=f"{LOG_STREAM_PREFIX}*", count=1000, _type="stream")
        }
        return sorted(found)

    async def acquire(self, stream: str) -> bool:
        """Take an unowned stream's lease (or keep one still ours, e.g. after a consumer was restarted)."""
        if await self.renew(stream):
            return True
        return bool(await self._redis.set(lease_key(stream), self.worker_id, nx=True, px=self.lease_ms))

    async def renew(self, stream: str) -> bool:
        return bool(await self._renew(keys=[lease_key(stream)], args=[self.worker_id, self.lease_ms]))

    async def release(self, stream: str) -> None:
        await self._release(keys=[lease_key(stream)], args=[self.worker_id])

    async def holder(self, stream: str) -> str | None:
        value = await self._redis.get(lease_key(stream))
        return value.decode() if isinstance(value, bytes) else value
