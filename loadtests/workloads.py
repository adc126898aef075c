"""What the suite serves and sends: the two models, their registry, V2 request bodies, and the server commands."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Literal

import httpx
import numpy as np
import numpy.typing as npt
import yaml

from loadtests import onnx_models as om
from loadtests.baselines import load_session
from loadtests.servers import ManagedServer, ServerSpec

Body = Literal["json", "binary"]
TABULAR, MLP = "tabular", "mlp"
MODEL_WIDTH = {TABULAR: 32, MLP: 256}
MODEL_DESCRIPTION = {
    TABULAR: "logistic-regression classifier, FP32 [N, 32] -> probabilities FP32 [N, 2], label INT64 [N]",
    MLP: "ReLU MLP 256→1024→1024→10, FP32 [N, 256] -> logits FP32 [N, 10]",
}
PLAIN_ENDPOINT, SHADOWED_ENDPOINT = "plain", "shadowed"

# Server names (one process each).
GATEWATCH, GATEWATCH_NOLOG, GATEWATCH_NOBATCH = "gatewatch", "gatewatch-nolog", "gatewatch-nobatch"
NAIVE, BARE, RAW = "naive", "bare", "raw"


def infer_path(name: str) -> str:
    return f"/v2/models/{name}/infer"


def build_registry(root: Path) -> dict[str, Path]:
    """tabular v1 (champion) and v2 (the shadow's target), mlp v1; returns each model's served file."""
    meta = {"task": "classification"}
    om.write_version(root, TABULAR, 1, om.tabular_classifier(features=MODEL_WIDTH[TABULAR], seed=1), meta)
    om.write_version(root, TABULAR, 2, om.tabular_classifier(features=MODEL_WIDTH[TABULAR], seed=2), meta)
    om.write_aliases(root, TABULAR, {"champion": 1})
    om.write_version(root, MLP, 1, om.mlp((MODEL_WIDTH[MLP], 1024, 1024, 10)), {"task": "regression"})
    return {TABULAR: root / TABULAR / "1" / "model.onnx", MLP: root / MLP / "1" / "model.onnx"}


def sample_row(model: str, seed: int = 7) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).normal(size=(1, MODEL_WIDTH[model])).astype(np.float32)


def json_body(row: npt.NDArray[np.float32]) -> bytes:
    data = [round(float(x), 6) for x in row.ravel()]
    tensor = {"name": "input", "shape": list(row.shape), "datatype": "FP32", "data": data}
    return json.dumps({"inputs": [tensor]}, separators=(",", ":")).encode()


def binary_body(row: npt.NDArray[np.float32]) -> tuple[bytes, dict[str, str]]:
    """V2 binary tensor extension: a JSON header, then raw little-endian tensor bytes; outputs binary too."""
    blob = row.astype("<f4").tobytes()
    header = {
        "inputs": [{"name": "input", "shape": list(row.shape), "datatype": "FP32",
                    "parameters": {"binary_data_size": len(blob)}}],
        "parameters": {"binary_data_output": True},
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    return head + blob, headers


def request_for(model: str, body: str) -> tuple[bytes, dict[str, str]]:
    row = sample_row(model)
    if body == "json":
        return json_body(row), {"Content-Type": "application/json"}
    return binary_body(row)


def gatewatch_config(workdir: Path, registry: Path, name: str) -> Path:
    """The config every gatewatch uses: defaults, plus two endpoints over tabular v1, one with a 100 % shadow."""
    primary = [{"name": "primary", "model": TABULAR, "version": 1, "weight": 1}]
    config = {
        "registry": str(registry),
        "data_dir": str(workdir / name),
        "endpoints": {
            PLAIN_ENDPOINT: {"variants": primary},
            SHADOWED_ENDPOINT: {"variants": primary,
                                "shadow": [{"name": "shadow", "model": TABULAR, "version": 2, "sample": 1.0}]},
        },
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def server_specs(names: set[str], workdir: Path, registry: Path, models: dict[str, Path],
                 redis_url: str | None = None) -> dict[str, ServerSpec]:
    baseline = [sys.executable, "-m", "loadtests.baselines"]
    env = {GATEWATCH: {}, GATEWATCH_NOLOG: {"GATEWATCH_LOG_ENABLED": "false"},
           GATEWATCH_NOBATCH: {"GATEWATCH_MAX_BATCH_SIZE": "1"}}  # 1 row per run: the batcher never stacks
    specs = {}
    for name, extra_env in env.items():
        config = gatewatch_config(workdir, registry, name)
        argv = [sys.executable, "-m", "gateway.cli", "serve", "--host", "127.0.0.1", "--config", str(config),
                "--log-level", "warning"]
        if redis_url is not None:  # else each gatewatch starts its embedded Redis beside it
            extra_env = {**extra_env, "GATEWATCH_REDIS_URL": redis_url}
        specs[name] = ServerSpec(argv, extra_env, workdir / name)
    naive_models = [f"--model={model}={path}" for model, path in models.items()]
    specs[NAIVE] = ServerSpec([*baseline, NAIVE, *naive_models])
    specs[BARE] = ServerSpec([*baseline, BARE])
    specs[RAW] = ServerSpec([*baseline, RAW])
    return {name: spec for name, spec in specs.items() if name in names}


def check_answers(servers: dict[str, ManagedServer], model: str) -> str:
    """gatewatch and the naive app must give the same answer to the same JSON request, or nothing here compares."""
    body = json_body(sample_row(model))
    answers = {}
    for name in (GATEWATCH, NAIVE):
        if name not in servers:
            continue
        response = httpx.post(servers[name].url + infer_path(model), content=body, timeout=30,
                              headers={"content-type": "application/json"})
        response.raise_for_status()
        answers[name] = {o["name"]: o["data"] for o in response.json()["outputs"]}
    if len(answers) == 2:
        first = next(iter(answers[GATEWATCH]))
        if not np.allclose(answers[GATEWATCH][first], answers[NAIVE][first], atol=1e-5):
            raise RuntimeError(f"gatewatch and naive disagree on {model}: {answers}")
        return f"{model}: gatewatch and naive give the same `{first}`"
    return f"{model}: only {', '.join(answers) or 'no'} V2 server(s) to compare"


@dataclass(frozen=True)
class InProcessResult:
    model: str
    rows: int
    per_call_us: list[float]

    @property
    def median_us(self) -> float:
        return median(self.per_call_us)


def measure_inprocess(model: str, path: Path, rows: int, seconds: float, runs: int) -> InProcessResult:
    """session.run on `rows` rows in a tight loop: the floor that no server can beat."""
    session = load_session(path)
    feeds = {"input": np.random.default_rng(0).normal(size=(rows, MODEL_WIDTH[model])).astype(np.float32)}
    for _ in range(50):
        session.run(None, feeds)  # warm-up: the first calls allocate
    per_call_us = []
    for _ in range(runs):
        calls, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < seconds:
            for _ in range(20):  # amortise the clock read over several calls
                session.run(None, feeds)
            calls += 20
        per_call_us.append(elapsed / calls * 1e6)
    return InProcessResult(model, rows, per_call_us)
