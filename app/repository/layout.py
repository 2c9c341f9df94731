"""The model repository on disk, laid out as Triton lays it out:

    DIR/<name>/config.json          optional: version policy, default version, rollout
    DIR/<name>/<version>/<file>.pt  one checkpoint per version (.pt or .pth); versions are positive integers

Names and versions from requests reach the disk only through `checkpoint_path`, which refuses
anything that is not a plain name or a positive integer and any path (symlinks included) that
resolves outside the repository.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.errors import ServeError

logger = logging.getLogger("app")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
VERSION = re.compile(r"^[1-9][0-9]{0,17}$")
CHECKPOINT_SUFFIXES = (".pt", ".pth")
CONFIG = "config.json"


@dataclass(frozen=True)
class Policy:
    """Triton's version policy: the latest N versions, all of them, or specific ones."""

    latest: int | None = 1
    specific: tuple[int, ...] | None = None  # with latest None: these; both None: all

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.specific is not None:
            return [v for v in ordered if v in self.specific]
        if self.latest is not None:
            return ordered[-self.latest :]
        return ordered

    @classmethod
    def parse(cls, value: object) -> Policy:
        """`{"latest": {"num_versions": N}}`, `{"all": {}}` or `{"specific": {"versions": [..]}}`."""
        if not isinstance(value, dict) or len(value) != 1:
            raise ValueError("version_policy must be one of latest, all or specific")
        kind, body = next(iter(value.items()))
        if not isinstance(body, dict):
            raise ValueError(f"version_policy.{kind} must be an object")
        if kind == "all":
            return cls(latest=None)
        if kind == "latest":
            count = body.get("num_versions", 1)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError("version_policy.latest.num_versions must be a positive integer")
            return cls(latest=count)
        if kind == "specific":
            versions = body.get("versions")
            if not isinstance(versions, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in versions
            ):
                raise ValueError("version_policy.specific.versions must be a list of positive integers")
            return cls(latest=None, specific=tuple(versions))
        raise ValueError(f"unknown version_policy {kind!r}: latest, all or specific")


@dataclass(frozen=True)
class ModelConfig:
    policy: Policy = Policy()
    default_version: str | None = None
    rollout: dict[str, Any] | None = None

    @classmethod
    def read(cls, directory: Path) -> ModelConfig:
        """The model's config.json, or the defaults without one; ValueError saying what is wrong."""
        path = directory / CONFIG
        if not path.is_file():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: must be a JSON object")
        policy = Policy.parse(raw["version_policy"]) if "version_policy" in raw else Policy()
        default = raw.get("default_version")
        if default is not None and not (isinstance(default, str | int) and VERSION.match(str(default))):
            raise ValueError(f"{path}: default_version must be a positive integer")
        rollout = raw.get("rollout")
        if rollout is not None and not isinstance(rollout, dict):
            raise ValueError(f"{path}: rollout must be an object")
        return cls(policy, None if default is None else str(default), rollout)


@dataclass
class ModelOnDisk:
    name: str
    versions: dict[int, Path] = field(default_factory=dict)  # version -> its checkpoint file
    config: ModelConfig = ModelConfig()
    problems: dict[int, str] = field(default_factory=dict)  # versions present but unusable
    config_error: str | None = None

    def wanted(self) -> list[int]:
        """The versions its policy serves."""
        return self.config.policy.select(list(self.versions))


def _inside(root: Path, path: Path) -> bool:
    """Whether `path`, symlinks resolved, lies within `root`."""
    try:
        path.resolve(strict=True).relative_to(root.resolve(strict=True))
    except (OSError, ValueError):
        return False
    return True


def check_name(name: str) -> None:
    """400 for a model name that is not a plain name (no separators, no '..')."""
    if not NAME.match(name) or name in (".", ".."):
        raise ServeError(400, f"invalid model name {name!r}: letters, digits, '.', '_' and '-' only")


def checkpoint_path(root: Path, name: str, version: int | str) -> Path:
    """The checkpoint of `name` version `version`: 404 if there is none, 400 for a name or
    version that is not plain, or one whose folder or file resolves outside the repository."""
    check_name(name)
    if not VERSION.match(str(version)):
        raise ServeError(400, f"invalid version {str(version)!r}: versions are positive integers")
    folder = root / name / str(version)
    if not folder.is_dir():
        raise ServeError(404, f"model {name!r} has no version {version} in the repository")
    if not _inside(root, folder):
        raise ServeError(400, f"{name}/{version} resolves outside the repository: refused")
    files = sorted(p for p in folder.iterdir() if p.suffix in CHECKPOINT_SUFFIXES and p.is_file())
    if len(files) != 1:
        found = ", ".join(p.name for p in files) or "none"
        raise ServeError(400, f"{name}/{version} must hold exactly one .pt or .pth checkpoint; found {found}")
    if not _inside(root, files[0]):
        raise ServeError(400, f"{name}/{version}/{files[0].name} resolves outside the repository: refused")
    return files[0]


def scan(root: Path) -> dict[str, ModelOnDisk]:
    """Every model in the repository with its usable versions; folders that are not versions are
    skipped with one log line each, versions that cannot be used are kept with the reason."""
    models: dict[str, ModelOnDisk] = {}
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        if not NAME.match(directory.name):
            logger.warning("repository: %s is not a model name; skipped", directory)
            continue
        model = ModelOnDisk(directory.name)
        try:
            model.config = ModelConfig.read(directory)
        except ValueError as exc:
            model.config_error = str(exc)
            logger.error("repository: %s", exc)
        for entry in sorted(p for p in directory.iterdir() if p.is_dir()):
            if not VERSION.match(entry.name):
                logger.warning("repository: %s is not a version (a positive integer); skipped", entry)
                continue
            try:
                model.versions[int(entry.name)] = checkpoint_path(root, model.name, entry.name)
            except ServeError as exc:
                model.problems[int(entry.name)] = exc.message
        models[model.name] = model
    return models
