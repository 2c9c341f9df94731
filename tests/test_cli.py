"""`python -m app`'s defaults: the worker count follows the CPUs this process may use."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.__main__ import usable_cpus


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000\n", None), ("100000 100000\n", 1), ("150000 100000\n", 2), ("50000 100000\n", 1), ("junk", None)],
)
def test_the_default_worker_count_honours_a_cgroup_cpu_quota(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    affinity = len(os.sched_getaffinity(0))
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    assert usable_cpus(path) == (affinity if expected is None else min(expected, affinity))
    assert usable_cpus(tmp_path / "absent") == affinity
