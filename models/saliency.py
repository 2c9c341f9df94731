"""Where the model looked: SmoothGrad x input saliency maps for the top class.

Computed on the checkpoint's own model (`LoadedModel.model`), never on the served copy the
inference thread runs (`for_inference`): gradients need autograd, which the inference thread's
inference mode turns off, and the two must not share a module's forward hooks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from models.preprocessing import PreprocessConfig

# SmoothGrad: the gradient averaged over this many copies of the input with Gaussian noise of
# this standard deviation, as a share of the input's range (Smilkov et al. 2017 suggest 10-20 %).
SMOOTHGRAD_SAMPLES = 16
SMOOTHGRAD_NOISE = 0.15
SALIENCY_METHOD = (
    f"smoothgrad_x_input: |mean over {SMOOTHGRAD_SAMPLES} noisy copies (sigma {SMOOTHGRAD_NOISE:g} of the input "
    "range) of d log p(top class) / d input, times (input - black image)|, divided by its maximum"
)


def saliency_maps(
    model: nn.Module, inputs: np.ndarray, targets: np.ndarray, preprocess: PreprocessConfig
) -> np.ndarray:
    """(N, 1, S, S) model input and (N,) target classes -> (N, S, S) float32 maps in [0, 1] (SALIENCY_METHOD).

    The attribution is against a black image (the data set's background), so pixels that are
    black in the model input get 0. The noise is seeded: the same image gives the same map.
    torch.cuda.OutOfMemoryError propagates as torch raises it: the service maps it to its answer.
    """
    device = next(model.parameters()).device
    count, _, height, width = inputs.shape
    x = torch.from_numpy(inputs).to(device)
    black = -preprocess.mean / preprocess.std  # pixel 0 after `normalize`
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((count * SMOOTHGRAD_SAMPLES, *inputs.shape[1:]), generator=generator)
    noisy = x.repeat_interleave(SMOOTHGRAD_SAMPLES, dim=0) + noise.to(device) * (SMOOTHGRAD_NOISE / preprocess.std)
    rows = torch.from_numpy(targets).to(device).repeat_interleave(SMOOTHGRAD_SAMPLES)
    with torch.enable_grad():
        noisy.requires_grad_(True)
        log_ps = model(noisy)
        picked = log_ps.gather(1, rows[:, None]).sum()
        (gradient,) = torch.autograd.grad(picked, noisy)  # the input's gradient only: the model's stay None
    mean_gradient = gradient.reshape(count, SMOOTHGRAD_SAMPLES, height, width).mean(dim=1)
    maps = (mean_gradient * (x[:, 0] - black)).abs()
    peak = maps.flatten(1).amax(dim=1).clamp_min(torch.finfo(maps.dtype).tiny)
    return (maps / peak[:, None, None]).cpu().numpy()
