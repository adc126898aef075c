"""Adaptive batching: over HTTP against a real gateway process, and in-process against a real OnnxRunner.

Concurrency is made deterministic without sleeps by occupying the one inference thread with real work: over HTTP
a large request to a deliberately slow model, in-process a job that holds the runner's executor until released.
While that thread is busy, requests pile up in the batcher for real, and the tests poll the queue depth (a
condition, not a delay) before letting the work through.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import ClientClosedRequest, DeadlineExceeded, NotReady, Overloaded
from gateway.runtime import batcher as batcher_module
from gateway.runtime.batcher import AdaptiveBatcher, BatchLimits, BatchObserver
from gateway.runtime.runner import OnnxRunner, SessionOptions
from loadtests import onnx_models as om
from tests.conftest import GatewayProcess, start_gateway, write_config

SLOW_FEATURES = 8
TABULAR_FEATURES = 32
MAX_BATCH = 32


def slow_model(features: int = SLOW_FEATURES, width: int = 512, depth: int = 256, seed: int = 0) -> onnx.ModelProto:
    """`x` FP32 [N, features] -> `y` FP32 [N, features] through `depth` [width x width] orthogonal MatMuls.

    Slow per row (a few ms) but small on the wire, and numerically tame: an orthogonal matrix keeps norms.
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(width, width)))
    a = rng.normal(0, 1 / np.sqrt(features), (features, width)).astype(np.float32)
    b = rng.normal(0, 1 / np.sqrt(width), (width, features)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h0"])]
    nodes += [helper.make_node("MatMul", [f"h{i}", "Q"], [f"h{i + 1}"]) for i in range(depth)]
    nodes.append(helper.make_node("MatMul", [f"h{depth}", "B"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", features])],
        [
            numpy_helper.from_array(a, "A"),
            numpy_helper.from_array(q.astype(np.float32), "Q"),
            numpy_helper.from_array(b, "B"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", om.OPSET)], producer_name="gatewatch")
    model.ir_version = om.IR_VERSION
    onnx.checker.check_model(model)
    return model


def ragged_identity() -> onnx.ModelProto:
    """`x` FP32 [N, M] -> `y` unchanged, with M dynamic too: requests of different widths are all valid."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "ragged",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "M"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", om.OPSET)], producer_name="gatewatch")
    model.ir_version = om.IR_VERSION
    onnx.checker.check_model(model)
    return model


class Reference:
    """onnxruntime on the model file itself, one row at a time: what every batched answer must equal."""

    def __init__(self, path: Path) -> None:
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def per_row(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        results = [self.session.run(self.output_names, {self.input_name: rows[i : i + 1]}) for i in range(len(rows))]
        return {name: np.concatenate([r[k] for r in results]) for k, name in enumerate(self.output_names)}


async def poll(condition: Callable[[], bool], within: float = 10.0, what: str = "condition") -> None:
    """Wait for a condition by polling it (never a blind sleep)."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.001)


# == over HTTP: a dedicated gateway with one inference thread ====================================================


@dataclass
class Served:
    gateway: GatewayProcess
    registry: Path

    def reference(self, model: str, version: int = 1) -> Reference:
        return Reference(self.registry / model / str(version) / "model.onnx")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    registry = tmp_path_factory.mktemp("batching-registry")
    om.write_version(registry, "slow", 1, slow_model())
    om.write_version(registry, "tabular", 1, om.tabular_classifier(seed=1))
    workdir = tmp_path_factory.mktemp("batching-gateway")
    config = write_config(
        workdir / "gatewatch.yaml",
        registry,
        inference_threads=1,  # one run at a time: what waits, waits in the batcher's queue
        max_batch_size=MAX_BATCH,
        max_queue_delay_ms=5,
        log_enabled="false",
    )
    gateway = start_gateway(config, workdir)
    yield Served(gateway, registry)
    gateway.terminate()


@pytest.fixture
async def client(served: Served) -> AsyncIterator[httpx.AsyncClient]:
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(base_url=served.gateway.url, timeout=60, limits=limits) as http:
        yield http


Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(http: httpx.AsyncClient) -> Scrape:
    """Every sample of one /metrics scrape, keyed by name and sorted labels."""
    response = await http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Scrape, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def metric(http: httpx.AsyncClient, name: str, **labels: str) -> float:
    return value(await scrape(http), name, **labels)


def v2_request(name: str, rows: np.ndarray, request_id: str | None = None) -> dict[str, Any]:
    tensor = {"name": name, "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}
    return {"inputs": [tensor], **({"id": request_id} if request_id is not None else {})}


def output(body: dict[str, Any], name: str) -> np.ndarray:
    (tensor,) = [o for o in body["outputs"] if o["name"] == name]
    return np.array(tensor["data"]).reshape(tensor["shape"])


async def occupy_runner(http: httpx.AsyncClient, rows: int, seed: int) -> asyncio.Task[httpx.Response]:
    """Start a big request to `slow` and return once it has left the queue: the inference thread is now busy."""
    block = np.random.default_rng(seed).normal(size=(rows, SLOW_FEATURES)).astype(np.float32)
    started = await metric(http, "gatewatch_requests_in_flight")
    task = asyncio.create_task(http.post("/v2/models/slow/infer", json=v2_request("x", block)))
    deadline = time.monotonic() + 10
    while await metric(http, "gatewatch_requests_in_flight") <= started:
        assert not task.done(), f"blocking request ended early: {(await task).text}"
        assert time.monotonic() < deadline, "blocking request never became in-flight"
    return task


async def wait_for_depth(http: httpx.AsyncClient, model: str, depth: int, until_done: asyncio.Future[Any]) -> bool:
    """Poll the queue depth until it reaches `depth`; False if `until_done` finished first (the wait is moot)."""
    while not until_done.done():
        if await metric(http, "gatewatch_queue_depth", model=model, version="1") >= depth:
            return True
    return False


async def all_waiting_on_blocker(
    http: httpx.AsyncClient, in_flight: int, blocker_runs: float, until_done: asyncio.Future[Any]
) -> bool:
    """Poll until `in_flight` inference requests are in the gateway; True if, in that same scrape, the blocking
    request's run had not finished yet (its batch not yet counted).

    The data plane counts a request in flight and hands it to its batcher in one step of the event loop, so once
    the gauge counts it, it is in a queue or a forming batch.
    """
    while not until_done.done():
        samples = await scrape(http)
        if value(samples, "gatewatch_requests_in_flight") >= in_flight:
            return value(samples, "gatewatch_batch_size_count", model="slow", version="1") == blocker_runs
    return False


async def test_concurrent_single_rows_are_served_in_fewer_runs(served: Served, client: httpx.AsyncClient) -> None:
    requests = 64
    rows = np.random.default_rng(64).normal(size=(requests, SLOW_FEATURES)).astype(np.float32)
    runs_before = await metric(client, "gatewatch_batch_size_count", model="slow", version="1")
    rows_before = await metric(client, "gatewatch_batch_size_sum", model="slow", version="1")

    blocker = await occupy_runner(client, rows=600, seed=1)
    calls = [client.post("/v2/models/slow/infer", json=v2_request("x", rows[i : i + 1], f"r{i}")) for i in range(64)]
    answers = asyncio.ensure_future(asyncio.gather(*calls))
    all_queued = await wait_for_depth(client, "slow", requests, answers)
    blocker_was_running = not blocker.done()
    responses = await answers
    assert (await blocker).status_code == 200

    assert [r.status_code for r in responses] == [200] * requests, [r.text for r in responses if r.status_code != 200]
    expected = served.reference("slow").per_row(rows)["y"]
    for i, response in enumerate(responses):
        body = response.json()
        assert body["id"] == f"r{i}" and body["model_name"] == "slow" and body["model_version"] == "1"
        np.testing.assert_allclose(output(body, "y"), expected[i : i + 1], rtol=1e-5, atol=1e-5)

    runs = await metric(client, "gatewatch_batch_size_count", model="slow", version="1") - runs_before - 1
    rows_run = await metric(client, "gatewatch_batch_size_sum", model="slow", version="1") - rows_before - 600
    assert rows_run == requests
    assert runs < requests
    if all_queued and blocker_was_running:
        # All 64 waited together behind the blocker: exactly ceil(64 / max_batch_size) runs.
        assert runs == math.ceil(requests / MAX_BATCH)


@given(
    sizes=st.lists(st.integers(1, 8), min_size=3, max_size=5),
    scale=st.sampled_from([0.01, 1.0, 100.0]),
    seed=st.integers(0, 2**16),
)
@settings(
    max_examples=20,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
async def test_stacked_requests_each_get_their_own_rows(
    served: Served, client: httpx.AsyncClient, sizes: list[int], scale: float, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    batches = [(rng.normal(size=(n, TABULAR_FEATURES)) * scale).astype(np.float32) for n in sizes]
    before = await scrape(client)
    runs_before = value(before, "gatewatch_batch_size_count", model="tabular", version="1")

    blocker = await occupy_runner(client, rows=120, seed=seed)
    calls = [client.post("/v2/models/tabular/versions/1/infer", json=v2_request("input", b)) for b in batches]
    answers = asyncio.ensure_future(asyncio.gather(*calls))
    slow_runs = value(before, "gatewatch_batch_size_count", model="slow", version="1")
    waited = await all_waiting_on_blocker(client, len(sizes) + 1, slow_runs, answers)
    responses = await answers
    assert (await blocker).status_code == 200

    reference = served.reference("tabular")
    for rows, response in zip(batches, responses, strict=True):
        assert response.status_code == 200, response.text
        expected = reference.per_row(rows)
        probabilities = output(response.json(), "probabilities")
        assert probabilities.shape == (len(rows), 2)
        np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=1e-5, atol=1e-6)
        labels = output(response.json(), "label")
        decisive = np.abs(expected["probabilities"][:, 0] - expected["probabilities"][:, 1]) > 1e-4
        assert np.array_equal(labels[decisive], expected["label"][decisive])
    if waited:
        # Every request arrived while the only inference thread was busy: the first batch to form waited for
        # the thread, and everything else (<= 4 x 8 rows, so under max_batch_size) formed one more batch.
        runs = await metric(client, "gatewatch_batch_size_count", model="tabular", version="1") - runs_before
        assert 1 <= runs <= 2, f"{len(sizes)} requests waited together, yet {runs} runs"


# == in-process: AdaptiveBatcher over a real OnnxRunner ==========================================================


@dataclass
class RecordingObserver(BatchObserver):
    """A BatchObserver that remembers what it was told."""

    runs: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)

    def batch_ran(self, rows: int, seconds: float) -> None:
        assert seconds >= 0
        self.runs.append(rows)

    def queue_depth(self, depth: int) -> None:
        self.depths.append(depth)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("batcher-models")
    protos = {
        "identity": om.identity("FP32"),
        "fixed": om.identity("FP32", batched=False),
        "tabular": om.tabular_classifier(seed=3),
        "ragged": ragged_identity(),
    }
    paths = {}
    for name, proto in protos.items():
        paths[name] = root / f"{name}.onnx"
        paths[name].write_bytes(proto.SerializeToString())
    return paths


class Lab:
    """Batchers over real runners sharing one inference thread, which `hold()` can keep busy until `release()`."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = files
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="test-onnxruntime")
        self.batchers: list[AdaptiveBatcher] = []
        self.runners: dict[str, OnnxRunner] = {}
        self._gates: list[threading.Event] = []

    def batcher(self, model: str, **limits: Any) -> tuple[AdaptiveBatcher, RecordingObserver]:
        runner = self.runners[model] = OnnxRunner.load(self.files[model], SessionOptions(), self.executor)
        observer = RecordingObserver()
        limits.setdefault("max_concurrency", 1)
        batcher = AdaptiveBatcher(runner, BatchLimits(**limits), observer, f"test {model}")
        self.batchers.append(batcher)
        return batcher, observer

    def hold(self) -> None:
        gate = threading.Event()
        self._gates.append(gate)
        self.executor.submit(gate.wait)

    def release(self) -> None:
        for gate in self._gates:
            gate.set()

    async def aclose(self) -> None:
        self.release()
        for batcher in self.batchers:
            await batcher.aclose()
        self.executor.shutdown(wait=True)


@pytest.fixture
async def lab(model_files: dict[str, Path]) -> AsyncIterator[Lab]:
    lab = Lab(model_files)
    yield lab
    await lab.aclose()


def ones(rows: int, width: int = 3, start: float = 0.0) -> np.ndarray:
    return (np.arange(rows * width, dtype=np.float32) + start).reshape(rows, width)


async def dispatched(batcher: AdaptiveBatcher, observer: RecordingObserver) -> None:
    """Wait until the batcher has taken everything queued so far into a run."""
    await poll(lambda: bool(observer.depths) and observer.depths[-1] == 0 and batcher.depth == 0, what="dispatch")


async def test_lone_request_is_dispatched_at_once_as_a_batch_of_one(lab: Lab) -> None:
    batcher, observer = lab.batcher("identity", max_queue_delay_ms=60_000)
    for start in (0.0, 100.0):
        x = ones(1, start=start)
        started = time.monotonic()
        async with asyncio.timeout(10):  # would take 60 s if a lone request waited for company
            (y,) = await batcher.infer({"x": x}, 1, None)
        assert time.monotonic() - started < 10
        np.testing.assert_array_equal(y, x)
    assert observer.runs == [1, 1]


async def test_requests_submitted_together_are_stacked(lab: Lab, model_files: dict[str, Path]) -> None:
    batcher, observer = lab.batcher("tabular", max_batch_size=MAX_BATCH)
    rng = np.random.default_rng(7)
    sizes = [1, 3, 2, 1, 4, 1, 2, 5]
    inputs = [rng.normal(size=(n, TABULAR_FEATURES)).astype(np.float32) for n in sizes]
    results = await asyncio.gather(*(batcher.infer({"input": x}, len(x), None) for x in inputs))

    assert len(observer.runs) < len(sizes)
    assert sum(observer.runs) == sum(sizes)
    reference = Reference(model_files["tabular"])
    for x, (probabilities, labels) in zip(inputs, results, strict=True):
        expected = reference.per_row(x)
        np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=1e-5, atol=1e-6)
        assert labels.shape == (len(x),)


async def test_max_batch_size_is_respected(lab: Lab) -> None:
    batcher, observer = lab.batcher("identity", max_batch_size=4)
    sizes = [1, 1, 2, 1, 3, 1, 1, 2, 4, 1]
    inputs = [ones(n, start=100 * i) for i, n in enumerate(sizes)]
    results = await asyncio.gather(*(batcher.infer({"x": x}, len(x), None) for x in inputs))

    assert observer.runs and all(rows <= 4 for rows in observer.runs), observer.runs
    assert sum(observer.runs) == sum(sizes)
    assert len(observer.runs) >= math.ceil(sum(sizes) / 4)
    for x, (y,) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(y, x)


async def test_full_queue_answers_overloaded(lab: Lab) -> None:
    batcher, observer = lab.batcher("identity", max_queue_size=3)
    lab.hold()
    first = asyncio.create_task(batcher.infer({"x": ones(1)}, 1, None))
    await dispatched(batcher, observer)  # taken into a run, which waits for the held thread
    waiting = [asyncio.create_task(batcher.infer({"x": ones(1, start=10 * i)}, 1, None)) for i in range(1, 4)]
    await poll(lambda: batcher.depth == 3, what="three queued requests")

    with pytest.raises(Overloaded) as refused:
        await batcher.infer({"x": ones(1)}, 1, None)
    assert refused.value.status_code == 429 and refused.value.retry_after is not None
    assert "queue full" in refused.value.message

    lab.release()
    for i, task in enumerate([first, *waiting]):
        (y,) = await task
        np.testing.assert_array_equal(y, ones(1, start=10 * i))
    assert sum(observer.runs) == 4


async def test_expired_deadline_raises_deadline_exceeded(lab: Lab) -> None:
    batcher, observer = lab.batcher("identity")
    lab.hold()
    first = asyncio.create_task(batcher.infer({"x": ones(1)}, 1, None))
    await dispatched(batcher, observer)

    with pytest.raises(DeadlineExceeded) as late:
        async with asyncio.timeout(10):
            await batcher.infer({"x": ones(5)}, 5, time.monotonic() + 0.05)
    assert late.value.status_code == 504
    with pytest.raises(DeadlineExceeded):
        await batcher.infer({"x": ones(7)}, 7, time.monotonic() - 1)  # already past on arrival

    patient = asyncio.create_task(batcher.infer({"x": ones(2, start=50)}, 2, time.monotonic() + 60))
    lab.release()
    np.testing.assert_array_equal((await first)[0], ones(1))
    np.testing.assert_array_equal((await patient)[0], ones(2, start=50))
    assert sum(observer.runs) == 3  # the expired requests' rows never reached the model


async def test_unbatched_model_never_stacks(lab: Lab) -> None:
    batcher, observer = lab.batcher("fixed", max_batch_size=MAX_BATCH)
    assert not lab.runners["fixed"].batched  # first dimension fixed at 1
    lab.hold()
    first = asyncio.create_task(batcher.infer({"x": ones(1)}, 1, None))
    await dispatched(batcher, observer)
    inputs = [ones(1, start=10 * i) for i in range(1, 6)]
    tasks = [asyncio.create_task(batcher.infer({"x": x}, 1, None)) for x in inputs]
    await poll(lambda: batcher.depth == len(inputs), what="queued requests")  # all waiting together
    lab.release()

    np.testing.assert_array_equal((await first)[0], ones(1))
    results = [await task for task in tasks]
    assert observer.runs == [1] * 6
    for x, (y,) in zip(inputs, results, strict=True):
        np.testing.assert_array_equal(y, x)


async def test_incompatible_trailing_shapes_are_not_stacked(lab: Lab) -> None:
    batcher, observer = lab.batcher("ragged", max_batch_size=MAX_BATCH)
    lab.hold()
    first = asyncio.create_task(batcher.infer({"x": ones(1)}, 1, None))
    await dispatched(batcher, observer)
    shapes = [(1, 3), (2, 3), (1, 5), (1, 5), (2, 3)]
    inputs = [ones(rows, width, start=100 * i) for i, (rows, width) in enumerate(shapes)]
    tasks = [asyncio.create_task(batcher.infer({"x": x}, len(x), None)) for x in inputs]
    await poll(lambda: batcher.depth == len(shapes), what="queued requests")
    lab.release()

    np.testing.assert_array_equal((await first)[0], ones(1))
    for x, task in zip(inputs, tasks, strict=True):
        np.testing.assert_array_equal((await task)[0], x)
    # In arrival order: width-3 requests stack, a width-5 one starts a new batch, and so on.
    assert observer.runs == [1, 3, 2, 2]


async def test_aclose_answers_what_was_queued(lab: Lab) -> None:
    batcher, observer = lab.batcher("identity", max_queue_delay_ms=2)
    lab.hold()
    first = asyncio.create_task(batcher.infer({"x": ones(1)}, 1, None))
    await dispatched(batcher, observer)
    queued = [asyncio.create_task(batcher.infer({"x": ones(2, start=10 * i)}, 2, None)) for i in range(1, 5)]
    await poll(lambda: batcher.depth == 4, what="queued requests")

    closing = asyncio.create_task(batcher.aclose())
    await asyncio.sleep(0)  # aclose() takes its first step: from here on, nothing new is accepted
    with pytest.raises(NotReady):
        await batcher.infer({"x": ones(1)}, 1, None)
    assert not closing.done()  # still draining: the held thread has not run anything yet
    lab.release()
    async with asyncio.timeout(10):
        await closing
    np.testing.assert_array_equal((await first)[0], ones(1))
    for i, task in enumerate(queued, start=1):
        np.testing.assert_array_equal((await task)[0], ones(2, start=10 * i))
    assert sum(observer.runs) == 9


async def test_a_batch_held_open_goes_when_no_more_requests_arrive(lab: Lab) -> None:
    # Two requests show concurrency, but no third comes: waiting the whole delay for rows that never arrive
    # would stall every closed-loop client below max_batch_size (c=8 at half the throughput of a plain app).
    batcher, observer = lab.batcher("identity", max_queue_delay_ms=3_000, max_batch_size=MAX_BATCH)
    async with asyncio.timeout(2.0):  # the arrival gap is a tenth of the delay; the full delay would time out
        results = await asyncio.gather(*(batcher.infer({"x": ones(1, start=i)}, 1, None) for i in range(2)))
    for i, (y,) in enumerate(results):
        np.testing.assert_array_equal(y, ones(1, start=i))
    assert observer.runs == [2]


async def test_requests_arriving_while_a_batch_is_held_open_join_it(lab: Lab) -> None:
    batcher, observer = lab.batcher("identity", max_queue_delay_ms=3_000, max_batch_size=MAX_BATCH)
    first = [asyncio.create_task(batcher.infer({"x": ones(1, start=i)}, 1, None)) for i in range(2)]
    await poll(lambda: bool(observer.depths) and batcher.depth == 0, what="the pair taken into a batch")
    late = asyncio.create_task(batcher.infer({"x": ones(1, start=2)}, 1, None))
    async with asyncio.timeout(10):
        await asyncio.gather(*first, late)
    assert observer.runs == [3]  # the late request came within the gap, so it rode in the same run


async def test_aclose_answers_a_batch_held_open_for_company(lab: Lab) -> None:
    # Two requests show concurrency, so the batcher holds their batch open (up to a minute) for more company.
    batcher, observer = lab.batcher("identity", max_queue_delay_ms=60_000, max_batch_size=MAX_BATCH)
    tasks = [asyncio.create_task(batcher.infer({"x": ones(1, start=i)}, 1, None)) for i in range(2)]
    await poll(lambda: bool(observer.depths) and batcher.depth == 0, what="the pair taken into a batch")
    assert not any(task.done() for task in tasks)
    async with asyncio.timeout(10):  # no company can come once closed: the batch must go at once
        await batcher.aclose()
    for i, task in enumerate(tasks):
        assert task.done()
        np.testing.assert_array_equal((await task)[0], ones(1, start=i))
    assert observer.runs == [2]


@pytest.fixture(scope="module")
async def tabular_batcher(model_files: dict[str, Path]) -> AsyncIterator[tuple[AdaptiveBatcher, RecordingObserver]]:
    executor = ThreadPoolExecutor(1, thread_name_prefix="test-onnxruntime")
    runner = OnnxRunner.load(model_files["tabular"], SessionOptions(), executor)
    observer = RecordingObserver()
    batcher = AdaptiveBatcher(runner, BatchLimits(max_batch_size=16, max_concurrency=1), observer, "test tabular")
    yield batcher, observer
    await batcher.aclose()
    executor.shutdown(wait=True)


@given(
    sizes=st.lists(st.integers(1, 8), min_size=1, max_size=8),
    values=st.floats(-1e3, 1e3, width=32),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
async def test_stacked_results_are_split_back_row_exactly(
    tabular_batcher: tuple[AdaptiveBatcher, RecordingObserver],
    model_files: dict[str, Path],
    sizes: list[int],
    values: float,
    seed: int,
) -> None:
    batcher, observer = tabular_batcher
    rng = np.random.default_rng(seed)
    inputs = [rng.normal(size=(n, TABULAR_FEATURES)).astype(np.float32) for n in sizes]
    inputs[0][0, 0] = values  # an extreme value somewhere
    runs_before = len(observer.runs)
    results = await asyncio.gather(*(batcher.infer({"input": x}, len(x), None) for x in inputs))

    new_runs = observer.runs[runs_before:]
    assert sum(new_runs) == sum(sizes) and all(rows <= 16 for rows in new_runs)
    reference = Reference(model_files["tabular"])
    for x, (probabilities, labels) in zip(inputs, results, strict=True):
        expected = reference.per_row(x)
        assert probabilities.shape == (len(x), 2) and labels.shape == (len(x),)
        np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=1e-5, atol=1e-6)


class Connection:
    """What the server says of one client's connection: `gone()` until `close()`."""

    def __init__(self) -> None:
        self.closed = False
        self.asked = 0

    def gone(self) -> bool:
        self.asked += 1
        return self.closed

    def close(self) -> None:
        self.closed = True


async def full_queue_of_three(lab: Lab) -> tuple[
    AdaptiveBatcher, RecordingObserver, asyncio.Task[list[np.ndarray]], list[Connection],
    list[asyncio.Task[list[np.ndarray]]],
]:
    """A batcher whose runner is held busy by `first`, with three requests from three clients filling its queue."""
    batcher, observer = lab.batcher("identity", max_queue_size=3)
    lab.hold()
    first = asyncio.create_task(batcher.infer({"x": ones(1)}, 1, None))
    await dispatched(batcher, observer)
    connections = [Connection() for _ in range(3)]
    queued = [asyncio.create_task(batcher.infer({"x": ones(1)}, 1, None, c.gone)) for c in connections]
    await poll(lambda: batcher.depth == 3, what="a full queue")
    return batcher, observer, first, connections, queued


async def test_requests_whose_clients_left_are_dropped_unrun_when_reached(lab: Lab) -> None:
    batcher, observer = lab.batcher("identity", max_batch_size=1)
    lab.hold()
    first = asyncio.create_task(batcher.infer({"x": ones(1)}, 1, None))
    await dispatched(batcher, observer)
    connections = [Connection() for _ in range(4)]
    tasks = [
        asyncio.create_task(batcher.infer({"x": ones(1, start=10 * i)}, 1, None, c.gone))
        for i, c in enumerate(connections)
    ]
    await poll(lambda: batcher.depth == 4, what="queued requests")
    connections[1].close()
    connections[2].close()
    lab.release()

    await first
    for i in (0, 3):
        np.testing.assert_array_equal((await tasks[i])[0], ones(1, start=10 * i))
    for i in (1, 2):
        with pytest.raises(ClientClosedRequest, match="closed the connection while its request was queued"):
            await tasks[i]
    assert observer.runs == [1, 1, 1]  # the first, then the two whose clients stayed


async def test_a_full_queue_makes_room_by_dropping_requests_whose_clients_left(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batcher_module, "_ROOM_SCAN_INTERVAL", 0.0)  # every refusal may scan
    batcher, observer, first, connections, queued = await full_queue_of_three(lab)
    with pytest.raises(Overloaded):  # every client still waits: the queue is really full
        await batcher.infer({"x": ones(1)}, 1, None)

    connections[0].close()
    fresh = asyncio.create_task(batcher.infer({"x": ones(1, start=7)}, 1, None))
    await poll(lambda: queued[0].done() and batcher.depth == 3, what="the abandoned request to leave the queue")
    with pytest.raises(ClientClosedRequest):
        await queued[0]
    lab.release()
    await first
    np.testing.assert_array_equal((await fresh)[0], ones(1, start=7))
    await asyncio.gather(*queued[1:])
    assert sum(observer.runs) == 4  # the first, the two kept, the fresh one: never the abandoned one


async def test_sustained_overload_scans_the_full_queue_at_most_once_per_interval(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batcher_module, "_ROOM_SCAN_INTERVAL", 3600.0)
    batcher, observer, first, connections, queued = await full_queue_of_three(lab)
    for _ in range(100):
        with pytest.raises(Overloaded):
            await batcher.infer({"x": ones(1)}, 1, None)
    assert [c.asked for c in connections] == [1, 1, 1]  # one scan, not a hundred
    lab.release()
    await first
    await asyncio.gather(*queued)
