"""Data-parallel training under `torchrun`: the process group, this process's share of the data,
and sums across processes. Without torchrun's environment everything is a single-process no-op."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that prints and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = Distributed()


def from_environment() -> Distributed:
    """The rank and world size torchrun sets; one process when they are absent."""
    if "WORLD_SIZE" not in os.environ:
        return SINGLE
    return Distributed(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )


def setup(ctx: Distributed, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo on the CPU); on CUDA, use the local rank's GPU."""
    if not ctx.enabled:
        return device
    if device.type != "cuda":
        dist.init_process_group("gloo")
        return device
    if device.index not in (None, ctx.local_rank):
        raise ValueError(f"under torchrun each process uses cuda:LOCAL_RANK; got --device {device}")
    device = torch.device("cuda", ctx.local_rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    return device


def teardown(ctx: Distributed) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: torch.Tensor, ctx: Distributed) -> torch.Tensor:
    """Element-wise sum over all processes (the tensor itself with one process)."""
    if not ctx.enabled:
        return values
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    reduced = values.to(device, copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device)


def average_buffers(model: nn.Module, ctx: Distributed) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over the processes. DDP keeps
    parameters identical, but each process updates its running statistics from its own batches."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for buffer in model.buffers():
            if buffer.is_floating_point():
                buffer.copy_(all_sum(buffer, ctx) / ctx.world_size)


def shard_batches(n: int, batch_size: int, ctx: Distributed, seed: int, epoch: int) -> Iterator[torch.Tensor]:
    """This process's index batches for one epoch: one shuffled order shared by all processes
    (seed + epoch), dealt out round-robin. Every process gets ceil(n / world_size) examples (the
    sampler repeats up to world_size - 1 of them), so all take the same number of steps."""
    indices: Sequence[int] = range(n)
    sampler: DistributedSampler[int] = DistributedSampler(
        indices,  # type: ignore[arg-type]  # only len() is used
        num_replicas=ctx.world_size,
        rank=ctx.rank,
        shuffle=True,
        seed=seed,
    )
    sampler.set_epoch(epoch)
    yield from torch.tensor(list(sampler), dtype=torch.long).split(batch_size)


def steps_per_epoch(n: int, batch_size: int, ctx: Distributed) -> int:
    per_process = -(-n // ctx.world_size)
    return -(-per_process // batch_size)


def shard(n: int, ctx: Distributed) -> torch.Tensor:
    """Indices of this process's share of n evaluation examples (disjoint, together all of them)."""
    return torch.arange(ctx.rank, n, ctx.world_size)
