"""MLflow Model Registry backend, over MLflow's REST API with httpx (no `mlflow` package at run time).

Versions and aliases come from the registry endpoints; a version's files are found with
`model-versions/get-download-uri` (MLflow 3 registers logged models as `models:/m-…`, which that call resolves
to their storage location) and downloaded through the tracking server's artifact proxy (`mlflow-artifacts`,
`mlflow server --serve-artifacts`) into a local cache keyed by model and version. A cached version is verified
(sizes, sha256 from the version's `sha256` tag or meta.json) and reused; the last index seen per model is kept
beside it, so a gateway cold-started while the registry is down serves from the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson

from registry_client.base import (
    META_FILE,
    MODEL_FILE,
    REFERENCE_FILE,
    ModelArtifact,
    ModelIndex,
    file_sha256,
    read_meta,
    verify_artifact,
)
from registry_client.errors import ArtifactRejected, RegistryError, RegistryUnavailable, VersionNotFound

API = "/api/2.0/mlflow"
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
WANTED_FILES = (MODEL_FILE, META_FILE, REFERENCE_FILE)
_COMPLETE = ".complete"
_REVISION = ".revision"  # the registry's revision (registration time, sha256 tag) the copy was downloaded for
_INDEX = "index.json"
_PAGE = 200

logger = logging.getLogger(__name__)


def credentials_from_env(env: Mapping[str, str]) -> httpx.Auth | None:
    """MLflow's own variables, with its client's precedence: MLFLOW_TRACKING_USERNAME / _PASSWORD (basic), else
    MLFLOW_TRACKING_TOKEN (bearer)."""
    user, password = env.get("MLFLOW_TRACKING_USERNAME"), env.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return httpx.BasicAuth(user, password)
    token = env.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return _Bearer(token)
    return None


class _Bearer(httpx.Auth):
    def __init__(self, token: str) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Any:
        request.headers["Authorization"] = f"Bearer {self._token}"
        yield request


class MlflowRegistry:
    def __init__(self, uri: str, cache_dir: Path, auth: httpx.Auth | None = None, timeout: float = 10.0) -> None:
        base = uri.removeprefix("mlflow+")
        if urlsplit(base).scheme not in ("http", "https"):
            raise ValueError(f"unsupported MLflow registry URI {uri!r}: expected mlflow+http(s)://host:port")
        self._base = base.rstrip("/")
        self._cache = cache_dir
        self._client = httpx.AsyncClient(base_url=self._base, auth=auth, timeout=timeout)
        self._revisions: dict[tuple[str, int], str] = {}  # what the registry said each version is, last index
        self._listed_any = False
        self.description = f"MLflow registry at {self._base} (cache {cache_dir})"

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- registry queries ----------------------------------------------------------------------------

    async def list_models(self) -> list[str]:
        models = await self._paged(f"{API}/registered-models/search", "registered_models", {})
        names = sorted(str(m["name"]) for m in models)
        if names or self._listed_any:  # a first listing that is empty may be a misconfigured server: keep the cache
            await asyncio.to_thread(self._forget_all_but, set(names))
        self._listed_any = self._listed_any or bool(names)
        return names

    async def index(self, model: str) -> ModelIndex:
        registered = (await self._get(f"{API}/registered-models/get", {"name": model}))["registered_model"]
        aliases = {str(a["alias"]): int(a["version"]) for a in registered.get("aliases", [])}
        versions = await self._paged(f"{API}/model-versions/search", "model_versions", {"filter": _name_filter(model)})
        revisions = {int(v["version"]): _revision(v) for v in versions if v.get("status", "READY") == "READY"}
        self._revisions.update({(model, version): revision for version, revision in revisions.items()})
        index = ModelIndex(model, tuple(sorted(revisions)), aliases, revisions)
        await asyncio.to_thread(self._remember_index, index)
        return index

    async def snapshot(self) -> list[ModelIndex]:
        """The last indexes seen, from the cache: what to serve when the registry is unreachable at start."""
        return await asyncio.to_thread(self._cached_indexes)

    async def fetch(self, model: str, version: int) -> ModelArtifact:
        target = self._cache / model / str(version)
        revision = self._revisions.get((model, version))
        if revision is not None and not await asyncio.to_thread(_cached_as, target, revision):
            # A model deleted and registered again restarts at version 1, and a sha256 tag may be corrected: the
            # cached copy is another artifact than the registry's version now (unknown offline: then it is used).
            await asyncio.to_thread(self._discard, target)
        if (target / _COMPLETE).is_file():
            try:
                return await asyncio.to_thread(self._verified, model, version, target)
            except ArtifactRejected as exc:
                # The cached copy changed on disk since it was verified: drop it (so no snapshot offers it) and
                # download the version again.
                logger.warning("%s v%s: discarding the cached copy (%s); downloading it again", model, version, exc)
                await asyncio.to_thread(self._discard, target)
        version_info = (await self._get(f"{API}/model-versions/get", {"name": model, "version": str(version)}))[
            "model_version"
        ]
        location = str(
            (await self._get(f"{API}/model-versions/get-download-uri", {"name": model, "version": str(version)}))[
                "artifact_uri"
            ]
        )
        listing = await self._list_artifacts(_proxy_path(await self._resolve_run_uri(location)))
        staging = Path(await asyncio.to_thread(self._staging_dir, model))
        try:
            for name, (path, size) in listing.items():
                await self._download(path, staging / name, size)
            expected = _sha256_tag(version_info)
            await asyncio.to_thread((staging / _REVISION).write_text, _revision(version_info))
            await asyncio.to_thread(self._finish, staging, target, expected)
        finally:
            await asyncio.to_thread(shutil.rmtree, staging, True)
        return await asyncio.to_thread(self._verified, model, version, target)

    async def _resolve_run_uri(self, location: str) -> str:
        """`runs:/<run id>/<path>` (the source MLflow's docs register with `create_model_version`, which the server
        hands back as is) -> that run's artifact location joined with the path; other URIs unchanged."""
        parts = urlsplit(location)
        if parts.scheme != "runs":
            return location
        run_id, _, path = parts.path.strip("/").partition("/")
        if not run_id:
            raise ArtifactRejected(f"{location!r} names no run", reason="unsupported_artifact_location")
        run = (await self._get(f"{API}/runs/get", {"run_id": run_id}))["run"]
        root = str(run["info"]["artifact_uri"]).rstrip("/")
        return f"{root}/{path}" if path else root

    # -- HTTP -----------------------------------------------------------------------------------------

    async def _get(self, path: str, params: dict[str, str]) -> dict[str, Any]:
        try:
            response = await self._client.get(path, params=params)
        except httpx.HTTPError as exc:
            raise RegistryUnavailable(f"{self._base}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 404:
            raise VersionNotFound(f"{self._base}{path} {params}: {_message(response)}")
        if response.status_code >= 500 or response.status_code in (401, 403, 429):
            raise RegistryUnavailable(f"{self._base}{path}: HTTP {response.status_code} {_message(response)}")
        if response.status_code >= 400:
            raise RegistryError(f"{self._base}{path} {params}: HTTP {response.status_code} {_message(response)}")
        body: dict[str, Any] = orjson.loads(response.content or b"{}")
        return body

    async def _paged(self, path: str, key: str, params: dict[str, str]) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            query = {**params, "max_results": str(_PAGE)}
            if token:
                query["page_token"] = token
            page = await self._get(path, query)
            items.extend(page.get(key, []))
            token = page.get("next_page_token")
            if not token:
                return items

    async def _list_artifacts(self, directory: str) -> dict[str, tuple[str, int | None]]:
        files = (await self._get(ARTIFACTS, {"path": directory})).get("files", [])
        found = {
            str(f["path"]).rsplit("/", 1)[-1]: (f"{directory}/{str(f['path']).rsplit('/', 1)[-1]}", f.get("file_size"))
            for f in files
            if not f.get("is_dir") and str(f["path"]).rsplit("/", 1)[-1] in WANTED_FILES
        }
        if MODEL_FILE not in found:
            raise ArtifactRejected(f"no {MODEL_FILE} in the artifact directory {directory}", reason="missing_file")
        return found

    async def _download(self, path: str, destination: Path, size: int | None) -> None:
        written = 0
        try:
            async with self._client.stream("GET", f"{ARTIFACTS}/{path}") as response:
                if response.status_code != 200:
                    raise RegistryUnavailable(f"download of {path}: HTTP {response.status_code}")
                handle = await asyncio.to_thread(destination.open, "wb")
                try:
                    async for chunk in response.aiter_bytes(1 << 20):
                        written += len(chunk)
                        await asyncio.to_thread(handle.write, chunk)
                finally:
                    await asyncio.to_thread(handle.close)
        except httpx.HTTPError as exc:
            raise RegistryUnavailable(f"download of {path}: {type(exc).__name__}: {exc}") from exc
        if size is not None and written != int(size):
            raise ArtifactRejected(f"{path}: downloaded {written} bytes, the registry lists {size}", "size_mismatch")

    # -- cache (blocking; called through asyncio.to_thread) -------------------------------------------

    def _staging_dir(self, model: str) -> str:
        (self._cache / model).mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(prefix=".download-", dir=self._cache / model)

    def _finish(self, staging: Path, target: Path, expected_sha256: str | None) -> None:
        verify_artifact(ModelArtifact("", 0, staging, read_meta(staging)))
        actual = file_sha256(staging / MODEL_FILE)
        if expected_sha256 is not None and actual != expected_sha256.lower():
            raise ArtifactRejected(
                f"{MODEL_FILE}: sha256 is {actual}, the version's sha256 tag says {expected_sha256}",
                reason="sha256_mismatch",
            )
        # The marker records the verified digest, so that a cached copy is checked again whenever it is reused.
        (staging / _COMPLETE).write_text(actual)
        # Gateway worker processes share this cache: another one may have finished the same version meanwhile and
        # be loading it. A rename onto an existing version directory fails; then keep that copy if it is sound.
        try:
            os.replace(staging, target)
            return
        except OSError:
            if self._sound(target):
                return
        self._discard(target)  # a damaged copy
        try:
            os.replace(staging, target)
        except OSError:
            if not self._sound(target):  # not someone else's finished copy: a real failure
                raise

    def _verified(self, model: str, version: int, directory: Path) -> ModelArtifact:
        artifact = ModelArtifact(model, version, directory, read_meta(directory))
        verify_artifact(artifact)
        recorded = (directory / _COMPLETE).read_text().strip()
        if len(recorded) == 64:  # caches written before digests were recorded hold "ok"
            actual = file_sha256(artifact.model_path)
            if actual != recorded:
                raise ArtifactRejected(
                    f"cached {artifact.model_path}: sha256 is {actual}, was {recorded} when downloaded",
                    reason="sha256_mismatch",
                )
        return artifact

    def _sound(self, directory: Path) -> bool:
        if not (directory / _COMPLETE).is_file():
            return False
        try:
            self._verified("", 0, directory)
        except (ArtifactRejected, OSError):
            return False
        return True

    def _discard(self, directory: Path) -> None:
        """Remove a version directory: renamed aside first (atomic), so no reader ever sees it half deleted."""
        aside = Path(tempfile.mkdtemp(prefix=".discarded-", dir=directory.parent))
        with contextlib.suppress(FileNotFoundError):
            os.replace(directory, aside / directory.name)
        shutil.rmtree(aside, ignore_errors=True)

    def _forget_all_but(self, models: set[str]) -> None:
        """Forget the models the registry no longer has, so that a gateway cold-started during a later outage does
        not serve a deleted model from its cache. Only the index goes (the snapshot is built from it): version files
        another process may be downloading right now stay, and are replaced if the name is registered again."""
        for path in self._cache.glob(f"*/{_INDEX}"):
            if path.parent.name not in models:
                logger.info("%s: no longer in the registry; its cached copy will not be served", path.parent.name)
                path.unlink(missing_ok=True)

    def _remember_index(self, index: ModelIndex) -> None:
        directory = self._cache / index.model
        directory.mkdir(parents=True, exist_ok=True)
        staging = directory / f".{_INDEX}.tmp"
        staging.write_bytes(orjson.dumps({"versions": list(index.versions), "aliases": index.aliases}))
        os.replace(staging, directory / _INDEX)

    def _cached_indexes(self) -> list[ModelIndex]:
        indexes: list[ModelIndex] = []
        for path in sorted(self._cache.glob(f"*/{_INDEX}")):
            raw = orjson.loads(path.read_bytes())
            cached = tuple(v for v in raw["versions"] if (path.parent / str(v) / _COMPLETE).is_file())
            # Every alias is kept, cached or not: a champion whose version is missing from the cache must not
            # send its traffic to another version. Revisions let a change seen once MLflow answers reload a version.
            revisions = {v: _cached_revision(path.parent / str(v)) for v in cached}
            indexes.append(ModelIndex(path.parent.name, cached, dict(raw["aliases"]), revisions))
        return indexes


def _cached_revision(directory: Path) -> str:
    """The registry's revision a cached copy was downloaded for ("" for copies written before it was recorded)."""
    try:
        return (directory / _REVISION).read_text()
    except OSError:
        return ""


def _proxy_path(artifact_uri: str) -> str:
    """`mlflow-artifacts:/0/abc/artifacts/model` or `mlflow-artifacts://host/0/…` -> `0/abc/artifacts/model`."""
    parts = urlsplit(artifact_uri)
    if parts.scheme != "mlflow-artifacts":
        raise ArtifactRejected(
            f"artifacts at {artifact_uri!r} are not served by the tracking server's proxy "
            "(start it with --serve-artifacts)",
            reason="unsupported_artifact_location",
        )
    return parts.path.strip("/")


def _name_filter(model: str) -> str:
    """The search filter for one model's versions. MLflow's filter strings have no escape character: a name
    holding a single quote is quoted with double quotes instead."""
    if "'" not in model:
        return f"name='{model}'"
    if '"' not in model:
        return f'name="{model}"'
    raise RegistryError(f"model name {model!r} holds both quote characters, which MLflow's search filter cannot quote")


def _revision(version_info: dict[str, Any]) -> str:
    """What identifies this version's artifact beyond its number: when it was registered, and its sha256 tag."""
    return f"{version_info.get('creation_timestamp', '')}:{_sha256_tag(version_info) or ''}"


def _cached_as(directory: Path, revision: str) -> bool:
    """Whether the cached copy (if any) was downloaded for this revision of the version; no copy counts as yes."""
    if not directory.exists():
        return True
    try:
        return (directory / _REVISION).read_text() == revision
    except OSError:
        return False


def _sha256_tag(version_info: dict[str, Any]) -> str | None:
    for tag in version_info.get("tags", []) or []:
        if tag.get("key") == "sha256" and tag.get("value"):
            return str(tag["value"])
    return None


def _message(response: httpx.Response) -> str:
    try:
        return str(orjson.loads(response.content).get("message", ""))
    except orjson.JSONDecodeError:
        return response.text[:200]
