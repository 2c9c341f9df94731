"""Training and evaluation loops: Adam(W), NLLLoss on log-probabilities, per-example averages."""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from training.distributed import SINGLE, Distributed, all_sum, average_buffers, shard, shard_batches, steps_per_epoch


def reseed(seed: int) -> torch.Generator:
    """Seed torch (CPU and CUDA), numpy and random; return a generator for data order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    return torch.Generator().manual_seed(seed)


def batches(n: int, batch_size: int, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Index batches over n examples, shuffled when a generator is given; the last may be short."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)


@dataclass
class Evaluation:
    loss: float  # mean NLL per example
    accuracy: float
    confusion: torch.Tensor  # (classes, classes): rows are true labels, columns predictions

    @property
    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(dim=1).clamp(min=1)
        return (self.confusion.diagonal() / totals).tolist()


@torch.inference_mode()
def evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> Evaluation:
    """Loss and accuracy averaged per example (not per batch), in eval mode."""
    if len(labels) == 0:
        raise ValueError("evaluate() needs at least one example")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total_loss = 0.0
    predictions, targets = [], []
    for idx in batches(len(labels), batch_size):
        log_ps = model(inputs[idx].to(device))
        target = labels[idx].to(device)
        total_loss += F.nll_loss(log_ps, target, reduction="sum").item()
        predictions.append(log_ps.argmax(dim=1).cpu())
        targets.append(target.cpu())
    model.train(was_training)
    num_classes = log_ps.shape[1]
    pairs = torch.cat(targets) * num_classes + torch.cat(predictions)
    confusion = torch.bincount(pairs, minlength=num_classes * num_classes).view(num_classes, num_classes)
    n = len(labels)
    return Evaluation(loss=total_loss / n, accuracy=confusion.diagonal().sum().item() / n, confusion=confusion)


def augment(x: torch.Tensor, max_shift: int, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror half of the images and translate each by up to `max_shift` pixels (0: mirror only)."""
    n, size = x.shape[0], x.shape[-1]
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(-1), x)
    if max_shift == 0:
        return x
    padded = F.pad(x, (max_shift,) * 4, value=fill)
    offsets = torch.randint(0, 2 * max_shift + 1, (2, n, 1), generator=generator)
    rows = offsets[0] + torch.arange(size)
    cols = offsets[1] + torch.arange(size)
    return padded[torch.arange(n).view(n, 1, 1), 0, rows[:, :, None], cols[:, None, :]].unsqueeze(1)


