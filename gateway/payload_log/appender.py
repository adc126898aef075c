"""StreamAppender: a batch of stream entries into Redis in one round trip and one command per stream.

redis-py packs every argument of every command in Python; a log record is an XADD of 37 arguments, and a
pipeline of them cost ~70 µs of the gateway's CPU per record — more than the rest of the request. Here a batch
becomes one EVALSHA per stream whose script runs the XADDs inside Redis: hiredis packs the whole argument list
in C (~2 µs a record) and one reply comes back instead of one per record.

The script is not transactional: if Redis fails part-way, the entries before the failure stay written. The
writer already handles that case (cut-off pipelines did the same) by checking the `uid`s present before a replay.
Entries are grouped by stream and each group is one command with its stream as its only key, so the script also
runs on Redis Cluster, where each stream may live on another node.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError, ResponseError

# ARGV = maxlen, then per entry: its number of field/value arguments (2k) followed by those 2k arguments.
APPEND_SCRIPT = """
local maxlen = ARGV[1]
local position = 2
local added = 0
while position <= #ARGV do
  local width = tonumber(ARGV[position])
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(ARGV, position + 1, position + width))
  position = position + width + 1
  added = added + 1
end
return added
"""


class StreamAppender:
    def __init__(self, redis: Redis, maxlen: int) -> None:
        self._redis = redis
        self._maxlen = maxlen
        self._sha: str | None = None

    async def append(self, entries: Iterable[tuple[str, Mapping[str, str]]]) -> int:
        """XADD every (stream, fields) in order per stream; raises what Redis or the connection raise."""
        grouped = _by_stream(entries)
        if not grouped:
            return 0
        sha = self._sha or await self._load()
        try:
            added = await self._run(sha, grouped)
        except NoScriptError:  # Redis restarted (or SCRIPT FLUSH) since we loaded it
            added = await self._run(await self._load(), grouped)
        return added

    async def _load(self) -> str:
        self._sha = str(await self._redis.script_load(APPEND_SCRIPT))
        return self._sha

    async def _run(self, sha: str, grouped: dict[str, list[Mapping[str, str]]]) -> int:
        commands = [_pack(sha, stream, self._maxlen, fields) for stream, fields in grouped.items()]
        connection: AbstractConnection = await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.send_packed_command(b"".join(commands), check_health=False)
            # Read every reply even after an error one, so the connection goes back to the pool clean.
            replies = [await _reply(connection) for _ in commands]
        except BaseException:
            await connection.disconnect()
            raise
        finally:
            await self._redis.connection_pool.release(connection)
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise reply
        return sum(int(reply) for reply in replies)  # type: ignore[call-overload]


async def _reply(connection: AbstractConnection) -> object:
    try:
        return await connection.read_response()
    except ResponseError as error:
        return error


def _by_stream(entries: Iterable[tuple[str, Mapping[str, str]]]) -> dict[str, list[Mapping[str, str]]]:
    grouped: dict[str, list[Mapping[str, str]]] = {}
    for stream, fields in entries:
        grouped.setdefault(stream, []).append(fields)
    return grouped


def _pack(sha: str, stream: str, maxlen: int, entries: Sequence[Mapping[str, str]]) -> bytes:
    arguments: list[str | int] = ["EVALSHA", sha, 1, stream, maxlen]
    for fields in entries:
        arguments.append(2 * len(fields))
        for pair in fields.items():
            arguments.extend(pair)
    # hiredis's stub types the argument as a one-element tuple; any length is accepted.
    packed: bytes = hiredis.pack_command(tuple(arguments))  # type: ignore[arg-type]
    return packed
