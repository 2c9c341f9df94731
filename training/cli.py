"""`python -m training train|evaluate|calibrate|ood-report|optimize`: the argument parser and nothing else.

Each subcommand names the function that runs it (`set_defaults(run=...)`); the pipelines are
`training.pipeline` (train, evaluate), `training.trust_commands` (calibrate, ood-report) and
`training.optimize` (optimize).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from models import ARCHITECTURES
from training.data import FashionMNIST
from training.optimize import run_optimize
from training.pipeline import AUGMENTATIONS, PRESETS, data_or_exit, device_or_exit, run_evaluate, run_train
from training.split import DEFAULT_SEED, DEFAULT_VAL_SIZE
from training.trust_commands import run_calibrate, run_ood_report


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, help="folder with the four Fashion-MNIST IDX files (.gz or raw)")
    parser.add_argument("--download", action="store_true", help="download with torchvision if not found (internet)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def _with_device_and_data(
    command: Callable[[argparse.Namespace, torch.device, FashionMNIST], int],
) -> Callable[[argparse.Namespace], int]:
    """A trust command, given the device and the data its options name."""
    return lambda args: command(args, device_or_exit(args.device), data_or_exit(args))


def _add_train(commands: argparse._SubParsersAction[argparse.ArgumentParser], preset: str | None) -> None:
    train = commands.add_parser("train", help="train a model and write a checkpoint")
    train.add_argument("--arch", choices=sorted(ARCHITECTURES), default="cnn")
    train.add_argument("--hidden-layers", type=int, nargs="+", help="hidden sizes for --arch network")
    train.add_argument("--channels", type=int, nargs="+", help="--arch cnn: the width of each stage (two or three)")
    train.add_argument("--hidden", type=int, help="--arch cnn: width of its hidden layer")
    train.add_argument(
        "--depths", type=int, nargs="+", help="--arch cnn: convolutions in each stage, one number per stage (1-3)"
    )
    train.add_argument("--drop-p", type=float, help="dropout probability (default: the architecture's)")
    train.add_argument("--epochs", type=int, default=15)
    train.add_argument(
        "--batch-size", type=int, default=256, help="examples per step and process (under torchrun: N x this per step)"
    )
    train.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    train.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's decoupled weight decay (0: Adam)")
    train.add_argument("--ema", type=float, help="validate and keep an exponential moving average of the weights")
    train.add_argument("--erase", type=float, default=0.0, help="share of images with a random rectangle erased")
    train.add_argument("--teacher", type=Path, help="a trained checkpoint to distill from (its answers, softened)")
    train.add_argument("--distill-alpha", type=float, help="--teacher: the weight of its part of the loss (0.5)")
    train.add_argument("--distill-temperature", type=float, help="--teacher: the softening temperature (4)")
    train.add_argument(
        "--distill-mirror", action="store_true", help="--teacher: it answers each image and its mirror, averaged"
    )
    train.add_argument(
        "--teacher-precision",
        choices=("auto", "fp32", "bf16"),
        help="--teacher: its forward passes in bfloat16 autocast or fp32 (auto: bf16 where the device has it natively)",
    )
    train.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        help="forward passes and losses in bfloat16 autocast or fp32 (default fp32; auto: bf16 where native)",
    )
    train.add_argument("--seed", type=int, default=DEFAULT_SEED)
    train.add_argument(
        "--preset", choices=sorted(PRESETS), help="the recipe of a bundled checkpoint (other options override it)"
    )
    train.add_argument("--resume", action="store_true", help="continue from OUT.progress, written after each epoch")
    train.add_argument(
        "--augment",
        choices=AUGMENTATIONS,
        default="none",
        help="none; flip: mirror half the images; shift: also move them up to 2 pixels",
    )
    train.add_argument(
        "--val-size", type=int, default=DEFAULT_VAL_SIZE, help="training examples held out for validation"
    )
    train.add_argument("--limit", type=int, help="use only the first N training and N test examples")
    train.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    train.add_argument("--out", type=Path, default=Path("runs/model.pt"), help="checkpoint path")
    _add_data_options(train)
    train.set_defaults(run=run_train)
    if preset:
        train.set_defaults(**PRESETS[preset])


def _add_evaluate(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    evaluate = commands.add_parser("evaluate", help="accuracy, per-class accuracy and confusion matrix on the test set")
    evaluate.add_argument("checkpoint", type=Path)
    evaluate.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate.add_argument("--limit", type=int, help="use only the first N test examples")
    _add_data_options(evaluate)
    evaluate.set_defaults(run=run_evaluate)


def _threshold(value: str) -> float | str:
    """`--mirror-below`: a number, or `auto`."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor auto") from None


def _add_trust_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    calibrate = commands.add_parser(
        "calibrate", help="fit the temperature and the OOD statistics into a checkpoint (written as format v1)"
    )
    calibrate.add_argument("checkpoint", type=Path)
    calibrate.add_argument("--out", type=Path, help="where to write it (default: over CHECKPOINT)")
    calibrate.add_argument(
        "--mirror",
        action="store_true",
        help="--arch cnn: from now on the model answers each image and its mirror together (fitted so)",
    )
    calibrate.add_argument(
        "--mirror-below",
        type=_threshold,
        metavar="P",
        help="--mirror: only for images whose plain answer's top probability is below P (0 < P <= 1); "
        "auto: the smallest P whose validation accuracy reaches the always-mirrored form's",
    )
    calibrate.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    _add_data_options(calibrate)
    calibrate.set_defaults(run=_with_device_and_data(run_calibrate))

    report = commands.add_parser("ood-report", help="AUROC and share flagged per kind of non-garment image")
    report.add_argument("checkpoint", type=Path)
    report.add_argument("--per-kind", type=int, default=500, help="images of each kind (default 500)")
    report.add_argument("--seed", type=int, default=0)
    report.add_argument("--json", action="store_true", help="print the table as JSON")
    report.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    _add_data_options(report)
    report.set_defaults(run=_with_device_and_data(run_ood_report))

    optimize = commands.add_parser(
        "optimize", help="make the int8 served form (ONNX Runtime), check its quality gates, store it in the checkpoint"
    )
    optimize.add_argument("checkpoint", type=Path)
    optimize.add_argument("--out", type=Path, help="where to write it (default: over CHECKPOINT)")
    optimize.add_argument("--per-kind", type=int, default=500, help="non-garment images of each kind for the OOD gate")
    optimize.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 for ONNX Runtime)")
    optimize.add_argument("--data-dir", type=Path, help="folder with the four Fashion-MNIST IDX files (.gz or raw)")
    optimize.add_argument("--download", action="store_true", help="download with torchvision if not found (internet)")
    optimize.set_defaults(run=lambda args: run_optimize(args, data_or_exit(args)))


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `preset`, that recipe's values are the defaults of `train`."""
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train(commands, preset)
    _add_evaluate(commands)
    _add_trust_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "preset", None):  # parsed again, so an option on the command line still wins
        args = build_parser(args.preset).parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
