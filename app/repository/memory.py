"""Each model version's resident memory in a worker, the per-worker limit, and giving freed
memory back to the system."""

from __future__ import annotations

import contextlib
import ctypes
import gc

import psutil

from app.errors import ServeError
from app.repository.registry import UNLOADING, Registry

ESTIMATE_FACTOR = 4  # before a first load: its resident cost, as a multiple of the file's size
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial value, kept fixed


def resident_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def pin_mmap_threshold() -> None:
    """Keep glibc's mmap threshold where it starts. By default it rises to the size of the largest
    block freed so far, so once one model's weights are freed, the next model's land in the heap,
    and unloading it left its memory with the process (measured: 40 MB of a 15 MB model held).
    Blocks over 128 KiB are then mapped apart and go back to the system when freed."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_memory() -> None:
    """Return freed memory to the system: a collection, then glibc's malloc_trim where there is one."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def in_use(registry: Registry) -> int:
    """What the versions this worker serves took when they loaded."""
    return sum(v.memory_bytes for v in registry if v.state != UNLOADING)


def check_room(registry: Registry, limit_mb: int | None, name: str, size_bytes: int) -> None:
    """Refuse (400) a load of `name` that would take this worker past `limit_mb`: its estimate is
    what another version of it measured, else a multiple of its file's size."""
    if limit_mb is None:
        return
    measured = [v.memory_bytes for v in registry if v.model == name and v.memory_bytes]
    estimate = max(measured) if measured else ESTIMATE_FACTOR * size_bytes
    used = in_use(registry)
    if used + estimate > limit_mb * 2**20:
        raise ServeError(
            400,
            f"loading {name!r} would take about {estimate / 2**20:.1f} MB more than the "
            f"{used / 2**20:.1f} MB its models use in each worker, past FASHION_SERVE_MAX_MODEL_MEMORY_MB={limit_mb}",
        )
