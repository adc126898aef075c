"""The MLflow registry backend against a real `mlflow server` (SQLite store, proxied artifacts).

Models are registered with MLflow's own client, the way users do it: files logged to a run and registered with
`create_model_version` (source `mlflow-artifacts:/…`, sha256 as a version tag), or `mlflow.onnx.log_model(...,
registered_model_name=…)` (MLflow 3: source `models:/m-…`). The server is shared by the session, so each test uses
its own registered-model names.

Where a test needs the network between us and MLflow to misbehave (record or demand credentials, shorten a
download, disappear), requests go through `Hop`, a real forwarding HTTP server in front of the real MLflow server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.server
import io
import json
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import httpx
import mlflow
import mlflow.onnx
import numpy as np
import onnx
import pytest
from mlflow import MlflowClient

import registry_client.mlflow as mlflow_backend
from loadtests import onnx_models as om
from registry_client.base import ModelIndex
from registry_client.errors import ArtifactRejected, RegistryUnavailable, VersionNotFound
from registry_client.factory import open_registry
from registry_client.mlflow import MlflowRegistry, credentials_from_env
from tests.conftest import MlflowServer, free_port

# -- registering models with MLflow's own client -------------------------------------------------------------


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def client_for(server: MlflowServer) -> MlflowClient:
    mlflow.set_tracking_uri(server.url)  # the fluent API (start_run, log_artifact) uses the global URI
    return MlflowClient(tracking_uri=server.url)


def sha256_of(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


def onnx_bytes(proto: onnx.ModelProto) -> bytes:
    payload: bytes = proto.SerializeToString()
    return payload


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


def register_files(
    server: MlflowServer, name: str, files: Mapping[str, bytes], tags: Mapping[str, str] | None = None
) -> int:
    """Log `files` under a run's `model/` artifact directory and register that directory as a new version."""
    client = client_for(server)
    quote = '"' if "'" in name else "'"
    if not client.search_registered_models(filter_string=f"name={quote}{name}{quote}"):
        client.create_registered_model(name)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run() as run:
        for file_name, payload in files.items():
            path = Path(tmp) / file_name
            path.write_bytes(payload)
            mlflow.log_artifact(str(path), artifact_path="model")
    version = client.create_model_version(
        name, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id, tags=dict(tags or {})
    )
    return int(version.version)


def register_onnx(server: MlflowServer, name: str, payload: bytes, sha256: str | None = "auto") -> int:
    """A version whose artifact directory holds model.onnx, with the `sha256` tag (its true digest by default)."""
    tags = {} if sha256 is None else {"sha256": sha256_of(payload) if sha256 == "auto" else sha256}
    return register_files(server, name, {"model.onnx": payload}, tags)


def log_onnx_model(server: MlflowServer, name: str, proto: onnx.ModelProto) -> int:
    """`mlflow.onnx.log_model(..., registered_model_name=…)`: MLflow 3 registers the logged model (`models:/m-…`)."""
    client_for(server)
    with mlflow.start_run():
        info = mlflow.onnx.log_model(proto, name="model", registered_model_name=name, pip_requirements=["onnx"])
    assert info.registered_model_version is not None
    return int(info.registered_model_version)


def set_alias(server: MlflowServer, name: str, alias: str, version: int) -> None:
    client_for(server).set_registered_model_alias(name, alias, str(version))


def registry_uri(url: str) -> str:
    return f"mlflow+{url}"


@contextlib.asynccontextmanager
async def opened(url: str, cache: Path, auth: httpx.Auth | None = None) -> AsyncIterator[MlflowRegistry]:
    registry = MlflowRegistry(registry_uri(url), cache, auth=auth)
    try:
        yield registry
    finally:
        await registry.aclose()


def cached_files(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def leftovers(cache: Path, model: str) -> list[str]:
    """Anything in the model's cache directory besides finished versions and the remembered index."""
    directory = cache / model
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if p.name != "index.json" and not p.name.isdigit())


# -- a real HTTP hop in front of the MLflow server -----------------------------------------------------------


