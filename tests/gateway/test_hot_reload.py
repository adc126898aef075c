"""Hot reload: a real `gatewatch serve` follows the registry while it serves, and never serves something it must not.

Registries are real: the session's `mlflow server` (models registered with MLflow's own client), and a directory.
Clients are concurrent `httpx.AsyncClient` tasks; every wait polls a condition against a deadline.

- An alias move under load is followed within two poll intervals, with no failed request, and per client the
  answering version never goes back.
- A corrupt version, or one whose signature cannot replace the champion's, is refused: the old version serves on,
  the refusal is counted and logged.
- The registry going away changes nothing for clients; a gateway cold-started meanwhile serves from its cache; once
  the registry is back, the next alias move is followed.

"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import http.server
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import orjson
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import NotReady
from gateway.metrics import GatewayMetrics
from gateway.runtime.batcher import BatchLimits
from gateway.runtime.manager import ModelManager
from gateway.runtime.runner import SessionOptions
from loadtests import onnx_models as om
from registry_client.errors import RegistryUnavailable
from registry_client.mlflow import MlflowRegistry
from tests.conftest import GatewayProcess, MlflowServer, start_gateway, write_config
from tests.registry_client.test_mlflow import (
    Hop,
    client_for,
    log_onnx_model,
    onnx_bytes,
    register_onnx,
    set_alias,
    unique_name,
)

POLL_SECONDS = 0.5
FEATURES = 32
LOAD_TASKS = 16
LOAD_REQUESTS = 2000
BODY = orjson.dumps(
    {
        "inputs": [
            {
                "name": "input",
                "shape": [1, FEATURES],
                "datatype": "FP32",
                "data": np.random.default_rng(7).normal(size=FEATURES).astype(np.float32).tolist(),
            }
        ]
    }
)
JSON = {"content-type": "application/json"}


# -- gateways --------------------------------------------------------------------------------------------------


def gateway_config(workdir: Path, registry: str, **extra: object) -> Path:
    """A config with `data_dir` = workdir/data, so a gateway started again from it finds its model cache."""
    workdir.mkdir(parents=True, exist_ok=True)
    lines = [
        f"registry: {registry}",
        f"data_dir: {workdir / 'data'}",
        f"registry_poll_seconds: {POLL_SECONDS}",
        "log_enabled: false",
    ]
    lines += [f"{key}: {value}" for key, value in extra.items()]
    path = workdir / "gatewatch.yaml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def mlflow_gateway(mlflow_server: MlflowServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """One gateway over the session's MLflow server: it mirrors every registered model, so each test adds its own."""
    workdir = tmp_path_factory.mktemp("hot-reload-mlflow")
    gateway = start_gateway(gateway_config(workdir, f"mlflow+{mlflow_server.url}"), workdir)
    yield gateway
    gateway.terminate()


# -- conditions, metrics -----------------------------------------------------------------------------------------


async def eventually(check: Callable[[], Awaitable[bool]], within: float, what: str) -> float:
    """Poll `check` until it holds; the seconds it took. Fails with `what` after `within` seconds."""
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < within, f"not within {within}s: {what}"
        await asyncio.sleep(0.02)  # polling a condition
    return time.monotonic() - started


