"""ModelManager: mirrors the registry into loaded, warmed-up model versions, and resolves version references.

Every change is prepared off to the side (fetch, verify, create the session, warm up) and then published with a
single assignment on the event loop, so a request sees either the old set of versions or the new one. A version
that fails any step is refused with a log line and `gatewatch_model_load_failures_total`; the others serve on.

A loaded version whose files change in the registry (a model.onnx replaced in place, an MLflow model deleted and
registered again, which restarts at version 1) is loaded again and swapped in the same way, as Triton's polling
does; if the new files fail, or their signature could not stand in for the served one, the old files serve on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

from gateway.errors import ModelNotFound, NotReady
from gateway.metrics import GatewayMetrics
from gateway.runtime.batcher import AdaptiveBatcher, BatchLimits
from gateway.runtime.promotion import Promotion, incompatibility, promote
from gateway.runtime.runner import OnnxRunner, SessionOptions, UnsupportedModel
from registry_client.base import ModelArtifact, ModelIndex, Registry, VersionRef
from registry_client.errors import ArtifactRejected, RegistryError, RegistryUnavailable, VersionNotFound
from registry_client.factory import OfflineSnapshot

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "champion"


@dataclass(eq=False)
class LoadedVersion:
    artifact: ModelArtifact
    runner: OnnxRunner
    batcher: AdaptiveBatcher
    revision: str = ""  # the registry's revision of the files it was loaded from ("" when the backend gives none)

    @property
    def model(self) -> str:
        return self.artifact.model

    @property
    def version(self) -> int:
        return self.artifact.version


@dataclass
class ModelState:
    """One model's loaded versions and aliases, replaced whole on every change."""

    name: str
    versions: dict[int, LoadedVersion] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    refused: dict[int, str] = field(default_factory=dict)
    refused_revisions: dict[int, str] = field(default_factory=dict)  # the files each refusal was about
    refused_updates: dict[int, str] = field(default_factory=dict)  # loaded versions: newer files refused (revision)
    latest_version: int | None = None
    reported_refusals: frozenset[str] = frozenset()  # refused moves already logged: each is reported once
    wanted_aliases: dict[str, int] = field(default_factory=dict)  # what the registry says, loaded or not

    def latest(self) -> LoadedVersion | None:
        return self.versions.get(self.latest_version) if self.latest_version is not None else None