class Hop:
    """A forwarding HTTP server in front of MLflow (GET only: all the backend uses).

    Records every request's path and Authorization header; optionally answers 401 unless the Authorization header
    is `require`; optionally serves files whose name ends with `shorten` one byte short (a consistent, complete
    response — only its size disagrees with the registry's listing); optionally answers 503 to downloads whose
    path contains `fail` (an artifact store failing for one version).
    """

    def __init__(
        self, upstream: str, require: str | None = None, shorten: str | None = None, fail: str | None = None
    ) -> None:
        self.upstream = upstream
        self.require = require
        self.shorten = shorten
        self.fail = fail
        self.seen: list[tuple[str, str | None]] = []
        self._lock = threading.Lock()
        hop = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                authorization = self.headers.get("Authorization")
                with hop._lock:
                    hop.seen.append((self.path, authorization))
                if hop.require is not None and authorization != hop.require:
                    self._reply(401, b'{"error_code": "UNAUTHENTICATED", "message": "credentials required"}')
                    return
                if hop.fail is not None and hop.fail in self.path.split("?")[0]:
                    self._reply(503, b'{"error_code": "TEMPORARILY_UNAVAILABLE", "message": "artifact store"}')
                    return
                upstream = httpx.get(f"{hop.upstream}{self.path}", timeout=30)
                body = upstream.content
                if hop.shorten is not None and self.path.split("?")[0].endswith(hop.shorten):
                    body = body[:-1]
                self._reply(upstream.status_code, body, upstream.headers.get("content-type", "application/json"))

            def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def paths(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self.seen]

    def authorizations(self) -> set[str | None]:
        with self._lock:
            return {authorization for _, authorization in self.seen}

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class MakeHop(Protocol):
    def __call__(self, require: str | None = None, shorten: str | None = None) -> Hop: ...


@pytest.fixture
def hop_to(mlflow_server: MlflowServer) -> Iterator[MakeHop]:
    hops: list[Hop] = []

    def make(require: str | None = None, shorten: str | None = None) -> Hop:
        hops.append(Hop(mlflow_server.url, require, shorten))
        return hops[-1]

    yield make
    for hop in hops:
        with contextlib.suppress(Exception):
            hop.stop()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "models"


@pytest.fixture(scope="module")
def one_version(mlflow_server: MlflowServer) -> tuple[str, int]:
    """A registered model with one version, for tests that only read it."""
    name = unique_name("one")
    return name, register_onnx(mlflow_server, name, onnx_bytes(om.identity("FP32")))


# -- listing: models, versions, aliases ----------------------------------------------------------------------


async def test_lists_models_and_resolves_versions_and_aliases(mlflow_server: MlflowServer, cache: Path) -> None:
    name = unique_name("listed")
    v1 = register_onnx(mlflow_server, name, onnx_bytes(om.tabular_classifier(seed=1)))
    v2 = log_onnx_model(mlflow_server, name, om.tabular_classifier(seed=2))
    set_alias(mlflow_server, name, "champion", v1)
    set_alias(mlflow_server, name, "challenger", v2)
    assert (v1, v2) == (1, 2)

    async with opened(mlflow_server.url, cache) as registry:
        assert name in await registry.list_models()
        assert await registry.index(name) == ModelIndex(name, (1, 2), {"champion": 1, "challenger": 2})

        set_alias(mlflow_server, name, "champion", v2)
        client_for(mlflow_server).delete_registered_model_alias(name, "challenger")
        assert await registry.index(name) == ModelIndex(name, (1, 2), {"champion": 2})

        with pytest.raises(VersionNotFound):
            await registry.index(unique_name("never-registered"))


