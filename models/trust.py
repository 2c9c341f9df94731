"""Calibrated probabilities and an out-of-distribution score, from the one forward pass the
service already runs.

A checkpoint may carry two optional records (see docs/trust.md for the method and figures):

- `calibration`: a temperature T; the served probabilities are softmax(log_probs / T), which
  equals temperature scaling of the logits (log_softmax only shifts each row).
- `ood`: class-conditional Gaussians with a shared covariance on the L2-normalized input of
  the model's last Linear layer (its penultimate features). Stored whitened: `whiten` W
  (D x D, with W Wᵀ the precision matrix) and `centers` (C x D, the class means times W), so
  the score of features f is min over classes c of ||normalize(f) W - centers[c]||², the
  squared Mahalanobis distance to the nearest class. `threshold` flags about 5 % of
  validation garments.

Both records are plain dicts of tensors and numbers, so checkpoints still load with
`weights_only=True`. A checkpoint without them loads with None, and `Trust` then gives the
plain probabilities and no scores.

Where the OOD method lives: the score and the verdict here (`ood_scores`,
`out_of_distribution`); the records read and checked by `models.checkpoint.load_checkpoint`;
the fitting in `training.fit_trust`; the layer whose input are the features is declared by each
architecture (`models.networks.Architecture.output_layer`).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.networks import last_linear

OOD_METHOD = "mahalanobis_l2_penultimate"
CALIBRATION_METHOD = "temperature"
# The temperatures a checkpoint may hold, and the range fitting keeps to.
MIN_TEMPERATURE = 0.01
MAX_TEMPERATURE = 100.0


class RecordError(ValueError):
    """A calibration or OOD record in a checkpoint is malformed."""


def _number(record: Mapping[str, Any], key: str, low: float, high: float) -> float:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RecordError(f"{key} must be a finite number, got {value!r:.80}")
    if not low <= value <= high:
        raise RecordError(f"{key} must be in [{low}, {high}], got {value!r}")
    return float(value)


def _tensor(record: Mapping[str, Any], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    value = record.get(key)
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise RecordError(f"{key} must be a floating-point tensor, got {type(value).__name__}")
    if tuple(value.shape) != shape:
        raise RecordError(f"{key} has shape {tuple(value.shape)}, the model needs {shape}")
    if not torch.isfinite(value).all():
        raise RecordError(f"{key} holds NaN or infinite values")
    return value.detach().to(torch.float32).contiguous().clone()


def _plain_extras(record: Mapping[str, Any], keys: set[str]) -> dict[str, Any]:
    """The record's descriptive entries (numbers, strings), kept for reports."""
    extras = {}
    for key, value in record.items():
        if key in keys:
            continue
        if not isinstance(key, str) or not isinstance(value, str | int | float | bool | None):
            raise RecordError(f"unexpected entry {key!r:.40} of type {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordError(f"entry {key!r} is not finite")
        extras[key] = value
    return extras


@dataclass(frozen=True)
class Calibration:
    """Temperature scaling: probabilities = softmax(log_probs / temperature)."""

    temperature: float
    info: Mapping[str, Any] | None = None  # how it was fitted (validation size, NLL), for reports

    def to_record(self) -> dict[str, Any]:
        return {**(self.info or {}), "method": CALIBRATION_METHOD, "temperature": float(self.temperature)}

    @classmethod
    def from_record(cls, record: Any) -> Calibration:
        if not isinstance(record, Mapping) or record.get("method") != CALIBRATION_METHOD:
            raise RecordError(f"calibration must be a dict with method {CALIBRATION_METHOD!r}")
        temperature = _number(record, "temperature", MIN_TEMPERATURE, MAX_TEMPERATURE)
        return cls(temperature, _plain_extras(record, {"method", "temperature"}))


@dataclass(frozen=True)
class OODStats:
    """Whitened class-conditional Gaussians on normalized penultimate features, and the threshold."""

    whiten: torch.Tensor  # (D, D)
    centers: torch.Tensor  # (C, D)
    threshold: float
    info: Mapping[str, Any] | None = None

    def to_record(self) -> dict[str, Any]:
        return {
            **(self.info or {}),
            "method": OOD_METHOD,
            "whiten": self.whiten.detach().cpu().to(torch.float32).contiguous(),
            "centers": self.centers.detach().cpu().to(torch.float32).contiguous(),
            "threshold": float(self.threshold),
        }

    @classmethod
    def from_record(cls, record: Any, num_classes: int, feature_dim: int) -> OODStats:
        if not isinstance(record, Mapping) or record.get("method") != OOD_METHOD:
            raise RecordError(f"ood must be a dict with method {OOD_METHOD!r}")
        return cls(
            whiten=_tensor(record, "whiten", (feature_dim, feature_dim)),
            centers=_tensor(record, "centers", (num_classes, feature_dim)),
            threshold=_number(record, "threshold", 0.0, math.inf),
            info=_plain_extras(record, {"method", "whiten", "centers", "threshold"}),
        )

    def to(self, device: torch.device | str) -> OODStats:
        return OODStats(self.whiten.to(device), self.centers.to(device), self.threshold, self.info)


def ood_scores(features: torch.Tensor, stats: OODStats) -> torch.Tensor:
    """(N, D) penultimate features -> (N,) squared Mahalanobis distance to the nearest class."""
    g = F.normalize(features.reshape(features.shape[0], -1), dim=1) @ stats.whiten
    return (g.unsqueeze(1) - stats.centers).square_().sum(dim=2).amin(dim=1)


@overload
def out_of_distribution(scores: float, threshold: float) -> bool: ...
@overload
def out_of_distribution(scores: torch.Tensor, threshold: float) -> torch.Tensor: ...
@overload
def out_of_distribution(scores: np.ndarray, threshold: float) -> np.ndarray: ...
def out_of_distribution(
    scores: float | torch.Tensor | np.ndarray, threshold: float
) -> bool | torch.Tensor | np.ndarray:
    """The OOD verdict, for one score or an array of them: past the threshold is out of distribution."""
    return scores > threshold


def forward_with_features(
    model: nn.Module, x: torch.Tensor, output_layer: nn.Linear
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass -> (log-probabilities, the input of `output_layer`: the penultimate features).

    A forward hook captures the features for the length of the call. Hooks belong to the
    module, so the model must not run in another thread meanwhile: the served model is run by
    its inference thread alone (`models.networks.for_inference` always returns a copy of its own).
    """
    captured: list[torch.Tensor] = []

    def capture(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        captured.append(inputs[0])

    handle = output_layer.register_forward_hook(capture)
    try:
        log_ps = model(x)
    finally:
        handle.remove()
    return log_ps, captured[-1]


class Trust:
    """Calibrated probabilities and OOD scores for the served model; None-safe for old checkpoints.

    Build it once from a checkpoint's records (`LoadedModel.trust()`), then per batch, under
    inference mode: `probabilities, scores = trust(served_model, x)`; an image is out of
    distribution when `out_of_distribution(score, trust.threshold)`.
    """

    def __init__(
        self,
        calibration: Calibration | None = None,
        ood: OODStats | None = None,
        device: torch.device | str = "cpu",
        output_layer: Callable[[nn.Module], nn.Linear] = last_linear,
    ) -> None:
        self.calibration = calibration
        self.ood = ood.to(device) if ood is not None else None
        self.threshold: float | None = ood.threshold if ood is not None else None
        self._inv_temperature = 1.0 / calibration.temperature if calibration is not None else None
        self._find_output_layer = output_layer
        self._output_layers: weakref.WeakKeyDictionary[nn.Module, nn.Linear] = weakref.WeakKeyDictionary()

    def _output_layer(self, model: nn.Module) -> nn.Linear:
        layer = self._output_layers.get(model)
        if layer is None:
            layer = self._output_layers[model] = self._find_output_layer(model)
        return layer

    def __call__(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(N, 1, 28, 28) normalized input -> (calibrated probabilities (N, C), OOD scores (N,) or None)."""
        if self.ood is None:
            return self.apply(model(x), None)
        return self.apply(*forward_with_features(model, x, self._output_layer(model)))

    def apply(self, log_ps: torch.Tensor, features: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A forward pass's outputs (from any served form) -> (calibrated probabilities, OOD scores or None)."""
        scores = None if self.ood is None or features is None else ood_scores(features, self.ood)
        if self._inv_temperature is None:
            return log_ps.exp(), scores
        return torch.softmax(log_ps * self._inv_temperature, dim=1), scores
