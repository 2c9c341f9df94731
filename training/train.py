"""Training and evaluation loops: Adam, NLLLoss on log-probabilities, per-example averages."""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
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
    """The network as trained (wrapped in DistributedDataParallel under torchrun), Adam and its
    one-cycle learning rate."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    ctx: Distributed

    @classmethod
    def create(cls, model: nn.Module, lr: float, epochs: int, steps: int, ctx: Distributed) -> _Optimization:
        device = next(model.parameters()).device
        net: nn.Module = model
        if ctx.enabled:
            net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, epochs=epochs, steps_per_epoch=steps)
        return cls(net, optimizer, scheduler, device, ctx)

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
            loss = F.nll_loss(self.net(x), y, reduction="sum")
            self.optimizer.zero_grad(set_to_none=True)
            (loss / len(y)).backward()
            self.optimizer.step()
            self.scheduler.step()
            total_loss += loss.item()
            seen += len(y)
        loss_sum, examples = all_sum(torch.tensor([total_loss, seen], dtype=torch.float64), self.ctx).tolist()
        return float(loss_sum / examples)


def fit(
    model: nn.Module,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    max_shift: int | None = None,
    fill: float = 0.0,
    on_epoch: Callable[[EpochResult], Any] | None = None,
    ctx: Distributed = SINGLE,
    shuffle_seed: int = 0,
) -> FitResult:
    """Train with Adam and a one-cycle learning rate; keep the weights of the best validation epoch.

    Best means highest validation accuracy, then lowest validation loss. `max_shift` turns on
    augmentation (see `augment`), with `fill` as the background value of shifted-in pixels.
    One process draws the data order from `generator`. Under torchrun (`ctx`), the model is
    wrapped in DistributedDataParallel, each process trains on its share of an order drawn
    from `shuffle_seed` and the epoch (`batch_size` per process), BatchNorm statistics are
    averaged after each epoch, and losses and accuracies are summed over all processes, so every
    process holds the same weights and records the same history and best epoch.
    """
    steps = steps_per_epoch(len(train_y), batch_size, ctx)
    optimization = _Optimization.create(model, lr, epochs, steps, ctx)
    augmentation = None if max_shift is None else partial(augment, max_shift=max_shift, fill=fill, generator=generator)
    result = FitResult()
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = (
            shard_batches(len(train_y), batch_size, ctx, shuffle_seed, epoch)
            if ctx.enabled
            else batches(len(train_y), batch_size, generator)
        )
        bar = tqdm(
            order,
            total=steps,
            desc=f"epoch {epoch}/{epochs}",
            leave=False,
            disable=not (ctx.is_main and sys.stderr.isatty()),
        )
        train_loss = optimization.train_epoch(bar, train_x, train_y, augmentation)
        average_buffers(model, ctx)
        val = evaluate_across(model, val_x, val_y, ctx)
        record = EpochResult(epoch, train_loss, val.loss, val.accuracy, time.perf_counter() - start)
        result.add(record, model)
        if on_epoch:
            on_epoch(record)
    return result
