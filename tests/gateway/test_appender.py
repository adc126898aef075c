"""StreamAppender against a real redis-server (the `redis_server` fixture): one EVALSHA per stream (and run of
entries with the same field names) per batch.

Every test builds its own asyncio client with the log writer's options (`client_options`: no retries, so nothing
here is rescued by redis-py sending a command again) and reads what landed with the plain `redis_client`, byte
for byte. Waiting is never a sleep: each step awaits the call it checks, or polls a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from gateway.payload_log.appender import APPEND_SCRIPT, Entry, StreamAppender
from gateway.redis_connection import client_options
from tests.conftest import RedisServer
from tests.polling import wait_for

LOG = "gatewatch:log:appender-a"
OTHER = "gatewatch:log:appender-b"
CANCELLED = "gatewatch-test-cancelled-append"
SCRIPT_SHA = hashlib.sha1(APPEND_SCRIPT.encode()).hexdigest()

Pair = tuple[str, Mapping[str, str]]
Raw = dict[bytes, bytes]


@pytest.fixture
async def connect(redis_server: RedisServer) -> AsyncIterator[Callable[..., aioredis.Redis]]:
    """Asyncio clients on `redis_server` with the log writer's options; closed after the test."""
    clients: list[aioredis.Redis] = []

    def make(**overrides: Any) -> aioredis.Redis:
        client = aioredis.Redis.from_url(redis_server.url, **{**client_options(2.0), **overrides})
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def stored(client: redis.Redis, stream: str) -> list[Raw]:
    raw: Any = client.xrange(stream)
    return [fields for _, fields in raw]


def as_bytes(fields: Mapping[str, str]) -> Raw:
    return {name.encode(): value.encode() for name, value in fields.items()}


def entries(batch: list[Pair]) -> list[Entry]:
    return [Entry.of(stream, fields) for stream, fields in batch]


def records(stream: str, count: int, tag: str = "") -> list[Pair]:
    return [(stream, {"uid": f"{tag}{stream}-{i}", "n": str(i)}) for i in range(count)]


# -- what lands, byte for byte ------------------------------------------------------------------------------------


async def test_interleaved_streams_each_get_their_own_entries_in_order_byte_exact(
    connect: Callable[..., aioredis.Redis], redis_client: redis.Redis
) -> None:
    large = "".join(chr(0x20 + i % 0x5F) for i in range(100_000)) + "ü€𝄞"  # ~100 KB, multibyte tail
    # Runs of entries sharing their field names (one command each, names sent once), broken by the other
    # stream, by other names and by the same names in another order: every entry must come back as it went.
    batch: list[Pair] = [
        (LOG, {"uid": "a-0", "text": "naïve café — 日本語 🚀", "empty": ""}),
        (OTHER, {"uid": "b-0", "ключ": "значение", "": "empty name"}),
        (LOG, {"uid": "a-1", "text": large, "empty": ""}),
        (OTHER, {"uid": "b-1", "ключ": "*3\r\n$4\r\nPING\r\n", "": "a\x00b"}),
        (LOG, {"uid": "a-2", "text": "", "empty": "'; return 0 --"}),
        (LOG, {"uid": "a-3", "payload": "other names", "n": "1e400"}),
        (LOG, {"uid": "a-4", "text": "the first names again", "empty": ""}),
        (OTHER, {"ключ": "same names, other order", "": "", "uid": "b-2"}),
        (OTHER, {"uid": "b-3"}),
        (LOG, {"uid": "a-5", "text": "  ", "empty": ""}),
    ]
    appender = StreamAppender(connect(), maxlen=10_000)

    added = await appender.append(Entry.of(name, fields) for name, fields in batch)  # the writer passes a generator

    assert added == len(batch)
    for stream in (LOG, OTHER):
        assert stored(redis_client, stream) == [as_bytes(fields) for name, fields in batch if name == stream]
    assert stored(redis_client, LOG)[1][b"text"] == large.encode()


async def test_nothing_to_append_returns_zero(
    connect: Callable[..., aioredis.Redis], redis_client: redis.Redis
) -> None:
    assert await StreamAppender(connect(), maxlen=100).append([]) == 0
    assert redis_client.dbsize() == 0


# -- the script cache and the connection come and go ------------------------------------------------------------


async def test_script_flush_between_appends_reloads_the_script(
    connect: Callable[..., aioredis.Redis], redis_client: redis.Redis
) -> None:
    appender = StreamAppender(connect(), maxlen=10_000)
    first, second = records(LOG, 3, "first-"), records(LOG, 4, "second-") + records(OTHER, 2, "second-")
    assert await appender.append(entries(first)) == 3

    redis_client.script_flush()  # what a Redis restart without AOF does to the script cache too
    assert redis_client.script_exists(SCRIPT_SHA) == [False]

    assert await appender.append(entries(second)) == 6  # NOSCRIPT, load, run again: each entry once
    assert stored(redis_client, LOG) == [as_bytes(fields) for _, fields in first + second[:4]]
    assert stored(redis_client, OTHER) == [as_bytes(fields) for _, fields in second[4:]]
    assert redis_client.script_exists(SCRIPT_SHA) == [True]


async def restart(server: RedisServer) -> None:
    """A new redis-server process on the same port: every pooled socket is dead, the script cache is empty, and
    AOF keeps the streams."""
    await asyncio.to_thread(server.stop)
    await asyncio.to_thread(server.start)


