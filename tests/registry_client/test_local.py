"""The directory registry, and version references resolved through the model manager over it.

Real ONNX files in a temporary directory laid out as design.md describes; no gateway process needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.errors import ModelNotFound, NotReady
from gateway.metrics import GatewayMetrics
from gateway.runtime.batcher import BatchLimits
from gateway.runtime.manager import ModelManager
from gateway.runtime.runner import SessionOptions
from loadtests import onnx_models as om
from registry_client.base import file_sha256, parse_version_ref
from registry_client.errors import ArtifactRejected, RegistryError, RegistryUnavailable, VersionNotFound
from registry_client.factory import open_registry
from registry_client.local import DirectoryRegistry

IDENTITY = om.identity("FP32").SerializeToString()


def version_dir(root: Path, model: str, version: str, payload: bytes | None = IDENTITY) -> Path:
    """A raw version directory, bypassing write_version's checks (so it can be wrong on purpose)."""
    directory = root / model / version
    directory.mkdir(parents=True)
    if payload is not None:
        (directory / "model.onnx").write_bytes(payload)
    return directory


# -- version listing ----------------------------------------------------------------------------------------


async def test_index_lists_only_version_dirs_holding_model_onnx(tmp_path: Path) -> None:
    for version in ("1", "3", "10"):
        version_dir(tmp_path, "m", version)
    version_dir(tmp_path, "m", "2", payload=None)  # being written: no model.onnx yet
    version_dir(tmp_path, "m", ".4-staging")  # write_version's staging directory
    version_dir(tmp_path, "m", "0")  # versions are positive
    version_dir(tmp_path, "m", "latest")
    version_dir(tmp_path, "m", "²")  # a digit to str.isdigit(), not to int()
    version_dir(tmp_path, "m", "05")  # fetch(m, 5) would look in m/5
    (tmp_path / "m" / "7").write_text("a file, not a directory")
    (tmp_path / "m" / "8").mkdir()
    (tmp_path / "m" / "8" / "model.onnx").mkdir()  # a directory named model.onnx is no model

    index = await DirectoryRegistry(tmp_path).index("m")

    assert index.model == "m"
    assert index.versions == (1, 3, 10)  # sorted numerically, not as strings


async def test_index_of_model_without_versions_is_empty(tmp_path: Path) -> None:
    version_dir(tmp_path, "m", "1", payload=None)
    index = await DirectoryRegistry(tmp_path).index("m")
    assert index.versions == ()
    assert index.aliases == {}


async def test_index_unknown_model_raises_version_not_found(tmp_path: Path) -> None:
    with pytest.raises(VersionNotFound, match="model 'nope' not in"):
        await DirectoryRegistry(tmp_path).index("nope")


async def test_list_models_skips_hidden_dirs_and_files(tmp_path: Path) -> None:
    version_dir(tmp_path, "b", "1")
    version_dir(tmp_path, "a", "1")
    (tmp_path / ".cache").mkdir()
    (tmp_path / "README.md").write_text("not a model")
    assert await DirectoryRegistry(tmp_path).list_models() == ["a", "b"]


async def test_list_models_of_missing_root_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(RegistryUnavailable, match="does not exist"):
        await DirectoryRegistry(tmp_path / "missing").list_models()


# -- aliases.json -------------------------------------------------------------------------------------------


async def test_aliases_read_from_aliases_json(tmp_path: Path) -> None:
    version_dir(tmp_path, "m", "1")
    version_dir(tmp_path, "m", "2")
    om.write_aliases(tmp_path, "m", {"champion": 1, "challenger": 2})
    index = await DirectoryRegistry(tmp_path).index("m")
    assert index.aliases == {"champion": 1, "challenger": 2}


async def test_aliases_accept_digit_strings_and_drop_invalid_values(tmp_path: Path) -> None:
    version_dir(tmp_path, "m", "1")
    aliases = {
        "a": "2",
        "b": 3,
        "neg": -1,
        "zero": 0,
        "word": "two",
        "float": 1.5,
        "flag": True,
        "sup": "²",
        "none": None,
    }
    (tmp_path / "m" / "aliases.json").write_text(json.dumps(aliases))
    index = await DirectoryRegistry(tmp_path).index("m")
    assert index.aliases == {"a": 2, "b": 3}


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '"champion"', ""])
async def test_unreadable_aliases_file_is_an_error_not_no_aliases(tmp_path: Path, content: str) -> None:
    """Read as "no aliases", a file caught half-written would move every alias away until the next poll."""
    version_dir(tmp_path, "m", "1")
    (tmp_path / "m" / "aliases.json").write_text(content)
    with pytest.raises(RegistryError, match="aliases.json"):
        await DirectoryRegistry(tmp_path).index("m")


# -- fetch and verification ---------------------------------------------------------------------------------


