"""OnnxRunner: one onnxruntime session per model version, run on a dedicated thread pool.

onnxruntime releases the GIL inside `run()`, so inference threads run in parallel with the event loop. Creating
a session holds the GIL for its whole duration, so sessions are created (and warmed up) before a version is
marked loaded, never on the request path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gateway.protocol.codecs import DATATYPE_TO_NUMPY, ORT_TO_DATATYPE, TensorSpec


@dataclass(frozen=True)
class SessionOptions:
    intra_op_threads: int = 1
    inter_op_threads: int = 1


class UnsupportedModel(Exception):
    """The graph loads but uses tensor types the gateway cannot serve."""


class OnnxRunner:
    def __init__(self, session: ort.InferenceSession, executor: Executor) -> None:
        self._session = session
        self._executor = executor
        self.inputs = tuple(_spec(arg) for arg in session.get_inputs())
        self.outputs = tuple(_spec(arg) for arg in session.get_outputs())
        self.output_names = [spec.name for spec in self.outputs]
        self.input_types = {spec.name: spec.datatype for spec in self.inputs}
        self.batched = _has_batch_dimension(self.inputs) and _has_batch_dimension(self.outputs)

    @classmethod
    def load(cls, path: Path, options: SessionOptions, executor: Executor) -> OnnxRunner:
        """Create the session and run one warm-up inference. Blocking: call it in a thread."""
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=session_options, providers=["CPUExecutionProvider"])
        runner = cls(session, executor)
        runner.run_sync(runner.zero_inputs())
        return runner

    def zero_inputs(self, rows: int = 1) -> dict[str, np.ndarray]:
        """A request of zeros (empty strings for BYTES), `rows` rows where the batch dimension is dynamic."""
        arrays: dict[str, np.ndarray] = {}
        for spec in self.inputs:
            shape = [rows if i == 0 and dim == -1 else max(dim, 1) for i, dim in enumerate(spec.shape)]
            dtype = DATATYPE_TO_NUMPY[spec.datatype]
            if spec.datatype == "BYTES":
                arrays[spec.name] = np.full(shape, "", dtype=object)
            else:
                arrays[spec.name] = np.zeros(shape, dtype=dtype)
        return arrays

    def run_sync(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._session.run(self.output_names, inputs)
        return [np.asarray(result) for result in results]

    async def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.run_sync, inputs)


def _spec(arg: ort.NodeArg) -> TensorSpec:
    datatype = ORT_TO_DATATYPE.get(arg.type)
    if datatype is None:
        raise UnsupportedModel(f"tensor {arg.name!r} has type {arg.type}, which the gateway cannot serve")
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in (arg.shape or []))
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)


def _has_batch_dimension(specs: Sequence[TensorSpec]) -> bool:
    return bool(specs) and all(spec.shape and spec.shape[0] == -1 for spec in specs)
