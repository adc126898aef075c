"""Where closed windows go, atomically: result, alert state, alert events and the acknowledgement of the entries.

One Lua script per closed window, so a crash can never store a result without acknowledging its entries or
acknowledge them without storing it; and the script first checks that the caller still holds the stream's lease,
so a worker that lost its stream (paused past its lease, say) cannot commit a window its successor is rebuilding.
(A MULTI/EXEC transaction gives the same atomicity but cannot make the writes conditional on the lease, nor the
retrain request on its cooldown.)

Keys:
    gatewatch:windows                              results, field `result` = JSON (XADD MAXLEN ~)
    gatewatch:monitor:state:{stream}               hash: alert state per window key, feedback cursor
    gatewatch:alerts                               alert events, field `event` = JSON (the webhook payload)
    gatewatch:monitor:retrain:{model}:{version}    retrain cooldown (SET NX PX), shared by all workers
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from gateway.records import ALERTS_STREAM, MONITOR_GROUP
from monitors.ownership import lease_key

WINDOWS_STREAM = "gatewatch:windows"
STATE_KEY = "gatewatch:monitor:state:{stream}"
RETRAIN_KEY = "gatewatch:monitor:retrain:{model}:{version}"
FEEDBACK_CURSOR_FIELD = "feedback_cursor"

# KEYS: lease, log stream, windows stream, state hash, alerts stream, retrain cooldown key
# ARGV: owner, group, windows maxlen, result, n, n x (field, value), m, m x event, retrain event or '',
#       cooldown ms, entry ids...
_COMMIT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local i = 5
local n = tonumber(ARGV[i])
for j = 1, n do redis.call('HSET', KEYS[4], ARGV[i + 2 * j - 1], ARGV[i + 2 * j]) end
i = i + 2 * n + 1
n = tonumber(ARGV[i])
for j = 1, n do redis.call('XADD', KEYS[5], '*', 'event', ARGV[i + j]) end
i = i + n + 1
local asked = 0
if ARGV[i] ~= '' then
  local cooldown = tonumber(ARGV[i + 1])
  if cooldown <= 0 or redis.call('SET', KEYS[6], ARGV[1], 'NX', 'PX', cooldown) then
    redis.call('XADD', KEYS[5], '*', 'event', ARGV[i])
    asked = 1
  end
end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', 'result', ARGV[4])
i = i + 2
while i <= #ARGV do
  local last = math.min(i + 999, #ARGV)
  redis.call('XACK', KEYS[2], ARGV[2], unpack(ARGV, i, last))
  i = last + 1
end
return asked
"""


class LeaseLost(Exception):
    """The stream's lease is no longer this worker's: stop consuming it; its new owner rebuilds the windows."""


@dataclass(frozen=True)
class Commit:
    key_model: str
    key_version: str
    result: bytes
    state: Mapping[str, bytes]
    events: Sequence[bytes]
    retrain_event: bytes | None
    entry_ids: Sequence[bytes]


class WindowStore:
    def __init__(self, redis: Redis, owner: str, results_maxlen: int, retrain_cooldown_seconds: float) -> None:
        self._redis = redis
        self._owner = owner
        self._maxlen = results_maxlen
        self._cooldown_ms = int(retrain_cooldown_seconds * 1000)
        self._commit = redis.register_script(_COMMIT)

    async def commit(self, stream: str, commit: Commit) -> bool:
        """Store and acknowledge one closed window; True when its retrain request was sent (not cooling down)."""
        keys = [lease_key(stream), stream, WINDOWS_STREAM, STATE_KEY.format(stream=stream), ALERTS_STREAM,
                RETRAIN_KEY.format(model=commit.key_model, version=commit.key_version)]
        args: list[Any] = [self._owner, MONITOR_GROUP, self._maxlen, commit.result, len(commit.state)]
        for field, value in commit.state.items():
            args += [field, value]
        args += [len(commit.events), *commit.events, commit.retrain_event or b"", self._cooldown_ms]
        args += commit.entry_ids
        outcome = await self._commit(keys=keys, args=args)
        if outcome == -1:
            raise LeaseLost(stream)
        return bool(outcome)

    async def load_state(self, stream: str) -> dict[str, bytes]:
        raw: Any = await self._redis.hgetall(STATE_KEY.format(stream=stream))
        return {key.decode(): value for key, value in raw.items()}

    async def ack(self, stream: str, entry_ids: Sequence[bytes]) -> None:
        """Acknowledge entries that belong to no window (unreadable, trimmed, or duplicates of counted ones)."""
        if entry_ids:
            await self._redis.xack(stream, MONITOR_GROUP, *entry_ids)
