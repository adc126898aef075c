"""Pick the registry backend for a settings value."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol, runtime_checkable

from registry_client.base import ModelIndex, Registry
from registry_client.local import DirectoryRegistry
from registry_client.mlflow import MlflowRegistry, credentials_from_env


@runtime_checkable
class OfflineSnapshot(Protocol):
    """A registry that remembers what it last listed, to serve from its cache when it cannot be reached."""

    async def snapshot(self) -> list[ModelIndex]: ...


def open_registry(uri: str, cache_dir: Path, env: Mapping[str, str]) -> Registry:
    """A path or `file://…` -> directory registry; `mlflow+http(s)://host:port` -> MLflow (credentials from env)."""
    if uri.startswith("mlflow+"):
        return MlflowRegistry(uri, cache_dir, auth=credentials_from_env(env))
    if uri.startswith("file://"):
        return DirectoryRegistry(Path(uri.removeprefix("file://")))
    if "://" in uri:
        raise ValueError(f"unsupported registry URI {uri!r}: expected a path, file://… or mlflow+http(s)://…")
    return DirectoryRegistry(Path(uri))
