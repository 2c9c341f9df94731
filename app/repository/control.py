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
import ctypes
import gc
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from app.dataplane import DataPlane
from app.errors import ServeError
from app.repository.layout import NAME, ModelOnDisk, check_name, checkpoint_path, scan
from app.repository.registry import READY, UNAVAILABLE, UNLOADING, Rollout, Version, version_order
from app.repository.shared import ModelState, SharedState, State, VersionState
from app.served_model import ServedModel

logger = logging.getLogger("app")
FOLLOW_POLL_S = 0.1  # how often a worker looks at the shared state (one stat of a tmpfs file)
SYNC_TIMEOUT_S = 60.0  # how long a change waits for every worker before it answers 504
ESTIMATE_FACTOR = 4  # before a first load: its resident cost, as a multiple of the file's size

Loader = Callable[[Path, str, str, Path], Awaitable[ServedModel]]  # blob, name, version, origin


def _resident() -> int:
    return int(psutil.Process().memory_info().rss)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, kept fixed


def _pin_mmap_threshold() -> None:
    """Keep glibc's mmap threshold where it starts. By default it rises to the size of the largest
    block freed so far, so once one model's weights are freed, the next model's land in the heap,
    and unloading it left its memory with the process (measured: 40 MB of a 15 MB model held).
    Blocks over 128 KiB are then mapped apart and go back to the system when freed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def _release_memory() -> None:
    """Return freed memory to the system: a collection, then glibc's malloc_trim where there is one."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Repository:
    """This worker's side of the model repository."""

    def __init__(self, plane: DataPlane, root: Path | None, shared: SharedState, load: Loader) -> None:
        self.plane = plane
        self.root = root
        self.shared = shared
        self.load_version = load
        self.registry = plane.registry
        self.settings = plane.settings
        self.failures: dict[str, str] = {}  # this worker's, for its acknowledgement
        self._seen: tuple[int, int] | None = None
        self._retiring: set[asyncio.Task[None]] = set()

    # --- start and follow ------------------------------------------------------------------------

    async def start(self) -> None:
        """Serve the shared state, or make the first one: what the configuration asks for at start."""
        _pin_mmap_threshold()
        self.shared.register(os.getpid())
        async with self.shared.locked():
            state = self.shared.read()
            if state.generation == 0:
                state = await self._first_state()
            else:
                await self.apply(state)
            self._acknowledge(state)

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
        asked = self.shared.reconcile_requests()
        while True:
            await asyncio.sleep(FOLLOW_POLL_S)
            try:
                if self.shared.changed_since(self._seen) is not None:
                    state = self.shared.read()
                    if state.generation != self.registry.generation:
                        await self.apply(state)
                        self._acknowledge(state)
                if self.shared.reconcile_requests() > asked:
                    asked = self.shared.reconcile_requests()
                    await self.reconcile()
            except asyncio.CancelledError:
                raise
            except Exception:  # never stop following: the next poll tries again
                logger.exception("repository: following the shared state failed")

    def _acknowledge(self, state: State) -> None:
        self._seen = self.shared.changed_since(None)
        self.registry.generation = state.generation
        self.shared.acknowledge(os.getpid(), state.generation, self.failures)

    # --- bringing this worker to a state ---------------------------------------------------------

    async def apply(self, state: State) -> None:
        """Serve exactly `state`: load what is new (beside what serves, then swapped), drain and free
        what is gone."""
        self.failures = {}
        for name, model in state.models.items():
            for version, wanted in model.versions.items():
                entry = self.registry.get(name, version)
                if entry is not None and entry.served is not None and entry.served.checkpoint.sha256 == wanted.sha256:
                    continue
                try:
                    await self._load_version(name, version, wanted)
                except Exception as exc:  # validated by the worker that published it: unexpected here
                    self.failures[f"{name}/{version}"] = str(exc)
                    logger.error("repository: %s version %s did not load in this worker: %s", name, version, exc)
        for entry in list(self.registry):
            model_state = state.models.get(entry.model)
            if entry.state != UNLOADING and (model_state is None or entry.version not in model_state.versions):
                await self._unload(entry)
        self._defaults(state)

    def _defaults(self, state: State) -> None:
        """Each model's configured default version and its rollout, as `state` says."""
        self.registry.default_versions = {
            name: m.default_version for name, m in state.models.items() if m.default_version is not None
        }
        self.registry.rollouts = {name: Rollout.of(m.rollout) for name, m in state.models.items() if m.rollout}

    async def _load_version(self, name: str, version: str, wanted: VersionState) -> Version:
        """Load one version beside what serves, then serve it."""
        entry = await self._prepare(name, version, wanted)
        self._install(entry)
        return entry

    async def _prepare(self, name: str, version: str, wanted: VersionState) -> Version:
        """One version loaded and warmed up, its resident cost measured; not serving yet."""
        before = _resident()
        served = await self.load_version(self.shared.blobs / wanted.blob, name, version, Path(wanted.origin))
        return Version(name, version, served, READY, memory_bytes=max(0, _resident() - before))

    def _install(self, entry: Version) -> None:
        """Serve `entry`; the copy of the same version it replaces drains and is freed."""
        previous = self.registry.put(entry)
        if previous is not None:
            self._retire(previous)
        assert entry.served is not None
        logger.info("repository: serving %s version %s (%s)", entry.model, entry.version, entry.served.summary())

    async def _unload(self, entry: Version) -> None:
        """Refuse new requests for `entry` at once, let the admitted ones finish, then free it."""
        entry.state, entry.reason = UNLOADING, "unloading"
        self._retire(entry)

    def _retire(self, entry: Version) -> None:
        task = asyncio.create_task(self._drain_and_free(entry))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _drain_and_free(self, entry: Version) -> None:
        await entry.drained()
        if self.registry.get(entry.model, entry.version) is entry:
            self.registry.remove(entry)
        served, entry.served = entry.served, None
        if served is not None and served.batcher is not None:
            batcher, served.batcher = served.batcher, None  # breaks the model <-> batcher cycle
            batcher.close()
            await asyncio.to_thread(batcher.join, 5.0)
        del served
        _release_memory()
        logger.info("repository: %s version %s unloaded", entry.model, entry.version)

    async def settled(self) -> None:
        """Wait until every drain this worker started has freed its version (tests, benchmarks)."""
        while self._retiring:
            await asyncio.gather(*list(self._retiring))

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
            "versions": rollout_figures(self.plane.metrics.totals("fashion_serve_rollout_"), name),
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
            await self.apply(state)
            self._acknowledge(state)
        return state

    async def _publish(self, state: State) -> State:
        """`state` as the next generation: written, served here, acknowledged."""
        state.generation = max(state.generation, self.registry.generation) + 1
        self.shared.write(state)
        await self.apply(state)
        self._acknowledge(state)
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
        self._check_memory(model.name, wanted)
        try:
            entry = await self._prepare(model.name, version, wanted)
        except ServeError:
            raise
        except Exception as exc:
            raise ServeError(400, f"model {model.name!r} version {version} did not load: {exc}") from None
        limit_mb = self.settings.max_model_memory_mb
        if limit_mb is not None and self._in_use() + entry.memory_bytes > limit_mb * 2**20:
            self._retire(entry)
            raise ServeError(
                400,
                f"{model.name!r} version {version} took {entry.memory_bytes / 2**20:.1f} MB in this worker, "
                f"past FASHION_SERVE_MAX_MODEL_MEMORY_MB={limit_mb}; not loaded",
            )
        self._install(entry)
        return wanted

    def _in_use(self) -> int:
        return sum(v.memory_bytes for v in self.registry if v.state != UNLOADING)

    def _check_memory(self, name: str, wanted: VersionState) -> None:
        """Refuse a load that would take this worker past FASHION_SERVE_MAX_MODEL_MEMORY_MB."""
        limit_mb = self.settings.max_model_memory_mb
        if limit_mb is None:
            return
        measured = [v.memory_bytes for v in self.registry if v.model == name and v.memory_bytes]
        estimate = max(measured) if measured else ESTIMATE_FACTOR * wanted.size_bytes
        if self._in_use() + estimate > limit_mb * 2**20:
            raise ServeError(
                400,
                f"loading {name!r} would take about {estimate / 2**20:.1f} MB more than the "
                f"{self._in_use() / 2**20:.1f} MB its models use in each worker, past "
                f"FASHION_SERVE_MAX_MODEL_MEMORY_MB={limit_mb}",
            )

    # --- what the index and /model show ----------------------------------------------------------

    def on_disk(self, name: str) -> bool:
        """Whether the repository holds a model of that (plain) name."""
        return self.root is not None and NAME.match(name) is not None and (self.root / name).is_dir()

    def index(self, ready_only: bool = False) -> list[dict[str, object]]:
        """Every version on disk and every version served, with its state and reason (Triton's rows)."""
        state = self.shared.read()
        rows: dict[tuple[str, str], dict[str, object]] = {}
        on_disk = scan(self.root) if self.root is not None else {}
        for model in on_disk.values():
            for number in sorted({*model.versions, *model.problems}):
                reason = model.problems.get(number, "unloaded")
                rows[(model.name, str(number))] = {
                    "name": model.name,
                    "version": str(number),
                    "state": UNAVAILABLE,
                    "reason": reason,
                }
        for entry in self.registry:
            rows[(entry.model, entry.version)] = entry.row()
        for name, versions in state.failures.items():
            for failed, reason in versions.items():
                row = rows.setdefault((name, failed), {"name": name, "version": failed, "state": UNAVAILABLE})
                if row["state"] != READY:
                    row["reason"] = reason
                else:
                    row["reason"] = f"serving the earlier copy; the last load failed: {reason}"
        ordered = sorted(rows.values(), key=lambda r: (str(r["name"]), version_order(str(r["version"]))))
        return [r for r in ordered if not ready_only or r["state"] == READY]


