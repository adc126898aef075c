"""Stream lag of the monitor group: entries not yet delivered to it, plus entries delivered but not acknowledged.

Redis 7 reports the undelivered count as `lag` in XINFO GROUPS; Redis 6.2 (the embedded one) does not, so the
entries after the group's `last-delivered-id` are counted server-side by a Lua script, in chunks (each chunk
returns two numbers, not the entries). Past `cap` entries counting stops and the stream length, an upper bound of
the lag, is reported instead.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

from gateway.records import MONITOR_GROUP

_COUNT_AFTER = """
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
if #entries == 0 then return {0, ARGV[1]} end
return {#entries, entries[#entries][1]}
"""


class LagProbe:
    def __init__(self, redis: Redis, chunk: int = 500, cap: int = 10_000) -> None:
        self._redis = redis
        self._count_after = redis.register_script(_COUNT_AFTER)
        self._chunk = chunk
        self._cap = cap

    async def lag(self, stream: str) -> int:
        groups: list[dict[Any, Any]] = await self._redis.xinfo_groups(stream)
        group = next((g for g in groups if _text(g.get("name")) == MONITOR_GROUP), None)
        if group is None:
            return int(await self._redis.xlen(stream))
        pending = int(group.get("pending") or 0)
        if group.get("lag") is not None:
            return int(group["lag"]) + pending
        undelivered = await self._undelivered(stream, _text(group.get("last-delivered-id")) or "0-0")
        if undelivered is None:
            return int(await self._redis.xlen(stream))  # an upper bound of undelivered + pending
        return undelivered + pending

    async def _undelivered(self, stream: str, cursor: str) -> int | None:
        """Entries after `cursor`, or None past the cap."""
        counted = 0
        while counted < self._cap:
            found, last = await self._count_after(keys=[stream], args=[cursor, self._chunk])
            counted += int(found)
            if int(found) < self._chunk:
                return counted
            cursor = _text(last)
        return None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")
