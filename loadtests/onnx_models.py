"""Small, real ONNX models for the examples, the benchmarks and the tests, built with onnx's helper API.

Run `python -m loadtests.onnx_models DIR` to write the example registry (a 32-feature tabular classifier in two
versions, `champion` and `challenger`) under DIR.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9  # understood by every onnxruntime we support

_ELEMENT_TYPES = {
    "BOOL": TensorProto.BOOL,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _model(nodes: list[Any], inputs: list[Any], outputs: list[Any], initializers: list[Any]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "gatewatch", inputs, outputs, initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="gatewatch")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def tabular_classifier(features: int = 32, classes: int = 2, seed: int = 0) -> onnx.ModelProto:
    """Logistic regression: `input` FP32 [N, features] -> `probabilities` FP32 [N, classes], `label` INT64 [N]."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 1 / np.sqrt(features), (features, classes)).astype(np.float32)
    bias = rng.normal(0, 0.1, classes).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["input", "W"], ["logits"]),
        helper.make_node("Add", ["logits", "B"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["scores"], ["label"], axis=1, keepdims=0),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
        [
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", classes]),
            helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
        ],
        [numpy_helper.from_array(weights, "W"), numpy_helper.from_array(bias, "B")],
    )


def mlp(sizes: tuple[int, ...] = (256, 1024, 1024, 10), seed: int = 0) -> onnx.ModelProto:
    """ReLU MLP: `input` FP32 [N, sizes[0]] -> `logits` FP32 [N, sizes[-1]]."""
    rng = np.random.default_rng(seed)
    nodes: list[Any] = []
    initializers: list[Any] = []
    current = "input"
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        weight = rng.normal(0, np.sqrt(2 / fan_in), (fan_in, fan_out)).astype(np.float32)
        initializers += [
            numpy_helper.from_array(weight, f"W{layer}"),
            numpy_helper.from_array(np.zeros(fan_out, np.float32), f"B{layer}"),
        ]
        last = layer == len(sizes) - 2
        nodes += [
            helper.make_node("MatMul", [current, f"W{layer}"], [f"m{layer}"]),
            helper.make_node("Add", [f"m{layer}", f"B{layer}"], ["logits" if last else f"a{layer}"]),
        ]
        if not last:
            nodes.append(helper.make_node("Relu", [f"a{layer}"], [f"h{layer}"]))
            current = f"h{layer}"
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", sizes[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", sizes[-1]])],
        initializers,
    )


def int64_sum(width: int = 4) -> onnx.ModelProto:
    """`input` INT64 [N, width] -> `sum` INT64 [N, 1] (row sums) and `doubled` INT64 [N, width]."""
    nodes = [
        helper.make_node("ReduceSum", ["input", "axes"], ["sum"], keepdims=1),
        helper.make_node("Add", ["input", "input"], ["doubled"]),
    ]
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.INT64, ["N", width])],
        [
            helper.make_tensor_value_info("sum", TensorProto.INT64, ["N", 1]),
            helper.make_tensor_value_info("doubled", TensorProto.INT64, ["N", width]),
        ],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )


def identity(datatype: str, width: int = 3, batched: bool = True) -> onnx.ModelProto:
    """`x` -> `y` unchanged, for any datatype; `batched=False` fixes the first dimension at 1."""
    element = _ELEMENT_TYPES[datatype]
    shape: list[Any] = ["N", width] if batched else [1, width]
    return _model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", element, shape)],
        [helper.make_tensor_value_info("y", element, shape)],
        [],
    )


def heavy(width: int = 512, depth: int = 24, seed: int = 0) -> onnx.ModelProto:
    """A deliberately slow model: `depth` chained [width x width] MatMuls sharing one weight."""
    rng = np.random.default_rng(seed)
    weight = (np.eye(width) + rng.normal(0, 1e-3, (width, width))).astype(np.float32)
    nodes = []
    current = "input"
    for step in range(depth):
        out = "output" if step == depth - 1 else f"h{step}"
        nodes.append(helper.make_node("MatMul", [current, "W"], [out]))
        current = out
    return _model(
        nodes,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", width])],
        [numpy_helper.from_array(weight, "W")],
    )


def write_version(
    root: Path,
    model: str,
    version: int,
    proto: onnx.ModelProto | bytes,
    meta: dict[str, Any] | None = None,
    with_sha256: bool = True,
) -> Path:
    """Lay out `root/model/version/` atomically (built in a temp dir, then renamed into place)."""
    payload = proto if isinstance(proto, bytes) else proto.SerializeToString()
    model_dir = root / model
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=model_dir))
    (staging / "model.onnx").write_bytes(payload)
    full_meta = dict(meta or {})
    if with_sha256:
        full_meta.setdefault("sha256", hashlib.sha256(payload).hexdigest())
    if full_meta:
        (staging / "meta.json").write_text(json.dumps(full_meta, indent=2))
    target = model_dir / str(version)
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target


def write_aliases(root: Path, model: str, aliases: dict[str, int]) -> None:
    path = root / model / "aliases.json"
    staging = path.with_suffix(".tmp")
    staging.write_text(json.dumps(aliases))
    os.replace(staging, path)


def write_example_registry(root: Path) -> None:
    """The quickstart registry: `tabular` v1 (champion) and v2 (challenger), 32 FP32 features."""
    meta = {"task": "classification", "labels": ["negative", "positive"]}
    write_version(root, "tabular", 1, tabular_classifier(seed=1), meta)
    write_version(root, "tabular", 2, tabular_classifier(seed=2), meta)
    write_aliases(root, "tabular", {"champion": 1, "challenger": 2})


if __name__ == "__main__":
    write_example_registry(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/models"))
