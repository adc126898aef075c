"""ShadowMirror: run a route's shadow variants on a request after its primary answer is ready.

Shadow results are never returned; each is logged with `role=shadow` and the primary's request id, and compared
with the primary's outputs (`gatewatch_shadow_disagreements_total`). At most `max_in_flight` shadow inferences
run at once; beyond that a shadow is skipped and counted, never queued without bound, so a slow shadow model
cannot build up memory or delay the primary path's queue.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from prometheus_client import Counter

from gateway.errors import GatewayError, Overloaded
from gateway.records import ROLE_SHADOW, Exchange
from gateway.routing.table import Route, ShadowVariant
from gateway.runtime.manager import ModelManager

logger = logging.getLogger(__name__)


class ExchangeSink(Protocol):
    def log(self, exchange: Exchange) -> None: ...


@dataclass(frozen=True)
class ShadowMetrics:
    requests: Counter
    skipped: Counter
    disagreements: Counter


@dataclass(frozen=True)
class PrimaryResult:
    endpoint: str
    request_id: str
    arrived_ms: int
    rows: int
    inputs: Mapping[str, np.ndarray]
    outputs: dict[str, np.ndarray]


class ShadowMirror:
    def __init__(
        self, manager: ModelManager, metrics: ShadowMetrics, max_in_flight: int, rng: random.Random | None = None
    ) -> None:
        self._manager = manager
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._random = (rng or random.Random()).random
        self._tasks: set[asyncio.Task[None]] = set()
        # One shadow inference at a time: shadows never hold more than one inference thread, so a slow shadow
        # model cannot starve the primaries of the thread pool they share.
        self._lane = asyncio.Semaphore(1)
        self.log: ExchangeSink | None = None

    def announce(self, endpoint: str, route: Route) -> None:
        """Create the route's shadow series at 0, so that dashboards read "0 skipped" rather than "no data"."""
        for shadow in route.shadow:
            for counter in (self._metrics.requests, self._metrics.skipped, self._metrics.disagreements):
                counter.labels(endpoint, shadow.name)

    def mirror(self, shadows: list[ShadowVariant], primary: PrimaryResult) -> None:
        """Schedule each sampled shadow; returns at once."""
        for shadow in shadows:
            if shadow.sample < 1.0 and self._random() >= shadow.sample:
                continue
            self._metrics.requests.labels(primary.endpoint, shadow.name).inc()
            if len(self._tasks) >= self._max_in_flight:
                self._metrics.skipped.labels(primary.endpoint, shadow.name).inc()
                continue
            task = asyncio.get_running_loop().create_task(self._run(shadow, primary))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def aclose(self) -> None:
        """Let running shadows finish (they hold no client connection, only their own log record)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _run(self, shadow: ShadowVariant, primary: PrimaryResult) -> None:
        started = time.perf_counter()
        model, version, status, error = shadow.model, None, 200, ""
        outputs: list[tuple[str, np.ndarray]] | None = None
        input_types: dict[str, str] = {}
        try:
            async with self._lane:
                # Resolved once its turn comes: a version swapped or unloaded while it waited is not used.
                loaded = self._manager.resolve(shadow.model, shadow.version)
                version, input_types = loaded.version, loaded.runner.input_types
                results = await loaded.batcher.infer(dict(primary.inputs), primary.rows, None)
            outputs = list(zip(loaded.runner.output_names, results, strict=True))
            regression = loaded.artifact.meta.get("task") == "regression"
            if disagrees(primary.outputs, dict(outputs), shadow.tolerance, regression):
                self._metrics.disagreements.labels(primary.endpoint, shadow.name).inc()
        except Overloaded as exc:
            self._metrics.skipped.labels(primary.endpoint, shadow.name).inc()
            status, error = exc.status_code, exc.message
        except GatewayError as exc:
            status, error = exc.status_code, exc.message
            logger.warning("shadow %s of %s failed: %s", shadow.name, primary.endpoint, exc.message)
        if self.log is not None:
            self.log.log(
                Exchange(
                    request_id=primary.request_id,
                    arrived_ms=primary.arrived_ms,
                    endpoint=primary.endpoint,
                    variant=shadow.name,
                    role=ROLE_SHADOW,
                    model=model,
                    version=version,
                    rows=primary.rows,
                    status=status,
                    latency_ms=(time.perf_counter() - started) * 1000,
                    error=error,
                    inputs=primary.inputs,
                    input_types=input_types,
                    outputs=outputs,
                )
            )


def disagrees(
    primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray], tolerance: float, regression: bool = False
) -> bool:
    """Outputs both models have: labels by equality, class scores ([N, k] floats) by argmax, and regression outputs
    (meta.json `task: regression`, or any other float output) by max abs difference against `tolerance`."""
    for name in primary.keys() & shadow.keys():
        a, b = primary[name], shadow[name]
        if a.shape != b.shape:
            return True
        if a.dtype.kind in "OUSb" or a.dtype.kind in "iu":
            if not np.array_equal(a, b):
                return True
        elif not regression and a.ndim == 2 and a.shape[1] > 1:
            if not np.array_equal(a.argmax(axis=1), b.argmax(axis=1)):
                return True
        elif a.size and float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) > tolerance:
            return True
    return False
