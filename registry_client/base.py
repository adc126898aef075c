"""What every registry backend offers: versions, aliases and a local copy of a version's files."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from registry_client.errors import ArtifactRejected

MODEL_FILE = "model.onnx"
META_FILE = "meta.json"
REFERENCE_FILE = "reference.npz"
ALIASES_FILE = "aliases.json"

VersionRef = int | str
"""An integer version, an alias such as `champion`, or `latest`."""


@dataclass(frozen=True)
class ModelArtifact:
    """A version's files on local disk, checked and ready to load."""

    model: str
    version: int
    directory: Path
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return self.directory / MODEL_FILE

    @property
    def reference_path(self) -> Path | None:
        path = self.directory / REFERENCE_FILE
        return path if path.is_file() else None


@dataclass(frozen=True)
class ModelIndex:
    """A model's versions and aliases as the registry lists them now."""

    model: str
    versions: tuple[int, ...]
    aliases: dict[str, int]
    # Per version, something that changes when its files do (a backend may leave it empty): a version refused
    # while still being written is tried again once its files change.
    revisions: Mapping[int, str] = field(default_factory=dict, compare=False)


class Registry(Protocol):
    """A source of versioned models. Methods may raise `RegistryUnavailable`."""

    description: str

    async def list_models(self) -> list[str]: ...

    async def index(self, model: str) -> ModelIndex: ...

    async def fetch(self, model: str, version: int) -> ModelArtifact:
        """Make the version's files available locally and verify them (blocking work off the loop)."""
        ...

    async def aclose(self) -> None: ...


def parse_version_ref(ref: str) -> VersionRef:
    """`"3"` -> 3; anything else stays a name (alias or `latest`)."""
    # str.isdigit() also accepts non-ASCII digits ("²", "٣") that int() rejects or reads as another number.
    return int(ref) if ref.isascii() and ref.isdigit() else ref


def read_meta(directory: Path) -> dict[str, Any]:
    path = directory / META_FILE
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactRejected(f"{path}: unreadable meta.json ({exc})", reason="bad_meta") from exc
    if not isinstance(meta, dict):
        raise ArtifactRejected(f"{path}: meta.json is not an object", reason="bad_meta")
    return meta


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_artifact(artifact: ModelArtifact) -> None:
    """Refuse a version whose model file is missing or whose sha256 differs from meta.json's. Blocking."""
    if not artifact.model_path.is_file():
        raise ArtifactRejected(f"{artifact.model_path} does not exist", reason="missing_file")
    expected = artifact.meta.get("sha256")
    if expected is None:
        return
    actual = file_sha256(artifact.model_path)
    if actual != str(expected).lower():
        raise ArtifactRejected(
            f"{artifact.model_path}: sha256 is {actual}, meta.json expects {expected}", reason="sha256_mismatch"
        )
