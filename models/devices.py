"""Where a model runs: one rule for serving and training."""

from __future__ import annotations

import torch


def resolve_device(device: torch.device | str) -> torch.device:
    """'auto' -> the GPU when there is one, else the CPU; ValueError for CUDA on a machine without it."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return resolved
