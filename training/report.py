"""What a training run leaves next to its checkpoint: curves, confusion matrix, metrics JSON."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from training.train import EpochResult


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed over `path` when the block succeeds, so a
    reader never sees a half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_curves(history: Sequence[EpochResult], path: Path) -> None:
    epochs = [r.epoch for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r.train_loss for r in history], marker="o", label="training loss")
    ax_loss.plot(epochs, [r.val_loss for r in history], marker="o", label="validation loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("NLL per example")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * r.val_accuracy for r in history], marker="o", color="tab:green")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("validation accuracy (%)")
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip("."))
    plt.close(fig)


def plot_confusion(confusion: torch.Tensor, class_names: Sequence[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 7))
    ax.imshow(confusion.numpy(), cmap="Blues")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, class_names, rotation=45, ha="right")
    ax.set_yticks(ticks, class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = confusion.max().item() / 2
    for i in ticks:
        for j in ticks:
            value = confusion[i, j].item()
            ax.text(
                j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value > threshold else "black"
            )
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix.lstrip("."))
    plt.close(fig)


def write_json(data: Mapping[str, Any], path: Path) -> None:
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def artifact_paths(checkpoint: Path) -> dict[str, Path]:
    stem = checkpoint.with_suffix("")
    return {
        "curves": stem.with_name(stem.name + ".curves.png"),
        "confusion": stem.with_name(stem.name + ".confusion.png"),
        "metrics": stem.with_name(stem.name + ".metrics.json"),
    }
