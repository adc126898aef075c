"""One log stream, consumed while this worker holds its lease: read, window, analyse, commit.

Start of ownership: join the group (created at id 0), load the alert states, then re-read every pending entry
(XAUTOCLAIM from 0-0, min-idle 0), whoever it was delivered to, to rebuild the open windows a previous owner left.
Then XREADGROUP in batches. A closed window is analysed in a thread while reading goes on; windows are committed
in the order they closed (their alert states depend on it), each with its entries' XACK (`store.py`).

While a version's drift reference is being taken from live rows, it grows only as windows commit (each offers its
rows). A window closed meanwhile is therefore analysed only when its turn to commit comes, after every window before
it has offered its rows: the reference is then either complete, and the window is tested against it, or still
short, and the window's rows go into it. Analysed any earlier (a backlog closes several windows in one batch), it
would miss a reference its predecessors complete and go untested.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from typing import Any

import orjson
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from gateway.records import LOG_STREAM_PREFIX, MONITOR_GROUP, ROLE_PRIMARY, feedback_stream
from monitors.alerts import RETRAIN_REQUESTED, AlertRules, AlertState, WindowFacts, build_event, step
from monitors.analysis import DriftSettings, WindowAnalysis, analyse, result_document
from monitors.drift.detector import ReferenceProfile
from monitors.feedback import FeedbackJoiner
from monitors.lag import LagProbe
from monitors.metrics import MonitorMetrics
from monitors.reference import ReferenceStore, VersionReference
from monitors.store import FEEDBACK_CURSOR_FIELD, Commit, WindowStore
from monitors.windows import ClosedWindow, WindowSet, WindowSpec, parse_entry, parse_flat_entry

logger = logging.getLogger(__name__)

_MAX_ANALYSES = 4  # closed windows analysed ahead of their commit, per stream (memory stays bounded)
_FEEDBACK_SECONDS = 1.0
_LAG_SECONDS = 1.0
_LAG_BEHIND_SECONDS = 10.0
RawEntry = tuple[bytes, Any]


@dataclass
class ConsumerContext:
    """What every stream consumer of a worker shares."""

    redis: Redis
    worker_id: str
    store: WindowStore
    references: ReferenceStore
    metrics: MonitorMetrics
    lag: LagProbe
    executor: Executor
    spec: WindowSpec
    rules: AlertRules
    drift: DriftSettings
    read_count: int
    sweep_seconds: float  # how often to look for entries pending at another consumer (a stale former owner)
    block_ms: int = 500


@dataclass
class _Closed:
    window: ClosedWindow
    reference: VersionReference | None
    analysis: asyncio.Future[WindowAnalysis] | None = None  # None: not started yet (see the module docstring)
    profile: ReferenceProfile | None = None  # the reference it is analysed against (its `reference` may change)

    @property
    def ready(self) -> bool:
        """Committable without waiting for a thread: analysed, or to be analysed at its commit."""
        return self.analysis is None or self.analysis.done()


class StreamConsumer:
    def __init__(self, stream: str, ctx: ConsumerContext) -> None:
        self.stream = stream
        self.endpoint = stream.removeprefix(LOG_STREAM_PREFIX)
        self._ctx = ctx
        self._windows = WindowSet(ctx.spec)
        self._states: dict[str, AlertState] = {}
        self._joiner = FeedbackJoiner()
        self._feedback_cursor = "0-0"
        self._queue: deque[_Closed] = deque()
        self._stopping = asyncio.Event()
        self._last_run: dict[str, float] = {}

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        await self._start()
        while not self._stopping.is_set():
            batch = await self._read()
            caught_up = len(batch) < self._ctx.read_count
            await self._feed(batch)
            if caught_up:
                await self._enqueue(self._windows.expire(int(time.time() * 1000)))
            await self._housekeeping(caught_up)
            await self._commit_ready(drain=caught_up)

    async def _start(self) -> None:
        try:
            await self._ctx.redis.xgroup_create(self.stream, MONITOR_GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        for field, value in (await self._ctx.store.load_state(self.stream)).items():
            if field == FEEDBACK_CURSOR_FIELD:
                self._feedback_cursor = value.decode()
            else:
                self._states[field] = AlertState.from_json(value)
        await self._claim_pending()

    async def _claim_pending(self) -> None:
        """Take over every pending entry of the group and feed it in stream order (rebuilding open windows)."""
        cursor: Any = "0-0"
        claimed = 0
        while True:
            reply: Any = await self._ctx.redis.xautoclaim(
                self.stream, MONITOR_GROUP, self._ctx.worker_id, 0, cursor, count=self._ctx.read_count)
            cursor, entries = reply[0], reply[1]
            claimed += len(entries)
            await self._feed(entries)
            if cursor in (b"0-0", "0-0"):
                break
        if claimed:
            logger.info("%s: re-read %d pending entries", self.stream, claimed)

    async def _read(self) -> list[RawEntry]:
        # Sent with its name as bytes, XREADGROUP skips redis-py's reply callback, which makes a dict of every
        # entry's fields: entries come as [id, [name, value, …]] and `parse_flat_entry` reads just what it needs.
        ctx = self._ctx
        execute: Any = ctx.redis.execute_command
        reply: Any = await execute(
            b"XREADGROUP", b"GROUP", MONITOR_GROUP, ctx.worker_id, b"COUNT", ctx.read_count, b"BLOCK", ctx.block_ms,
            b"STREAMS", self.stream, b">")
        if not reply:
            return []
        groups = reply.values() if isinstance(reply, dict) else (entries for _, entries in reply)  # RESP3 | RESP2
        return [entry for entries in groups for entry in entries]

    async def _feed(self, entries: Sequence[RawEntry]) -> None:
        unusable: list[bytes] = []
        closed: list[ClosedWindow] = []
        add = self._windows.add
        for entry_id, fields in entries:
            if isinstance(fields, list):
                entry = parse_flat_entry(self.stream, entry_id, fields)
            else:
                entry = parse_entry(self.stream, entry_id, fields)
            if entry is None:
                unusable.append(entry_id)
                continue
            now_closed, duplicates = add(entry)
            if now_closed:
                closed += now_closed
            if duplicates:
                unusable += duplicates
        # Nothing of these is counted anywhere (or it is counted already): acknowledging them now loses nothing.
        await self._ctx.store.ack(self.stream, unusable)
        await self._enqueue(closed)

    async def _enqueue(self, closed: Sequence[ClosedWindow]) -> None:
        for window in closed:
            reference = None
            if window.key.model and window.key.version:
                reference = await self._ctx.references.get(window.key.model, window.key.version)
            pending = _Closed(window, reference)
            if reference is None or not reference.wants_rows:
                self._analyse(pending)
            # else: the windows queued before it may still complete the reference; analysed at its commit
            self._queue.append(pending)
            await self._commit_ready(drain=False)

    def _analyse(self, closed: _Closed) -> asyncio.Future[WindowAnalysis]:
        """Start the window's analysis in a thread, against its reference as it stands now."""
        reference = closed.reference
        closed.profile = reference.profile if reference else None
        closed.analysis = asyncio.get_running_loop().run_in_executor(
            self._ctx.executor, analyse, closed.window, closed.profile, reference.meta if reference else {},
            bool(reference and reference.wants_rows), self._ctx.drift)
        return closed.analysis

    async def _commit_ready(self, drain: bool) -> None:
        while self._queue and (drain or self._queue[0].ready or len(self._queue) > _MAX_ANALYSES):
            closed = self._queue.popleft()
            # Every window before it is committed: a live reference holds their rows now.
            analysis = await (closed.analysis or self._analyse(closed))
            await self._commit(closed.window, closed.reference, closed.profile, analysis)

    async def _commit(self, window: ClosedWindow, reference: VersionReference | None,
                      profile: ReferenceProfile | None, analysis: WindowAnalysis) -> None:
        ctx, key = self._ctx, window.key
        field = f"alert:{key.label}"
        tested = analysis.drift is not None and analysis.drift.tested > 0
        drifted = analysis.drift.drifted if analysis.drift is not None and tested else None
        p99 = analysis.traffic.p99_ms if key.role == ROLE_PRIMARY else None
        state, fired = step(self._states.get(field, AlertState()), drifted, p99, ctx.rules)
        facts = WindowFacts(key, window.start_ms, window.end_ms, window.rows, analysis.drift, p99,
                            ctx.rules.latency_slo_ms)
        events = [build_event(event_type, facts) for event_type in fired]
        performance = None
        if key.role == ROLE_PRIMARY:
            await self._read_feedback()  # whatever ground truth arrived before this commit joins it
            labels = [str(label) for label in (reference.meta.get("labels") or [])] if reference else []
            self._joiner.add_predictions(key, analysis.task, labels, analysis.predictions)
            performance = self._joiner.take(key)
        retrain = next((event for event in events if event["type"] == RETRAIN_REQUESTED), None)
        source = profile.source if profile else "none yet"  # what the window was tested against, if anything
        result = result_document(window, analysis, ctx.worker_id, source, events,
                                 asdict(performance) if performance else None)
        asked = await ctx.store.commit(self.stream, Commit(
            key_model=key.model, key_version=key.version, result=orjson.dumps(result),
            state={field: state.to_json(), FEEDBACK_CURSOR_FIELD: self._feedback_cursor.encode()},
            events=[orjson.dumps(event) for event in events if event is not retrain],
            retrain_event=orjson.dumps(retrain) if retrain else None,
            entry_ids=window.entry_ids,
        ))
        self._states[field] = state
        self._report(window, analysis, state, events, retrain is not None and not asked)
        if performance is not None:
            ctx.metrics.performance(key, performance)
        if reference is not None and reference.wants_rows:
            await ctx.references.offer(reference, analysis.inputs, analysis.outputs, analysis.output_types)

    def _report(self, window: ClosedWindow, analysis: WindowAnalysis, state: AlertState,
                events: list[dict[str, Any]], retrain_cooling: bool) -> None:
        self._ctx.metrics.window(window.key, window.rows, analysis.drift, state.drift_active)
        if window.key.role == ROLE_PRIMARY:
            self._ctx.metrics.traffic(window.key, analysis.traffic)
        for event in events:
            if event["type"] == RETRAIN_REQUESTED and retrain_cooling:
                logger.info("%s: retrain request suppressed (cooldown for %s v%s)", self.stream,
                            window.key.model, window.key.version)
            else:
                logger.warning("%s %s: %s", event["type"], event["event_id"], event["summary"])

    async def _housekeeping(self, caught_up: bool) -> None:
        """Chores on timers: feedback, stray pending entries, the lag gauge (rarer while behind, when counting
        the undelivered entries costs Redis more)."""
        if self._is_due("feedback", _FEEDBACK_SECONDS):
            await self._read_feedback()
        if self._is_due("sweep", self._ctx.sweep_seconds) and await self._others_pending():
            await self._claim_pending()
        if self._is_due("lag", _LAG_SECONDS if caught_up else _LAG_BEHIND_SECONDS):
            self._ctx.metrics.lag(self.endpoint, await self._ctx.lag.lag(self.stream))

    def _is_due(self, chore: str, every: float) -> bool:
        now = time.monotonic()
        if chore in self._last_run and now - self._last_run[chore] < every:
            return False
        self._last_run[chore] = now
        return True

    async def _read_feedback(self) -> None:
        reply: Any = await self._ctx.redis.xread({feedback_stream(self.endpoint): self._feedback_cursor}, count=1000)
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self._joiner.add_feedback(fields or {})
                self._feedback_cursor = entry_id.decode()

    async def _others_pending(self) -> bool:
        """Entries delivered to another consumer: a former owner read them after this worker took over."""
        summary: Any = await self._ctx.redis.xpending(self.stream, MONITOR_GROUP)
        me = self._ctx.worker_id.encode()
        return any(c["name"] != me and int(c["pending"]) > 0 for c in summary.get("consumers") or [])