class ModelManager:
    def __init__(
        self,
        registry: Registry,
        executor: Executor,
        metrics: GatewayMetrics,
        session_options: SessionOptions,
        limits_for: Callable[[str], BatchLimits],
    ) -> None:
        self._registry = registry
        self._executor = executor
        self._metrics = metrics
        self._session_options = session_options
        self._limits_for = limits_for
        self._models: dict[str, ModelState] = {}
        self._sync_lock = asyncio.Lock()
        self.ready = False

    # -- queries (hot path: dictionary lookups only) ------------------------------------------------------

    def model_names(self) -> list[str]:
        return sorted(self._models)

    def serves_something(self) -> bool:
        """False when the registry lists models but not one version of them loaded (all refused)."""
        return not self._models or any(state.versions for state in self._models.values())

    def state(self, model: str) -> ModelState:
        state = self._models.get(model)
        if state is None:
            if not self.ready:  # the first look at the registry has not finished: no model is known yet
                raise NotReady(f"models are still loading from the registry; {model!r} is not known yet")
            raise ModelNotFound(f"unknown model {model!r}; serving: {', '.join(self.model_names()) or 'none'}")
        return state

    def resolve(self, model: str, ref: VersionRef | None = None) -> LoadedVersion:
        """The loaded version `ref` names; no ref means the `champion` alias when the registry sets one (never
        another version in its place), else the latest loaded version."""
        state = self.state(model)
        if ref is None:
            ref = DEFAULT_ALIAS if DEFAULT_ALIAS in state.wanted_aliases else "latest"
        if ref == "latest":
            latest = state.latest()
            if latest is None:
                raise ModelNotFound(f"model {model!r} has no loaded version ({self._refusals(state)})")
            return latest
        version = ref if isinstance(ref, int) else state.aliases.get(ref)
        if version is None and isinstance(ref, str) and ref in state.wanted_aliases:
            wanted = state.wanted_aliases[ref]
            raise ModelNotFound(
                f"model {model!r}: its {ref} alias points at v{wanted}, which is not loaded ({self._refusals(state)}); "
                "no other version answers in its place"
            )
        if version is None:
            known = ", ".join(sorted(state.aliases)) or "none"
            raise ModelNotFound(f"model {model!r} has no alias {ref!r} (aliases: {known}; or a version number)")
        loaded = state.versions.get(version)
        if loaded is None:
            raise ModelNotFound(
                f"model {model!r} has no loaded version {version} "
                f"(loaded: {sorted(state.versions)}; {self._refusals(state)})"
            )
        return loaded

    @staticmethod
    def _refusals(state: ModelState) -> str:
        if not state.refused:
            return "none refused"
        return "refused: " + ", ".join(f"v{v} ({why})" for v, why in sorted(state.refused.items()))

    # -- registry synchronisation --------------------------------------------------------------------------

    async def sync(self) -> None:
        """Bring loaded versions in line with the registry: load new ones, drop deleted ones, follow aliases.

        On a cold start with the registry unreachable, serve what a caching registry (MLflow) last saw, then
        raise so that the poller backs off.
        """
        async with self._sync_lock:
            try:
                indexes, unreadable = await self._live_indexes()
            except RegistryUnavailable:
                if self.ready or not isinstance(self._registry, OfflineSnapshot):
                    raise
                cached = await self._registry.snapshot()
                logger.warning("registry unreachable at start: serving %d model(s) from the cache", len(cached))
                for index in cached:
                    await self._sync_model(index)
                # Ready only with something to serve: a first start with no cache waits for the registry.
                self.ready = any(state.versions for state in self._models.values())
                raise
            # One model's unreachable artifacts must not hold back the others: sync all, then report.
            unavailable = [error for index in indexes if (error := await self._sync_model(index)) is not None]
            for name in set(self._models) - {index.model for index in indexes} - unreadable:
                await self._unload_model(name)
            self.ready = True
            if unavailable:
                raise unavailable[0]

    async def _live_indexes(self) -> tuple[list[ModelIndex], set[str]]:
        """Each model's index, and the models whose index could not be read this time (they keep their state)."""
        indexes: list[ModelIndex] = []
        unreadable: set[str] = set()
        for name in await self._registry.list_models():
            try:
                indexes.append(await self._registry.index(name))
            except VersionNotFound:
                continue  # deleted between the listing and now
            except RegistryUnavailable:
                raise
            except RegistryError as exc:
                logger.error("%s: cannot read its versions and aliases (%s); what is loaded keeps serving", name, exc)
                unreadable.add(name)
        return indexes, unreadable

    async def poll_forever(self, interval: float) -> None:
        """Sync every `interval` seconds; while the registry is unreachable, keep serving and back off."""
        delay = interval
        while True:
            await asyncio.sleep(delay)
            try:
                await self.sync()
                delay = interval
            except RegistryUnavailable as exc:
                delay = min(delay * 2, max(interval, 60.0))
                logger.warning("registry unavailable (%s); serving what is loaded, next try in %.0fs", exc, delay)
            except Exception:  # the poller must outlive any one bad sync; what loaded keeps serving
                delay = min(delay * 2, max(interval, 60.0))
                logger.exception("registry sync failed; next try in %.0fs", delay)

    async def _sync_model(self, index: ModelIndex) -> RegistryUnavailable | None:
        """Apply one model's index; returns (rather than raises) a transient fetch failure, after publishing
        everything that did load, so that nothing loaded is dropped and the version is retried next poll."""
        current = self._models.get(index.model, ModelState(index.model))
        versions = dict(current.versions)
        refused, refused_revisions = _still_refused(current, index)
        refused_updates = {v: r for v, r in current.refused_updates.items() if index.revisions.get(v) == r}
        replaced: list[LoadedVersion] = []
        unavailable: RegistryUnavailable | None = None
        for version in index.versions:
            serving = versions.get(version)
            revision = index.revisions.get(version, "")
            if version in refused or (serving is not None and not _files_changed(serving, revision, refused_updates)):
                continue
            try:
                loaded, reason = await self._load(index.model, version, serving)
            except RegistryUnavailable as exc:
                unavailable = unavailable or exc
                continue
            if loaded is not None:
                loaded.revision = revision
                versions[version] = loaded
                if serving is not None:
                    replaced.append(serving)
            elif serving is not None:
                refused_updates[version] = revision  # tried once per change of files, not at every poll
            else:
                refused[version] = reason
                refused_revisions[version] = revision
        removed = [versions.pop(v) for v in list(versions) if v not in index.versions]
        runners = {v: loaded.runner for v, loaded in versions.items()}
        promotion = promote(runners, index.aliases, current.aliases, current.latest_version)
        self._report(index.model, promotion, current.reported_refusals)
        # One assignment publishes the new state: a request sees the old versions and aliases or the new ones.
        self._models[index.model] = ModelState(
            index.model,
            versions,
            promotion.aliases,
            refused,
            refused_revisions,
            refused_updates,
            promotion.latest,
            frozenset(promotion.refused),
            dict(index.aliases),
        )
        for old in replaced:
            await old.batcher.aclose()  # answers what it already queued; new requests go to the new files
        for old in removed:
            await self._unload(old)
        return unavailable

    def _report(self, model: str, promotion: Promotion, already_reported: frozenset[str]) -> None:
        for note in promotion.moved:
            logger.info("%s: %s", model, note)
            self._count_reload(model, "moved")
        for note in promotion.refused:
            if note in already_reported:
                continue  # the registry still asks for the same refused move: said once already
            logger.error("%s: refused %s", model, note)
            self._count_reload(model, "refused")

    async def _load(
        self, model: str, version: int, serving: LoadedVersion | None = None
    ) -> tuple[LoadedVersion | None, str]:
        """Fetch, verify and load a version; `serving` is the copy of it already loaded, when its files changed."""
        replacing = serving is not None
        if replacing:
            logger.info("%s v%s: its files changed in the registry; loading them again", model, version)
        try:
            artifact = await self._registry.fetch(model, version)
            runner = await asyncio.to_thread(
                OnnxRunner.load, artifact.model_path, self._session_options, self._executor
            )
        except ArtifactRejected as exc:
            return None, self._refuse(model, version, exc.reason, str(exc), replacing)
        except RegistryUnavailable:
            raise  # transient: try this version again at the next poll
        except RegistryError as exc:
            return None, self._refuse(model, version, "fetch_failed", str(exc), replacing)
        except UnsupportedModel as exc:
            return None, self._refuse(model, version, "unsupported", str(exc), replacing)
        except Exception as exc:  # onnxruntime raises its own types for a file it cannot load
            return None, self._refuse(model, version, "invalid_model", f"onnxruntime cannot load it: {exc}", replacing)
        if serving is not None and (reason := incompatibility(serving.runner, runner)) is not None:
            detail = f"its new files cannot replace the served ones: {reason}"
            return None, self._refuse(model, version, "incompatible", detail, replacing)
        label = f"{model} v{version}"
        batcher = AdaptiveBatcher(runner, self._limits_for(model), self._metrics.for_version(model, version), label)
        self._metrics.model_loaded.labels(model, str(version)).set(1)
        self._count_reload(model, "loaded")
        logger.info("loaded %s (%s, batching %s)", label, artifact.directory, "on" if runner.batched else "off")
        return LoadedVersion(artifact, runner, batcher), ""

    def _refuse(self, model: str, version: int, reason: str, detail: str, serving: bool) -> str:
        still = "; its earlier files serve on" if serving else ""
        logger.error("refused %s v%s [%s]: %s%s", model, version, reason, detail, still)
        if self._counts_events():
            self._metrics.model_load_failures.labels(model, str(version), reason).inc()
            self._metrics.model_reloads.labels(model, "failed").inc()
        return reason

    def _count_reload(self, model: str, outcome: str) -> None:
        if self._counts_events():
            self._metrics.model_reloads.labels(model, outcome).inc()

    def _counts_events(self) -> bool:
        """Once per gateway, not once per worker process (see ModelEventCounting)."""
        return self._metrics.model_events.counts(start_up=not self.ready)

    async def _unload(self, loaded: LoadedVersion) -> None:
        self._metrics.model_loaded.labels(loaded.model, str(loaded.version)).set(0)
        await loaded.batcher.aclose()
        logger.info("unloaded %s v%s", loaded.model, loaded.version)

    async def _unload_model(self, name: str) -> None:
        state = self._models.pop(name)
        for loaded in state.versions.values():
            await self._unload(loaded)

    async def aclose(self) -> None:
        for name in list(self._models):
            await self._unload_model(name)


def _files_changed(serving: LoadedVersion, revision: str, refused_updates: dict[int, str]) -> bool:
    """Whether a loaded version's files in the registry are no longer those it was loaded from (and those new
    files were not already refused)."""
    if not revision or not serving.revision or revision == serving.revision:
        return False
    return refused_updates.get(serving.version) != revision


def _still_refused(current: ModelState, index: ModelIndex) -> tuple[dict[int, str], dict[int, str]]:
    """Refusals that still stand: the version is still listed and its files have not changed since (a version
    caught while being written is tried again once the writer is done)."""
    refused: dict[int, str] = {}
    revisions: dict[int, str] = {}
    for version, reason in current.refused.items():
        if version not in index.versions:
            continue
        revision = index.revisions.get(version, "")
        if revision != current.refused_revisions.get(version, ""):
            logger.info("%s v%s changed since it was refused: trying it again", index.model, version)
            continue
        refused[version], revisions[version] = reason, revision
    return refused, revisions