async def test_fetch_returns_artifact_with_meta(tmp_path: Path) -> None:
    directory = om.write_version(tmp_path, "m", 1, om.identity("FP32"), {"task": "regression"})
    artifact = await DirectoryRegistry(tmp_path).fetch("m", 1)
    assert artifact.model == "m" and artifact.version == 1
    assert artifact.directory == directory
    assert artifact.model_path == directory / "model.onnx"
    assert artifact.meta["task"] == "regression"
    assert artifact.meta["sha256"] == file_sha256(artifact.model_path)
    assert artifact.reference_path is None


async def test_fetch_sha256_mismatch_is_rejected(tmp_path: Path) -> None:
    om.write_version(tmp_path, "m", 1, om.identity("FP32"), {"sha256": "0" * 64})
    with pytest.raises(ArtifactRejected, match="meta.json expects 0{64}") as caught:
        await DirectoryRegistry(tmp_path).fetch("m", 1)
    assert caught.value.reason == "sha256_mismatch"


async def test_fetch_sha256_compared_case_insensitively(tmp_path: Path) -> None:
    digest = hashlib.sha256(IDENTITY).hexdigest().upper()
    om.write_version(tmp_path, "m", 1, IDENTITY, {"sha256": digest})
    artifact = await DirectoryRegistry(tmp_path).fetch("m", 1)
    assert artifact.meta["sha256"] == digest


@pytest.mark.parametrize("meta", ["{broken", "[]"])
async def test_fetch_bad_meta_json_is_rejected(tmp_path: Path, meta: str) -> None:
    directory = version_dir(tmp_path, "m", "1")
    (directory / "meta.json").write_text(meta)
    with pytest.raises(ArtifactRejected) as caught:
        await DirectoryRegistry(tmp_path).fetch("m", 1)
    assert caught.value.reason == "bad_meta"


async def test_fetch_missing_version_raises_version_not_found(tmp_path: Path) -> None:
    version_dir(tmp_path, "m", "1")
    version_dir(tmp_path, "m", "2", payload=None)
    registry = DirectoryRegistry(tmp_path)
    with pytest.raises(VersionNotFound, match="m version 2"):
        await registry.fetch("m", 2)
    with pytest.raises(VersionNotFound, match="m version 9"):
        await registry.fetch("m", 9)


# -- open_registry and version references -------------------------------------------------------------------


def test_open_registry_accepts_path_and_file_uri(tmp_path: Path) -> None:
    for uri in (str(tmp_path), f"file://{tmp_path}"):
        registry = open_registry(uri, tmp_path / "cache", {})
        assert isinstance(registry, DirectoryRegistry) and registry.root == tmp_path


def test_open_registry_unknown_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="unsupported registry URI 's3://bucket/models'"):
        open_registry("s3://bucket/models", Path("cache"), {})


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [("3", 3), ("10", 10), ("champion", "champion"), ("latest", "latest"), ("²", "²"), ("٣", "٣"), ("-1", "-1")],
)
def test_parse_version_ref_reads_ascii_integers_only(ref: str, parsed: int | str) -> None:
    assert parse_version_ref(ref) == parsed


# -- resolving references through the model manager ---------------------------------------------------------


@pytest.fixture
def three_versions(tmp_path: Path) -> Path:
    """`m` v1, v2 good; v3 corrupt; champion -> 1, challenger -> 2, ghost -> 7 (no such version)."""
    om.write_version(tmp_path, "m", 1, om.identity("FP32"))
    om.write_version(tmp_path, "m", 2, om.identity("FP32"))
    om.write_version(tmp_path, "m", 3, b"not onnx", with_sha256=False)
    om.write_aliases(tmp_path, "m", {"champion": 1, "challenger": 2, "ghost": 7})
    om.write_version(tmp_path, "plain", 1, om.identity("FP32"))
    om.write_version(tmp_path, "plain", 4, om.identity("FP32"))
    return tmp_path


@pytest.fixture
async def manager(three_versions: Path) -> AsyncIterator[ModelManager]:
    """A ModelManager synced from `three_versions`, closed (batchers drained) afterwards."""
    executor = ThreadPoolExecutor(1)
    manager = ModelManager(
        DirectoryRegistry(three_versions),
        executor,
        GatewayMetrics(CollectorRegistry()),
        SessionOptions(),
        lambda _: BatchLimits(),
    )
    await manager.sync()
    yield manager
    await manager.aclose()
    executor.shutdown()


async def test_resolve_integer_alias_and_latest(manager: ModelManager) -> None:
    assert manager.resolve("m", 2).version == 2
    assert manager.resolve("m", 1).version == 1
    assert manager.resolve("m", "champion").version == 1
    assert manager.resolve("m", "challenger").version == 2
    # `latest` = the highest version that loaded successfully: v3 is corrupt.
    assert manager.resolve("m", "latest").version == 2
    assert manager.state("m").refused == {3: "invalid_model"}


