"""Feedback joined to predictions by request id, whichever arrives first: accuracy and MAE."""

from __future__ import annotations

import json

import numpy as np
import pytest

from monitors.features import parse_tensor_lists, stack
from monitors.feedback import FeedbackJoiner, predictions_of, task_of
from monitors.windows import WindowKey
from tests.monitors.helpers import tensor

KEY = WindowKey("e", "m", "1", "primary")


def outputs(*tensors: dict[str, object]) -> bytes:
    return json.dumps(list(tensors)).encode()


def feedback(request_id: str, label: object) -> dict[bytes, bytes]:
    return {b"id": request_id.encode(), b"label": json.dumps(label).encode()}


def test_task_from_meta_or_integer_outputs() -> None:
    assert task_of({"task": "regression"}, {"label": "INT64"}) == "regression"
    assert task_of({}, {"label": "INT64", "p": "FP32"}) == "classification"
    assert task_of({}, {"value": "FP32"}) == "regression"


def test_classification_predictions_per_request_and_accuracy_in_either_order() -> None:
    docs = parse_tensor_lists([
        outputs(tensor("label", np.array([1]), "INT64"), tensor("p", np.array([[0.2, 0.8]]), "FP32")),
        outputs(tensor("label", np.array([0, 2]), "INT64"), tensor("p", np.array([[0.9, 0.1], [0, 1]]), "FP32")),
        b"[]",
    ])
    stacked = stack(docs, [frozenset()] * 3)
    predictions = predictions_of(stacked, "classification", [b"a", b"b", b"c"])
    assert [(rid, part.tolist()) for rid, part in predictions] == [(b"a", [1]), (b"b", [0, 2])]
    joiner = FeedbackJoiner()
    joiner.add_feedback(feedback("a", 1))  # before its prediction
    joiner.add_predictions(KEY, "classification", ["cat", "dog", "eel"], predictions)
    joiner.add_feedback(feedback("b", ["cat", "dog"]))  # after it; class names from meta.json `labels`
    joiner.add_feedback({b"id": b"b", b"reward": b"1.0"})  # a reward is not ground truth
    performance = joiner.take(KEY)
    assert performance is not None and performance.rows == 3
    assert performance.accuracy == pytest.approx(2 / 3)
    assert joiner.take(KEY) is None


def test_regression_mae_and_argmax_fallback() -> None:
    docs = parse_tensor_lists([outputs(tensor("y", np.array([[2.0]]), "FP32")),
                               outputs(tensor("y", np.array([[5.0]]), "FP32"))])
    predictions = predictions_of(stack(docs, [frozenset()] * 2), "regression", [b"r1", b"r2"])
    joiner = FeedbackJoiner()
    joiner.add_predictions(KEY, "regression", [], predictions)
    joiner.add_feedback(feedback("r1", 3.0))
    joiner.add_feedback(feedback("r2", 4.0))
    joiner.add_feedback(feedback("r3", 1.0))  # no such prediction (yet): waits, counts nowhere
    performance = joiner.take(KEY)
    assert performance is not None and performance.mae == pytest.approx(1.0) and performance.rows == 2
    scores = stack(parse_tensor_lists([outputs(tensor("p", np.array([[0.1, 0.9]]), "FP32"))]), [frozenset()])
    assert [part.tolist() for _, part in predictions_of(scores, "classification", [b"x"])] == [[1]]
