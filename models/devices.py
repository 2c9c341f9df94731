"""Where a model runs: one rule for serving and training."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def resolve_device(device: torch.device | str) -> torch.device:
    """'auto' -> the GPU when there is one, else the CPU; ValueError for CUDA on a machine without it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return resolved


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively (a GPU that supports it; a CPU with AVX-512
    BF16 or AMX, as Linux reports its flags), where bfloat16 autocast is fast and not emulated."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()