async def metric(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """A sample of /metrics (0 when absent, as for a counter never incremented)."""
    response = await client.get("/metrics")
    response.raise_for_status()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def infer(client: httpx.AsyncClient, model: str) -> httpx.Response:
    return await client.post(f"/v2/models/{model}/infer", content=BODY, headers=JSON)


async def serving_version(client: httpx.AsyncClient, model: str) -> int | None:
    response = await infer(client, model)
    return int(response.json()["model_version"]) if response.status_code == 200 else None


async def wait_serving(client: httpx.AsyncClient, model: str, version: int, within: float = 30) -> float:
    async def check() -> bool:
        return await serving_version(client, model) == version

    return await eventually(check, within, f"{model} answered by v{version}")


async def wait_log(gateway: GatewayProcess, fragment: str, within: float = 30, count: int = 1) -> None:
    async def check() -> bool:
        return gateway.log().count(fragment) >= count

    await eventually(check, within, f"{count} log line(s) with {fragment!r} in:\n{gateway.log()[-3000:]}")


async def metadata(client: httpx.AsyncClient, model: str) -> dict[str, Any]:
    response = await client.get(f"/v2/models/{model}")
    assert response.status_code == 200, response.text
    payload: dict[str, Any] = response.json()
    return payload


async def wait_aliases(client: httpx.AsyncClient, model: str, aliases: dict[str, str], within: float = 30) -> None:
    """Until GET /v2/models/{model} lists exactly these aliases: the gateway has seen them."""

    async def check() -> bool:
        response = await client.get(f"/v2/models/{model}")
        return response.status_code == 200 and response.json()["aliases"] == aliases

    await eventually(check, within, f"{model} aliases {aliases}")


# -- load ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    sent: float
    received: float
    status: int
    version: int | None
    output: float | None
    error: str = ""


@dataclass
class LoadRun:
    per_client: list[list[Answer]]
    moved_at: float
    new_version: int

    @property
    def answers(self) -> list[Answer]:
        return [answer for answers in self.per_client for answer in answers]

    def first_new(self) -> Answer:
        return min((a for a in self.answers if a.version == self.new_version), key=lambda a: a.received)

    @property
    def switch_seconds(self) -> float:
        """From the start of the alias move to the first answer by the new version."""
        return self.first_new().received - self.moved_at


async def client_loop(
    client: httpx.AsyncClient, model: str, stop: asyncio.Event, answers: list[Answer], pause: float = 0.0
) -> None:
    """Requests back to back until `stop`; `pause` > 0 paces a background prober (rate, not synchronisation)."""
    while not stop.is_set():
        if pause and answers:
            await asyncio.sleep(pause)
        sent = time.monotonic()
        try:
            response = await infer(client, model)
        except httpx.HTTPError as exc:
            answers.append(Answer(sent, time.monotonic(), 0, None, None, repr(exc)))
            continue
        received = time.monotonic()
        if response.status_code != 200:
            answers.append(Answer(sent, received, response.status_code, None, None, response.text[:300]))
            continue
        payload = response.json()
        probabilities = next(o for o in payload["outputs"] if o["name"] == "probabilities")
        answers.append(Answer(sent, received, 200, int(payload["model_version"]), float(probabilities["data"][0])))


async def alias_move_under_load(
    url: str,
    model: str,
    new_version: int,
    move: Callable[[], Awaitable[None]],
    prepare: Callable[[httpx.AsyncClient], Awaitable[None]] | None = None,
) -> LoadRun:
    """LOAD_TASKS clients send requests back to back; once a quarter of LOAD_REQUESTS are answered, `prepare` runs
    (still under load), then `move`; the load goes on until LOAD_REQUESTS are answered and 300 after the switch."""
    stop = asyncio.Event()
    per_client: list[list[Answer]] = [[] for _ in range(LOAD_TASKS)]
    limits = httpx.Limits(max_connections=LOAD_TASKS + 2, max_keepalive_connections=LOAD_TASKS + 2)

    def answered() -> int:
        return sum(len(answers) for answers in per_client)

    def new_answers() -> list[Answer]:
        return [a for answers in per_client for a in answers if a.version == new_version]

    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        clients = [asyncio.create_task(client_loop(client, model, stop, answers)) for answers in per_client]
        try:

            async def started() -> bool:
                return answered() >= LOAD_REQUESTS // 4

            async def switched() -> bool:
                return bool(new_answers())

            async def enough() -> bool:
                return answered() >= LOAD_REQUESTS and len(new_answers()) >= 300

            await eventually(started, 60, "load running")
            if prepare is not None:
                await prepare(client)
            moved_at = time.monotonic()
            await move()
            await eventually(switched, 30, f"an answer by v{new_version}")
            await eventually(enough, 120, f"{LOAD_REQUESTS} answers, 300 by v{new_version}")
        finally:
            stop.set()
            await asyncio.gather(*clients)
    return LoadRun(per_client, moved_at, new_version)


def assert_clean_switch(run: LoadRun, old_version: int) -> None:
    answers = run.answers
    failed = [a for a in answers if a.status != 200]
    assert failed == [], f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
    assert len(answers) >= LOAD_REQUESTS
    assert {a.version for a in answers} == {old_version, run.new_version}

    # Within two poll intervals of the move.
    assert run.switch_seconds <= 2 * POLL_SECONDS, f"switched after {run.switch_seconds:.3f}s"

    # Never back: per client, versions in the order it got them are non-decreasing ...
    for index, client_answers in enumerate(run.per_client):
        versions = [a.version or 0 for a in client_answers]
        assert versions == sorted(versions), f"client {index} went back to an old version: {versions}"
    # ... and any request sent once some client had seen the new version is answered by it.
    first_new = run.first_new().received
    late_old = [a for a in answers if a.sent > first_new and a.version == old_version]
    assert late_old == [], f"{len(late_old)} requests sent after the switch answered by v{old_version}"

    # The version label names the model that computed the answer: one output per version, and they differ.
    outputs = {
        v: {round(a.output or 0.0, 6) for a in answers if a.version == v} for v in (old_version, run.new_version)
    }
    assert all(len(values) == 1 for values in outputs.values()), outputs
    assert outputs[old_version] != outputs[run.new_version]


def tabular(seed: int, features: int = FEATURES) -> bytes:
    return onnx_bytes(om.tabular_classifier(features=features, seed=seed))


# -- MLflow: alias move under load ---------------------------------------------------------------------------------


async def test_mlflow_alias_move_under_load(mlflow_server: MlflowServer, mlflow_gateway: GatewayProcess) -> None:
    name = unique_name("hot")
    v1 = register_onnx(mlflow_server, name, tabular(seed=1))
    v2 = log_onnx_model(mlflow_server, name, om.tabular_classifier(seed=2))  # source models:/m-…
    set_alias(mlflow_server, name, "champion", v1)
    set_alias(mlflow_server, name, "challenger", v2)

    async with httpx.AsyncClient(base_url=mlflow_gateway.url, timeout=30) as http:
        await wait_aliases(http, name, {"champion": "1", "challenger": "2"})
        assert await serving_version(http, name) == v1
        assert (await metadata(http, name))["versions"] == ["1", "2"]
        for version in ("1", "2"):
            assert await metric(http, "gatewatch_model_loaded", model=name, version=version) == 1
        moved_before = await metric(http, "gatewatch_model_reloads_total", model=name, outcome="moved")

        async def move() -> None:
            await asyncio.to_thread(set_alias, mlflow_server, name, "champion", v2)

        run = await alias_move_under_load(mlflow_gateway.url, name, v2, move)
        assert_clean_switch(run, v1)
        print(f"\nMLflow: {len(run.answers)} requests, 0 failed, switch {run.switch_seconds * 1000:.0f} ms")

        assert (await metadata(http, name))["aliases"] == {"champion": "2", "challenger": "2"}
        assert await metric(http, "gatewatch_model_reloads_total", model=name, outcome="moved") > moved_before
        assert f"{name}: champion: v1 -> v2" in mlflow_gateway.log()
        for version in ("1", "2"):  # the old champion stays loaded: it is still a registered version
            assert await metric(http, "gatewatch_model_loaded", model=name, version=version) == 1


async def version_ready(http: httpx.AsyncClient, model: str, version: int) -> bool:
    response = await http.get(f"/v2/models/{model}/versions/{version}/ready")
    return response.status_code == 200


# -- MLflow: refused versions ----------------------------------------------------------------------------------------


async def test_mlflow_corrupt_or_incompatible_versions_are_refused(
    mlflow_server: MlflowServer, mlflow_gateway: GatewayProcess
) -> None:
    name = unique_name("guarded")
    register_onnx(mlflow_server, name, tabular(seed=1))
    set_alias(mlflow_server, name, "champion", 1)
    gateway = mlflow_gateway
    stop = asyncio.Event()
    answers: list[Answer] = []

    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        await wait_aliases(http, name, {"champion": "1"})  # a move needs a current target to keep
        prober = asyncio.create_task(client_loop(http, name, stop, answers, pause=0.01))  # one client throughout
        try:
            refused_before = await metric(http, "gatewatch_model_reloads_total", model=name, outcome="refused")

            # v2: not an ONNX model (its sha256 tag is right: the bytes are what was registered).
            corrupt = await asyncio.to_thread(register_onnx, mlflow_server, name, b"this is not an onnx model")
            assert corrupt == 2
            await asyncio.to_thread(set_alias, mlflow_server, name, "champion", corrupt)
            await wait_log(gateway, f"refused {name} v2 [invalid_model]")
            await wait_log(gateway, f"{name}: refused champion -> v2: that version is not loaded")
            assert (
                await metric(
                    http, "gatewatch_model_load_failures_total", model=name, version="2", reason="invalid_model"
                )
                == 1
            )
            assert await metric(http, "gatewatch_model_reloads_total", model=name, outcome="failed") >= 1
            assert await metric(http, "gatewatch_model_loaded", model=name, version="2") == 0
            assert (await metadata(http, name))["aliases"] == {"champion": "1"}
            assert (await metadata(http, name))["versions"] == ["1"]
            assert await serving_version(http, name) == 1

            # v3: a valid model with 16 features where the champion takes 32; v4: INT64 input. Loaded, never promoted.
            narrow = await asyncio.to_thread(register_onnx, mlflow_server, name, tabular(seed=3, features=16))
            integer = await asyncio.to_thread(
                register_onnx, mlflow_server, name, onnx_bytes(om.int64_sum(width=FEATURES))
            )
            assert (narrow, integer) == (3, 4)
            for version, why in (
                (narrow, "input 'input' has shape [-1, 16], was [-1, 32]"),
                (integer, "input 'input' is INT64 [-1, 32], was FP32 [-1, 32]"),
            ):
                await asyncio.to_thread(set_alias, mlflow_server, name, "champion", version)
                await wait_log(gateway, f"{name}: refused champion -> v{version}: {why}")
                assert await metric(http, "gatewatch_model_loaded", model=name, version=str(version)) == 1
                described = await metadata(http, name)
                assert described["aliases"] == {"champion": "1"}
                assert described["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, FEATURES]}]
                assert await serving_version(http, name) == 1
            assert await metric(http, "gatewatch_model_reloads_total", model=name, outcome="refused") >= (
                refused_before + 3
            )
            assert (await metadata(http, name))["versions"] == ["1", "3", "4"]

            # The guard is not stuck: a compatible version is followed.
            compatible = await asyncio.to_thread(register_onnx, mlflow_server, name, tabular(seed=5))
            await asyncio.to_thread(set_alias, mlflow_server, name, "champion", compatible)
            await wait_serving(http, name, compatible)
        finally:
            stop.set()
            await prober

    failed = [a for a in answers if a.status != 200]
    assert failed == [], failed[:3]
    versions = [a.version or 0 for a in answers]
    assert set(versions) == {1, 5} and versions == sorted(versions), "only v1, then v5 once it was champion"
    assert len(answers) >= 50


async def test_mlflow_refused_move_is_reported_once(
    mlflow_server: MlflowServer, mlflow_gateway: GatewayProcess
) -> None:
    name = unique_name("refused-once")
    await asyncio.to_thread(register_onnx, mlflow_server, name, tabular(seed=1))
    await asyncio.to_thread(set_alias, mlflow_server, name, "champion", 1)
    async with httpx.AsyncClient(base_url=mlflow_gateway.url, timeout=30) as http:
        await wait_aliases(http, name, {"champion": "1"})
        await asyncio.to_thread(register_onnx, mlflow_server, name, tabular(seed=2, features=16))
        await asyncio.to_thread(set_alias, mlflow_server, name, "champion", 2)
        refusal = f"{name}: refused champion -> v2"
        await wait_log(mlflow_gateway, refusal)
        # Two more registry changes, each seen by the gateway: at least two more complete polls.
        expected = {"champion": "1"}
        for marker in ("seen-1", "seen-2"):
            await asyncio.to_thread(set_alias, mlflow_server, name, marker, 1)
            expected[marker] = "1"
            await wait_aliases(http, name, expected)
        assert mlflow_gateway.log().count(refusal) == 1
        # champion -> v2 and latest -> v2, one refusal each
        assert await metric(http, "gatewatch_model_reloads_total", model=name, outcome="refused") == 2


async def test_transient_fetch_failure_keeps_the_versions_already_loaded(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """In process (ModelManager over MlflowRegistry), the artifact store failing for v2 only, through a real hop."""
    name = unique_name("partial")
    await asyncio.to_thread(register_onnx, mlflow_server, name, tabular(seed=1))
    await asyncio.to_thread(register_onnx, mlflow_server, name, tabular(seed=2))
    source = (await asyncio.to_thread(client_for(mlflow_server).get_model_version, name, "2")).source
    assert source is not None and source.startswith("mlflow-artifacts:/")
    hop = Hop(mlflow_server.url, fail=source.split("/artifacts/")[0].rsplit("/", 1)[-1])  # v2's run id
    metrics = GatewayMetrics(CollectorRegistry())
    executor = ThreadPoolExecutor(2)
    registry = MlflowRegistry(f"mlflow+{hop.url}", tmp_path / "models")
    manager = ModelManager(registry, executor, metrics, SessionOptions(1, 1), lambda _: BatchLimits())

    def batchers() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == f"batcher {name} v1" and not t.done()]

    try:
        for _ in range(3):  # three polls while v2's download fails
            with pytest.raises(RegistryUnavailable, match="HTTP 503"):
                await manager.sync()
        loaded = metrics.registry.get_sample_value(
            "gatewatch_model_reloads_total", {"model": name, "outcome": "loaded"}
        )
        assert (loaded, len(batchers())) == (1, 1), "v1 loaded once, one batcher"
    finally:
        await manager.aclose()
        for task in batchers():  # whatever leaked
            task.cancel()
        await registry.aclose()
        hop.stop()
        executor.shutdown()


# -- MLflow: registry outage, cold start from the cache, recovery ----------------------------------------------------


async def test_mlflow_unreachable_at_first_start_is_not_ready_until_it_answers(tmp_path: Path) -> None:
    """No registry and nothing cached: nothing to serve, so not ready (503), rather than ready with 404s."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        nobody = closed.getsockname()[1]  # bound, never listening: connections are refused
        config = gateway_config(tmp_path, f"mlflow+http://127.0.0.1:{nobody}")
        gateway = start_gateway(config, tmp_path, wait_path="/v2/health/live")
        try:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
                await wait_log(gateway, "registry unavailable", count=2)  # the start, then at least one poll
                ready = await http.get("/v2/health/ready")
                assert ready.status_code == 503 and "Retry-After" in ready.headers
                # Models are not known yet: 503 with Retry-After (try again), not a 404 (no such model).
                for response in (await infer(http, "tabular"), await http.get("/v2/models/tabular")):
                    assert response.status_code == 503, response.text
                    assert "Retry-After" in response.headers
                    assert "still loading" in response.json()["error"]
        finally:
            assert gateway.terminate() == 0


async def test_a_registry_url_that_is_no_mlflow_server_leaves_the_gateway_up_and_not_ready(tmp_path: Path) -> None:
    """A wrong URL (here a plain web server answering 404) is a configuration error to report, not a crash."""
    (tmp_path / "www").mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "www"))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as web:
        threading.Thread(target=web.serve_forever, daemon=True).start()
        try:
            config = gateway_config(tmp_path, f"mlflow+http://127.0.0.1:{web.server_address[1]}")
            gateway = start_gateway(config, tmp_path, wait_path="/v2/health/live")
            try:
                async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
                    await wait_log(gateway, "not ready until it answers as a registry")
                    assert (await client.get("/v2/health/ready")).status_code == 503
            finally:
                assert gateway.terminate() == 0
        finally:
            web.shutdown()


async def test_mlflow_outage_cold_start_from_cache_and_recovery(
    mlflow_server: MlflowServer, mlflow_gateway: GatewayProcess, tmp_path: Path
) -> None:
    name = unique_name("outage")
    register_onnx(mlflow_server, name, tabular(seed=1))
    register_onnx(mlflow_server, name, tabular(seed=2))
    set_alias(mlflow_server, name, "champion", 1)
    gateway = mlflow_gateway

    # A previous run of a second gateway warms its cache (data_dir), then stops.
    config = gateway_config(tmp_path / "cold", f"mlflow+{mlflow_server.url}")
    previous = start_gateway(config, tmp_path / "cold")
    try:
        async with httpx.AsyncClient(base_url=previous.url, timeout=30) as http:
            await wait_serving(http, name, 1)
            await eventually(lambda: version_ready(http, name, 2), 30, f"{name} v2 loaded")
    finally:
        assert previous.terminate() == 0

    stop = asyncio.Event()
    answers: list[Answer] = []
    ready_codes: list[int] = []

    async def probe_ready(http: httpx.AsyncClient) -> None:
        while not stop.is_set():
            ready_codes.append((await http.get("/v2/health/ready")).status_code)
            await asyncio.sleep(0.05)  # pacing the probe, not synchronising

    cold: GatewayProcess | None = None
    stopping: asyncio.Task[None] | None = None
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            await wait_serving(http, name, 1)
            probes = [
                asyncio.create_task(client_loop(http, name, stop, answers, pause=0.02)),
                asyncio.create_task(probe_ready(http)),
            ]
            try:
                unavailable_before = gateway.log().count("registry unavailable")
                stopping = asyncio.create_task(asyncio.to_thread(mlflow_server.stop))

                async def registry_down() -> bool:
                    try:
                        await http.get(f"{mlflow_server.url}/health", timeout=2)
                    except httpx.TransportError:
                        return True
                    return False

                await eventually(registry_down, 60, "MLflow server stopped answering")

                # Cold start while the registry is down (the server's process may still be exiting): same data_dir
                # as the previous run.
                cold = await asyncio.to_thread(start_gateway, config, tmp_path / "cold")
                assert "registry unreachable at start: serving" in cold.log()
                async with httpx.AsyncClient(base_url=cold.url, timeout=30) as cold_http:
                    assert (await cold_http.get("/v2/health/ready")).status_code == 200
                    assert await serving_version(cold_http, name) == 1
                    described = await metadata(cold_http, name)
                    assert described["versions"] == ["1", "2"] and described["aliases"] == {"champion": "1"}

                # The running gateway has polled and failed (at least twice), and serves on.
                await wait_log(gateway, "registry unavailable", within=60, count=unavailable_before + 2)
                served_while_down = len(answers)
                await stopping
                assert await registry_down()
                await asyncio.to_thread(mlflow_server.start)
            finally:
                stop.set()
                await asyncio.gather(*probes)

            assert [a for a in answers if a.status != 200] == []
            assert {a.version for a in answers} == {1}
            assert served_while_down >= 20 and len(ready_codes) >= 20
            assert set(ready_codes) == {200}

            # Back up: the next alias move is followed, by both, at their next poll (the backoff while the registry
            # was down grows to a minute).
            moved_at = time.monotonic()
            set_alias(mlflow_server, name, "champion", 2)
            await wait_serving(http, name, 2, within=120)
            followed = time.monotonic() - moved_at
            assert cold is not None
            async with httpx.AsyncClient(base_url=cold.url, timeout=30) as cold_http:
                await wait_serving(cold_http, name, 2, within=120)
            print(
                f"\noutage: {len(answers)} requests while the registry went down and came back, 0 failed; "
                f"the move after the restart followed in {followed:.1f}s"
            )
    finally:
        if cold is not None:
            cold.terminate()
        if stopping is not None:
            await asyncio.gather(stopping, return_exceptions=True)
        if mlflow_server.process is None:  # leave the session's server running for the other tests
            mlflow_server.start()


# -- directory registry: the same alias move under load --------------------------------------------------------------


@contextlib.asynccontextmanager
async def directory_gateway(tmp_path: Path, registry: Path) -> AsyncIterator[tuple[GatewayProcess, httpx.AsyncClient]]:
    """A gateway polling a directory registry every POLL_SECONDS (logging off) and a client; it must exit cleanly."""
    config = write_config(
        tmp_path / "gatewatch.yaml", registry, registry_poll_seconds=POLL_SECONDS, log_enabled="false"
    )
    gateway = start_gateway(config, tmp_path)
    try:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            yield gateway, http
    finally:
        assert gateway.terminate() == 0


async def test_directory_alias_move_under_load(tmp_path: Path) -> None:
    registry = tmp_path / "models"
    name = "dirhot"
    om.write_version(registry, name, 1, om.tabular_classifier(seed=1))
    om.write_version(registry, name, 2, om.tabular_classifier(seed=2))
    om.write_aliases(registry, name, {"champion": 1, "challenger": 2})
    async with directory_gateway(tmp_path, registry) as (gateway, http):
        assert await serving_version(http, name) == 1

        async def add_version(client: httpx.AsyncClient) -> None:
            om.write_version(registry, name, 3, om.tabular_classifier(seed=3))  # while the load runs
            await eventually(lambda: version_ready(client, name, 3), 30, "v3 loaded")

        async def move() -> None:
            om.write_aliases(registry, name, {"champion": 3, "challenger": 2})

        run = await alias_move_under_load(gateway.url, name, 3, move, prepare=add_version)
        assert_clean_switch(run, 1)
        print(f"\ndirectory: {len(run.answers)} requests, 0 failed, switch {run.switch_seconds * 1000:.0f} ms")

        described = await metadata(http, name)
        assert described["versions"] == ["1", "2", "3"]
        assert described["aliases"] == {"champion": "3", "challenger": "2"}
        for version in ("1", "2", "3"):
            assert await metric(http, "gatewatch_model_loaded", model=name, version=version) == 1
        assert f"{name}: champion: v1 -> v3" in gateway.log()


async def test_directory_version_caught_while_being_written_loads_once_the_write_finishes(tmp_path: Path) -> None:
    """Writers do not always rename a version into place: a `model.onnx` seen half-written is refused, and tried
    again as soon as its file changes, so the finished version is served without a restart."""
    registry = tmp_path / "models"
    name = "inplace"
    om.write_version(registry, name, 1, om.tabular_classifier(seed=1), with_sha256=False)
    async with directory_gateway(tmp_path, registry) as (gateway, http):
        assert await serving_version(http, name) == 1
        payload = om.tabular_classifier(seed=2).SerializeToString()
        target = registry / name / "2" / "model.onnx"
        target.parent.mkdir()
        target.write_bytes(payload[: len(payload) // 3])  # the writer is a third of the way through
        await wait_log(gateway, f"refused {name} v2")
        failures = await metric(
            http, "gatewatch_model_load_failures_total", model=name, version="2", reason="invalid_model"
        )
        assert failures >= 1
        assert not await version_ready(http, name, 2)
        assert await serving_version(http, name) == 1  # the old version keeps serving meanwhile
        with target.open("ab") as rest:
            rest.write(payload[len(payload) // 3 :])
        await wait_serving(http, name, 2)
        assert f"{name} v2 changed since it was refused" in gateway.log()
        assert await version_ready(http, name, 2)


async def test_directory_aliases_file_caught_half_written_moves_no_alias(tmp_path: Path) -> None:
    """An unreadable aliases.json (an editor truncating it before writing) is not "no aliases": the champion stays
    where it was, instead of default traffic going to `latest` until the next poll."""
    registry = tmp_path / "models"
    name = "halfaliases"
    for version in (1, 2):
        om.write_version(registry, name, version, om.tabular_classifier(seed=version))
    om.write_aliases(registry, name, {"champion": 1})
    async with directory_gateway(tmp_path, registry) as (gateway, http):
        assert await serving_version(http, name) == 1
        (registry / name / "aliases.json").write_text('{"champ')
        await wait_log(gateway, f"{name}: cannot read its versions and aliases", count=2)  # two polls at least
        assert await serving_version(http, name) == 1
        assert (await metadata(http, name))["aliases"] == {"champion": "1"}
        om.write_aliases(registry, name, {"champion": 2})
        await wait_serving(http, name, 2)


# -- a version's files replaced --------------------------------------------------------------------------------------


def replace_file(path: Path, payload: bytes) -> None:
    """Swap a file's content in one step (written beside it, then renamed over it), as a careful writer does."""
    staging = path.with_name(f".{path.name}.new")
    staging.write_bytes(payload)
    os.replace(staging, path)


async def output_of(client: httpx.AsyncClient, model: str) -> float:
    response = await infer(client, model)
    assert response.status_code == 200, response.text
    return float(next(o for o in response.json()["outputs"] if o["name"] == "probabilities")["data"][0])


async def wait_output(client: httpx.AsyncClient, model: str, expected: float, within: float = 30) -> None:
    async def check() -> bool:
        return round(await output_of(client, model), 6) == round(expected, 6)

    await eventually(check, within, f"{model} answering {expected}")


async def test_directory_version_replaced_in_place_is_swapped_under_load(tmp_path: Path) -> None:
    """A model.onnx replaced in place (same version number) is loaded again and swapped in without a failed request;
    per client, once the new files answered, the old ones never do again."""
    registry = tmp_path / "models"
    name = "replaced"
    version_dir = om.write_version(registry, name, 1, om.tabular_classifier(seed=1), with_sha256=False)
    async with directory_gateway(tmp_path, registry) as (gateway, http):
        old_output = await output_of(http, name)
        stop = asyncio.Event()
        per_client: list[list[Answer]] = [[] for _ in range(LOAD_TASKS // 2)]
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as client:
            clients = [asyncio.create_task(client_loop(client, name, stop, answers)) for answers in per_client]
            try:
                await eventually(lambda: _answered(per_client, 200), 60, "load running")
                replace_file(version_dir / "model.onnx", tabular(seed=2))
                await eventually(lambda: _answered_other_than(per_client, old_output, 200), 30, "new files answering")
            finally:
                stop.set()
                await asyncio.gather(*clients)
        answers = [a for client_answers in per_client for a in client_answers]
        failed = [a for a in answers if a.status != 200]
        assert failed == [], f"{len(failed)} of {len(answers)} requests failed, e.g. {failed[:3]}"
        assert {a.version for a in answers} == {1}
        outputs = {round(a.output or 0.0, 6) for a in answers}
        assert len(outputs) == 2 and round(old_output, 6) in outputs
        for index, client_answers in enumerate(per_client):
            old = [round(a.output or 0.0, 6) == round(old_output, 6) for a in client_answers]
            assert old == sorted(old, reverse=True), f"client {index} got the old files back after the new ones"
        assert f"{name} v1: its files changed in the registry" in gateway.log()
        assert await metric(http, "gatewatch_model_loaded", model=name, version="1") == 1  # not "unloaded"
        assert await metric(http, "gatewatch_model_reloads_total", model=name, outcome="loaded") == 2


def _answered(per_client: list[list[Answer]], count: int) -> Awaitable[bool]:
    async def check() -> bool:
        return sum(len(answers) for answers in per_client) >= count

    return check()


def _answered_other_than(per_client: list[list[Answer]], output: float, count: int) -> Awaitable[bool]:
    async def check() -> bool:
        others = [a for answers in per_client for a in answers if round(a.output or 0.0, 6) != round(output, 6)]
        return len(others) >= count

    return check()


async def test_directory_replacement_that_cannot_serve_is_refused_once_and_the_old_files_serve_on(
    tmp_path: Path,
) -> None:
    """Broken or incompatible new files for a loaded version are refused (counted once per change of files, not at
    every poll); the version keeps answering from its earlier files, and good files later are swapped in."""
    registry = tmp_path / "models"
    name = "guardedfiles"
    version_dir = om.write_version(registry, name, 1, om.tabular_classifier(seed=1), with_sha256=False)
    async with directory_gateway(tmp_path, registry) as (gateway, http):
        old_output = await output_of(http, name)

        replace_file(version_dir / "model.onnx", b"not an onnx model")
        await wait_log(gateway, f"refused {name} v1 [invalid_model]")
        # A model added afterwards is served only after a later poll, which saw the same broken files again.
        om.write_version(registry, "marker", 1, om.tabular_classifier(seed=9))
        await wait_serving(http, "marker", 1)
        failures = await metric(
            http, "gatewatch_model_load_failures_total", model=name, version="1", reason="invalid_model"
        )
        assert failures == 1
        assert round(await output_of(http, name), 6) == round(old_output, 6)
        assert "its earlier files serve on" in gateway.log()

        replace_file(version_dir / "model.onnx", onnx_bytes(om.tabular_classifier(features=8, seed=3)))
        await wait_log(gateway, f"refused {name} v1 [incompatible]")
        assert "input 'input' has shape" in gateway.log()
        assert round(await output_of(http, name), 6) == round(old_output, 6)
        assert await version_ready(http, name, 1)

        new_payload = tabular(seed=4)
        replace_file(version_dir / "model.onnx", new_payload)
        expected = await asyncio.to_thread(_probability, new_payload)
        await wait_output(http, name, expected)


def _probability(payload: bytes) -> float:
    """What onnxruntime answers for BODY's first probability with this model: the output the gateway must give."""
    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    row = np.asarray(orjson.loads(BODY)["inputs"][0]["data"], dtype=np.float32).reshape(1, FEATURES)
    return float(session.run(["probabilities"], {"input": row})[0][0][0])


async def test_mlflow_model_registered_again_between_polls_is_loaded_again(
    mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    """In process, one sync per poll: a model deleted and registered anew between two polls has a version 1 again,
    with other files. The manager serves the new files (and the old batcher is closed), not the ones it loaded."""
    name = unique_name("reborn")
    await asyncio.to_thread(register_onnx, mlflow_server, name, tabular(seed=1))
    metrics = GatewayMetrics(CollectorRegistry())
    executor = ThreadPoolExecutor(2)
    registry = MlflowRegistry(f"mlflow+{mlflow_server.url}", tmp_path / "models")
    manager = ModelManager(registry, executor, metrics, SessionOptions(1, 1), lambda _: BatchLimits())
    row = np.asarray(orjson.loads(BODY)["inputs"][0]["data"], dtype=np.float32).reshape(1, FEATURES)

    async def first_probability() -> float:
        outputs = await manager.resolve(name).batcher.infer({"input": row}, 1, None)
        return float(outputs[0][0][0])

    try:
        await manager.sync()
        first = manager.resolve(name)
        assert round(await first_probability(), 6) == round(_probability(tabular(seed=1)), 6)

        await asyncio.to_thread(client_for(mlflow_server).delete_registered_model, name)
        assert await asyncio.to_thread(register_onnx, mlflow_server, name, tabular(seed=2)) == 1
        await manager.sync()

        assert manager.resolve(name) is not first
        assert round(await first_probability(), 6) == round(_probability(tabular(seed=2)), 6)
        loaded = metrics.registry.get_sample_value(
            "gatewatch_model_reloads_total", {"model": name, "outcome": "loaded"}
        )
        assert loaded == 2
        assert metrics.registry.get_sample_value("gatewatch_model_loaded", {"model": name, "version": "1"}) == 1
        with pytest.raises(NotReady, match="being unloaded"):  # the old files' batcher is closed
            await first.batcher.infer({"input": row}, 1, None)
    finally:
        await manager.aclose()
        await registry.aclose()
        executor.shutdown()
