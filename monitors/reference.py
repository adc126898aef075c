"""The drift reference of each model version, shared by every worker.

From the registry when the version has `reference.npz` (one array per input name): the inputs as they are, and
for prediction drift the model's own outputs on them (onnxruntime, in a thread). Otherwise the first
`reference_rows` live rows the monitor sees for the version, announced in the log and persisted in Redis
(`gatewatch:monitor:reference:{model}:{version}`, an npz blob, first writer wins) so that other workers and
restarts reuse the same one instead of each taking its own.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
from collections.abc import Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from redis.asyncio import Redis

from monitors.drift.detector import ReferenceProfile
from monitors.features import Tensors, columns_of, datatype_of
from registry_client.base import ModelArtifact, Registry
from registry_client.errors import RegistryError, RegistryUnavailable

logger = logging.getLogger(__name__)

REFERENCE_KEY = "gatewatch:monitor:reference:{model}:{version}"
MAX_REFERENCE_ROWS = 10_000  # a larger reference.npz is subsampled (seeded): tests cost grows with its size
_RECHECK_SECONDS = 2.0  # while a live reference is being built, how often to look for one another worker stored
_REGISTRY_RETRY_SECONDS = 30.0


@dataclass
class VersionReference:
    """What the monitor knows of one model version: meta.json and, once there is one, the prepared reference."""

    model: str
    version: str
    meta: dict[str, Any] = field(default_factory=dict)
    profile: ReferenceProfile | None = None
    live: bool = False  # the reference is (being) taken from live rows
    inputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    outputs: dict[str, list[np.ndarray]] = field(default_factory=dict)
    rows: int = 0
    checked_at: float = 0.0

    @property
    def wants_rows(self) -> bool:
        return self.live and self.profile is None


class ReferenceStore:
    def __init__(self, redis: Redis, registry: Registry | None, reference_rows: int, executor: Executor) -> None:
        self._redis = redis
        self._registry = registry
        self._rows = reference_rows
        self._executor = executor
        self._versions: dict[tuple[str, str], VersionReference] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    async def get(self, model: str, version: str) -> VersionReference:
        """The version's reference state, loading it on first use; never raises for a missing reference."""
        key = (model, version)
        async with self._locks.setdefault(key, asyncio.Lock()):
            known = self._versions.setdefault(key, VersionReference(model, version))
            due = time.monotonic() >= known.checked_at
            if known.profile is None and not known.live and due:
                await self._load(known)
            elif known.wants_rows and due:
                known.checked_at = time.monotonic() + _RECHECK_SECONDS
                await self._adopt_stored(known)
            return known

    async def offer(
        self, reference: VersionReference, inputs: Tensors, outputs: Tensors, output_types: Mapping[str, str]
    ) -> None:
        """Add a closed window's rows to a live reference being built; store it once it has `reference_rows`."""
        if not reference.wants_rows or not inputs:
            return
        for name, array in inputs.items():
            reference.inputs.setdefault(name, []).append(array)
        for name, array in outputs.items():
            reference.outputs.setdefault(name, []).append(array)
        reference.rows += max(array.shape[0] for array in inputs.values())
        if reference.rows < self._rows:
            return
        blob = await self._run(_npz_blob, dict(reference.inputs), dict(reference.outputs), self._rows)
        stored = await self._redis.set(self._key(reference), blob, nx=True)
        if not stored:
            await self._adopt_stored(reference)
            return
        reference.profile = await self._run(_profile_from_blob, blob, reference.meta, "live")
        reference.inputs, reference.outputs = {}, {}
        logger.info("drift reference for %s v%s: the first %d live rows, stored in Redis",
                    reference.model, reference.version, self._rows)

    async def _load(self, reference: VersionReference) -> None:
        reachable, artifact = await self._artifact(reference.model, reference.version)
        if not reachable:
            reference.checked_at = time.monotonic() + _REGISTRY_RETRY_SECONDS  # no live rows: the registry may have one
            return
        reference.meta = dict(artifact.meta) if artifact else {}
        if artifact is not None and artifact.reference_path is not None:
            reference.profile = await self._run(_profile_from_registry, artifact)
            logger.info("drift reference for %s v%s: %s", reference.model, reference.version, reference.profile.source)
            return
        reference.live = True
        await self._adopt_stored(reference)
        if reference.profile is None:
            logger.info("%s v%s has no reference.npz: its drift reference will be the first %d live rows",
                        reference.model, reference.version, self._rows)

    async def _artifact(self, model: str, version: str) -> tuple[bool, ModelArtifact | None]:
        """(reachable, artifact): the version's files, None when the registry has none to offer."""
        if self._registry is None or not model or not version.isdigit():
            return True, None
        try:
            return True, await self._registry.fetch(model, int(version))
        except RegistryUnavailable as exc:
            logger.warning("registry unavailable for %s v%s (%s); retrying in %.0fs",
                           model, version, exc, _REGISTRY_RETRY_SECONDS)
            return False, None
        except RegistryError as exc:
            logger.info("%s v%s not usable from the registry (%s)", model, version, exc)
            return True, None

    async def _adopt_stored(self, reference: VersionReference) -> None:
        stored = await self._redis.get(self._key(reference))
        if stored:
            reference.profile = await self._run(_profile_from_blob, stored, reference.meta, "live")
            reference.inputs, reference.outputs = {}, {}

    def _key(self, reference: VersionReference) -> str:
        return REFERENCE_KEY.format(model=reference.model, version=reference.version)

    async def _run(self, function: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)