async def test_listing_follows_page_tokens(
    mlflow_server: MlflowServer, cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One result per page: every page of models and of versions is read (the real server's page tokens)."""
    names = [unique_name("paged") for _ in range(3)]
    payload = onnx_bytes(om.identity("FP32"))
    for name in names:
        register_onnx(mlflow_server, name, payload)
    register_onnx(mlflow_server, names[0], payload)
    monkeypatch.setattr(mlflow_backend, "_PAGE", 1)

    async with opened(mlflow_server.url, cache) as registry:
        listed = await registry.list_models()
        assert set(names) <= set(listed)
        assert listed == sorted(m.name for m in client_for(mlflow_server).search_registered_models(max_results=1000))
        assert (await registry.index(names[0])).versions == (1, 2)


# -- fetching into the cache ---------------------------------------------------------------------------------


async def test_fetch_downloads_the_version_files_into_the_cache(mlflow_server: MlflowServer, cache: Path) -> None:
    name = unique_name("fetched")
    model = onnx_bytes(om.tabular_classifier(seed=3))
    meta = {"sha256": sha256_of(model), "task": "classification", "labels": ["no", "yes"]}
    reference = npz_bytes(input=np.random.default_rng(0).normal(size=(50, 32)).astype(np.float32))
    files = {
        "model.onnx": model,
        "meta.json": json.dumps(meta).encode(),
        "reference.npz": reference,
        "notes.txt": b"not part of a version: never downloaded",
    }
    v1 = register_files(mlflow_server, name, files, {"sha256": sha256_of(model)})
    logged = om.tabular_classifier(seed=4)
    v2 = log_onnx_model(mlflow_server, name, logged)

    async with opened(mlflow_server.url, cache) as registry:
        artifact = await registry.fetch(name, v1)
        assert (artifact.model, artifact.version) == (name, v1)
        assert artifact.directory == cache / name / str(v1)
        assert cached_files(artifact.directory) == {
            "model.onnx",
            "meta.json",
            "reference.npz",
            ".complete",
            ".revision",
        }
        assert artifact.model_path.read_bytes() == model
        assert artifact.meta == meta
        assert artifact.reference_path is not None and artifact.reference_path.read_bytes() == reference
        with np.load(artifact.reference_path) as loaded:
            assert loaded["input"].shape == (50, 32)

        # MLflow 3's logged model: the version's source is `models:/m-…`; only model.onnx is a version file.
        logged_artifact = await registry.fetch(name, v2)
        assert logged_artifact.directory == cache / name / str(v2)
        assert cached_files(logged_artifact.directory) == {"model.onnx", ".complete", ".revision"}
        assert onnx.load_from_string(logged_artifact.model_path.read_bytes()) == logged
        assert logged_artifact.meta == {}
        assert logged_artifact.reference_path is None
    assert leftovers(cache, name) == []


async def test_a_version_registered_from_a_runs_uri_is_fetched(mlflow_server: MlflowServer, cache: Path) -> None:
    """`create_model_version(name, "runs:/<run id>/model")`, as MLflow's docs register a model: the server's
    download URI is that `runs:/` URI itself, resolved here through the run's artifact location."""
    name = unique_name("fromrun")
    payload = onnx_bytes(om.identity("FP32", width=4))
    client = client_for(mlflow_server)
    client.create_registered_model(name)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run() as run:
        (Path(tmp) / "model.onnx").write_bytes(payload)
        mlflow.log_artifact(str(Path(tmp) / "model.onnx"), artifact_path="model")
    source = f"runs:/{run.info.run_id}/model"
    version = int(client.create_model_version(name, source=source, run_id=run.info.run_id).version)
    async with httpx.AsyncClient(base_url=mlflow_server.url) as http:
        download = await http.get(
            "/api/2.0/mlflow/model-versions/get-download-uri", params={"name": name, "version": str(version)}
        )
    assert download.json()["artifact_uri"] == source  # what makes this case different
    async with opened(mlflow_server.url, cache) as registry:
        assert (await registry.fetch(name, version)).model_path.read_bytes() == payload


async def test_a_deleted_model_leaves_the_cache(mlflow_server: MlflowServer, cache: Path) -> None:
    """Once the registry no longer lists a model, its cached copy goes: a gateway cold-started during a later outage
    must not serve it again from the cache."""
    name, kept = unique_name("deleted"), unique_name("kept")
    for model in (name, kept):
        register_onnx(mlflow_server, model, onnx_bytes(om.identity("FP32")))
    async with opened(mlflow_server.url, cache) as registry:
        for model in (name, kept):
            await registry.index(model)
            await registry.fetch(model, 1)
        assert {name, kept} <= {index.model for index in await registry.snapshot()}
        client_for(mlflow_server).delete_registered_model(name)
        listed = await registry.list_models()
        assert name not in listed and kept in listed
        cached = {index.model for index in await registry.snapshot()}
        assert name not in cached and kept in cached


async def test_fetch_reuses_the_cache(mlflow_server: MlflowServer, cache: Path, hop_to: MakeHop) -> None:
    name = unique_name("reused")
    payload = onnx_bytes(om.identity("FP32"))
    version = register_onnx(mlflow_server, name, payload)
    hop = hop_to()

    async with opened(hop.url, cache) as registry:
        first = await registry.fetch(name, version)
        downloads = [p for p in hop.paths() if p.endswith("/model.onnx")]
        assert len(downloads) == 1, hop.paths()
        requests_before = len(hop.paths())
        stamp = first.model_path.stat().st_mtime_ns

        again = await registry.fetch(name, version)
        assert again == first
        assert len(hop.paths()) == requests_before, "a cached version is served without asking the registry"
        assert first.model_path.stat().st_mtime_ns == stamp

    # Another process (say a restarted gateway) with the same cache and no registry at all reuses it too.
    nowhere = f"http://127.0.0.1:{free_port()}"
    async with opened(nowhere, cache) as offline:
        reused = await offline.fetch(name, version)
        assert reused.model_path.read_bytes() == payload


async def test_damaged_cached_copy_is_downloaded_again(mlflow_server: MlflowServer, cache: Path) -> None:
    """The cache is verified on reuse too: a changed model.onnx (tag-only sha256, no meta.json) is not served."""
    name = unique_name("damaged")
    payload = onnx_bytes(om.identity("FP32", width=5))
    version = register_onnx(mlflow_server, name, payload)
    async with opened(mlflow_server.url, cache) as registry:
        artifact = await registry.fetch(name, version)
        artifact.model_path.write_bytes(payload[:-7])  # a truncated copy on disk

        repaired = await registry.fetch(name, version)
        assert repaired.model_path.read_bytes() == payload
    assert leftovers(cache, name) == []


async def test_damaged_cached_copy_is_not_served_while_the_registry_is_down(
    mlflow_server: MlflowServer, cache: Path
) -> None:
    name = unique_name("damaged-offline")
    payload = onnx_bytes(om.identity("FP32", width=6))
    version = register_onnx(mlflow_server, name, payload)
    async with opened(mlflow_server.url, cache) as registry:
        assert await registry.index(name) == ModelIndex(name, (version,), {})
        artifact = await registry.fetch(name, version)
    artifact.model_path.write_bytes(b"\x00" + payload[1:])  # same size, different bytes

    async with opened(f"http://127.0.0.1:{free_port()}", cache) as offline:
        with pytest.raises(RegistryUnavailable):
            await offline.fetch(name, version)
        assert await offline.snapshot() == [ModelIndex(name, (), {})], "the damaged copy is no longer offered"


async def test_concurrent_fetchers_sharing_a_cache_all_get_the_version(
    mlflow_server: MlflowServer, cache: Path
) -> None:
    """Gateway worker processes share `data_dir/models` and fetch the same new version at the same moment."""
    name = unique_name("shared-cache")
    payload = onnx_bytes(om.mlp((256, 512, 512, 10)))
    version = register_onnx(mlflow_server, name, payload)
    for round_ in range(4):
        shared = cache / str(round_)
        registries = [MlflowRegistry(registry_uri(mlflow_server.url), shared) for _ in range(4)]
        try:
            results = await asyncio.gather(*(r.fetch(name, version) for r in registries), return_exceptions=True)
        finally:
            await asyncio.gather(*(r.aclose() for r in registries))
        failures = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        assert failures == []
        assert (shared / name / str(version) / "model.onnx").read_bytes() == payload
        assert leftovers(shared, name) == []


# -- verification: sha256, size, missing files ---------------------------------------------------------------


async def test_wrong_sha256_tag_is_rejected(mlflow_server: MlflowServer, cache: Path) -> None:
    name = unique_name("tampered")
    payload = onnx_bytes(om.identity("FP32"))
    wrong = register_onnx(mlflow_server, name, payload, sha256="0" * 64)
    upper = register_onnx(mlflow_server, name, payload, sha256=sha256_of(payload).upper())

    async with opened(mlflow_server.url, cache) as registry:
        with pytest.raises(ArtifactRejected, match="sha256 tag says 0{64}") as caught:
            await registry.fetch(name, wrong)
        assert caught.value.reason == "sha256_mismatch"
        assert not (cache / name / str(wrong)).exists(), "a rejected download is not cached"
        with pytest.raises(ArtifactRejected):  # and not half-remembered either: rejected again
            await registry.fetch(name, wrong)

        accepted = await registry.fetch(name, upper)  # hex digits compare case-insensitively
        assert accepted.model_path.read_bytes() == payload
    assert leftovers(cache, name) == []


async def test_a_model_registered_again_is_not_served_from_the_old_cached_copy(
    mlflow_server: MlflowServer, cache: Path
) -> None:
    """MLflow numbers versions from 1 again when a model is deleted and registered anew: same name, same version
    number, another artifact. The cache must not hand back the old one."""
    name = unique_name("recycled")
    first, second = onnx_bytes(om.identity("FP32", width=3)), onnx_bytes(om.identity("FP32", width=5))
    version = register_onnx(mlflow_server, name, first)
    async with opened(mlflow_server.url, cache) as registry:
        old_revision = (await registry.index(name)).revisions[version]
        assert (await registry.fetch(name, version)).model_path.read_bytes() == first
        client_for(mlflow_server).delete_registered_model(name)
        assert register_onnx(mlflow_server, name, second) == version
        index = await registry.index(name)
        assert index.revisions[version] != old_revision
        assert (await registry.fetch(name, version)).model_path.read_bytes() == second
    assert leftovers(cache, name) == []


async def test_a_corrected_sha256_tag_changes_the_versions_revision(mlflow_server: MlflowServer, cache: Path) -> None:
    """The gateway tries a refused version again when its revision changes: fixing the tag must change it."""
    name = unique_name("retagged")
    payload = onnx_bytes(om.identity("FP32"))
    version = register_onnx(mlflow_server, name, payload, sha256="0" * 64)
    async with opened(mlflow_server.url, cache) as registry:
        before = (await registry.index(name)).revisions[version]
        with pytest.raises(ArtifactRejected):
            await registry.fetch(name, version)
        client_for(mlflow_server).set_model_version_tag(name, str(version), "sha256", sha256_of(payload))
        assert (await registry.index(name)).revisions[version] != before
        assert (await registry.fetch(name, version)).model_path.read_bytes() == payload


async def test_a_name_with_a_quote_finds_its_versions(mlflow_server: MlflowServer, cache: Path) -> None:
    name = unique_name("it's")  # MLflow's filter strings have no escape: the name is quoted with "…"
    version = register_onnx(mlflow_server, name, onnx_bytes(om.identity("FP32")))
    async with opened(mlflow_server.url, cache) as registry:
        assert (await registry.index(name)).versions == (version,)


async def test_meta_json_sha256_mismatch_is_rejected(mlflow_server: MlflowServer, cache: Path) -> None:
    name = unique_name("bad-meta-sha")
    payload = onnx_bytes(om.identity("FP32"))
    version = register_files(
        mlflow_server, name, {"model.onnx": payload, "meta.json": json.dumps({"sha256": "f" * 64}).encode()}
    )
    async with opened(mlflow_server.url, cache) as registry:
        with pytest.raises(ArtifactRejected, match="meta.json expects f{64}") as caught:
            await registry.fetch(name, version)
    assert caught.value.reason == "sha256_mismatch"
    assert not (cache / name / str(version)).exists()
    assert leftovers(cache, name) == []


async def test_download_shorter_than_listed_is_rejected(
    cache: Path, mlflow_server: MlflowServer, hop_to: MakeHop
) -> None:
    name = unique_name("short")
    version = register_onnx(mlflow_server, name, onnx_bytes(om.identity("FP32")), sha256=None)
    hop = hop_to(shorten="/model.onnx")
    async with opened(hop.url, cache) as registry:
        with pytest.raises(ArtifactRejected, match="bytes, the registry lists") as caught:
            await registry.fetch(name, version)
    assert caught.value.reason == "size_mismatch"
    assert not (cache / name / str(version)).exists()
    assert leftovers(cache, name) == []


async def test_version_without_model_onnx_is_rejected(mlflow_server: MlflowServer, cache: Path) -> None:
    name = unique_name("no-model-file")
    version = register_files(mlflow_server, name, {"meta.json": b'{"task": "regression"}'})
    async with opened(mlflow_server.url, cache) as registry:
        with pytest.raises(ArtifactRejected, match="no model.onnx") as caught:
            await registry.fetch(name, version)
    assert caught.value.reason == "missing_file"


async def test_fetch_of_unknown_version_is_not_found(
    mlflow_server: MlflowServer, one_version: tuple[str, int], cache: Path
) -> None:
    name, _ = one_version
    async with opened(mlflow_server.url, cache) as registry:
        with pytest.raises(VersionNotFound):
            await registry.fetch(name, 7)
    assert leftovers(cache, name) == []


# -- snapshot: the last indexes seen, for a cold start while the registry is down -----------------------------


async def test_snapshot_after_the_server_is_gone(mlflow_server: MlflowServer, cache: Path, hop_to: MakeHop) -> None:
    name = unique_name("snapshot")
    payload = onnx_bytes(om.identity("FP32"))
    v1 = register_onnx(mlflow_server, name, payload)
    v2 = register_onnx(mlflow_server, name, payload)
    set_alias(mlflow_server, name, "champion", v1)
    set_alias(mlflow_server, name, "challenger", v2)
    hop = hop_to()

    async with opened(hop.url, cache) as registry:
        live = await registry.index(name)
        assert live == ModelIndex(name, (1, 2), {"champion": 1, "challenger": 2})
        await registry.fetch(name, v1)  # only v1 reaches the cache
        hop.stop()  # the registry is gone

        with pytest.raises(RegistryUnavailable):
            await registry.list_models()
        with pytest.raises(RegistryUnavailable):
            await registry.index(name)
        # Offered: cached versions only, with their revisions (so that a change seen later reloads them), and every
        # alias: one on a version not cached must not send its traffic to another version.
        snapshot = await registry.snapshot()
        assert snapshot == [ModelIndex(name, (1,), {"champion": 1, "challenger": 2})]
        assert snapshot[0].revisions == {1: live.revisions[1]} and live.revisions[1]
        assert (await registry.fetch(name, v1)).model_path.read_bytes() == payload
        with pytest.raises(RegistryUnavailable):
            await registry.fetch(name, v2)

    async with opened(hop.url, cache) as restarted:  # a new process, same cache, registry still gone
        assert await restarted.snapshot() == [ModelIndex(name, (1,), {"champion": 1, "challenger": 2})]


# -- credentials ---------------------------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("env", "authorization"),
    [
        ({"MLFLOW_TRACKING_TOKEN": "t0k-en"}, "Bearer t0k-en"),
        ({"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "s3:cr=t"}, basic("alice", "s3:cr=t")),
        (  # both: basic, as MLflow's own client does (mlflow/utils/rest_utils.py)
            {"MLFLOW_TRACKING_TOKEN": "loses", "MLFLOW_TRACKING_USERNAME": "a", "MLFLOW_TRACKING_PASSWORD": "b"},
            basic("a", "b"),
        ),
        ({"MLFLOW_TRACKING_USERNAME": "alice"}, None),  # a user without a password is no credential
        ({"MLFLOW_TRACKING_TOKEN": ""}, None),
        ({}, None),
    ],
)
async def test_credentials_from_env_are_sent_on_every_request(
    one_version: tuple[str, int], tmp_path: Path, hop_to: MakeHop, env: dict[str, str], authorization: str | None
) -> None:
    name, version = one_version
    hop = hop_to()
    registry = open_registry(registry_uri(hop.url), tmp_path / "models", env)
    try:
        assert name in await registry.list_models()
        assert (await registry.index(name)).versions == (version,)
        await registry.fetch(name, version)
    finally:
        await registry.aclose()
    assert any(p.endswith("/model.onnx") for p in hop.paths()), "the download went through the hop too"
    assert hop.authorizations() == {authorization}


async def test_refused_credentials_make_the_registry_unavailable(
    one_version: tuple[str, int], cache: Path, hop_to: MakeHop
) -> None:
    """An MLflow behind authentication: 401 is reported as unavailable (keep serving, retry), never as 'no models'."""
    name, version = one_version
    hop = hop_to(require="Bearer right")

    async with opened(hop.url, cache, credentials_from_env({"MLFLOW_TRACKING_TOKEN": "wrong"})) as registry:
        with pytest.raises(RegistryUnavailable, match="HTTP 401"):
            await registry.list_models()
    async with opened(hop.url, cache, credentials_from_env({"MLFLOW_TRACKING_TOKEN": "right"})) as registry:
        assert (await registry.fetch(name, version)).version == version


async def test_open_registry_picks_the_mlflow_backend(tmp_path: Path) -> None:
    registry = open_registry("mlflow+http://127.0.0.1:5000/", tmp_path, {})
    try:
        assert isinstance(registry, MlflowRegistry)
        assert registry.description == f"MLflow registry at http://127.0.0.1:5000 (cache {tmp_path})"
    finally:
        await registry.aclose()
    with pytest.raises(ValueError, match="unsupported MLflow registry URI"):
        MlflowRegistry("mlflow+ftp://127.0.0.1:5000", tmp_path)