async def test_after_a_redis_restart_the_first_append_succeeds(
    connect: Callable[..., aioredis.Redis], redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """A dead pooled socket is replaced and the lost script loaded again, within the one call (client_options
    states RESP2, without which redis-py 8.1 hands out the dead socket once: redis/redis-py#4260)."""
    appender = StreamAppender(connect(max_connections=1), maxlen=10_000)
    before, after = records(LOG, 5, "before-"), records(LOG, 5, "after-")
    assert await appender.append(entries(before)) == 5  # script loaded, the one pooled connection open
    await restart(redis_server)
    assert await appender.append(entries(after)) == 5  # reconnected, NOSCRIPT, script loaded again, run once
    assert stored(redis_client, LOG) == [as_bytes(fields) for _, fields in before + after]
    assert redis_client.script_exists(SCRIPT_SHA) == [True]


# -- a failing stream in a batch ----------------------------------------------------------------------------------


async def test_a_wrongtype_stream_fails_the_append_but_not_the_other_streams_nor_the_connection(
    connect: Callable[..., aioredis.Redis], redis_client: redis.Redis
) -> None:
    bad = "gatewatch:log:not-a-stream"
    redis_client.set(bad, "a plain string")
    client = connect(max_connections=1)
    appender = StreamAppender(client, maxlen=10_000)
    assert await appender.append(entries(records(LOG, 1, "warm-"))) == 1
    connection_id = await client.client_id()  # the one pooled connection, which the appender also uses

    # The bad stream's command goes first: its error reply must not stop the good stream's reply being read.
    batch = [(bad, {"uid": "x-0"}), *records(LOG, 3), (bad, {"uid": "x-1"}), *records(OTHER, 2)]
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await appender.append(entries(batch))

    # Not transactional: one EVALSHA per stream, so the good streams are written although the append raised.
    # The writer relies on this being visible: it spools the whole batch and, before replaying it, skips the
    # `uid`s already in each stream, so these entries are not written twice.
    assert stored(redis_client, LOG) == [as_bytes(f) for _, f in records(LOG, 1, "warm-") + records(LOG, 3)]
    assert stored(redis_client, OTHER) == [as_bytes(f) for _, f in records(OTHER, 2)]
    assert redis_client.get(bad) == b"a plain string"

    # Every reply was read, so the same connection serves the next append: no reconnection, nothing left over.
    assert await appender.append(entries(records(OTHER, 2, "next-"))) == 2
    assert await client.client_id() == connection_id
    assert stored(redis_client, OTHER)[2:] == [as_bytes(f) for _, f in records(OTHER, 2, "next-")]


# -- MAXLEN ---------------------------------------------------------------------------------------------------------


async def test_maxlen_trims_approximately_and_keeps_the_newest_entries(
    connect: Callable[..., aioredis.Redis], redis_client: redis.Redis
) -> None:
    cap, count = 100, 1_000
    config: Any = redis_client.config_get("stream-node-max-entries")
    node_size = int(config["stream-node-max-entries"])
    appender = StreamAppender(connect(), maxlen=cap)
    batch = records(LOG, count)

    assert await appender.append(entries(batch)) == count

    length = redis_client.xlen(LOG)
    # `MAXLEN ~` drops whole radix-tree nodes only: never below the cap, at most about one node above it.
    assert cap <= length <= cap + node_size, length
    assert stored(redis_client, LOG) == [as_bytes(fields) for _, fields in batch[-length:]]  # the newest, in order


# -- cancellation -----------------------------------------------------------------------------------------------------


async def test_cancelled_mid_append_leaves_the_pool_usable(
    connect: Callable[..., aioredis.Redis], redis_client: redis.Redis
) -> None:
    appender = StreamAppender(connect(max_connections=1, client_name=CANCELLED), maxlen=1_000_000)
    assert await appender.append(entries(records(OTHER, 1, "warm-"))) == 1  # script cached, the one connection open
    big = [(LOG, {"uid": f"big-{i}", "payload": "v" * 1_000}) for i in range(8_000)]  # ~8 MB: many socket writes

    with pytest.raises(TimeoutError) as raised:
        async with asyncio.timeout(0):  # cancels at the append's first suspension: sending the 8 MB
            await appender.append(entries(big))

    cancelled = raised.value.__cause__
    assert isinstance(cancelled, asyncio.CancelledError)
    where = [frame.f_code.co_name for frame, _ in traceback.walk_tb(cancelled.__traceback__)]
    assert "_run" in where and ("send_packed_command" in where or "_reply" in where), where  # mid-protocol

    # One connection in the pool: it was given back (else "Too many connections"), and not as it was, or the
    # rest of the big command would swallow this one, or its reply would answer this one's read.
    following = records(OTHER, 3, "after-")
    assert await appender.append(entries(following)) == 3
    assert stored(redis_client, OTHER)[1:] == [as_bytes(fields) for _, fields in following]

    # The cancelled connection is closed, but asyncio's close() still flushes what the transport had buffered:
    # the rest of the big command may reach Redis after append() has raised. Wait for that socket to go away
    # (so nothing lands in the next test's database), then: what was written is a prefix of the batch, in order.
    def one_connection_left() -> bool:
        listed: Any = redis_client.client_list()
        names: list[str] = [client["name"] for client in listed]
        return names.count(CANCELLED) == 1  # the pool's new connection only

    await wait_for(one_connection_left, 10, "the cancelled connection to close")
    landed = [fields[b"uid"].decode() for fields in stored(redis_client, LOG)]
    assert landed == [fields["uid"] for _, fields in big[: len(landed)]]
