"""AdaptiveBatcher: stacks concurrent requests for one model version along the batch dimension.

A batch forms from what is already waiting when a run slot frees up, so under load batches grow by themselves
while the previous ones run, and a lone request on an idle model is dispatched at once: it never waits for
company. When the waiting requests already show concurrency, the batcher may hold the batch open for up to
`max_queue_delay_ms` (counted from its oldest request's arrival) to fill it to `max_batch_size` rows — but only
while requests keep arriving: when none comes within a tenth of that delay, the batch goes as it is. Eight
closed-loop clients can never fill 32 rows, and waiting the whole delay for them halved their throughput
(2,271 req/s at c=8 with the server half idle, against 4,271 for a hand-written app: bench/REPORT.md at cc0c17c).

The queue is bounded: a full queue answers `Overloaded` (429 + Retry-After) immediately. A request whose client
has gone (the server says so through `connection_gone`) is dropped from the queue when the dispatcher reaches it,
or as soon as it stands between a new request and a full queue (within 5 ms): it neither runs nor holds a place.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from gateway.errors import ClientClosedRequest, DeadlineExceeded, GatewayError, NotReady, Overloaded
from gateway.runtime.runner import OnnxRunner

logger = logging.getLogger(__name__)

_ARRIVAL_GAP = 0.1  # of max_queue_delay_ms: a batch held open goes when no request came for this long
_ROOM_SCAN_INTERVAL = 0.005  # seconds between scans of a full queue for requests whose clients have gone


class BatchObserver(Protocol):
    """Where a batcher reports what it does (the gateway's metrics, bound to one model version)."""

    def batch_ran(self, rows: int, seconds: float) -> None: ...

    def queue_depth(self, depth: int) -> None: ...

    def follow_queue(self, depth: Callable[[], int]) -> bool:
        """True when the observer reads `depth()` itself whenever it needs it: then `queue_depth` is not called."""
        return False


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 512
    max_concurrency: int = 2


class InferenceFailed(GatewayError):
    status_code = 500


@dataclass(eq=False)
class _Pending:
    inputs: dict[str, np.ndarray]
    rows: int
    future: asyncio.Future[list[np.ndarray]]
    arrived: float
    deadline: float | None
    connection_gone: Callable[[], bool] | None = None

    @functools.cached_property
    def compat(self) -> tuple[object, ...]:
        """Requests stack only when every non-batch dimension and dtype agree (computed only when stacking)."""
        return tuple((name, a.shape[1:], a.dtype.str) for name, a in sorted(self.inputs.items()))

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def abandoned(self) -> bool:
        return self.connection_gone is not None and self.connection_gone()


class AdaptiveBatcher:
    def __init__(self, runner: OnnxRunner, limits: BatchLimits, observer: BatchObserver, label: str) -> None:
        self._runner = runner
        self._limits = limits
        self._max_rows = limits.max_batch_size if runner.batched else 1
        # Requests are decoded against the signature, so their dtypes agree; with no dynamic dimension beyond the
        # batch one their shapes do too, and the per-request compatibility key need not be built.
        self._always_stackable = all(-1 not in spec.shape[1:] for spec in runner.inputs)
        self._observer = observer
        self._label = label
        self._queue: deque[_Pending] = deque()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(limits.max_concurrency)
        self._running: set[asyncio.Task[None]] = set()
        self._collecting: list[_Pending] = []  # taken from the queue, not yet running
        self._closed = False
        # Kept: on Python 3.11, asyncio.get_running_loop() makes a getpid() syscall on every call.
        self._loop = asyncio.get_running_loop()
        self._loop_task = self._loop.create_task(self._dispatch_forever(), name=f"batcher {label}")
        self._push_depth = not observer.follow_queue(lambda: len(self._queue))
        self._next_room_scan = 0.0

    @property
    def depth(self) -> int:
        return len(self._queue)

    async def infer(
        self,
        inputs: dict[str, np.ndarray],
        rows: int,
        deadline: float | None,
        connection_gone: Callable[[], bool] | None = None,
    ) -> list[np.ndarray]:
        """Run one request's rows, batched with others; `deadline` is in `time.monotonic()` seconds."""
        if self._closed:
            raise NotReady(f"{self._label} is being unloaded; retry")
        if len(self._queue) >= self._limits.max_queue_size and not self._made_room():
            raise Overloaded(f"{self._label}: queue full ({len(self._queue)} requests waiting); retry later")
        future: asyncio.Future[list[np.ndarray]] = self._loop.create_future()
        pending = _Pending(inputs, rows, future, time.monotonic(), deadline, connection_gone)
        self._queue.append(pending)
        if self._push_depth:
            self._observer.queue_depth(len(self._queue))
        self._wakeup.set()
        try:
            if deadline is None:
                return await future
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.0)):
                return await future
        except TimeoutError:
            raise DeadlineExceeded(f"{self._label}: deadline passed before the model answered") from None
        finally:
            if future.cancelled():  # deadline passed or caller gone: leave the queue now, not when a slot frees
                self._discard(pending)

    def _made_room(self) -> bool:
        """On a full queue, drop the requests whose clients have gone; True if that made room. The scan costs about
        0.1 µs per queued request, so under sustained overload it runs at most every `_ROOM_SCAN_INTERVAL`."""
        now = time.monotonic()
        if now < self._next_room_scan:
            return False
        self._next_room_scan = now + _ROOM_SCAN_INTERVAL
        return self._drop_abandoned()

    def _drop_abandoned(self) -> bool:
        """Fail the queued requests whose clients have gone; True if there were any."""
        kept: deque[_Pending] = deque()
        dropped: list[_Pending] = []
        for item in self._queue:
            (dropped if item.abandoned() else kept).append(item)
        if not dropped:
            return False
        for item in dropped:
            _fail_abandoned(item)
        self._queue = kept
        if self._push_depth:
            self._observer.queue_depth(len(kept))
        return True

    def _discard(self, pending: _Pending) -> None:
        with contextlib.suppress(ValueError):  # already taken into a batch
            self._queue.remove(pending)
            if self._push_depth:
                self._observer.queue_depth(len(self._queue))

    async def aclose(self) -> None:
        """Stop taking requests, answer the ones already queued, then stop."""
        self._closed = True
        self._wakeup.set()  # a batch held open for company can get none now: it goes at once
        while self._queue or self._collecting or self._running:
            # The dispatcher empties the queue on its own; wait for the runs it starts.
            if self._running:
                await asyncio.wait(set(self._running))
            else:
                await asyncio.sleep(0)
        self._loop_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._loop_task

    async def _dispatch_forever(self) -> None:
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            task = self._loop.create_task(self._run(batch))
            self._collecting = []
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _collect(self) -> list[_Pending]:
        batch: list[_Pending] = []
        self._collecting = batch
        while not batch:
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            batch = self._drain(batch)
        delay = self._limits.max_queue_delay_ms / 1000
        fill_until = batch[0].arrived + delay
        # A single waiting request shows no concurrency: dispatch it now rather than wait for company.
        while len(batch) > 1 and self._rows(batch) < self._max_rows and not self._closed:
            remaining = fill_until - time.monotonic()
            if remaining <= 0 or not await self._arrival_within(min(remaining, delay * _ARRIVAL_GAP)):
                break
            batch = self._drain(batch)
        return batch

    async def _arrival_within(self, seconds: float) -> bool:
        """Whether a request arrives within `seconds`."""
        self._wakeup.clear()
        try:
            async with asyncio.timeout(seconds):
                await self._wakeup.wait()
        except TimeoutError:
            return False
        return True

    def _drain(self, batch: list[_Pending]) -> list[_Pending]:
        """Move waiting requests into `batch` while they fit; expired or abandoned ones are dropped."""
        now = time.monotonic()
        rows = self._rows(batch)
        while self._queue:
            head = self._queue[0]
            if head.abandoned():
                _fail_abandoned(self._queue.popleft())
                continue
            if head.future.done() or head.expired(now):
                self._queue.popleft()
                if not head.future.done():
                    head.future.set_exception(DeadlineExceeded(f"{self._label}: deadline passed while queued"))
                continue
            if batch and (
                rows + head.rows > self._max_rows
                or (not self._always_stackable and head.compat != batch[0].compat)
            ):
                break
            batch.append(self._queue.popleft())
            rows += head.rows
        if self._push_depth:
            self._observer.queue_depth(len(self._queue))
        return batch

    @staticmethod
    def _rows(batch: Sequence[_Pending]) -> int:
        return sum(item.rows for item in batch)

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            live = []
            for item in batch:  # a client may have left while the batch waited for company
                if item.abandoned():
                    _fail_abandoned(item)
                elif not item.future.done():
                    live.append(item)
            if not live:
                return
            try:
                results = await self._run_stacked(live)
            except InferenceFailed:
                if len(live) == 1:
                    raise
                # One bad request must not fail its neighbours: retry each on its own.
                for item in live:
                    await self._run_alone(item)
                return
            for item, outputs in zip(live, results, strict=True):
                if not item.future.done():
                    item.future.set_result(outputs)
        except InferenceFailed as exc:
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        finally:
            self._slots.release()

    async def _run_alone(self, item: _Pending) -> None:
        try:
            (outputs,) = await self._run_stacked([item])
        except InferenceFailed as exc:
            if not item.future.done():
                item.future.set_exception(exc)
            return
        if not item.future.done():
            item.future.set_result(outputs)

    async def _run_stacked(self, items: list[_Pending]) -> list[list[np.ndarray]]:
        if len(items) == 1:
            inputs = items[0].inputs
        else:
            inputs = {name: np.concatenate([item.inputs[name] for item in items]) for name in items[0].inputs}
        rows = self._rows(items)
        started = time.perf_counter()
        try:
            outputs = await self._runner.run(inputs)
        except Exception as exc:  # onnxruntime's own error types; the caller gets a 500 with the reason
            logger.warning("%s: inference failed on %d rows: %s", self._label, rows, exc)
            raise InferenceFailed(f"{self._label}: inference failed: {exc}") from exc
        self._observer.batch_ran(rows, time.perf_counter() - started)
        if len(items) == 1:
            return [outputs]
        return self._split(items, outputs, rows)

    def _split(self, items: list[_Pending], outputs: list[np.ndarray], rows: int) -> list[list[np.ndarray]]:
        if any(output.ndim == 0 or output.shape[0] != rows for output in outputs):
            raise InferenceFailed(f"{self._label}: an output's first dimension does not follow the batch")
        bounds = np.cumsum([0] + [item.rows for item in items])
        return [
            [output[start:end] for output in outputs]
            for start, end in zip(bounds[:-1], bounds[1:], strict=True)
        ]


def _fail_abandoned(item: _Pending) -> None:
    if not item.future.done():
        item.future.set_exception(ClientClosedRequest("the client closed the connection while its request was queued"))
