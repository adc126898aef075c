"""The demo's synthetic credit task: a feature sampler that can drift, and logistic regressions trained on it.

Models are trained with numpy (gradient descent on standardised features, the standardisation folded into the
weights) and exported with onnx's helper API, so the demo needs no scikit-learn; outputs are plain tensors
(`probabilities` [N, 2], `label` [N]), like skl2onnx with `zipmap=False`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from loadtests.onnx_models import IR_VERSION, OPSET, write_aliases, write_version

FEATURES = ("age", "income", "balance", "tenure_years", "utilization", "region")
CATEGORICAL = ("region",)
MODEL = "credit"
_TRUE_WEIGHTS = np.array([-0.4, 0.9, -0.6, 0.3, -1.2, 0.25])


@dataclass(frozen=True)
class Population:
    """How applicants look; `drift` in [0, 1] moves income up by one standard deviation and reshuffles regions."""

    drift: float = 0.0

    def sample(self, rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
        regions_p = (1 - self.drift) * np.array([0.4, 0.3, 0.2, 0.1]) + self.drift * np.array([0.1, 0.2, 0.3, 0.4])
        features = np.column_stack(
            [
                rng.normal(40, 10, rows),
                rng.normal(50 + 15 * self.drift, 15, rows),
                rng.normal(5, 2, rows),
                rng.exponential(3, rows),
                rng.beta(2, 5, rows),
                rng.choice(4, rows, p=regions_p).astype(float),
            ]
        ).astype(np.float32)
        standardised = (features - _MEANS) / _SCALES
        logits = standardised @ _TRUE_WEIGHTS - 0.2
        labels = (rng.random(rows) < 1 / (1 + np.exp(-logits))).astype(np.int64)
        return features, labels


_MEANS = np.array([40, 50, 5, 3, 2 / 7, 1.0], dtype=np.float32)
_SCALES = np.array([10, 15, 2, 3, 0.16, 1.0], dtype=np.float32)


def train(features: np.ndarray, labels: np.ndarray, l2: float, steps: int = 400) -> tuple[np.ndarray, float]:
    """Logistic regression on raw features; returns weights and bias that include the standardisation."""
    mean, scale = features.mean(axis=0), features.std(axis=0) + 1e-6
    x = (features - mean) / scale
    weights, bias = np.zeros(x.shape[1]), 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ weights + bias)))
        weights -= 0.5 * (x.T @ (p - labels) / len(labels) + l2 * weights)
        bias -= 0.5 * float(np.mean(p - labels))
    return weights / scale, bias - float(np.sum(weights * mean / scale))


def export(weights: np.ndarray, bias: float) -> onnx.ModelProto:
    """Two-class logistic regression as ONNX: `input` FP32 [N, k] -> `probabilities`, `label`."""
    w = np.column_stack([np.zeros_like(weights), weights]).astype(np.float32)
    b = np.array([0.0, bias], dtype=np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["logits"]),
        helper.make_node("Add", ["logits", "B"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "credit",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", len(weights)])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gatewatch-demo")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def build_registry(root: Path, seed: int = 7) -> Path:
    """Three versions of `credit` (champion, challenger, and a third used as the shadow), each with a reference
    sample and meta.json (feature names, the categorical feature, sha256). Reused when already built."""
    if all((root / MODEL / str(v) / "model.onnx").is_file() for v in (1, 2, 3)):
        return root
    rng = np.random.default_rng(seed)
    meta = {
        "task": "classification",
        "labels": ["repaid", "defaulted"],
        "features": {"input": list(FEATURES)},
        "categorical": list(CATEGORICAL),
    }
    for version, (rows, l2) in enumerate(((2000, 0.01), (8000, 0.001), (4000, 0.3)), start=1):
        features, labels = Population().sample(rng, rows)
        directory = write_version(root, MODEL, version, export(*train(features, labels, l2)), meta)
        np.savez(directory / "reference.npz", input=features[:2000])
    write_aliases(root, MODEL, {"champion": 1, "challenger": 2})
    return root
