"""From logged tensors to drift features (design.md, "Streams"): decoding, stacking, naming.

An input (or output) tensor `X` of shape [N, k] gives features `X[0]` … `X[k-1]` (or meta.json's names), [N] gives
one feature `X`, higher ranks give none. Redacted tensors (data removed) and truncated ones (data cut short) are
skipped; `sampled_out` entries carry no tensors at all. Everything here is CPU work: call it off the event loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

Tensors = dict[str, np.ndarray]
TensorDoc = list[dict[str, Any]]

_CATEGORICAL_DATATYPES = ("BOOL", "BYTES", "INT", "UINT")


def parse_tensor_lists(raws: Sequence[bytes]) -> list[TensorDoc]:
    """Each raw `inputs`/`outputs` field as its list of V2 tensors ([] when unreadable)."""
    if not raws:
        return []
    try:
        # One parse for the whole window: the per-call overhead is most of the cost of small records.
        docs: list[Any] = orjson.loads(b"[" + b",".join(raw or b"[]" for raw in raws) + b"]")
    except orjson.JSONDecodeError:
        docs = [_parse_one(raw) for raw in raws]
    return [doc if isinstance(doc, list) else [] for doc in docs]


def _parse_one(raw: bytes) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return []


def usable(tensor: Any, excluded: frozenset[str]) -> bool:
    """A tensor whose data is all there: not redacted (data null), not truncated (fewer values than its shape)."""
    if not isinstance(tensor, dict) or tensor.get("name") in excluded:
        return False
    data, shape = tensor.get("data"), tensor.get("shape")
    if not isinstance(data, list) or not isinstance(shape, list) or not shape:
        return False
    try:
        return len(data) == math.prod(shape) and min(shape) >= 0
    except TypeError:
        return False


@dataclass
class Stacked:
    """Each tensor name's rows from all entries, stacked on the batch axis, with where each part came from."""

    tensors: Tensors = field(default_factory=dict)
    datatypes: dict[str, str] = field(default_factory=dict)
    owners: dict[str, list[int]] = field(default_factory=dict)  # per tensor: entry index of each part
    counts: dict[str, list[int]] = field(default_factory=dict)  # per tensor: rows of each part


def stack(docs: Iterable[TensorDoc], excluded: Iterable[frozenset[str]]) -> Stacked:
    """Stack every usable tensor of every entry; a tensor whose trailing shape differs from the first one seen
    under its name is left out."""
    flat: dict[str, list[Any]] = {}
    trailing: dict[str, tuple[int, ...]] = {}
    stacked = Stacked()
    for index, (doc, skip) in enumerate(zip(docs, excluded, strict=True)):
        for tensor in doc:
            if not usable(tensor, skip):
                continue
            name, shape = str(tensor["name"]), tuple(tensor["shape"])
            if trailing.setdefault(name, shape[1:]) != shape[1:]:
                continue
            if name not in flat:
                flat[name], stacked.owners[name], stacked.counts[name] = [], [], []
                stacked.datatypes[name] = str(tensor.get("datatype", ""))
            flat[name].extend(tensor["data"])
            stacked.owners[name].append(index)
            stacked.counts[name].append(int(shape[0]))
    for name, values in flat.items():
        array = _array(values, stacked.datatypes[name])
        if array is not None:
            stacked.tensors[name] = array.reshape(-1, *trailing[name])
    return stacked


def _array(values: list[Any], datatype: str) -> np.ndarray | None:
    try:
        if datatype == "BYTES":
            return np.asarray(values, dtype=str)
        if datatype == "BOOL":
            return np.asarray(values, dtype=bool)
        array = np.asarray(values)
    except (TypeError, ValueError):
        return None
    return array if array.dtype.kind in "biuf" else None


def feature_columns(tensors: Mapping[str, np.ndarray], names: Mapping[str, Sequence[str]]) -> Tensors:
    """Per-feature 1-D columns of stacked tensors, named `X[i]`, or by meta.json `features` when it has k names."""
    columns: Tensors = {}
    for tensor, array in tensors.items():
        if array.ndim == 1:
            columns[tensor] = array
        elif array.ndim == 2:
            given = list(names.get(tensor, ()))
            labels = given if len(given) == array.shape[1] else [f"{tensor}[{i}]" for i in range(array.shape[1])]
            for i, label in enumerate(labels):
                columns[str(label)] = array[:, i]
    return columns


def columns_of(
    inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray], output_types: Mapping[str, str],
    meta: Mapping[str, Any],
) -> tuple[Tensors, set[str]]:
    """All drift features of stacked inputs and outputs, and which of them are categorical (chi-squared).

    Categorical: meta.json `categorical`, and integer, boolean and string outputs (string and boolean inputs are
    categorical by their type; `ReferenceProfile.build` sees to that). An output feature is renamed
    `output:<name>` only where an input feature already has its name. Used alike for references and windows.
    """
    names = meta.get("features") or {}
    columns = feature_columns(inputs, names if isinstance(names, Mapping) else {})
    categorical = {str(name) for name in meta.get("categorical", []) or []}
    for tensor, array in outputs.items():
        is_label = output_types.get(tensor, "").startswith(_CATEGORICAL_DATATYPES) or array.dtype.kind in "biuOSU"
        for name, values in feature_columns({tensor: array}, {}).items():
            label = f"output:{name}" if name in columns else name
            columns[label] = values
            if is_label:
                categorical.add(label)
    return columns, categorical


def datatype_of(array: np.ndarray) -> str:
    """The V2 datatype name for an array from reference.npz or a model run."""
    kind = array.dtype.kind
    if kind == "b":
        return "BOOL"
    if kind in "iu":
        return f"{'UINT' if kind == 'u' else 'INT'}{array.dtype.itemsize * 8}"
    if kind == "f":
        return f"FP{array.dtype.itemsize * 8}"
    return "BYTES"