def _first_rows(parts: Mapping[str, list[np.ndarray]], rows: int) -> Tensors:
    return {name: np.concatenate(arrays)[:rows] for name, arrays in parts.items()}


def _npz_blob(inputs: Mapping[str, list[np.ndarray]], outputs: Mapping[str, list[np.ndarray]], rows: int) -> bytes:
    buffer = io.BytesIO()
    arrays = {f"in:{name}": array for name, array in _first_rows(inputs, rows).items()}
    arrays.update({f"out:{name}": array for name, array in _first_rows(outputs, rows).items()})
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def _profile_from_blob(blob: bytes, meta: Mapping[str, Any], source: str) -> ReferenceProfile:
    with np.load(io.BytesIO(blob), allow_pickle=False) as npz:
        inputs = {key[3:]: npz[key] for key in npz.files if key.startswith("in:")}
        outputs = {key[4:]: npz[key] for key in npz.files if key.startswith("out:")}
    return _profile(inputs, outputs, meta, source)


def _profile_from_registry(artifact: ModelArtifact) -> ReferenceProfile:
    assert artifact.reference_path is not None
    with np.load(artifact.reference_path, allow_pickle=False) as npz:
        inputs = {name: npz[name] for name in npz.files}
    rows = min((array.shape[0] for array in inputs.values() if array.ndim), default=0)
    if rows > MAX_REFERENCE_ROWS:
        keep = np.sort(np.random.default_rng(0).choice(rows, MAX_REFERENCE_ROWS, replace=False))
        inputs = {name: array[keep] for name, array in inputs.items()}
    outputs = _model_outputs(artifact.model_path, inputs)
    source = f"reference.npz of {artifact.directory}" + ("" if outputs else " (no prediction reference)")
    return _profile(inputs, outputs, artifact.meta, source)


def _profile(inputs: Tensors, outputs: Tensors, meta: Mapping[str, Any], source: str) -> ReferenceProfile:
    types = {name: datatype_of(array) for name, array in outputs.items()}
    columns, categorical = columns_of(inputs, outputs, types, meta)
    rows = max((array.shape[0] for array in inputs.values() if array.ndim), default=0)
    return ReferenceProfile.build(columns, categorical, source, rows)


def _model_outputs(model_path: Path, inputs: Tensors, chunk: int = 1024) -> Tensors:
    """The model's outputs on the reference inputs (the prediction-drift reference); {} if it cannot run them."""
    import onnxruntime as ort

    from gateway.protocol.codecs import DATATYPE_TO_NUMPY, ORT_TO_DATATYPE

    try:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        feeds = {}
        for spec in session.get_inputs():
            dtype = DATATYPE_TO_NUMPY[ORT_TO_DATATYPE[spec.type]]
            feeds[spec.name] = np.asarray(inputs[spec.name]).astype(dtype if dtype.kind != "O" else object)
        rows = min(array.shape[0] for array in feeds.values())
        names = [output.name for output in session.get_outputs()]
        parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for start in range(0, rows, chunk):
            results = session.run(names, {name: array[start:start + chunk] for name, array in feeds.items()})
            for name, result in zip(names, results, strict=True):
                parts[name].append(np.asarray(result))
        return {name: np.concatenate(arrays) for name, arrays in parts.items() if arrays}
    except KeyError as exc:
        logger.warning("%s: reference.npz lacks input %s or its type is unknown: no prediction reference",
                       model_path, exc)
    except Exception:  # onnxruntime raises its own exception types for a model it cannot run
        logger.exception("%s: cannot run the model on reference.npz: no prediction reference", model_path)
    return {}