def rollout_figures(totals: dict[tuple[str, tuple[tuple[str, str], ...]], float], model: str) -> dict[str, Any]:
    """Per version and role of `model`, from the rollout counters: requests, images, the OOD-flagged
    share, the mean calibrated confidence and latency; for a shadow, its top-1 agreement with the
    default version on the same inputs and the mean absolute difference of their probabilities."""
    sums: dict[tuple[str, str], dict[str, float]] = {}
    for (name, labels), value in totals.items():
        tags = dict(labels)
        if tags.get("model") != model:
            continue
        metric = name.removeprefix("fashion_serve_rollout_").removesuffix("_total")
        sums.setdefault((tags["version"], tags.get("role", "shadow")), {})[metric] = value
    figures: dict[str, Any] = {}
    for (version, role), values in sorted(sums.items()):
        if role == "shadow" and "requests" not in values and "dropped" not in values:
            continue
        images, requests = values.get("images", 0.0), values.get("requests", 0.0)
        row: dict[str, Any] = {
            "requests": int(requests),
            "images": int(images),
            "ood_flagged_share": values.get("flagged", 0.0) / images if images else None,
            "mean_confidence": values.get("confidence", 0.0) / images if images else None,
            "mean_latency_ms": 1000 * values.get("seconds", 0.0) / requests if requests else None,
        }
        if role == "shadow":
            shared = sums.get((version, "shadow"), {})
            row["agreement"] = shared.get("agreed", 0.0) / images if images else None
            row["agreement_images"] = int(images)
            row["mean_abs_diff"] = shared.get("abs_diff", 0.0) / images if images else None
            row["dropped"] = int(shared.get("dropped", 0))
        figures.setdefault(version, {})[role] = row
    return figures


def scan_one(root: Path, name: str) -> ModelOnDisk:
    """One model of the repository, by a name checked before it touches the disk."""
    check_name(name)
    model = scan(root).get(name)
    if model is None:
        raise ServeError(404, f"no model {name!r} in the repository")
    return model
