"""The `calibrate` and `ood-report` commands: fit the trust records into a checkpoint, and judge them.

Both rebuild the checkpoint's own train/validation split from its training record
(`training.split.SplitPlan`). The argument parser is `training.cli`."""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch
from sklearn.metrics import roc_auc_score

from models import CheckpointError, FashionCNN, LoadedModel, for_inference, load_checkpoint, save_checkpoint
from models.preprocessing import normalize_tensor
from models.trust import Trust
from training.data import FashionMNIST
from training.fit_trust import calibrated, expected_calibration_error, fit_trust, flagged_share
from training.ood_data import ood_inputs
from training.pipeline import test_metrics
from training.report import artifact_paths, write_json
from training.split import SplitPlan
from training.train import evaluate


def _load(args: argparse.Namespace, device: torch.device) -> LoadedModel:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return load_checkpoint(args.checkpoint, device=device)
    except CheckpointError as exc:
        raise SystemExit(f"cannot load checkpoint: {exc}") from None


def training_split(loaded: LoadedModel, num_train: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): the split `train` made for this checkpoint."""
    try:
        return SplitPlan.from_record(loaded.training).indices(num_train)
    except ValueError as exc:
        raise SystemExit(f"cannot rebuild the training split: {exc}") from None


def _mirrored(args: argparse.Namespace, loaded: LoadedModel) -> dict[str, Any]:
    """The model arguments to save: with --mirror (and --mirror-below), the CNN's mirrored form,
    set on the loaded model too, so that what follows is fitted on its answers."""
    below = getattr(args, "mirror_below", None)
    if below is not None and not args.mirror:
        raise SystemExit("--mirror-below applies with --mirror only")
    if not getattr(args, "mirror", False):
        return loaded.model_args
    if not isinstance(loaded.model, FashionCNN):
        raise SystemExit(f"--mirror: the {loaded.arch} architecture has no mirrored form (the cnn has)")
    model_args = {**loaded.model_args, "mirror": True, "mirror_below": below}
    try:
        loaded.architecture.check(model_args)
    except ValueError as exc:
        raise SystemExit(f"--mirror-below: {exc}") from None
    loaded.model.mirror, loaded.model.mirror_below = True, below
    return model_args


# The thresholds `--mirror-below auto` tries, smallest first.
MIRROR_BELOW_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)


def choose_mirror_below(model: FashionCNN, x: torch.Tensor, labels: torch.Tensor) -> float | None:
    """`--mirror-below auto`: the smallest threshold of `MIRROR_BELOW_GRID` at which the model,
    mirrored only below it, answers the validation images as well as when always mirrored (None:
    always, when none does). Each threshold's accuracy is printed."""
    device = next(model.parameters()).device
    x, labels = x.to(device), labels.to(device)

    def accuracy(below: float | None) -> float:
        model.mirror, model.mirror_below = True, below
        return evaluate(model, x, labels).accuracy

    always = accuracy(None)
    print(f"validation accuracy, mirrored always: {100 * always:.2f}%")
    chosen = None
    for below in MIRROR_BELOW_GRID:
        measured = accuracy(below)
        reaches = measured >= always
        print(f"  mirrored below {below}: {100 * measured:.2f}%{'  <- chosen' if reaches and chosen is None else ''}")
        if reaches and chosen is None:
            chosen = below
    return chosen


def _auto_threshold(
    args: argparse.Namespace, loaded: LoadedModel, x: torch.Tensor, labels: torch.Tensor
) -> float | None:
    """`--mirror-below auto`, once `_mirrored` has refused what cannot be mirrored."""
    if not args.mirror:
        raise SystemExit("--mirror-below applies with --mirror only")
    _mirrored(argparse.Namespace(mirror=True, mirror_below=None), loaded)
    assert isinstance(loaded.model, FashionCNN)
    return choose_mirror_below(loaded.model, x, labels)


