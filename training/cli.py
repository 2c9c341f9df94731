"""`python -m training train|evaluate`: train a classifier and write its checkpoint, or score one."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import ARCHITECTURES, CheckpointError, build_model, load_checkpoint, model_args_for, save_checkpoint
from models.devices import resolve_device
from models.fashion_mnist import FASHION_MNIST_CLASSES
from models.preprocessing import PreprocessConfig, normalize, normalize_tensor
from training import distributed
from training.data import DataNotFoundError, FashionMNIST, load_fashion_mnist
from training.distributed import Distributed
from training.fit_trust import fit_trust
from training.report import artifact_paths, plot_confusion, plot_curves, write_json
from training.train import EpochResult, Evaluation, FitResult, evaluate, fit, reseed
from training.trust_commands import add_commands as add_trust_commands
from training.trust_commands import run_calibrate, run_ood_report

AUGMENTATIONS: dict[str, int | None] = {"none": None, "flip": 0, "shift": 2}  # -> max_shift


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="folder with the four Fashion-MNIST IDX files (.gz or raw)")
    parser.add_argument("--download", action="store_true", help="download with torchvision if not found (internet)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model and write a checkpoint")
    train.add_argument("--arch", choices=sorted(ARCHITECTURES), default="cnn")
    train.add_argument("--hidden-layers", type=int, nargs="+", help="hidden sizes for --arch network")
    train.add_argument("--drop-p", type=float, help="dropout probability (default: the architecture's)")
    train.add_argument("--epochs", type=int, default=15)
    train.add_argument(
        "--batch-size", type=int, default=256, help="examples per step and process (under torchrun: N x this per step)"
    )
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default="none",
        help="none; flip: mirror half the images; shift: also move them up to 2 pixels",
    )
    train.add_argument("--val-size", type=int, default=5000, help="training examples held out for validation")
    train.add_argument("--limit", type=int, help="use only the first N training and N test examples")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    train.add_argument("--out", type=Path, default=Path("runs/model.pt"), help="checkpoint path")
    _add_data_options(train)

    ev = commands.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix on the test set")
    ev.add_argument("checkpoint", type=Path)
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--limit", type=int, help="use only the first N test examples")
    _add_data_options(ev)
    add_trust_commands(commands, _add_data_options)
    return parser


def _model_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.hidden_layers:
        if args.arch != "network":
            raise SystemExit("--hidden-layers applies to --arch network only")
        overrides["hidden_layers"] = args.hidden_layers
    if args.drop_p is not None:
        overrides["drop_p"] = args.drop_p
    try:
        return model_args_for(args.arch, overrides)
    except ValueError as exc:
        raise SystemExit(f"invalid model arguments: {exc}") from None


def _device(name: str) -> torch.device:
    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"--device {name}: {exc}") from None


def _load_data(args: argparse.Namespace) -> FashionMNIST:
    try:
        return load_fashion_mnist(args.data_dir, download=args.download)
    except DataNotFoundError as exc:
        raise SystemExit(str(exc)) from None


def test_metrics(result: Evaluation, class_names: tuple[str, ...] | list[str]) -> dict[str, Any]:
    return {
        "test_accuracy": round(result.accuracy, 6),
        "test_loss": round(result.loss, 6),
        "per_class_accuracy": {
            name: round(a, 6) for name, a in zip(class_names, result.per_class_accuracy, strict=True)
        },
    }


def _print_epoch(record: EpochResult) -> None:
    print(
        f"epoch {record.epoch:3d}  train loss {record.train_loss:.4f}  val loss {record.val_loss:.4f}  "
        f"val accuracy {100 * record.val_accuracy:.2f}%  ({record.seconds:.1f} s)",
        flush=True,
    )


@dataclass(frozen=True)
class Splits:
    """Normalized (N, 1, 28, 28) inputs and labels on the training device."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]


def _split(args: argparse.Namespace, data: FashionMNIST, preprocess: PreprocessConfig, device: torch.device) -> Splits:
    """The first --limit examples; --val-size of the training set (at most a fifth) held out, the
    same examples in every process."""
    train_images, train_labels = data.train.images, data.train.labels
    test_images, test_labels = data.test.images, data.test.labels
    if args.limit:
        train_images, train_labels = train_images[: args.limit], train_labels[: args.limit]
        test_images, test_labels = test_images[: args.limit], test_labels[: args.limit]
    val_size = min(args.val_size, len(train_labels) // 5)
    split = torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(args.seed))
    val_idx, train_idx = split[:val_size], split[val_size:]

    def inputs(images: torch.Tensor) -> torch.Tensor:
        return normalize_tensor(images, preprocess).unsqueeze(1).to(device)

    return Splits(
        train=(inputs(train_images[train_idx]), train_labels[train_idx].to(device)),
        val=(inputs(train_images[val_idx]), train_labels[val_idx].to(device)),
        test=(inputs(test_images), test_labels.to(device)),
    )


def _new_model(args: argparse.Namespace, model_args: dict[str, Any], device: torch.device) -> nn.Module:
    model = build_model(args.arch, model_args, device=device)
    if args.arch == "cnn":
        model = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU
    return model


def _training_record(
    args: argparse.Namespace, splits: Splits, duration: float, device: torch.device, source: str, world_size: int
) -> dict[str, Any]:
    return {
        "epochs": args.epochs,
        "seed": args.seed,
        "batch_size": args.batch_size,  # per process
        "world_size": world_size,
        "optimizer": "Adam",
        "lr": args.lr,
        "lr_schedule": "one-cycle",
        "augment": args.augment,
        "train_examples": len(splits.train[1]),
        "val_examples": len(splits.val[1]),
        "duration_s": round(duration, 1),
        "device": str(device),
        "torch_version": str(torch.__version__),
        "data_source": source,
    }


