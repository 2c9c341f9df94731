"""The state every worker of one server serves, in one directory they share (a tmpfs the
supervisor creates; a private one for a lone process):

- `state.json`: the generation, and per model its versions (each as a validated copy of its
  checkpoint in `blobs/`, named by its SHA-256), default version and rollout, and the last
  failure per version. Written atomically, under `lock`, by the worker that changes it.
- `acks/<pid>.json`: the generation each worker serves now, with what failed there.
- `workers/<pid>`: the workers alive (a SIGKILLed one's file stays; its pid no longer answers).
- `reconcile`: how many reconciles (SIGHUP) the supervisor was asked for.

`lock` serializes the changes (one load at a time, across workers): `fcntl.flock`, released by
the kernel if its holder dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from app.errors import ServeError


@dataclass
class VersionState:
    blob: str  # file name in blobs/
    sha256: str
    origin: str  # where it came from in the repository
    size_bytes: int


@dataclass
class ModelState:
    versions: dict[str, VersionState] = field(default_factory=dict)
    default_version: str | None = None
    rollout: dict[str, Any] | None = None


@dataclass
class State:
    generation: int = 0
    models: dict[str, ModelState] = field(default_factory=dict)
    failures: dict[str, dict[str, str]] = field(default_factory=dict)  # model -> version -> reason
    reconciled: int = 0  # the reconcile requests this state has answered

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> State:
        raw = json.loads(text)
        models = {
            name: ModelState(
                {v: VersionState(**s) for v, s in m["versions"].items()}, m.get("default_version"), m.get("rollout")
            )
            for name, m in raw.get("models", {}).items()
        }
        return cls(raw["generation"], models, raw.get("failures", {}), raw.get("reconciled", 0))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SharedState:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.file = directory / "state.json"
        self.blobs = directory / "blobs"
        self.acks = directory / "acks"
        self.workers = directory / "workers"
        for folder in (self.blobs, self.acks, self.workers):
            folder.mkdir(parents=True, exist_ok=True)

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[None]:
        """Hold the one change lock (waited for in a thread, so the event loop goes on)."""
        fd = os.open(self.directory / "lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def read(self) -> State:
        try:
            return State.from_json(self.file.read_text())
        except FileNotFoundError:
            return State()

    def write(self, state: State) -> None:
        partial = self.file.with_name(f"state.{os.getpid()}.tmp")
        partial.write_text(state.to_json())
        os.replace(partial, self.file)

    def changed_since(self, seen: tuple[int, int] | None) -> tuple[int, int] | None:
        """The state file's identity now, if it differs from `seen` (None while it is absent)."""
        try:
            stat = os.stat(self.file)
        except FileNotFoundError:
            return None
        now = (stat.st_ino, stat.st_mtime_ns)
        return now if now != seen else None

    def keep(self, source: Path) -> VersionState:
        """A copy of the checkpoint at `source`, read once, in blobs/ under its SHA-256 (ServeError 400
        if it cannot be read): what every worker loads, whatever happens to the file later."""
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise ServeError(400, f"cannot read {source}: {exc.strerror or exc}") from None
        sha = hashlib.sha256(data).hexdigest()
        blob = self.blobs / f"{sha}{source.suffix}"
        if not blob.exists():
            partial = blob.with_name(f"{blob.name}.{os.getpid()}.tmp")
            partial.write_bytes(data)
            os.replace(partial, blob)
        return VersionState(blob.name, sha, str(source), len(data))

    def forget_unused(self, state: State) -> None:
        """Remove blobs no version of `state` names."""
        used = {v.blob for m in state.models.values() for v in m.versions.values()}
        for blob in self.blobs.iterdir():
            if blob.name not in used and not blob.name.endswith(".tmp"):
                blob.unlink(missing_ok=True)

    # --- the workers -----------------------------------------------------------------------------

    def register(self, pid: int) -> None:
        (self.workers / str(pid)).touch()

    def unregister(self, pid: int) -> None:
        (self.workers / str(pid)).unlink(missing_ok=True)
        (self.acks / f"{pid}.json").unlink(missing_ok=True)

    def acknowledge(self, pid: int, generation: int, failures: dict[str, str]) -> None:
        partial = self.acks / f"{pid}.tmp"
        partial.write_text(json.dumps({"generation": generation, "failures": failures}))
        os.replace(partial, self.acks / f"{pid}.json")

    def live_workers(self) -> list[int]:
        pids = []
        for entry in self.workers.iterdir():
            if entry.name.isdigit():
                if _alive(int(entry.name)):
                    pids.append(int(entry.name))
                else:
                    self.unregister(int(entry.name))
        return sorted(pids)

    def _ack(self, pid: int) -> dict[str, Any]:
        try:
            ack = json.loads((self.acks / f"{pid}.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {"generation": -1, "failures": {}}
        return ack if isinstance(ack, dict) else {"generation": -1, "failures": {}}

    async def wait_for(self, generation: int, timeout_s: float) -> None:
        """Return once every live worker serves `generation` (or a later one); ServeError 504 naming
        the workers that lag after `timeout_s`, 500 naming those where it failed to load."""
        give_up = time.monotonic() + timeout_s
        while True:
            acks = {pid: self._ack(pid) for pid in self.live_workers()}
            lagging = [pid for pid, ack in acks.items() if ack["generation"] < generation]
            failed = {pid: ack["failures"] for pid, ack in acks.items() if ack["generation"] >= generation}
            failed = {pid: f for pid, f in failed.items() if f}
            if failed:
                detail = "; ".join(f"worker {pid}: {f}" for pid, f in failed.items())
                raise ServeError(500, f"generation {generation} failed to load in some workers: {detail}")
            if not lagging:
                return
            if time.monotonic() > give_up:
                late = ", ".join(map(str, lagging))
                raise ServeError(504, f"workers {late} have not applied generation {generation} within {timeout_s:g} s")
            await asyncio.sleep(0.05)

    # --- reconcile requests (SIGHUP) -------------------------------------------------------------

    def reconcile_requests(self) -> int:
        try:
            return int((self.directory / "reconcile").read_text() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def request_reconcile(self) -> None:
        """The supervisor's half of SIGHUP: one more reconcile asked for; a worker does it."""
        partial = self.directory / "reconcile.tmp"
        partial.write_text(str(self.reconcile_requests() + 1))
        os.replace(partial, self.directory / "reconcile")
