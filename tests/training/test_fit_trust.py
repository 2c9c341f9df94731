"""Fitting the trust records (temperature, OOD Gaussians and threshold), the calibrate command,
the AUROC used by the report, and the non-garment images it is judged on."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import PreprocessConfig, build_model, load_checkpoint
from models.trust import OODStats, ood_scores
from training.data import FashionMNIST, Split
from training.fit_trust import (
    calibrated,
    expected_calibration_error,
    fit_ood,
    fit_temperature,
    validation_flag_rate,
)
from training.ood_data import generators, ood_inputs
from training.trust_commands import auroc, run_calibrate


def overconfident(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities three times too sharp for labels drawn from the true softmax."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 10, generator=generator) * 2
    labels = torch.multinomial(logits.softmax(dim=1), 1, generator=generator).squeeze(1)
    return (3 * logits).log_softmax(dim=1), labels


def test_temperature_undoes_overconfidence_and_lowers_nll_and_ece() -> None:
    val_log_ps, val_labels = overconfident(4000, seed=0)
    test_log_ps, test_labels = overconfident(4000, seed=1)
    temperature = fit_temperature(val_log_ps, val_labels)
    assert temperature == pytest.approx(3.0, rel=0.1)
    before, after = test_log_ps.exp(), calibrated(test_log_ps, temperature)
    assert F.nll_loss(after.log(), test_labels) < F.nll_loss(test_log_ps, test_labels) - 0.1
    assert expected_calibration_error(after, test_labels) < expected_calibration_error(before, test_labels) / 3


def test_expected_calibration_error_on_a_hand_worked_case() -> None:
    # Two bins used: confidence 0.9 (2 right of 2: gap 0.1) and 0.6 (1 right of 2: gap 0.1).
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 0, 1])
    assert expected_calibration_error(probs, labels, bins=10) == pytest.approx(0.1)


def clusters(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten classes of 16-d features around distinct directions, like a classifier's penultimate layer."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.eye(16)[:10] * 4 + 1
    labels = torch.randint(0, 10, (n,), generator=generator)
    return directions[labels] + torch.randn(n, 16, generator=generator) * 0.5, labels


def test_ood_fit_flags_far_away_inputs_and_about_the_target_share_of_held_out_ones() -> None:
    train, labels = clusters(5000, seed=0)
    val, _ = clusters(2000, seed=1)
    held_out, _ = clusters(4000, seed=2)
    stats = fit_ood(train, labels, val, num_classes=10)
    far = torch.randn(500, 16, generator=torch.Generator().manual_seed(3))  # no class's direction
    held_out_flagged = float((ood_scores(held_out, stats) > stats.threshold).double().mean())
    assert 0.02 <= held_out_flagged <= 0.07
    assert float((ood_scores(far, stats) > stats.threshold).double().mean()) > 0.95
    assert stats.info is not None
    assert stats.info["val_flag_rate"] == pytest.approx(validation_flag_rate(0.05, 2000), abs=1e-6)


def test_the_validation_share_leaves_room_for_its_sampling_error() -> None:
    assert validation_flag_rate(0.05, 5000) == pytest.approx(0.0449, abs=1e-4)
    assert validation_flag_rate(0.05, 10**9) == pytest.approx(0.05, abs=1e-4)
    assert validation_flag_rate(0.05, 10) == 0.025  # never below half the target


def test_auroc_matches_counting_pairs() -> None:
    generator = torch.Generator().manual_seed(0)
    positives = torch.randint(0, 20, (60,), generator=generator).float()
    negatives = torch.randint(5, 25, (80,), generator=generator).float()
    wins = (positives[:, None] > negatives[None]).double() + 0.5 * (positives[:, None] == negatives[None]).double()
    assert auroc(positives, negatives) == pytest.approx(float(wins.mean()))
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0


def fake_data(seed: int = 0) -> FashionMNIST:
    """A few hundred random 'garments' per class: enough to fit, nothing to learn from."""
    generator = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        return Split(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=generator), torch.arange(n) % 10)

    return FashionMNIST(split(600), split(200), source="fake")


def test_a_course_checkpoint_calibrates_into_format_v1(tmp_path: Path) -> None:
    torch.manual_seed(0)
    args = {"input_size": 784, "output_size": 10, "hidden_layers": [32, 16]}
    model: nn.Module = build_model("network", {**args, "drop_p": 0.5})
    course = tmp_path / "checkpoint.pth"
    torch.save({**args, "state_dict": model.state_dict()}, course)
    out = tmp_path / "calibrated.pt"
    (tmp_path / "calibrated.metrics.json").write_text(json.dumps({"metrics": {}, "history": []}))

    namespace = argparse.Namespace(checkpoint=course, out=out, threads=None)
    assert run_calibrate(namespace, torch.device("cpu"), fake_data()) == 0

    loaded = load_checkpoint(out)
    assert loaded.format == "v1"
    assert loaded.calibration is not None and loaded.ood is not None
    assert loaded.ood.whiten.shape == (16, 16) and loaded.ood.centers.shape == (10, 16)
    assert loaded.preprocess == PreprocessConfig(mean=0.5, std=0.5)  # the course's normalization, kept
    for key in ("test_ece_uncalibrated", "test_ece_calibrated", "ood_test_flagged", "calibration_temperature"):
        assert key in loaded.metrics
    written = json.loads((tmp_path / "calibrated.metrics.json").read_text())
    assert written["metrics"] == loaded.metrics
    assert written["history"] == []
    torch.testing.assert_close(loaded.model.state_dict(), model.state_dict())


def test_non_garment_images_go_through_the_service_preprocessing() -> None:
    config = PreprocessConfig()
    inputs = ood_inputs(config, per_kind=4, seed=0)
    assert set(inputs) == {"noise", "blank", "shapes", "text", "digits", "photos"}
    low, high = (0 - config.mean) / config.std, (1 - config.mean) / config.std
    for kind, x in inputs.items():
        assert x.shape == (4, 1, 28, 28) and x.dtype == np.float32, kind
        assert np.isfinite(x).all() and x.min() >= low - 1e-6 and x.max() <= high + 1e-6, kind
    assert np.array_equal(inputs["shapes"], ood_inputs(config, per_kind=4, seed=0)["shapes"])  # seeded
    # Blank images, light or dark, end up as one dark level: the invert=auto rule applied.
    assert (inputs["blank"].reshape(4, -1).std(axis=1) < 1e-6).all()
    assert (inputs["blank"] <= 0).all()


def test_every_kind_draws_a_pil_image() -> None:
    rng = np.random.default_rng(0)
    for kind, draw in generators().items():
        image = draw(rng)
        assert image.width >= 1 and image.height >= 1, kind


def test_ood_statistics_score_the_nearest_class() -> None:
    stats = OODStats(torch.eye(2), torch.tensor([[1.0, 0.0], [0.0, 1.0]]), threshold=0.5)
    scores = ood_scores(torch.tensor([[3.0, 0.0], [0.0, 0.2], [1.0, -1.0]]), stats)
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.0, 2.0 - 2.0**0.5]))
