"""LogWriter: every request and its answer into Redis streams, without slowing the response or losing a record.

The request path only appends to a bounded in-memory queue (`log()`, `feedback()`: no await, no I/O). One
background task drains it in batches, each one round trip to Redis (`appender.py`). When Redis fails or is too slow, the
batch goes to the disk spool and the writer switches to spooling until a PING succeeds; it then replays the spool
in order (and only then resumes direct writes, so per-process order holds). A batch cut off mid-way may have
written part of its batch: those records are spooled with the time of the attempt, and before replaying them
the writer reads the stream from that time on and skips the `uid`s already there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.payload_log.appender import Entry, StreamAppender
from gateway.payload_log.spool import Cursor, Spool, SpooledRecord, orphaned_spools
from gateway.records import LOG_FIELDS, Exchange, PayloadPolicy, exchange_values, log_stream

logger = logging.getLogger(__name__)

# Any Redis failure (down, hung, out of memory…) means "not written now": spool, never lose.
_UNREACHABLE = (RedisError, RedisConnectionError, RedisTimeoutError, OSError, asyncio.TimeoutError)
_OUTAGE_BATCH_FACTOR = 16  # spooling is cheap: drain bigger batches while Redis is away
_PROBE_INTERVAL = 0.25
_CLOCK_MARGIN_MS = 60_000  # stream ids come from Redis's clock, attempts from ours


@dataclass(frozen=True)
class WriterLimits:
    maxlen: int = 1_000_000
    queue_size: int = 100_000
    batch_size: int = 512
    spool_max_bytes: int = 1 << 30
    write_timeout: float = 2.0
    linger: float = 0.005  # seconds a partial batch waits for company: one round trip per request costs more CPU


class LogMetrics:
    """The writer's view of `gatewatch_log_*` (children resolved once)."""

    def __init__(self, records: Counter, queue_depth: Gauge, spool_bytes: Gauge) -> None:
        self.written = records.labels("written")
        self.spooled = records.labels("spooled")
        self.replayed = records.labels("replayed")
        self.dropped = records.labels("dropped")
        self.queue_depth = queue_depth
        self.spool_bytes = spool_bytes


# A queued record: its stream, the exchange (or feedback fields), the payload policy and the sampling draw.
_Queued = tuple[str, Exchange | dict[str, str], PayloadPolicy | None, bool]


