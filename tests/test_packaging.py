"""The installed project (what the container's `pip install .` copies) holds every package of the
source tree: pyproject.toml lists them one by one."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_source_package_is_listed_in_pyproject() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in ("app", "models", "training")
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found - listed == set(), f"packages a non-editable install would leave out: {sorted(found - listed)}"