def _parameters_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run_train(args: argparse.Namespace) -> int:
    """Train one model; under torchrun, data-parallel with rank 0 alone evaluating and writing files."""
    ctx = distributed.from_environment()
    if args.threads:
        torch.set_num_threads(args.threads)
    model_args = _model_args(args)
    device = _device(args.device)
    try:
        device = distributed.setup(ctx, device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    try:
        return _train(args, model_args, device, ctx)
    finally:
        distributed.teardown(ctx)


def _train(args: argparse.Namespace, model_args: dict[str, Any], device: torch.device, ctx: Distributed) -> int:
    data = _load_data(args)
    preprocess = PreprocessConfig()
    generator = reseed(args.seed + ctx.rank)  # own dropout and augmentation draws per process
    splits = _split(args, data, preprocess, device)
    model = _new_model(args, model_args, device)
    if ctx.is_main:
        where = f"{device} x {ctx.world_size} processes" if ctx.enabled else str(device)
        print(
            f"training {args.arch} {model_args} on {where}: {len(splits.train[1])} train / "
            f"{len(splits.val[1])} validation / {len(splits.test[1])} test examples from {data.source}",
            flush=True,
        )
    start = time.perf_counter()
    fit_result = fit(
        model,
        *splits.train,
        *splits.val,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        generator=generator,
        max_shift=AUGMENTATIONS[args.augment],
        fill=float(normalize(np.zeros(1), preprocess)[0]),
        on_epoch=_print_epoch if ctx.is_main else None,
        ctx=ctx,
        shuffle_seed=args.seed,
    )
    duration = time.perf_counter() - start
    assert fit_result.best_state is not None
    model.load_state_dict(fit_result.best_state)
    if ctx.enabled:
        # One write: the ranks share torchrun's stdout, and print() writes the newline separately.
        sys.stdout.write(f"rank {ctx.rank}/{ctx.world_size}: parameters sha256 {_parameters_sha256(model)}\n")
        sys.stdout.flush()
    if not ctx.is_main:
        return 0
    training = _training_record(args, splits, duration, device, data.source, ctx.world_size)
    out, paths, test = _evaluate_and_write(args, model, model_args, preprocess, splits, fit_result, training)
    print(
        f"best epoch {fit_result.best_epoch}: test accuracy {100 * test.accuracy:.2f}%, test loss {test.loss:.4f}; "
        f"trained in {duration:.0f} s; wrote {out}, {', '.join(str(p) for p in paths.values())}"
    )
    return 0


def _evaluate_and_write(
    args: argparse.Namespace,
    model: nn.Module,
    model_args: dict[str, Any],
    preprocess: PreprocessConfig,
    splits: Splits,
    fit_result: FitResult,
    training: dict[str, Any],
) -> tuple[Path, dict[str, Path], Evaluation]:
    """Score the best weights on the test set, fit the trust records, write the checkpoint and its
    curves, confusion matrix and metrics (each atomically)."""
    test = evaluate(model, *splits.test)
    trust = fit_trust(model, splits.train, splits.val, splits.test)
    best = fit_result.history[fit_result.best_epoch - 1]
    metrics = {
        **test_metrics(test, FASHION_MNIST_CLASSES),
        "best_epoch": fit_result.best_epoch,
        "val_accuracy": round(best.val_accuracy, 6),
        "val_loss": round(best.val_loss, 6),
        **trust.metrics,
    }
    model = model.to(memory_format=torch.contiguous_format)
    out = save_checkpoint(
        args.out,
        model,
        args.arch,
        model_args,
        preprocess,
        metrics=metrics,
        training=training,
        calibration=trust.calibration,
        ood=trust.ood,
    )
    paths = artifact_paths(out)
    plot_curves(fit_result.history, paths["curves"])
    plot_confusion(test.confusion, FASHION_MNIST_CLASSES, paths["confusion"])
    write_json(
        {
            "checkpoint": str(out),
            "arch": args.arch,
            "model_args": model_args,
            "metrics": metrics,
            "training": training,
            "history": [vars(r) for r in fit_result.history],
            "confusion_matrix": test.confusion.tolist(),
        },
        paths["metrics"],
    )
    return out, paths, test


def run_evaluate(args: argparse.Namespace) -> int:
    try:
        loaded = load_checkpoint(args.checkpoint, device=_device(args.device))
    except CheckpointError as exc:
        raise SystemExit(f"cannot load checkpoint: {exc}") from None
    data = _load_data(args)
    images, labels = data.test.images, data.test.labels
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    x = normalize_tensor(images, loaded.preprocess).unsqueeze(1).to(loaded.device)
    result = evaluate(loaded.model, x, labels.to(loaded.device))
    metrics = test_metrics(result, loaded.class_names)
    if args.json:
        print(json.dumps({**metrics, "confusion_matrix": result.confusion.tolist()}, indent=2))
        return 0
    print(f"{args.checkpoint} ({loaded.arch}, {loaded.format} format) on {len(labels)} test images from {data.source}")
    print(f"accuracy {100 * result.accuracy:.2f}%   loss {result.loss:.4f}")
    width = max(map(len, loaded.class_names))
    for name, acc in metrics["per_class_accuracy"].items():
        print(f"  {name:<{width}}  {100 * acc:6.2f}%")
    print("confusion matrix (rows: true, columns: predicted):")
    for name, row in zip(loaded.class_names, result.confusion.tolist(), strict=True):
        print(f"  {name:<{width}} " + " ".join(f"{v:5d}" for v in row))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("calibrate", "ood-report"):
        run = run_calibrate if args.command == "calibrate" else run_ood_report
        return run(args, _device(args.device), _load_data(args))
    return run_train(args) if args.command == "train" else run_evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