def run_calibrate(args: argparse.Namespace, device: torch.device, data: FashionMNIST) -> int:
    loaded = _load(args, device)
    train_idx, val_idx = training_split(loaded, len(data.train.labels))
    if not loaded.training:
        plan = SplitPlan()
        print(f"{args.checkpoint}: no training record; assuming seed {plan.seed}, {plan.val_size} for validation")

    def split(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize_tensor(images, loaded.preprocess).unsqueeze(1), labels

    if getattr(args, "mirror_below", None) == "auto":
        args.mirror_below = _auto_threshold(
            args, loaded, *split(data.train.images[val_idx], data.train.labels[val_idx])
        )
    model_args = _mirrored(args, loaded)

    fit = fit_trust(
        loaded.model,
        split(data.train.images[train_idx], data.train.labels[train_idx]),
        split(data.train.images[val_idx], data.train.labels[val_idx]),
        split(data.test.images, data.test.labels),
        architecture=loaded.architecture,
    )
    metrics = {**loaded.metrics, **fit.metrics}
    confusion = None
    if model_args != loaded.model_args:  # mirrored: it answers otherwise now, so its test figures are measured again
        x, labels = split(data.test.images, data.test.labels)
        result = evaluate(loaded.model, x.to(loaded.device), labels.to(loaded.device))
        metrics |= test_metrics(result, loaded.class_names)
        confusion = result.confusion.tolist()
    out = save_checkpoint(
        args.out or args.checkpoint,
        loaded.model,
        loaded.arch,
        model_args,
        loaded.preprocess,
        loaded.class_names,
        metrics=metrics,
        training=loaded.training,
        calibration=fit.calibration,
        ood=fit.ood,
        created_at=loaded.created_at,
    )
    metrics_json = artifact_paths(out)["metrics"]
    if metrics_json.is_file():
        record = json.loads(metrics_json.read_text())
        record["metrics"] = metrics
        if confusion is not None:
            record["confusion_matrix"] = confusion
        write_json(record, metrics_json)
    print(
        f"temperature {fit.calibration.temperature:.4f}: test ECE {fit.metrics['test_ece_uncalibrated']:.4f} -> "
        f"{fit.metrics['test_ece_calibrated']:.4f}; OOD threshold {fit.ood.threshold:.2f} flags "
        f"{100 * fit.metrics['ood_test_flagged']:.2f}% of test images; wrote {out}"
    )
    return 0


def auroc(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    """P(a positive's score > a negative's), ties counting half: scikit-learn's ROC AUC."""
    labels = torch.cat([torch.zeros(len(negatives)), torch.ones(len(positives))])
    return float(roc_auc_score(labels.numpy(), torch.cat([negatives, positives]).double().numpy()))


@torch.inference_mode()
def _scores(trust: Trust, model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, ...]:
    probs, scores = zip(*(trust(model, b.to(device)) for b in x.split(500)), strict=True)
    assert all(s is not None for s in scores)
    return torch.cat(probs).cpu(), torch.cat([s for s in scores if s is not None]).cpu()


def run_ood_report(args: argparse.Namespace, device: torch.device, data: FashionMNIST) -> int:
    loaded = _load(args, device)
    if loaded.ood is None:
        raise SystemExit(f"{args.checkpoint} has no OOD statistics: run `python -m training calibrate` first")
    # Uncalibrated probabilities here; the calibrated ones are computed from them for the ECE.
    trust = Trust(None, loaded.ood, device, loaded.architecture.output_layer)
    served = for_inference(loaded.model, loaded.architecture)
    threshold = loaded.ood.threshold
    test_x = normalize_tensor(data.test.images, loaded.preprocess).unsqueeze(1)
    test_probs, test_scores = _scores(trust, served, test_x, device)

    def row(kind: str, scores: torch.Tensor, auc: float | None) -> dict[str, Any]:
        return {"kind": kind, "images": len(scores), "auroc": auc, "flagged": flagged_share(scores, threshold)}

    rows = [row("test (garments)", test_scores, None)]
    every = []
    for kind, inputs in ood_inputs(loaded.preprocess, args.per_kind, args.seed).items():
        _, scores = _scores(trust, served, torch.from_numpy(inputs), device)
        every.append(scores)
        rows.append(row(kind, scores, auroc(scores, test_scores)))
    pooled = torch.cat(every)
    rows.append(row("all non-garments", pooled, auroc(pooled, test_scores)))
    labels = data.test.labels
    temperature = loaded.calibration.temperature if loaded.calibration is not None else 1.0
    ece = {
        "uncalibrated": expected_calibration_error(test_probs, labels),
        "calibrated": expected_calibration_error(calibrated(test_probs.log(), temperature), labels),
    }
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "threshold": threshold, "rows": rows, "test_ece": ece}))
        return 0
    print(f"{args.checkpoint} ({loaded.arch}): OOD threshold {threshold:.2f}, {args.per_kind} images per kind")
    print(f"  {'kind':<18} {'images':>6}  {'AUROC':>6}  {'flagged':>7}")
    for line in rows:
        shown = "" if line["auroc"] is None else f"{line['auroc']:.3f}"
        print(f"  {line['kind']:<18} {line['images']:>6}  {shown:>6}  {100 * line['flagged']:6.1f}%")
    print(
        f"test ECE (15 bins): {ece['uncalibrated']:.4f} uncalibrated, "
        f"{ece['calibrated']:.4f} calibrated (T = {temperature:.4f})"
    )
    return 0
