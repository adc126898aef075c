"""Ground truth joined to logged predictions by request id: accuracy (classification) or MAE (regression).

Feedback (`gatewatch:feedback:{endpoint}`: `id` and `label`, or `reward`) usually arrives after the prediction, so
both sides wait in bounded maps: predictions by request id, and labels whose prediction has not been seen yet.
A matched pair counts in the next closing primary window of the prediction's endpoint x model x version.
Rewards carry no ground truth and are left to the router's bandits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import orjson

from monitors.features import Stacked
from monitors.windows import WindowKey

_INTEGER_TYPES = ("INT", "UINT", "BOOL", "BYTES")


@dataclass(frozen=True)
class Performance:
    task: str  # classification | regression
    rows: int  # labelled rows joined in this window
    accuracy: float | None = None
    mae: float | None = None


class _Prediction(NamedTuple):  # a thousand per window: a tuple is made far faster than a frozen dataclass
    key: WindowKey
    task: str
    values: np.ndarray
    labels: tuple[str, ...]  # meta.json `labels`: class index -> name


def task_of(meta: Mapping[str, Any], output_types: Mapping[str, str]) -> str:
    """meta.json `task` when given; else classification when the model returns an integer (label) output."""
    task = meta.get("task")
    if task in ("classification", "regression"):
        return str(task)
    return "classification" if any(t.startswith(_INTEGER_TYPES) for t in output_types.values()) else "regression"


def predictions_of(outputs: Stacked, task: str, request_ids: Sequence[bytes]) -> list[tuple[bytes, np.ndarray]]:
    """Per logged request, its predictions (one per row): the integer label output, else the argmax of a score
    matrix (classification); the single-valued float output (regression)."""
    chosen: tuple[str, np.ndarray] | None = None
    for name, array in outputs.tensors.items():
        integer = outputs.datatypes.get(name, "").startswith(_INTEGER_TYPES)
        if task == "classification" and integer and array.ndim == 1:
            chosen = (name, array)
            break
        if chosen is None and array.dtype.kind == "f":
            if task == "regression" and (array.ndim == 1 or (array.ndim == 2 and array.shape[1] == 1)):
                chosen = (name, array.reshape(-1))
            elif task == "classification" and array.ndim == 2 and array.shape[1] > 1:
                chosen = (name, array.argmax(axis=1))
    if chosen is None:
        return []
    name, values = chosen
    counts = outputs.counts[name]
    if len(counts) > 1 and min(counts) == max(counts) > 0:
        parts = list(values.reshape(len(counts), counts[0]))  # as np.split would cut it, without a call per part
    else:
        parts = np.split(values, np.cumsum(counts)[:-1]) if len(counts) > 1 else [values]
    return [(request_ids[i], part) for i, part in zip(outputs.owners[name], parts, strict=True) if request_ids[i]]


class FeedbackJoiner:
    def __init__(self, max_predictions: int = 200_000, max_waiting: int = 100_000) -> None:
        self._predictions: dict[bytes, _Prediction] = {}
        self._waiting: dict[bytes, Any] = {}  # request id -> label, feedback ahead of its prediction
        self._matched: dict[WindowKey, list[tuple[_Prediction, Any]]] = {}
        self._max_predictions = max_predictions
        self._max_waiting = max_waiting

    def add_predictions(
        self, key: WindowKey, task: str, labels: Sequence[str], predictions: Sequence[tuple[bytes, np.ndarray]]
    ) -> None:
        names = tuple(labels)
        for request_id, values in predictions:
            prediction = _Prediction(key, task, values, names)
            label = self._waiting.pop(request_id, None)
            if label is not None:
                self._matched.setdefault(key, []).append((prediction, label))
            else:
                self._predictions[request_id] = prediction
        _trim(self._predictions, self._max_predictions)

    def add_feedback(self, fields: Mapping[bytes, bytes]) -> None:
        raw_label, request_id = fields.get(b"label"), fields.get(b"id", b"")
        if raw_label is None or not request_id:
            return
        try:
            label = orjson.loads(raw_label)
        except orjson.JSONDecodeError:
            return
        prediction = self._predictions.pop(request_id, None)
        if prediction is None:
            self._waiting[request_id] = label
            _trim(self._waiting, self._max_waiting)
        else:
            self._matched.setdefault(prediction.key, []).append((prediction, label))

    def take(self, key: WindowKey) -> Performance | None:
        """Accuracy or MAE over the pairs matched for `key` since the last call; None when there are none."""
        pairs = self._matched.pop(key, [])
        if not pairs:
            return None
        task = pairs[0][0].task
        scores = [score for prediction, label in pairs for score in _scores(prediction, label)]
        if not scores:
            return None
        mean = float(np.mean(scores))
        if task == "classification":
            return Performance(task, len(scores), accuracy=mean)
        return Performance(task, len(scores), mae=mean)


def _scores(prediction: _Prediction, label: Any) -> list[float]:
    """Per row: 1/0 for a right/wrong class, or the absolute error."""
    labels = label if isinstance(label, list) else [label]
    if len(labels) != prediction.values.size:
        return []
    scores: list[float] = []
    for truth, predicted in zip(labels, prediction.values.tolist(), strict=True):
        if prediction.task == "classification":
            names = {str(predicted)}
            if isinstance(predicted, int) and 0 <= predicted < len(prediction.labels):
                names.add(prediction.labels[predicted])
            if isinstance(truth, float) and truth.is_integer():
                truth = int(truth)  # a class sent as 1.0 is class 1
            scores.append(1.0 if str(truth) in names else 0.0)
        elif isinstance(truth, int | float) and not isinstance(truth, bool):
            scores.append(abs(float(truth) - float(predicted)))
    return scores


def _trim(mapping: dict[bytes, Any], limit: int) -> None:
    while len(mapping) > limit:
        del mapping[next(iter(mapping))]
