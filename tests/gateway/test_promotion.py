"""Where aliases and `latest` point after a registry change: pure decisions over real onnxruntime runners."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import onnx
import pytest

from gateway.runtime.promotion import promote
from gateway.runtime.runner import OnnxRunner, SessionOptions
from loadtests import onnx_models as om


@pytest.fixture(scope="module")
def runners(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, OnnxRunner]]:
    """Two tabular models of the same signature, and one whose input is wider (not a drop-in replacement)."""
    directory = tmp_path_factory.mktemp("promotion")
    models = {"a": om.tabular_classifier(features=4, seed=1), "b": om.tabular_classifier(features=4, seed=2),
              "wide": om.tabular_classifier(features=8, seed=3)}
    with ThreadPoolExecutor(1) as executor:
        loaded = {}
        for name, proto in models.items():
            path = directory / f"{name}.onnx"
            onnx.save(proto, str(path))
            loaded[name] = OnnxRunner.load(Path(path), SessionOptions(1, 1), executor)
        yield loaded


def test_latest_of_a_model_nothing_serves_yet_is_its_highest_loaded_version(runners: dict[str, OnnxRunner]) -> None:
    promotion = promote({1: runners["a"], 2: runners["wide"]}, {}, {}, None)
    assert promotion.latest == 2  # design.md: the highest version that loaded; no clients to protect yet
    assert promotion.moved == ["latest: -> v2"] and promotion.refused == []


def test_latest_moves_only_to_a_compatible_version_while_it_serves(runners: dict[str, OnnxRunner]) -> None:
    refused = promote({1: runners["a"], 2: runners["wide"]}, {}, {}, 1)
    assert refused.latest == 1 and refused.moved == [] and refused.refused[0].startswith("latest -> v2: input")
    moved = promote({1: runners["a"], 2: runners["b"]}, {}, {}, 1)
    assert (moved.latest, moved.moved) == (2, ["latest: v1 -> v2"])  # logged and counted like alias moves


def test_an_alias_whose_version_is_gone_is_unset_not_kept(runners: dict[str, OnnxRunner]) -> None:
    """Deleting the champion's version while it serves: `champion` is unset (default traffic goes to `latest`),
    the same as a restart over the same files would decide, and the note says so."""
    promotion = promote({3: runners["a"]}, {"champion": 1}, {"champion": 1}, 3)
    assert promotion.aliases == {} and promotion.latest == 3
    assert promotion.refused == ["champion -> v1: that version is not loaded; champion is unset until it is"]
    on_restart = promote({3: runners["a"]}, {"champion": 1}, {}, None)
    assert on_restart.aliases == {} and on_restart.latest == 3


def test_an_alias_waiting_for_its_new_version_keeps_the_old_one(runners: dict[str, OnnxRunner]) -> None:
    promotion = promote({1: runners["a"]}, {"champion": 2}, {"champion": 1}, 1)
    assert promotion.aliases == {"champion": 1}
    assert promotion.refused == ["champion -> v2: that version is not loaded; v1 keeps serving"]
