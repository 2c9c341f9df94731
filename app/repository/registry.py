"""The models and versions one worker serves: each version's served model, state and requests in
progress. No I/O: `app.repository.control` changes it, the data plane reads it per request."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from app.errors import ServeError, unavailable
from app.served_model import ServedModel

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"


def version_order(version: str) -> tuple[int, int, str]:
    """Versions in numeric order where they are numbers (Triton's are), else by name after them."""
    return (0, int(version), "") if version.isdigit() else (1, 0, version)


@dataclass(eq=False)
class Version:
    """One version of one model in this worker."""

    model: str
    version: str
    served: ServedModel | None = None
    state: str = LOADING
    reason: str = ""
    memory_bytes: int = 0  # resident bytes its load added to this worker
    in_flight: int = 0  # requests admitted to it and not yet answered
    _idle: asyncio.Event | None = None  # made by `drained`, set when the last request leaves

    def enter(self) -> None:
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def drained(self) -> None:
        """Return once no admitted request is left on this version."""
        while self.in_flight:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()

    def row(self) -> dict[str, object]:
        """Its line in the repository index (Triton's fields, plus memory)."""
        return {
            "name": self.model,
            "version": self.version,
            "state": self.state,
            "reason": self.reason,
            "memory_bytes": self.memory_bytes,
        }


@dataclass(frozen=True)
class Rollout:
    """A model's candidate versions: a canary answers `canary_percent` of the requests that name no
    version; a shadow also runs on `shadow_percent` of those the default version answers."""

    canary: str | None = None
    canary_percent: float = 0.0
    shadow: str | None = None
    shadow_percent: float = 0.0

    @classmethod
    def of(cls, record: dict[str, Any] | None) -> Rollout:
        """From the shared state's `rollout` record (`{"canary": {"version", "percent"}, "shadow": ...}`)."""

        def part(key: str) -> tuple[str | None, float]:
            value = (record or {}).get(key)
            return (str(value["version"]), float(value.get("percent", 0))) if isinstance(value, dict) else (None, 0.0)

        canary, shadow = part("canary"), part("shadow")
        return cls(canary[0], canary[1], shadow[0], shadow[1])


@dataclass(frozen=True, slots=True)
class Route:
    """Which version answers a request, in which role, and the shadow that also runs on it."""

    entry: Version
    role: str  # "named" (the request named the version), "default" or "canary"
    shadow: Version | None = None


class Registry:
    """Name -> version -> `Version`, which version of a model answers when none is named, and
    which model answers when none is named."""

    def __init__(self, default_model: str | None = None) -> None:
        self.models: dict[str, dict[str, Version]] = {}
        self._default_versions: dict[str, str] = {}  # configured; else the highest ready
        self._defaults: dict[str, Version] = {}  # what default_version found, while it holds
        self.default_model = default_model  # configured; else the only model
        self.rollouts: dict[str, Rollout] = {}
        self.generation = 0  # the shared state this worker serves (app.repository.shared)

    @property
    def default_versions(self) -> dict[str, str]:
        return self._default_versions

    @default_versions.setter
    def default_versions(self, value: dict[str, str]) -> None:
        self._default_versions = value
        self._defaults.clear()

    def put(self, entry: Version) -> Version | None:
        """Add or replace a version; the one it replaced, if any."""
        self._defaults.clear()
        versions = self.models.setdefault(entry.model, {})
        previous = versions.get(entry.version)
        versions[entry.version] = entry
        return previous

    def remove(self, entry: Version) -> None:
        self._defaults.clear()
        versions = self.models.get(entry.model, {})
        if versions.get(entry.version) is entry:
            del versions[entry.version]
        if not versions:
            self.models.pop(entry.model, None)

    def get(self, name: str, version: str) -> Version | None:
        return self.models.get(name, {}).get(version)

    def __iter__(self) -> Iterator[Version]:
        for name in sorted(self.models):
            yield from sorted(self.models[name].values(), key=lambda v: version_order(v.version))

    def default_name(self) -> str:
        """The model a request that names none is for; 404 when that cannot be told."""
        if self.default_model is not None:
            return self.default_model
        if len(self.models) == 1:
            return next(iter(self.models))
        raise ServeError(404, f"name a model: this server serves {self._names()} (no FASHION_SERVE_DEFAULT_MODEL)")

    def default_version(self, name: str) -> Version | None:
        """The version that answers for `name` when none is named: the configured one while it
        is ready, else the highest ready version. Asked per request, so the answer is kept until
        a version is added or removed, the configuration changes, or it stops being ready."""
        found = self._defaults.get(name)
        if found is not None and found.state == READY:
            return found
        found = self._default_version(name)
        if found is not None:
            self._defaults[name] = found
        return found

    def _default_version(self, name: str) -> Version | None:
        versions = self.models.get(name, {})
        configured = versions.get(self.default_versions.get(name, ""))
        if configured is not None and configured.state == READY:
            return configured
        ready = [v for v in versions.values() if v.state == READY]
        return max(ready, key=lambda v: version_order(v.version)) if ready else None

    def resolve(self, name: str | None, version: str | None) -> Version:
        """The version a request is for: 404 naming what exists when the model or version is not
        known; 503 when it is known but cannot answer now (loading, unloading, failed)."""
        name = name or self.default_name()
        versions = self.models.get(name)
        if versions is None:
            raise ServeError(404, f"unknown model {name!r}: this server serves {self._names()}")
        if version is None:
            entry = self.default_version(name)
            if entry is None:
                raise unavailable(f"model {name!r} has no version ready")
            return entry
        found = versions.get(version)
        if found is None:
            have = ", ".join(sorted(versions, key=version_order)) or "none"
            raise ServeError(404, f"unknown version {version!r} of model {name!r}: it has {have}")
        if found.state != READY:
            raise unavailable(f"version {version} of model {name!r} is {found.state}: {found.reason or 'not ready'}")
        return found

    def route(self, name: str | None, version: str | None) -> Route:
        """`resolve`, with the model's rollout: a request that names no version goes to the canary
        for its share (drawn at random per request), else to the default version, which a shadow
        then also runs on for its share (a second, independent draw)."""
        entry = self.resolve(name, version)
        if version is not None:
            return Route(entry, "named")
        rollout = self.rollouts.get(entry.model)
        if rollout is None:
            return Route(entry, "default")
        if rollout.canary is not None and random.random() * 100 < rollout.canary_percent:
            canary = self.get(entry.model, rollout.canary)
            if canary is not None and canary.state == READY and canary.served is not None:
                return Route(canary, "canary")
        shadow = None
        if rollout.shadow is not None and random.random() * 100 < rollout.shadow_percent:
            candidate = self.get(entry.model, rollout.shadow)
            if candidate is not None and candidate.state == READY and candidate is not entry:
                shadow = candidate
        return Route(entry, "default", shadow)

    def _names(self) -> str:
        return ", ".join(repr(n) for n in sorted(self.models)) or "no models"
