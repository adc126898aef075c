"""Directory registry: `<root>/<model>/<version>/model.onnx`, optional `meta.json`, `aliases.json` per model."""

from __future__ import annotations

import asyncio
import json
import logging
import stat
from pathlib import Path

from registry_client.base import (
    ALIASES_FILE,
    META_FILE,
    MODEL_FILE,
    ModelArtifact,
    ModelIndex,
    read_meta,
    verify_artifact,
)
from registry_client.errors import RegistryError, RegistryUnavailable, VersionNotFound

logger = logging.getLogger(__name__)


class DirectoryRegistry:
    """Versions are the positive-integer subdirectories that hold a `model.onnx`.

    Write a new version atomically (build it elsewhere, then rename the directory into place): a version
    directory without `model.onnx` is not a version yet. A `model.onnx` written in place may be seen half-written
    and refused; the index carries each version's file sizes and times, so it is tried again once they change.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.description = f"directory {root}"
        self._misplaced_reported: set[str] = set()

    async def list_models(self) -> list[str]:
        return await asyncio.to_thread(self._list_models)

    async def index(self, model: str) -> ModelIndex:
        return await asyncio.to_thread(self._index, model)

    async def fetch(self, model: str, version: int) -> ModelArtifact:
        return await asyncio.to_thread(self._fetch, model, version)

    async def aclose(self) -> None:
        return None

    def _list_models(self) -> list[str]:
        if not self.root.is_dir():
            raise RegistryUnavailable(f"registry directory {self.root} does not exist")
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def _index(self, model: str) -> ModelIndex:
        model_dir = self.root / model
        if not model_dir.is_dir():
            raise VersionNotFound(f"model {model!r} not in {self.root}")
        revisions = {
            int(p.name): revision
            for p in model_dir.iterdir()
            if _is_version_name(p.name) and (revision := _revision(p)) is not None
        }
        if not revisions:
            self._report_if_a_registry(model_dir)
        return ModelIndex(model, tuple(sorted(revisions)), self._aliases(model_dir), revisions)

    def _report_if_a_registry(self, model_dir: Path) -> None:
        """A "model" without versions whose subdirectories hold versions is a registry itself: `registry` most
        likely names its parent. Said once (a model without versions yet is normal, and stays quiet)."""
        if model_dir.name in self._misplaced_reported:
            return
        for child in model_dir.iterdir():
            if child.is_dir() and any(_is_version_name(p.name) and (p / MODEL_FILE).is_file() for p in child.iterdir()):
                self._misplaced_reported.add(model_dir.name)
                logger.warning(
                    "registry %s: %r holds models (such as %r), not versions: should `registry` be %s?",
                    self.root, model_dir.name, child.name, model_dir,
                )
                return

    def _aliases(self, model_dir: Path) -> dict[str, int]:
        path = model_dir / ALIASES_FILE
        if not path.is_file():
            return {}
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            # Perhaps caught half-written: reading it as "no aliases" would move every alias away meanwhile.
            raise RegistryError(f"{path} is not readable JSON ({exc}); write it atomically") from exc
        if not isinstance(raw, dict):
            raise RegistryError(f"{path} must be a JSON object of alias -> version, got {type(raw).__name__}")
        return {
            str(name): int(v)
            for name, v in raw.items()
            if (type(v) is int and v > 0) or (isinstance(v, str) and _is_version_name(v))
        }

    def _fetch(self, model: str, version: int) -> ModelArtifact:
        directory = self.root / model / str(version)
        if not (directory / MODEL_FILE).is_file():
            raise VersionNotFound(f"{model} version {version} not in {self.root}")
        artifact = ModelArtifact(model=model, version=version, directory=directory, meta=read_meta(directory))
        verify_artifact(artifact)
        return artifact


def _revision(directory: Path) -> str | None:
    """Size and modification time of the version's files; None while it has no `model.onnx`."""
    parts = []
    for name in (MODEL_FILE, META_FILE):
        try:
            info = (directory / name).stat()
        except OSError:
            info = None
        if info is None or not stat.S_ISREG(info.st_mode):
            if name == MODEL_FILE:
                return None
            continue
        parts.append(f"{info.st_size}:{info.st_mtime_ns}")
    return "/".join(parts)


def _is_version_name(name: str) -> bool:
    """A positive integer written the one way `fetch` looks it up: ASCII digits, no sign, no leading zero.

    (`str.isdigit()` alone also accepts "²" or "٣", on which `int()` fails or reads another number, and "01",
    whose directory `fetch(model, 1)` would never find.)
    """
    return name.isascii() and name.isdigit() and not name.startswith("0")