class LogWriter:
    def __init__(
        self,
        redis: Redis,
        spool_dir: Path,
        metrics: LogMetrics,
        limits: WriterLimits,
        policy_for: Callable[[str], PayloadPolicy],
    ) -> None:
        self._redis = redis
        self._appender = StreamAppender(redis, limits.maxlen)
        self._spool_dir = spool_dir
        self._spool = Spool.for_process(spool_dir, limits.spool_max_bytes)
        self._metrics = metrics
        self._limits = limits
        self._policy_for = policy_for
        self._queue: deque[_Queued] = deque()
        self._wakeup = asyncio.Event()
        self._uid_prefix = secrets.token_hex(6)
        self._sequence = itertools.count()
        self._outage = False
        self._next_probe = 0.0
        self._cursor = Cursor()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- request path: enqueue only -----------------------------------------------------------------------

    def log(self, exchange: Exchange) -> None:
        policy = self._policy_for(exchange.endpoint)
        sampled_in = policy.sample >= 1.0 or random.random() < policy.sample
        self._enqueue((log_stream(exchange.endpoint), exchange, policy, sampled_in))

    def feedback(self, stream: str, fields: dict[str, str]) -> None:
        self._enqueue((stream, fields, None, True))

    def _enqueue(self, item: _Queued) -> None:
        if len(self._queue) >= self._limits.queue_size:
            self._metrics.dropped.inc()
            logger.error("log queue full (%d records): dropping a record for %s", len(self._queue), item[0])
            return
        self._queue.append(item)
        if not self._wakeup.is_set():
            self._wakeup.set()

    @property
    def depth(self) -> int:
        return len(self._queue)

    # -- lifecycle ----------------------------------------------------------------------------------------

    async def start(self) -> None:
        if not await asyncio.to_thread(self._spool.open, True):
            raise RuntimeError(f"cannot lock spool file {self._spool.path}")
        self._metrics.spool_bytes.set(self._spool.size)
        self._task = asyncio.create_task(self._run(), name="log writer")
        self._task.add_done_callback(_report_crash)

    async def aclose(self) -> None:
        """Flush everything queued (to Redis, else to the spool), then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        await asyncio.to_thread(self._spool.close)

    # -- background drain ---------------------------------------------------------------------------------

    async def _run(self) -> None:
        await self._replay_orphans()
        while True:
            batch = await self._next_batch()
            if batch:
                await self._deliver(batch)
            elif self._spool.size and not self._closing:
                await self._recover()
            if self._closing and not self._queue:
                if self._spool.size and not self._outage:
                    await self._recover()
                return

    async def _next_batch(self) -> list[Entry]:
        if not self._queue and not self._closing:
            self._wakeup.clear()
            timeout = _PROBE_INTERVAL if self._spool.size else None
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wakeup.wait()
        if 0 < len(self._queue) < self._limits.batch_size and not self._closing and self._limits.linger > 0:
            await asyncio.sleep(self._limits.linger)  # let a trickle of records share one round trip
        limit = self._limits.batch_size * (_OUTAGE_BATCH_FACTOR if self._outage else 1)
        popleft = self._queue.popleft
        batch = [self._encode(popleft()) for _ in range(min(len(self._queue), limit))]
        self._metrics.queue_depth.set(len(self._queue))
        return batch

    def _encode(self, item: _Queued) -> Entry:
        # The uid is drawn here, in queue order, so that it is unique per process and ordered like the records.
        stream, body, policy, sampled_in = item
        uid = f"{self._uid_prefix}-{next(self._sequence)}"
        if isinstance(body, dict):
            return Entry.of(stream, {"uid": uid, **body})
        assert policy is not None
        return Entry(stream, LOG_FIELDS, exchange_values(body, uid, policy, sampled_in))

    async def _deliver(self, batch: list[Entry]) -> None:
        if self._outage or self._spool.size:
            await self._to_spool(_spooled(batch, None))  # keep order: nothing overtakes what is already spooled
            if not self._closing:
                await self._recover()
            return
        attempted = _now_ms()
        if await self._write(batch):
            self._metrics.written.inc(len(batch))
            return
        self._enter_outage()
        await self._to_spool(_spooled(batch, attempted))

    async def _write(self, entries: Iterable[Entry]) -> bool:
        try:
            async with asyncio.timeout(self._limits.write_timeout):
                await self._appender.append(entries)
        except _UNREACHABLE as exc:
            logger.warning("redis write failed (%s: %s); spooling to %s", type(exc).__name__, exc, self._spool.path)
            return False
        return True

    async def _to_spool(self, records: list[SpooledRecord]) -> None:
        kept = await asyncio.to_thread(self._spool.append, records)
        self._metrics.spooled.inc(kept)
        self._metrics.spool_bytes.set(self._spool.size)
        if kept < len(records):
            self._metrics.dropped.inc(len(records) - kept)
            logger.error("spool %s is full: dropped %d records", self._spool.path, len(records) - kept)

    def _enter_outage(self) -> None:
        if not self._outage:
            logger.warning("redis unreachable: log records go to %s until it returns", self._spool.path)
        self._outage = True

    async def _recover(self) -> None:
        """If Redis answers, replay the spool; otherwise stay in outage."""
        if self._outage and not await self._reachable():
            return
        self._outage = False
        if not await self._replay(self._spool, self._cursor_setter(self._spool)):
            self._enter_outage()
            return
        logger.info("redis is back: spool replayed")

    async def _reachable(self) -> bool:
        now = time.monotonic()
        if now < self._next_probe:
            return False
        self._next_probe = now + _PROBE_INTERVAL
        try:
            async with asyncio.timeout(self._limits.write_timeout):
                await self._redis.ping()
        except _UNREACHABLE:
            return False
        return True

    def _cursor_setter(self, spool: Spool) -> Callable[[Cursor], None]:
        def save(cursor: Cursor) -> None:
            spool.save_cursor(cursor)
            if spool is self._spool:
                self._cursor = cursor

        return save

    async def _replay(self, spool: Spool, save_cursor: Callable[[Cursor], None]) -> bool:
        """Write `spool` to Redis in order, from its cursor; True when it is empty afterwards."""
        cursor = await asyncio.to_thread(spool.load_cursor)
        while True:
            records, next_offset = await asyncio.to_thread(spool.read, cursor.offset, self._limits.batch_size)
            if not records:
                await asyncio.to_thread(spool.clear)
                self._metrics.spool_bytes.set(self._spool.size)
                return True
            pending = await self._not_yet_written(records, cursor.attempted_ms)
            if pending is None:
                return False
            attempted = _now_ms()
            if not await self._write(Entry.of(r.stream, r.fields) for r in pending):
                await asyncio.to_thread(save_cursor, Cursor(cursor.offset, cursor.attempted_ms or attempted))
                return False
            self._metrics.replayed.inc(len(records))
            cursor = Cursor(next_offset, None)
            await asyncio.to_thread(save_cursor, cursor)

    async def _not_yet_written(
        self, records: list[SpooledRecord], chunk_attempted_ms: int | None
    ) -> list[SpooledRecord] | None:
        """Drop records a cut-off batch already delivered; None if Redis failed while checking."""
        since: dict[str, int] = {}
        for record in records:
            attempted = record.attempted_ms or chunk_attempted_ms
            if attempted is not None:
                since[record.stream] = min(since.get(record.stream, attempted), attempted)
        if not since:
            return records
        present: set[str] = set()
        try:
            for stream, start_ms in since.items():
                present |= await self._uids_since(stream, start_ms - _CLOCK_MARGIN_MS)
        except _UNREACHABLE:
            return None
        pending = [r for r in records if r.fields.get("uid") not in present]
        if len(pending) < len(records):
            logger.info(
                "replay: %d records already reached redis before the outage; not sent twice",
                len(records) - len(pending),
            )
        return pending

    async def _uids_since(self, stream: str, start_ms: int, page: int = 5000) -> set[str]:
        found: set[str] = set()
        start = f"{max(start_ms, 0)}-0"
        while True:
            async with asyncio.timeout(self._limits.write_timeout):
                entries: Any = await self._redis.xrange(stream, min=start, max="+", count=page)
            found |= {fields[b"uid"].decode() for _, fields in entries if b"uid" in fields}
            if len(entries) < page:
                return found
            start = "(" + entries[-1][0].decode()

    async def _replay_orphans(self) -> None:
        """Spools left by processes that died (or were stopped during an outage) are replayed first."""
        orphans = await asyncio.to_thread(orphaned_spools, self._spool_dir, self._limits.spool_max_bytes)
        for orphan in orphans:
            if orphan.path == self._spool.path:
                continue
            logger.info("replaying %s (%d bytes) left by an earlier process", orphan.path, orphan.size)
            if not await self._replay(orphan, orphan.save_cursor):
                # Redis is down: adopt the rest into our own spool (ahead of anything new) and go on.
                await self._adopt(orphan)
                self._enter_outage()
            await asyncio.to_thread(orphan.close)

    async def _adopt(self, orphan: Spool) -> None:
        cursor = await asyncio.to_thread(orphan.load_cursor)
        offset = cursor.offset
        while True:
            records, offset = await asyncio.to_thread(orphan.read, offset, self._limits.batch_size)
            if not records:
                break
            if cursor.attempted_ms is not None:
                records = [SpooledRecord(r.stream, r.fields, r.attempted_ms or cursor.attempted_ms) for r in records]
                cursor = Cursor()
            await self._to_spool(records)
        await asyncio.to_thread(orphan.clear)


def _spooled(batch: list[Entry], attempted_ms: int | None) -> list[SpooledRecord]:
    return [SpooledRecord(entry.stream, entry.as_dict(), attempted_ms) for entry in batch]


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.critical("log writer stopped: %r", task.exception())


def _now_ms() -> int:
    return int(time.time() * 1000)
