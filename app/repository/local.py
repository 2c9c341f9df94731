"""This worker's copy of the shared state: bringing it to a state (load what is new beside what
serves, then swap; drain and free what goes), and acknowledging the generation it serves."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from app.repository.memory import release_memory, resident_bytes
from app.repository.registry import READY, UNLOADING, Registry, Rollout, Version
from app.repository.shared import SharedState, State, VersionState
from app.served_model import ServedModel

logger = logging.getLogger("app")

Loader = Callable[[Path, str, str, Path], Awaitable[ServedModel]]  # blob, name, version, origin


class LocalCopy:
    def __init__(self, registry: Registry, shared: SharedState, load: Loader) -> None:
        self.registry = registry
        self.shared = shared
        self.load_version = load
        self.failures: dict[str, str] = {}  # this worker's, for its acknowledgement
        self.seen: tuple[int, int] | None = None  # the state file this worker last applied
        self._retiring: set[asyncio.Task[None]] = set()

    def acknowledge(self, state: State) -> None:
        self.seen = self.shared.changed_since(None)
        self.registry.generation = state.generation
        self.shared.acknowledge(os.getpid(), state.generation, self.failures)

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
                    await self.load_now(name, version, wanted)
                except Exception as exc:  # validated by the worker that published it: unexpected here
                    self.failures[f"{name}/{version}"] = str(exc)
                    logger.error("repository: %s version %s did not load in this worker: %s", name, version, exc)
        for entry in list(self.registry):
            model_state = state.models.get(entry.model)
            if entry.state != UNLOADING and (model_state is None or entry.version not in model_state.versions):
                await self.unload(entry)
        self.defaults(state)

    def defaults(self, state: State) -> None:
        """Each model's configured default version and its rollout, as `state` says."""
        self.registry.default_versions = {
            name: m.default_version for name, m in state.models.items() if m.default_version is not None
        }
        self.registry.rollouts = {name: Rollout.of(m.rollout) for name, m in state.models.items() if m.rollout}

    async def load_now(self, name: str, version: str, wanted: VersionState) -> Version:
        """Load one version beside what serves, then serve it."""
        entry = await self.prepare(name, version, wanted)
        self.install(entry)
        return entry

    async def prepare(self, name: str, version: str, wanted: VersionState) -> Version:
        """One version loaded and warmed up, its resident cost measured; not serving yet."""
        before = resident_bytes()
        served = await self.load_version(self.shared.blobs / wanted.blob, name, version, Path(wanted.origin))
        return Version(name, version, served, READY, memory_bytes=max(0, resident_bytes() - before))

    def install(self, entry: Version) -> None:
        """Serve `entry`; the copy of the same version it replaces drains and is freed."""
        previous = self.registry.put(entry)
        if previous is not None:
            self.retire(previous)
        assert entry.served is not None
        logger.info("repository: serving %s version %s (%s)", entry.model, entry.version, entry.served.summary())

    async def unload(self, entry: Version) -> None:
        """Refuse new requests for `entry` at once, let the admitted ones finish, then free it."""
        entry.state, entry.reason = UNLOADING, "unloading"
        self.retire(entry)

    def retire(self, entry: Version) -> None:
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
        release_memory()
        logger.info("repository: %s version %s unloaded", entry.model, entry.version)
