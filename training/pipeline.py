"""The `train` and `evaluate` commands: train a classifier and write its checkpoint, or score one.

The argument parser is `training.cli`; each function here takes its parsed arguments."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import ARCHITECTURES, CheckpointError, build_model, load_checkpoint, model_args_for, save_checkpoint
from models.devices import native_bf16, resolve_device
from models.fashion_mnist import FASHION_MNIST_CLASSES
from models.preprocessing import PreprocessConfig, normalize, normalize_tensor
from training import distributed
from training.data import DataNotFoundError, FashionMNIST, load_fashion_mnist
from training.distributed import Distributed
from training.fit_trust import fit_trust
from training.report import artifact_paths, plot_confusion, plot_curves, write_json
from training.split import SplitPlan
from training.train import EpochResult, Evaluation, FitResult, Recipe, Teacher, evaluate, fit, reseed

AUGMENTATIONS: dict[str, int | None] = {"none": None, "flip": 0, "shift": 2}  # -> max_shift

# `train --preset NAME`: the recipe of a bundled checkpoint, so one command rebuilds it from its
# seed (options given on the command line still win).
PRESETS: dict[str, dict[str, Any]] = {
    "fashion-cnn-v1": {"arch": "cnn", "epochs": 15, "augment": "flip", "seed": 0},
    "fashion-cnn-v2": {
        "arch": "cnn",
        "epochs": 60,
        "augment": "shift",
        "erase": 0.5,
        "weight_decay": 0.05,
        "ema": 0.999,
        "lr": 3e-3,
        "batch_size": 256,
        "seed": 0,
    },
}
# The same recipe on a CNN with a third stage.
PRESETS["fashion-cnn-v3"] = {**PRESETS["fashion-cnn-v2"], "channels": [32, 64, 128]}
# The same again, distilled from the bundled fashion-cnn-v3 answering each image and its mirror.
PRESETS["fashion-cnn-v4"] = {
    **PRESETS["fashion-cnn-v3"],
    "teacher": Path(__file__).resolve().parent.parent / "models" / "fashion_cnn_v3.pt",
    "distill_mirror": True,
}
# v3's recipe for 80 epochs instead of 60 (the schedule stretched, nothing else changed).
PRESETS["fashion-cnn-v5"] = {**PRESETS["fashion-cnn-v3"], "epochs": 80}
# v5 with one convolution instead of two at full resolution (a quarter of v5's multiply-adds less).
PRESETS["fashion-cnn-v6"] = {**PRESETS["fashion-cnn-v5"], "depths": [1, 2, 2]}
# A teacher to distill from: v5 at twice the width (about four times its multiply-adds), for 60
# epochs (v3's schedule; the teacher and its student must fit one working session together),
# in bfloat16 autocast where the CPU or GPU has it natively (about twice as fast).
PRESETS["fashion-cnn-teacher"] = {
    **PRESETS["fashion-cnn-v5"],
    "channels": [64, 128, 256],
    "epochs": 60,
    "precision": "auto",
}
# A student at three quarters of v5's width (the first CNN's int8 cost), distilled from that
# teacher answering each image and its mirror: the bundled one, which `--preset fashion-cnn-teacher
# --out models/fashion_cnn_teacher.pt` rebuilds (its hash is recorded in the student).
PRESETS["fashion-cnn-v7"] = {
    **PRESETS["fashion-cnn-v5"],
    "channels": [24, 48, 96],
    "precision": "auto",
    "teacher": Path(__file__).resolve().parent.parent / "models" / "fashion_cnn_teacher.pt",
    "distill_mirror": True,
}


def _model_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    if args.hidden_layers:
        if args.arch != "network":
            raise SystemExit("--hidden-layers applies to --arch network only")
        overrides["hidden_layers"] = args.hidden_layers
    for option in ("channels", "hidden", "depths"):
        if getattr(args, option, None) is not None:
            if args.arch != "cnn":
                raise SystemExit(f"--{option} applies to --arch cnn only")
            overrides[option] = getattr(args, option)
    if args.drop_p is not None:
        overrides["drop_p"] = args.drop_p
    try:
        return model_args_for(args.arch, overrides)
    except ValueError as exc:
        raise SystemExit(f"invalid model arguments: {exc}") from None


def progress_path(out: Path) -> Path:
    """Where `train` keeps the state after each epoch, for `--resume`."""
    return out.with_name(out.name + ".progress")


def device_or_exit(name: str) -> torch.device:
    """The --device option resolved, or a clear exit."""
    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"--device {name}: {exc}") from None


def data_or_exit(args: argparse.Namespace) -> FashionMNIST:
    """Fashion-MNIST where --data-dir (or the usual places) has it, or an exit saying how to get it."""
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


def split_plan(args: argparse.Namespace) -> SplitPlan:
    return SplitPlan(seed=args.seed, val_size=args.val_size, limit=args.limit)


def split_data(data: FashionMNIST, plan: SplitPlan, preprocess: PreprocessConfig, device: torch.device) -> Splits:
    """Training and validation as `plan` splits them (the same examples in every process), and the
    first `plan.limit` test examples (all without a limit)."""
    train_idx, val_idx = plan.indices(len(data.train.labels))
    test_images, test_labels = data.test.images[: plan.limit or None], data.test.labels[: plan.limit or None]

    def inputs(images: torch.Tensor) -> torch.Tensor:
        return normalize_tensor(images, preprocess).unsqueeze(1).to(device)

    return Splits(
        train=(inputs(data.train.images[train_idx]), data.train.labels[train_idx].to(device)),
        val=(inputs(data.train.images[val_idx]), data.train.labels[val_idx].to(device)),
        test=(inputs(test_images), test_labels.to(device)),
    )


def _new_model(args: argparse.Namespace, model_args: dict[str, Any], device: torch.device) -> nn.Module:
    model = build_model(args.arch, model_args, device=device)
    if ARCHITECTURES[args.arch].channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _training_record(
    args: argparse.Namespace,
    splits: Splits,
    duration: float,
    device: torch.device,
    source: str,
    world_size: int,
    precision: str,
    teacher: tuple[Teacher, str] | None = None,
) -> dict[str, Any]:
    """What the checkpoint records of its training (`precision`: as it trained); with `teacher`
    (the teacher and its SHA-256), the distillation as it ran (a resumed run keeps the precisions
    it began with)."""
    return {
        "epochs": args.epochs,
        **split_plan(args).record(),
        "batch_size": args.batch_size,  # per process
        "world_size": world_size,
        "optimizer": "AdamW" if args.weight_decay else "Adam",
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "lr_schedule": "one-cycle",
        "augment": args.augment,
        "erase_p": args.erase,
        "ema_decay": args.ema,
        "precision": precision,
        **(
            {}
            if teacher is None
            else {
                "teacher_sha256": teacher[1],
                "distill_alpha": args.distill_alpha,
                "distill_temperature": args.distill_temperature,
                "distill_mirror": args.distill_mirror,
                "teacher_precision": teacher[0].precision,
            }
        ),
        "preset": args.preset,
        "seed": args.seed,
        "train_examples": len(splits.train[1]),
        "val_examples": len(splits.val[1]),
        "duration_s": round(duration, 1),
        "device": str(device),
        "torch_version": str(torch.__version__),
        "data_source": source,
    }


def _teacher(
    args: argparse.Namespace, preprocess: PreprocessConfig, device: torch.device
) -> tuple[Teacher, str] | None:
    """`--teacher`: the checkpoint to distill from, frozen, and the SHA-256 of the bytes loaded."""
    if args.teacher is None:
        if args.distill_alpha is not None or args.distill_temperature is not None or args.distill_mirror:
            raise SystemExit("--distill-alpha, --distill-temperature and --distill-mirror apply with --teacher only")
        if args.teacher_precision is not None:
            raise SystemExit("--teacher-precision applies with --teacher only")
        return None
    alpha = 0.5 if args.distill_alpha is None else args.distill_alpha
    temperature = 4.0 if args.distill_temperature is None else args.distill_temperature
    if not 0.0 <= alpha <= 1.0 or not temperature > 0:
        raise SystemExit("--distill-alpha must be in [0, 1] and --distill-temperature above 0")
    try:
        data = Path(args.teacher).read_bytes()
        loaded = load_checkpoint(args.teacher, device=device, data=data)
    except (OSError, CheckpointError) as exc:
        raise SystemExit(f"cannot load the teacher: {exc}") from None
    if loaded.preprocess != preprocess or list(loaded.class_names) != list(FASHION_MNIST_CLASSES):
        raise SystemExit(f"the teacher {args.teacher} was trained on other inputs or classes than this model")
    model = loaded.model.eval().requires_grad_(False)
    if loaded.architecture.channels_last:
        model = model.to(memory_format=torch.channels_last)
    args.distill_alpha, args.distill_temperature = alpha, temperature  # recorded with the recipe
    teacher = Teacher(model, alpha, temperature, args.distill_mirror, _precision(args.teacher_precision, device))
    return teacher, hashlib.sha256(data).hexdigest()


def _precision(choice: str | None, device: torch.device) -> str:
    """`auto` (or unset): bf16 where the device has native bfloat16, else fp32."""
    if choice in (None, "auto"):
        return "bf16" if native_bf16(device) else "fp32"
    return choice


def parameters_sha256(model: nn.Module) -> str:
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
    device = device_or_exit(args.device)
    try:
        device = distributed.setup(ctx, device)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    try:
        return _train(args, model_args, device, ctx)
    finally:
        distributed.teardown(ctx)


def _recipe(args: argparse.Namespace, preprocess: PreprocessConfig, device: torch.device) -> Recipe:
    return Recipe(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        max_shift=AUGMENTATIONS[args.augment],
        erase_p=args.erase,
        fill=float(normalize(np.zeros(1), preprocess)[0]),  # the background, for shifted-in and erased pixels
        ema_decay=args.ema,
        precision=_precision(args.precision or "fp32", device),
    )


def _train(args: argparse.Namespace, model_args: dict[str, Any], device: torch.device, ctx: Distributed) -> int:
    data = data_or_exit(args)
    preprocess = PreprocessConfig()
    generator = reseed(args.seed + ctx.rank)  # own dropout and augmentation draws per process
    splits = split_data(data, split_plan(args), preprocess, device)
    model = _new_model(args, model_args, device)
    teacher = _teacher(args, preprocess, device)
    if ctx.is_main:
        where = f"{device} x {ctx.world_size} processes" if ctx.enabled else str(device)
        print(
            f"training {args.arch} {model_args} on {where}: {len(splits.train[1])} train / "
            f"{len(splits.val[1])} validation / {len(splits.test[1])} test examples from {data.source}",
            flush=True,
        )
    recipe = _recipe(args, preprocess, device)
    progress = progress_path(args.out)
    if progress.exists() and not args.resume:
        progress.unlink()
    if args.resume and ctx.is_main:
        print(f"resuming from {progress}" if progress.exists() else f"no {progress} yet: starting", flush=True)
    fit_result = fit(
        model,
        *splits.train,
        *splits.val,
        recipe=recipe,
        generator=generator,
        on_epoch=_print_epoch if ctx.is_main else None,
        ctx=ctx,
        shuffle_seed=args.seed,
        progress=progress,
        teacher=teacher[0] if teacher else None,
    )
    duration = sum(record.seconds for record in fit_result.history)  # across resumed runs
    assert fit_result.best_state is not None
    model.load_state_dict(fit_result.best_state)
    if ctx.enabled:
        # One write: the ranks share torchrun's stdout, and print() writes the newline separately.
        sys.stdout.write(f"rank {ctx.rank}/{ctx.world_size}: parameters sha256 {parameters_sha256(model)}\n")
        sys.stdout.flush()
    if not ctx.is_main:
        return 0
    training = _training_record(
        args, splits, duration, device, data.source, ctx.world_size, fit_result.precision, teacher
    )
    out, paths, test = _evaluate_and_write(args, model, model_args, preprocess, splits, fit_result, training)
    progress.unlink(missing_ok=True)
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
    trust = fit_trust(model, splits.train, splits.val, splits.test, architecture=ARCHITECTURES[args.arch])
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


RECIPE_KEYS = (
    "preset",
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "augment",
    "erase_p",
    "ema_decay",
    "precision",
    "teacher_sha256",
    "distill_alpha",
    "distill_temperature",
    "distill_mirror",
    "teacher_precision",
    "seed",
    "val_size",
    "duration_s",
    "device",
)


def describe_recipe(training: dict[str, Any]) -> str:
    """The recipe, teacher, split and wall time a checkpoint records, in one line."""
    return ", ".join(f"{key} {training[key]}" for key in RECIPE_KEYS if training.get(key) is not None)


def run_evaluate(args: argparse.Namespace) -> int:
    try:
        loaded = load_checkpoint(args.checkpoint, device=device_or_exit(args.device))
    except CheckpointError as exc:
        raise SystemExit(f"cannot load checkpoint: {exc}") from None
    data = data_or_exit(args)
    images, labels = data.test.images, data.test.labels
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    x = normalize_tensor(images, loaded.preprocess).unsqueeze(1).to(loaded.device)
    result = evaluate(loaded.model, x, labels.to(loaded.device))
    metrics = test_metrics(result, loaded.class_names)
    if args.json:
        print(
            json.dumps(
                {**metrics, "confusion_matrix": result.confusion.tolist(), "training": loaded.training}, indent=2
            )
        )
        return 0
    print(f"{args.checkpoint} ({loaded.arch}, {loaded.format} format) on {len(labels)} test images from {data.source}")
    if loaded.training:
        print("trained with: " + describe_recipe(loaded.training))
    print(f"accuracy {100 * result.accuracy:.2f}%   loss {result.loss:.4f}")
    width = max(map(len, loaded.class_names))
    for name, acc in metrics["per_class_accuracy"].items():
        print(f"  {name:<{width}}  {100 * acc:6.2f}%")
    print("confusion matrix (rows: true, columns: predicted):")
    for name, row in zip(loaded.class_names, result.confusion.tolist(), strict=True):
        print(f"  {name:<{width}} " + " ".join(f"{v:5d}" for v in row))
    return 0
