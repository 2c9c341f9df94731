"""Loads, unloads and reconciles in one worker: the repository API's verbs, and following the
state the other workers change (`app.repository.shared`).

A change is made under the shared lock by the worker that received it: it copies the
checkpoint, loads it itself (the checkpoint's checks, its served form, a warm-up through the
real path) before anything serves it, writes the new generation, and waits until every live
worker serves it. A version that fails never serves; what it would have replaced keeps serving,
and the index says why. Each other worker follows the state file: it loads what is new beside
what serves and swaps it in, drains what goes (refused at once, finished when the requests
admitted to it are), frees it, and acknowledges the generation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from app.errors import ServeError
from app.repository.layout import NAME, ModelOnDisk, check_name, checkpoint_path, scan
from app.repository.local import Loader, LocalCopy
from app.repository.memory import check_room, in_use, pin_mmap_threshold
from app.repository.registry import Registry, version_order
from app.repository.shared import ModelState, SharedState, State, VersionState
from app.repository.views import Totals, index_rows, rollout_figures
from app.settings import Settings

logger = logging.getLogger("app")
FOLLOW_POLL_S = 0.1  # how often a worker looks at the shared state (one stat of a tmpfs file)
SYNC_TIMEOUT_S = 60.0  # how long a change waits for every worker before it answers 504


class Repository:
    """This worker's side of the model repository."""

    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        totals: Callable[[str], Totals],
        root: Path | None,
        shared: SharedState,
        load: Loader,
    ) -> None:
        self.registry = registry  # what this worker serves
        self.settings = settings
        self.totals = totals  # the metrics' samples by name prefix, summed over the workers
        self.root = root
        self.shared = shared
        self.local = LocalCopy(registry, shared, load)  # this worker's copy of the shared state

    # --- start and follow ------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve the shared state, or make the first one: what the configuration asks for at start."""
        pin_mmap_threshold()
        self.shared.register(os.getpid())
        async with self.shared.locked():
            state = self.shared.read()
            if state.generation == 0:
                state = await self._first_state()
            else:
                await self.local.apply(state)
            self.local.acknowledge(state)

    async def _first_state(self) -> State:
        state = State(reconciled=self.shared.reconcile_requests())
        if self.root is None:
            return state
        wanted = self.settings.load_models
        names = None if wanted is None else {n.strip() for n in wanted.split(",") if n.strip()}
        for model in scan(self.root).values():
            if names is None or model.name in names:
                with contextlib.suppress(ServeError):  # recorded in the state; the others still load
                    await self._load_model(state, model, None)
        return await self._publish(state)

    async def follow(self) -> None:
        """Apply each state another worker publishes; carry out the reconciles SIGHUP asks for."""
        # The reconciles done so far, not the requests: a SIGHUP while this worker started is
        # carried out (by whichever worker gets there first: `reconcile` checks under the lock).
        asked = self.shared.read().reconciled
        while True:
            await asyncio.sleep(FOLLOW_POLL_S)
            try:
                seen = self.shared.changed_since(self.local.seen)
                if seen is not None:
                    # The file's identity is taken before its contents are read: a state published
                    # while this one is applied is then read at the next poll, not taken as applied.
                    state = self.shared.read()
                    if state.generation != self.registry.generation:
                        await self.local.apply(state)
                        self.local.acknowledge(state)
                    self.local.seen = seen
                if self.shared.reconcile_requests() > asked:
                    asked = self.shared.reconcile_requests()
                    await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # never stop following: the next poll tries again
                logger.exception("repository: following the shared state failed")

    # --- the API's verbs -------------------------------------------------------------------------

    async def load(self, name: str, version: str | None = None) -> int:
        """Load `name` (its policy's versions, or one `version` beside those loaded) on every worker;
        the generation that serves it. ServeError if the model or version cannot serve."""
        root = self._root()
        async with self.shared.locked():
            state = await self._current()
            model = scan_one(root, name)
            try:
                await self._load_model(state, model, version)
            finally:
                generation = (await self._publish(state)).generation
        await self.shared.wait_for(generation, SYNC_TIMEOUT_S)
        return generation

    async def unload(self, name: str, version: str | None = None) -> int:
        """Unload every version of `name`, or one `version`, on every worker; the new generation."""
        async with self.shared.locked():
            state = await self._current()
            model = state.models.get(name)
            if model is None or (version is not None and version not in model.versions):
                what = f"model {name!r}" if version is None else f"version {version} of model {name!r}"
                raise ServeError(404, f"{what} is not loaded")
            if version is None:
                del state.models[name]
            else:
                del model.versions[version]
                if not model.versions:
                    del state.models[name]
            generation = (await self._publish(state)).generation
        await self.shared.wait_for(generation, SYNC_TIMEOUT_S)
        return generation

    async def set_rollout(self, name: str, changes: dict[str, Any]) -> int:
        """Change `name`'s `default_version` (None: the highest loaded), `canary` and `shadow` (None:
        none), on every worker; the new generation. Every version named must be loaded."""
        async with self.shared.locked():
            state = await self._current()
            model = state.models.get(name)
            if model is None:
                raise ServeError(404, f"model {name!r} is not loaded")
            rollout = {**(model.rollout or {}), **{k: v for k, v in changes.items() if k != "default_version"}}
            default_version = changes.get("default_version", model.default_version)
            named = [default_version] + [part["version"] for part in rollout.values() if part is not None]
            missing = sorted({v for v in named if v is not None and v not in model.versions}, key=version_order)
            if missing:
                have = ", ".join(sorted(model.versions, key=version_order))
                raise ServeError(400, f"version {', '.join(missing)} of {name!r} is not loaded (loaded: {have})")
            model.default_version = default_version
            model.rollout = {key: part for key, part in rollout.items() if part is not None} or None
            generation = (await self._publish(state)).generation
        await self.shared.wait_for(generation, SYNC_TIMEOUT_S)
        return generation

    def rollout(self, name: str) -> dict[str, Any]:
        """The model's rollout as GET answers it: the default, canary and shadow, and per version how
        it has answered so far (summed over the workers)."""
        model = self.shared.read().models.get(name)
        if model is None or name not in self.registry.models:
            raise ServeError(404, f"model {name!r} is not loaded")
        default = self.registry.default_version(name)
        record = model.rollout or {}
        return {
            "model": name,
            "default_version": model.default_version,
            "serving_default": default.version if default is not None else None,
            "canary": record.get("canary"),
            "shadow": record.get("shadow"),
            "generation": self.registry.generation,
            "versions": rollout_figures(self.totals("fashion_serve_rollout_"), name),
        }

    async def reconcile(self) -> None:
        """SIGHUP: every loaded model brought to what the disk holds now (new versions its policy
        names loaded, files changed on disk loaded beside and swapped, versions gone unloaded),
        models removed from disk unloaded; without FASHION_SERVE_LOAD_MODELS, new models loaded."""
        async with self.shared.locked():
            state = await self._current()
            asked = self.shared.reconcile_requests()
            if asked <= state.reconciled:
                return  # another worker did it
            state.reconciled = asked
            on_disk = scan(self.root) if self.root is not None else {}
            for name in [n for n in state.models if n not in on_disk]:
                del state.models[name]
            for model in on_disk.values():
                if model.name in state.models or self.settings.load_models is None:
                    with contextlib.suppress(ServeError):
                        await self._load_model(state, model, None)
            await self._publish(state)
        logger.info("repository: reconciled with %s", self.root)

    async def _current(self) -> State:
        """The shared state, this worker brought to it first."""
        state = self.shared.read()
        if state.generation != self.registry.generation:
            await self.local.apply(state)
            self.local.acknowledge(state)
        return state

    async def _publish(self, state: State) -> State:
        """`state` as the next generation: written, served here, acknowledged."""
        state.generation = max(state.generation, self.registry.generation) + 1
        self.shared.write(state)
        await self.local.apply(state)
        self.local.acknowledge(state)
        self.shared.forget_unused(state)
        return state

    def _root(self) -> Path:
        if self.root is None:
            raise ServeError(400, "no model repository is configured (FASHION_SERVE_MODEL_REPOSITORY)")
        return self.root

    async def _load_model(self, state: State, model: ModelOnDisk, version: str | None) -> None:
        """Into `state` (not yet published): `model`'s policy versions (or `version` beside those
        loaded), each validated by loading it here first. Raises the first failure, after
        recording it; what loaded is kept, and versions the policy no longer names are dropped."""
        if model.config_error is not None:
            raise ServeError(400, f"model {model.name!r}: {model.config_error}")
        current = state.models.get(model.name) or ModelState()
        if version is not None:
            if not version.isdigit() or int(version) not in model.versions:
                reason = model.problems.get(int(version)) if version.isdigit() else None
                have = ", ".join(map(str, sorted(model.versions))) or "none"
                raise ServeError(
                    404 if reason is None else 400,
                    reason or f"model {model.name!r} has no version {version} on disk (it has {have})",
                )
            keep = dict(current.versions)
            targets = [int(version)]
        else:
            keep = {}
            targets = model.wanted()
            if not targets:
                problems = "; ".join(f"{v}: {p}" for v, p in model.problems.items()) or "no versions"
                raise ServeError(400, f"model {model.name!r} has nothing to load: {problems}")
        # config.json's default version and rollout where it has them, else what the API last set.
        default = model.config.default_version or current.default_version
        loaded = ModelState(keep, default, model.config.rollout or current.rollout)
        error: ServeError | None = None
        for number in targets:
            try:
                loaded.versions[str(number)] = await self._validated(model, str(number))
                state.failures.get(model.name, {}).pop(str(number), None)
            except ServeError as exc:
                state.failures.setdefault(model.name, {})[str(number)] = exc.message
                if str(number) in current.versions:
                    loaded.versions[str(number)] = current.versions[str(number)]  # the old copy keeps serving
                error = error or exc
        if loaded.versions:
            state.models[model.name] = loaded
        if error is not None:
            raise error

    async def _validated(self, model: ModelOnDisk, version: str) -> VersionState:
        """One version copied and loaded in this worker (the validation), unless it serves already."""
        path = checkpoint_path(self._root(), model.name, version)
        wanted = self.shared.keep(path)
        entry = self.registry.get(model.name, version)
        if entry is not None and entry.served is not None and entry.served.checkpoint.sha256 == wanted.sha256:
            return wanted
        check_room(self.registry, self.settings.max_model_memory_mb, model.name, wanted.size_bytes)
        try:
            entry = await self.local.prepare(model.name, version, wanted)
        except ServeError:
            raise
        except Exception as exc:
            raise ServeError(400, f"model {model.name!r} version {version} did not load: {exc}") from None
        limit_mb = self.settings.max_model_memory_mb
        if limit_mb is not None and in_use(self.registry) + entry.memory_bytes > limit_mb * 2**20:
            self.local.retire(entry)
            raise ServeError(
                400,
                f"{model.name!r} version {version} took {entry.memory_bytes / 2**20:.1f} MB in this worker, "
                f"past FASHION_SERVE_MAX_MODEL_MEMORY_MB={limit_mb}; not loaded",
            )
        self.local.install(entry)
        return wanted

    # --- what the index and /model show ----------------------------------------------------------

    def on_disk(self, name: str) -> bool:
        """Whether the repository holds a model of that (plain) name."""
        return self.root is not None and NAME.match(name) is not None and (self.root / name).is_dir()

    def index(self, ready_only: bool = False) -> list[dict[str, object]]:
        """Every version on disk and every version served, with its state and reason (Triton's rows)."""
        on_disk = scan(self.root) if self.root is not None else {}
        return index_rows(on_disk, self.registry, self.shared.read().failures, ready_only)


def scan_one(root: Path, name: str) -> ModelOnDisk:
    """One model of the repository, by a name checked before it touches the disk."""
    check_name(name)
    model = scan(root).get(name)
    if model is None:
        raise ServeError(404, f"no model {name!r} in the repository")
    return model
