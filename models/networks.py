"""The classifiers: the course's two networks, module for module, and the default CNN.

Every model takes a batch shaped (N, 1, 28, 28) (the MLPs flatten it) and returns
log-probabilities, so `exp()` of the output sums to one per row.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import fuse_conv_bn_eval


class Network(nn.Module):
    """The course's `fc_model.Network`: Linear+ReLU+dropout stacks, then a Linear output."""

    def __init__(self, input_size: int, output_size: int, hidden_layers: Sequence[int], drop_p: float = 0.5) -> None:
        super().__init__()
        sizes = [input_size, *hidden_layers]
        self.hidden_layers = nn.ModuleList(nn.Linear(n_in, n_out) for n_in, n_out in itertools.pairwise(sizes))
        self.output = nn.Linear(sizes[-1], output_size)
        self.dropout = nn.Dropout(p=drop_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        for linear in self.hidden_layers:
            x = self.dropout(F.relu(linear(x)))
        return F.log_softmax(self.output(x), dim=1)


class Classifier(nn.Module):
    """The course's Fashion-MNIST `Classifier`: 784-256-128-64-10 with dropout."""

    def __init__(self, drop_p: float = 0.2) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 256)
        self.fc2 = nn.Linear(256, 128)
        self.fc3 = nn.Linear(128, 64)
        self.fc4 = nn.Linear(64, 10)
        self.dropout = nn.Dropout(p=drop_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], -1)
        x = self.dropout(F.relu(self.fc1(x)))
        x = self.dropout(F.relu(self.fc2(x)))
        x = self.dropout(F.relu(self.fc3(x)))
        return F.log_softmax(self.fc4(x), dim=1)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class FashionCNN(nn.Module):
    """The default model: conv stages (each two 3x3 convs, then 2x2 max-pool) and a small head.

    `channels` names one width per stage: two stages, (32, 64), is the first bundled CNN; a
    third stage works on the 7x7 maps (floored to 3x3 by its pool). `depths`: how many convs
    each stage has before its pool (two each when None); one convolution in the first stage
    saves the costliest convolution of the network, the one at full 28x28 resolution. `mirror`: it answers each
    image and its mirror image (flipped left to right) together, their penultimate features
    averaged (so their logits too, and the OOD score reads the averaged features): twice the
    convolutions, for the accuracy of test-time mirroring (docs/trust.md). `mirror_below`, with
    `mirror`: only the images whose plain answer's top probability is below it are answered
    again mirrored, so the second pass costs only where the first one was in doubt.
    """

    def __init__(
        self,
        channels: Sequence[int] = (32, 64),
        hidden: int = 128,
        num_classes: int = 10,
        drop_p: float = 0.3,
        mirror: bool = False,
        mirror_below: float | None = None,
        depths: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.mirror = mirror
        self.mirror_below = mirror_below
        layers: list[nn.Module] = []
        side, c_in = 28, 1
        for width, depth in zip(channels, depths or [2] * len(channels), strict=True):
            layers += [_conv_block(c_in if i == 0 else width, width) for i in range(depth)]
            layers.append(nn.MaxPool2d(2))
            side, c_in = side // 2, width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(drop_p),
            nn.Linear(c_in * side * side, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(drop_p),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 28, 28)
        if not self.mirror:
            return F.log_softmax(self.head(self.features(x)), dim=1)
        if self.mirror_below is None:
            n = x.shape[0]
            hidden = self.head[:-1](self.features(torch.cat([x, x.flip(-1)])))
            return F.log_softmax(self.head[-1]((hidden[:n] + hidden[n:]) / 2), dim=1)
        hidden = self.head[:-1](self.features(x))
        if x.is_meta:  # shapes only (the checkpoint loader's probe): no values to be in doubt about
            return F.log_softmax(self.head[-1](hidden), dim=1)
        doubt = (self.head[-1](hidden).softmax(dim=1).amax(dim=1) < self.mirror_below).nonzero().squeeze(1)
        mirrored = self.head[:-1](self.features(x.index_select(0, doubt).flip(-1)))
        hidden = hidden.index_add(0, doubt, (mirrored - hidden.index_select(0, doubt)) / 2)
        return F.log_softmax(self.head[-1](hidden), dim=1)


def last_linear(model: nn.Module) -> nn.Linear:
    """The model's last nn.Linear: the output layer of every architecture in the registry."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear output layer")
    return linears[-1]


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    """A Conv2d feeding a BatchNorm2d that has running statistics, neither with hooks."""
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(norm, nn.BatchNorm2d)
        and norm.running_mean is not None
        and norm.running_var is not None
        and not any(m._forward_hooks or m._forward_pre_hooks for m in (conv, norm))
    )


def fold_batchnorm(model: nn.Module) -> None:
    """In place, on an eval-mode model: each Conv2d followed by a BatchNorm2d in a Sequential becomes
    one convolution with the normalization folded into its weights (the BatchNorm an Identity).
    Correct only where the convolution's output goes to that BatchNorm alone, which is what an
    architecture declares with `fold_batchnorm=True`."""
    pairs = [
        (block, i)
        for block in model.modules()
        if isinstance(block, nn.Sequential)
        for i in range(len(block) - 1)
        if _foldable(block[i], block[i + 1])
    ]
    for block, i in pairs:
        block[i] = fuse_conv_bn_eval(cast(nn.Conv2d, block[i]), cast(nn.BatchNorm2d, block[i + 1]))
        block[i + 1] = nn.Identity()


# Bounds on declared sizes: a checkpoint's arguments are checked against these before
# anything is built, so a hostile or corrupt file cannot ask for a huge allocation.
MAX_WIDTH = 16_384
MAX_DEPTH = 16
MAX_CLASSES = 1_000


@dataclass(frozen=True)
class Architecture:
    """How to build one architecture from the primitive arguments a checkpoint stores, and what
    the rest of the code must know about it: declared here, never inferred from its name."""

    build: Callable[..., nn.Module]
    defaults: Mapping[str, Any]
    check: Callable[[Mapping[str, Any]], None]
    # One input example, (channels, height, width): what load_checkpoint probes the model with.
    input_shape: tuple[int, int, int] = (1, 28, 28)
    # The output layer; its input is the penultimate features the OOD statistics describe.
    output_layer: Callable[[nn.Module], nn.Linear] = last_linear
    # Train and serve in the channels-last memory format (oneDNN's CPU convolutions prefer it).
    channels_last: bool = False
    # Every Conv2d followed by a BatchNorm2d in a Sequential feeds only that BatchNorm (see fold_batchnorm).
    fold_batchnorm: bool = False


def _int_in(args: Mapping[str, Any], key: str, low: int, high: int) -> None:
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key} must be an integer in [{low}, {high}], got {value!r}")


def _int_list(args: Mapping[str, Any], key: str, length: tuple[int, int]) -> None:
    values = args[key]
    if not isinstance(values, list | tuple) or not length[0] <= len(values) <= length[1]:
        raise ValueError(f"{key} must be a list of {length[0]} to {length[1]} integers, got {values!r}")
    for i in range(len(values)):
        _int_in({f"{key}[{i}]": values[i]}, f"{key}[{i}]", 1, MAX_WIDTH)


def _probability(args: Mapping[str, Any], key: str) -> None:
    value = args[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ValueError(f"{key} must be a number in [0, 1), got {value!r}")


def _check_network(args: Mapping[str, Any]) -> None:
    _int_in(args, "input_size", 28 * 28, 28 * 28)  # its input_shape, flattened
    _int_in(args, "output_size", 2, MAX_CLASSES)
    _int_list(args, "hidden_layers", (1, MAX_DEPTH))
    _probability(args, "drop_p")


def _check_classifier(args: Mapping[str, Any]) -> None:
    _probability(args, "drop_p")


def _check_cnn(args: Mapping[str, Any]) -> None:
    _int_list(args, "channels", (2, 3))
    _int_in(args, "hidden", 1, MAX_WIDTH)
    _int_in(args, "num_classes", 2, MAX_CLASSES)
    _probability(args, "drop_p")
    if not isinstance(args["mirror"], bool):
        raise ValueError(f"mirror must be true or false, got {args['mirror']!r}")
    below = args["mirror_below"]
    if below is not None and (isinstance(below, bool) or not isinstance(below, int | float) or not 0 < below <= 1):
        raise ValueError(f"mirror_below must be a number in (0, 1] or null, got {below!r}")
    if below is not None and not args["mirror"]:
        raise ValueError("mirror_below applies with mirror only")
    if args["depths"] is not None:
        _int_list(args, "depths", (len(args["channels"]), len(args["channels"])))
        if max(args["depths"]) > 3:
            raise ValueError(f"depths must be 1 to 3 convolutions per stage, got {args['depths']!r}")


ARCHITECTURES: dict[str, Architecture] = {
    "network": Architecture(
        Network,
        {"input_size": 784, "output_size": 10, "hidden_layers": [512, 256, 128], "drop_p": 0.5},
        _check_network,
    ),
    "classifier": Architecture(Classifier, {"drop_p": 0.2}, _check_classifier),
    "cnn": Architecture(
        FashionCNN,
        {
            "channels": [32, 64],
            "hidden": 128,
            "num_classes": 10,
            "drop_p": 0.3,
            "mirror": False,
            "mirror_below": None,
            "depths": None,
        },
        _check_cnn,
        channels_last=True,
        fold_batchnorm=True,
    ),
}


def for_inference(model: nn.Module, architecture: Architecture) -> nn.Module:
    """The model as served: an eval-mode copy, with BatchNorm folded into the convolutions and in
    the channels-last memory format where the architecture declares them. Outputs equal the
    original's to float rounding. Always a copy: the original (and its state_dict) stays as the
    checkpoint has it, and code that runs the original (saliency's gradients) never shares a
    module, or its forward hooks, with the inference thread.
    """
    served = copy.deepcopy(model).eval()
    if architecture.fold_batchnorm:
        fold_batchnorm(served)
    if architecture.channels_last:
        served = served.to(memory_format=torch.channels_last)
    return served


def model_args_for(arch: str, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full, checked argument dict for `arch`: its defaults updated with `overrides`."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    spec = ARCHITECTURES[arch]
    unknown = set(overrides or {}) - set(spec.defaults)
    if unknown:
        raise ValueError(f"unexpected arguments for {arch!r}: {', '.join(sorted(unknown))}")
    args = {**spec.defaults, **(overrides or {})}
    spec.check(args)
    return args


def build_model(arch: str, model_args: Mapping[str, Any], device: torch.device | str | None = None) -> nn.Module:
    """Build `arch` from checked arguments; `device="meta"` builds shapes only, allocating nothing."""
    args = model_args_for(arch, model_args)
    with torch.device(device or "cpu"):
        return ARCHITECTURES[arch].build(**args)