async def test_resolve_default_is_champion_else_latest(manager: ModelManager) -> None:
    assert manager.resolve("m").version == 1
    assert manager.resolve("plain").version == 4
    assert manager.resolve("plain", "latest").version == 4


async def test_champion_on_a_version_that_did_not_load_is_never_replaced_by_another(tmp_path: Path) -> None:
    """Started with `champion` on a corrupt version, the default route names the problem instead of sending the
    champion's traffic to `latest` (here the challenger); once the alias is fixed, the champion serves."""
    om.write_version(tmp_path, "m", 1, om.identity("FP32"))
    om.write_version(tmp_path, "m", 2, b"not onnx", with_sha256=False)
    om.write_version(tmp_path, "m", 3, om.identity("FP32"))
    om.write_aliases(tmp_path, "m", {"champion": 2, "challenger": 3})
    executor = ThreadPoolExecutor(1)
    metrics = GatewayMetrics(CollectorRegistry())
    manager = ModelManager(DirectoryRegistry(tmp_path), executor, metrics, SessionOptions(), lambda _: BatchLimits())
    try:
        with pytest.raises(NotReady, match="models are still loading"):  # before the first sync: 503, not 404
            manager.resolve("m")
        await manager.sync()
        with pytest.raises(ModelNotFound, match=r"champion alias points at v2, which is not loaded \(refused: v2"):
            manager.resolve("m")
        assert manager.resolve("m", "challenger").version == 3
        om.write_aliases(tmp_path, "m", {"champion": 1, "challenger": 3})
        await manager.sync()
        assert manager.resolve("m").version == 1
    finally:
        await manager.aclose()
        executor.shutdown()


async def test_nothing_loaded_is_serving_nothing(tmp_path: Path) -> None:
    """A registry whose every version is refused leaves the gateway with nothing to serve (not ready)."""
    om.write_version(tmp_path, "m", 1, b"not onnx", with_sha256=False)
    executor = ThreadPoolExecutor(1)
    metrics = GatewayMetrics(CollectorRegistry())
    manager = ModelManager(DirectoryRegistry(tmp_path), executor, metrics, SessionOptions(), lambda _: BatchLimits())
    try:
        await manager.sync()
        assert manager.ready and not manager.serves_something()
        om.write_version(tmp_path, "m", 2, om.identity("FP32"))
        await manager.sync()
        assert manager.serves_something()
    finally:
        await manager.aclose()
        executor.shutdown()


async def test_resolve_parsed_reference_from_a_url(manager: ModelManager) -> None:
    assert manager.resolve("m", parse_version_ref("2")).version == 2
    assert manager.resolve("m", parse_version_ref("challenger")).version == 2


@pytest.mark.parametrize(
    ("model", "ref", "message"),
    [
        ("m", 3, r"no loaded version 3 \(loaded: \[1, 2\]; refused: v3 \(invalid_model\)\)"),
        ("m", 9, r"no loaded version 9"),
        # An alias naming a version that is not loaded is either not published or names what is missing.
        ("m", "ghost", r"its ghost alias points at v7, which is not loaded \(refused: v3 \(invalid_model\)\)"),
        ("m", "staging", r"no alias 'staging' \(aliases: challenger, champion\b.*; or a version number\)"),
        ("plain", "champion", r"no alias 'champion' \(aliases: none"),
        ("nope", "latest", r"unknown model 'nope'; serving: m, plain"),
    ],
)
async def test_resolve_unknown_reference_is_model_not_found(
    manager: ModelManager, model: str, ref: int | str, message: str
) -> None:
    with pytest.raises(ModelNotFound) as caught:
        manager.resolve(model, ref)
    assert re.search(message, caught.value.message), caught.value.message


async def test_sync_follows_new_version_and_alias_move(three_versions: Path, manager: ModelManager) -> None:
    om.write_version(three_versions, "m", 5, om.identity("FP32"))
    om.write_aliases(three_versions, "m", {"champion": 5})
    await manager.sync()
    assert manager.resolve("m").version == 5
    assert manager.resolve("m", "latest").version == 5
    with pytest.raises(ModelNotFound, match="no alias 'challenger'"):
        manager.resolve("m", "challenger")


async def test_a_registry_given_by_its_parent_directory_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`registry: ./` instead of `./models`: the registry's models look like versions-less "models" of a model
    named `models`; say what is likely wrong, once, instead of silently serving nothing."""
    om.write_version(tmp_path / "models", "fraud", 1, om.identity("FP32"))
    (tmp_path / "empty-model").mkdir()  # a model with no versions yet: nothing to say
    registry = DirectoryRegistry(tmp_path)
    with caplog.at_level(logging.WARNING, logger="registry_client.local"):
        for _ in range(3):
            for name in await registry.list_models():
                assert (await registry.index(name)).versions == ()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1, warnings
    assert "'models' holds models (such as 'fraud'), not versions" in warnings[0]
    assert f"should `registry` be {tmp_path / 'models'}?" in warnings[0]
