"""Fit what `models.trust.Trust` serves: a temperature on the validation split, class-conditional
Gaussians on the training split's penultimate features, and the OOD threshold on validation.

Features come from `models.for_inference(model, architecture)`, the model the service runs,
through the same hook the service uses. Method and measurements: docs/trust.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models import for_inference
from models.networks import Architecture
from models.trust import (
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    Calibration,
    OODStats,
    forward_with_features,
    ood_scores,
    out_of_distribution,
)

ECE_BINS = 15
FLAG_RATE = 0.05  # the most garments the OOD threshold should flag
Z_95 = 1.645  # one-sided 95 % normal quantile
SHRINKAGE = 1e-3  # added to the covariance's eigenvalues, relative to their mean


@torch.inference_mode()
def extract(
    model: nn.Module, architecture: Architecture, x: torch.Tensor, batch_size: int = 1000
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities, penultimate features) of the served form of `model`, on the CPU."""
    served = for_inference(model.eval(), architecture)
    device = next(served.parameters()).device
    layer = architecture.output_layer(served)
    outputs = [forward_with_features(served, batch.to(device), layer) for batch in x.split(batch_size)]
    return torch.cat([o[0].cpu() for o in outputs]), torch.cat([o[1].cpu() for o in outputs])


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins: sum over bins of |accuracy - confidence| x share."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).double()
    index = (confidence.double() * bins).ceil().clamp(1, bins).long() - 1
    count = torch.bincount(index, minlength=bins).double()
    gap = torch.bincount(index, weights=correct - confidence.double(), minlength=bins)
    return float(gap.abs().sum() / count.sum())


def fit_temperature(log_ps: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimizing the NLL of softmax(log_ps / T) (log T optimized, so T stays positive), within
    the range a checkpoint may hold."""
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    logits = log_ps.double()
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))


def calibrated(log_ps: torch.Tensor, temperature: float) -> torch.Tensor:
    return torch.softmax(log_ps.double() / temperature, dim=1)


def flagged_share(scores: torch.Tensor, threshold: float) -> float:
    """The share of these scores the OOD verdict flags."""
    return float(out_of_distribution(scores, threshold).double().mean())


def threshold_for(scores: torch.Tensor, flag_rate: float) -> float:
    """The score above which `flag_rate` of these (in-distribution) scores lie."""
    return float(torch.quantile(scores.double(), 1.0 - flag_rate, interpolation="higher"))


def validation_flag_rate(flag_rate: float, n: int) -> float:
    """The share to flag on `n` validation examples so that, with 95 % confidence, unseen
    garments are flagged at most `flag_rate` of the time (the validation share's sampling
    error taken off: 4.49 % for 5 % on 5,000 examples)."""
    return max(flag_rate - Z_95 * (flag_rate * (1 - flag_rate) / n) ** 0.5, flag_rate / 2)


def fit_gaussians(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float = SHRINKAGE
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class means and a shared covariance of L2-normalized features -> (whiten W, centers).

    W = V diag(lambda^-1/2) from the covariance's eigen-decomposition (eigenvalues raised by
    `shrinkage` x their mean, so a rank-deficient covariance still inverts).
    """
    f = F.normalize(features.double().reshape(len(features), -1), dim=1)
    counts = torch.bincount(labels, minlength=num_classes)
    sums = torch.zeros(num_classes, f.shape[1], dtype=torch.float64).index_add_(0, labels, f)
    # A class with no examples (a tiny --limit run) gets the overall mean rather than failing the run.
    means = torch.where((counts > 0)[:, None], sums / counts.clamp(min=1)[:, None], f.mean(dim=0))
    centred = f - means[labels]
    covariance = centred.T @ centred / len(f)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp(min=0) + shrinkage * eigenvalues.clamp(min=0).mean()
    whiten = eigenvectors * eigenvalues.rsqrt()
    return whiten.float(), (means @ whiten).float()


def fit_ood(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    val_features: torch.Tensor,
    num_classes: int,
    flag_rate: float = FLAG_RATE,
) -> OODStats:
    """Gaussians on the training features; the threshold on the validation ones (`validation_flag_rate`)."""
    whiten, centers = fit_gaussians(train_features, train_labels, num_classes)
    provisional = OODStats(whiten, centers, threshold=0.0)
    val_rate = validation_flag_rate(flag_rate, len(val_features))
    threshold = threshold_for(ood_scores(val_features, provisional), val_rate)
    info = {
        "flag_rate": flag_rate,
        "val_flag_rate": round(val_rate, 6),
        "train_examples": len(train_labels),
        "val_examples": len(val_features),
    }
    return OODStats(whiten, centers, threshold, info)


@dataclass
class TrustFit:
    calibration: Calibration
    ood: OODStats
    metrics: dict[str, Any] = field(default_factory=dict)  # goes into the checkpoint's metrics


def fit_trust(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    *,
    architecture: Architecture,
) -> TrustFit:
    """Temperature on `val`, OOD statistics on `train` with the threshold on `val`; with `test`,
    the metrics report its ECE before and after calibration and the share of it flagged.

    Each split is (normalized inputs (N, 1, 28, 28), labels); `architecture` is the model's.
    """
    _, train_features = extract(model, architecture, train[0])
    val_log_ps, val_features = extract(model, architecture, val[0])
    val_labels = val[1].cpu()
    num_classes = val_log_ps.shape[1]
    temperature = fit_temperature(val_log_ps, val_labels)
    calibration = Calibration(
        temperature,
        {
            "val_examples": len(val_labels),
            "val_nll_before": round(F.nll_loss(val_log_ps.double(), val_labels).item(), 6),
            "val_nll_after": round(F.nll_loss(calibrated(val_log_ps, temperature).log(), val_labels).item(), 6),
        },
    )
    ood = fit_ood(train_features, train[1].cpu(), val_features, num_classes)
    metrics: dict[str, Any] = {"calibration_temperature": round(temperature, 6), "ood_threshold": ood.threshold}
    if test is not None:
        test_log_ps, test_features = extract(model, architecture, test[0])
        test_labels = test[1].cpu()
        metrics |= {
            "test_ece_uncalibrated": round(expected_calibration_error(test_log_ps.exp(), test_labels), 6),
            "test_ece_calibrated": round(
                expected_calibration_error(calibrated(test_log_ps, temperature), test_labels), 6
            ),
            "test_nll_calibrated": round(F.nll_loss(calibrated(test_log_ps, temperature).log(), test_labels).item(), 6),
            "ood_test_flagged": round(flagged_share(ood_scores(test_features, ood), ood.threshold), 6),
        }
    return TrustFit(calibration, ood, metrics)