def erase(x: torch.Tensor, p: float, fill: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al., 2017): in a share `p` of the images, one rectangle covering 2 to
    40 % of the image, with aspect ratio 0.3 to 3.3, becomes `fill` (the background value)."""
    n, size = x.shape[0], x.shape[-1]
    area = size * size * (0.02 + 0.38 * torch.rand(n, generator=generator))
    log_ratio = (torch.rand(n, generator=generator) * 2 - 1) * float(np.log(1 / 0.3))
    h = (area * log_ratio.exp()).sqrt().round().clamp(1, size).long()
    w = (area / log_ratio.exp()).sqrt().round().clamp(1, size).long()
    top = (torch.rand(n, generator=generator) * (size - h + 1)).long()
    left = (torch.rand(n, generator=generator) * (size - w + 1)).long()
    rows, cols = torch.arange(size).view(1, size, 1), torch.arange(size).view(1, 1, size)
    box = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + h).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + w).view(n, 1, 1))
    )
    chosen = (torch.rand(n, generator=generator) < p).view(n, 1, 1)
    return x.masked_fill((box & chosen).unsqueeze(1).to(x.device), fill)


def evaluate_across(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, ctx: Distributed) -> Evaluation:
    """`evaluate` with the examples shared out among the processes and the sums reduced: every
    process gets the figures of the whole set."""
    if not ctx.enabled:
        return evaluate(model, inputs, labels)
    idx = shard(len(labels), ctx)
    local = evaluate(model, inputs[idx], labels[idx])
    loss_sum = all_sum(torch.tensor([local.loss * len(idx)], dtype=torch.float64), ctx).item()
    confusion = all_sum(local.confusion, ctx)
    n = len(labels)
    return Evaluation(loss=loss_sum / n, accuracy=confusion.diagonal().sum().item() / n, confusion=confusion)


@dataclass
class EpochResult:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    seconds: float


@dataclass
class FitResult:
    history: list[EpochResult] = field(default_factory=list)
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    precision: str = "fp32"  # as the run trained (a resumed run keeps the precision it began with)

    def add(self, record: EpochResult, model: nn.Module) -> None:
        """Record an epoch; keep the model's weights when it is the best so far: highest validation
        accuracy, then lowest validation loss."""
        if self.best_epoch == 0 or _rank(record) > _rank(self.history[self.best_epoch - 1]):
            self.best_epoch = record.epoch
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.history.append(record)


def _rank(record: EpochResult) -> tuple[float, float]:
    return record.val_accuracy, -record.val_loss


@dataclass
class _Optimization:
    """The network as trained (wrapped in DistributedDataParallel under torchrun), AdamW and its
    one-cycle learning rate, and the exponential moving average of the weights when asked for."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    ctx: Distributed
    ema: AveragedModel | None = None
    teacher: Teacher | None = None
    precision: str = "fp32"

    @classmethod
    def create(
        cls, model: nn.Module, recipe: Recipe, steps: int, ctx: Distributed, teacher: Teacher | None = None
    ) -> _Optimization:
        device = next(model.parameters()).device
        net: nn.Module = model
        if ctx.enabled:
            net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=recipe.lr, epochs=recipe.epochs, steps_per_epoch=steps
        )
        ema = None
        if recipe.ema_decay is not None:
            ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(recipe.ema_decay), use_buffers=True)
        return cls(net, optimizer, scheduler, device, ctx, ema, teacher, recipe.precision)

    @property
    def evaluated(self) -> nn.Module:
        """The weights validation scores and the checkpoint keeps: the average when there is one."""
        return self.net if self.ema is None else self.ema.module

    def state_dict(self) -> dict[str, Any]:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        return state if self.ema is None else {**state, "ema": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])

    def train_epoch(
        self,
        order: Iterable[torch.Tensor],
        train_x: torch.Tensor,
        train_y: torch.Tensor,
        augmentation: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> float:
        """One step per index batch of `order`; the training loss per example, over all processes."""
        self.net.train()
        total_loss, seen = 0.0, 0
        for idx in order:
            x = train_x[idx] if augmentation is None else augmentation(train_x[idx])
            x, y = x.to(self.device, non_blocking=True), train_y[idx].to(self.device, non_blocking=True)
            with _autocast(self.device, self.precision):
                log_ps = self.net(x)
                loss = F.nll_loss(log_ps.float(), y, reduction="sum")
                if self.teacher is not None:
                    loss = self.teacher.blend(loss, log_ps.float(), x)
            self.optimizer.zero_grad(set_to_none=True)
            (loss / len(y)).backward()
            self.optimizer.step()
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(_unwrapped(self.net))
            total_loss += loss.item()
            seen += len(y)
        loss_sum, examples = all_sum(torch.tensor([total_loss, seen], dtype=torch.float64), self.ctx).tolist()
        return float(loss_sum / examples)


@dataclass
class Teacher:
    """Knowledge distillation (Hinton et al. 2015): a trained model whose softened answers the
    student also learns, on the same augmented batches. The loss is (1 - alpha) x the labels'
    loss + alpha x T^2 x KL(teacher || student), both distributions softened by temperature T."""

    model: nn.Module  # eval mode, on the student's device; its weights are never updated
    alpha: float = 0.5
    temperature: float = 4.0
    mirror: bool = False  # the teacher answers each image and its mirror image, averaged
    # "bf16": the teacher's forward passes under bfloat16 autocast (the student trains in fp32):
    # on a device with native bfloat16 several times faster, and its softened answers the same to
    # within rounding (tests/training/test_training.py)
    precision: str = "fp32"

    def answer(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's softened answers to `x`, as log-probabilities."""
        with torch.no_grad(), _autocast(x.device, self.precision):
            target = F.log_softmax(self.model(x).float() / self.temperature, dim=1)
            if self.mirror:  # the mean of the two softened distributions, as log-probabilities
                mirrored = F.log_softmax(self.model(x.flip(-1)).float() / self.temperature, dim=1)
                target = torch.logaddexp(target, mirrored) - math.log(2)
        return target

    def blend(self, label_loss: torch.Tensor, log_ps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The batch's loss (summed over examples, as `label_loss` is) with the teacher's part."""
        target = self.answer(x)
        student = F.log_softmax(log_ps / self.temperature, dim=1)  # log-probabilities / T: logits / T
        soft = F.kl_div(student, target, log_target=True, reduction="sum") * self.temperature**2
        return (1 - self.alpha) * label_loss + self.alpha * soft


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bfloat16 autocast for "bf16" (matrix products and convolutions in bfloat16, the weights
    and the losses in fp32), nothing for "fp32"."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Recipe:
    """How to train: the schedule, the regularization and the augmentation."""

    epochs: int
    batch_size: int
    lr: float  # the one-cycle schedule's peak
    weight_decay: float = 0.0  # AdamW's decoupled decay (0: plain Adam)
    max_shift: int | None = None  # None: no augmentation; 0: mirror only; N: also shift up to N pixels
    erase_p: float = 0.0  # share of training images with one random rectangle erased
    fill: float = 0.0  # the background value, for shifted-in and erased pixels
    ema_decay: float | None = None  # keep and evaluate an exponential moving average of the weights
    # "bf16": forward passes and losses under bfloat16 autocast, the weights and their updates
    # in fp32: on a CPU with native bfloat16 about twice as fast (docs/trust.md)
    precision: str = "fp32"

    def augmentation(self, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if self.max_shift is None and self.erase_p == 0:
            return None

        def apply(x: torch.Tensor) -> torch.Tensor:
            if self.max_shift is not None:
                x = augment(x, self.max_shift, self.fill, generator)
            return erase(x, self.erase_p, self.fill, generator) if self.erase_p else x

        return apply


def _save_progress(
    path: Path, epoch: int, model: nn.Module, optimization: _Optimization, result: FitResult, generator: torch.Generator
) -> None:
    """Everything `fit` needs to continue after `epoch`, written atomically."""
    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "optimization": optimization.state_dict(),
        "history": [vars(r) for r in result.history],
        "best_epoch": result.best_epoch,
        "best_state": result.best_state,
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),  # dropout's draws
        "teacher_precision": None if optimization.teacher is None else optimization.teacher.precision,
        "precision": optimization.precision,
    }
    tmp = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_progress(
    path: Path, model: nn.Module, optimization: _Optimization, result: FitResult, generator: torch.Generator
) -> int:
    """Restore what `_save_progress` wrote; the last finished epoch."""
    state = torch.load(path, map_location=optimization.device, weights_only=True)
    model.load_state_dict(state["model"])
    optimization.load_state_dict(state["optimization"])
    result.history = [EpochResult(**r) for r in state["history"]]
    result.best_epoch, result.best_state = state["best_epoch"], state["best_state"]
    generator.set_state(state["generator"].cpu())
    torch.set_rng_state(state["torch_rng"].cpu())
    if optimization.teacher is not None and state.get("teacher_precision"):
        optimization.teacher.precision = state["teacher_precision"]  # as the run began, wherever it resumes
    optimization.precision = state.get("precision", "fp32")  # the same; files from before it: fp32
    return int(state["epoch"])


def fit(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    recipe: Recipe,
    generator: torch.Generator,
    on_epoch: Callable[[EpochResult], Any] | None = None,
    ctx: Distributed = SINGLE,
    shuffle_seed: int = 0,
    progress: Path | None = None,
    teacher: Teacher | None = None,
) -> FitResult:
    """Train with AdamW and a one-cycle learning rate; keep the weights of the best validation epoch.

    Best means highest validation accuracy, then lowest validation loss; with `recipe.ema_decay`
    the averaged weights are the ones validated and kept. One process draws the data order and
    the augmentation from `generator`. Under torchrun (`ctx`), the model is wrapped in
    DistributedDataParallel, each process trains on its share of an order drawn from
    `shuffle_seed` and the epoch (`batch_size` per process), BatchNorm statistics are averaged
    after each epoch, and losses and accuracies are summed over all processes, so every process
    holds the same weights and records the same history and best epoch.

    With `teacher`, the student also learns the teacher's softened answers (`Teacher`); the
    training loss reported is then the blended one.

    With `progress`, the state after each epoch is written there (by the main process) and, when
    the file exists at the start, training continues after its last epoch: a run stopped at any
    point resumes and, in one process, ends with the weights an uninterrupted run would have.
    """
    steps = steps_per_epoch(len(train_y), recipe.batch_size, ctx)
    optimization = _Optimization.create(model, recipe, steps, ctx, teacher)
    augmentation = recipe.augmentation(generator)
    result = FitResult()
    done = 0
    if progress is not None and progress.exists():
        done = _load_progress(progress, model, optimization, result, generator)
    for epoch in range(done + 1, recipe.epochs + 1):
        start = time.perf_counter()
        order = (
            shard_batches(len(train_y), recipe.batch_size, ctx, shuffle_seed, epoch)
            if ctx.enabled
            else batches(len(train_y), recipe.batch_size, generator)
        )
        bar = tqdm(
            order,
            total=steps,
            desc=f"epoch {epoch}/{recipe.epochs}",
            leave=False,
            disable=not (ctx.is_main and sys.stderr.isatty()),
        )
        train_loss = optimization.train_epoch(bar, train_x, train_y, augmentation)
        average_buffers(model, ctx)
        val = evaluate_across(optimization.evaluated, val_x, val_y, ctx)
        record = EpochResult(epoch, train_loss, val.loss, val.accuracy, time.perf_counter() - start)
        result.add(record, _unwrapped(optimization.evaluated))
        if progress is not None and ctx.is_main:
            _save_progress(progress, epoch, model, optimization, result, generator)
        if on_epoch:
            on_epoch(record)
    result.precision = optimization.precision
    return result


def _unwrapped(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, DistributedDataParallel) else net
