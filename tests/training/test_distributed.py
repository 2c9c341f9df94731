"""Data-parallel training under torchrun, and the single process left exactly as it was."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import load_checkpoint
from tests.serverproc import ROOT, free_port
from tests.training.test_training import synthetic_data  # noqa: F401  (fixture)
from training.cli import Splits, _parameters_sha256, _split, main
from training.data import load_fashion_mnist
from training.distributed import Distributed, shard, shard_batches, steps_per_epoch
from training.train import evaluate

# Weights of `python -m training train` on `synthetic_data` with the flags below, computed on main
# at c0f4dae, before data-parallel training existed: a single process must still give exactly these.
BEFORE_TORCHRUN = {
    ("classifier", "shift"): "5fc3f320acebfa3d25eb0025984551502bba87ff0c4955f197aa97bde1ee45ed",
    ("cnn", "flip"): "9a1b172effc5521fce90a69bfc678d5fccf9130a66c9bf86c7cbd1a55757f216",
}


def _flags(arch: str, augment: str, data: Path, out: Path) -> list[str]:
    return [
        "train",
        "--arch",
        arch,
        "--epochs",
        "2",
        "--batch-size",
        "64",
        "--augment",
        augment,
        "--seed",
        "3",
        "--limit",
        "600",
        "--threads",
        "1",
        "--device",
        "cpu",
        "--data-dir",
        str(data),
        "--out",
        str(out),
    ]


@pytest.mark.parametrize(("arch", "augment"), list(BEFORE_TORCHRUN))
def test_a_single_process_trains_bit_identically_to_before(
    synthetic_data: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    arch: str,
    augment: str,
) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    try:
        assert main(_flags(arch, augment, synthetic_data, tmp_path / "m.pt")) == 0
    finally:
        torch.set_num_threads(threads)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert _parameters_sha256(loaded.model) == BEFORE_TORCHRUN[arch, augment]
    assert loaded.training["world_size"] == 1
    assert loaded.training["batch_size"] == 64


def test_shards_cover_the_data_once_with_equal_step_counts() -> None:
    n, batch_size = 11, 4
    ranks = [Distributed(rank=r, world_size=3) for r in range(3)]
    epoch1 = [torch.cat(list(shard_batches(n, batch_size, ctx, seed=5, epoch=1))) for ctx in ranks]
    assert {len(s) for s in epoch1} == {4}, "ceil(11 / 3) each: the sampler pads by repeating"
    assert set(torch.cat(epoch1).tolist()) == set(range(n))
    assert all(
        len(list(shard_batches(n, batch_size, ctx, 5, 1))) == steps_per_epoch(n, batch_size, ctx) for ctx in ranks
    )
    epoch2 = [torch.cat(list(shard_batches(n, batch_size, ctx, seed=5, epoch=2))) for ctx in ranks]
    assert not all(torch.equal(a, b) for a, b in zip(epoch1, epoch2, strict=True)), "set_epoch reshuffles"
    again = [torch.cat(list(shard_batches(n, batch_size, ctx, seed=5, epoch=1))) for ctx in ranks]
    assert all(torch.equal(a, b) for a, b in zip(epoch1, again, strict=True)), "same seed and epoch, same order"
    evaluation = torch.cat([shard(n, ctx) for ctx in ranks])
    assert sorted(evaluation.tolist()) == list(range(n)), "evaluation shards: disjoint, all examples"


@pytest.mark.slow
def test_two_processes_train_one_model(synthetic_data: Path, tmp_path: Path) -> None:  # noqa: F811
    """torchrun --nproc_per_node=2 on the CPU (gloo): both ranks end with the same parameters, rank 0
    alone writes a loadable checkpoint recording world_size 2, and the validation figures reduced
    across the ranks are those of the whole validation set."""
    out = tmp_path / "run" / "model.pt"
    flags = _flags("cnn", "flip", synthetic_data, out)  # BatchNorm: its running statistics too
    flags[flags.index("--epochs") + 1] = "3"
    flags[flags.index("--limit") + 1] = "605"  # 121 validation examples: shards of 61 and 60
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_addr=127.0.0.1",
            f"--master_port={free_port()}",
            "-m",
            "training",
            *flags,
        ],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    digests = dict(re.findall(r"rank (\d)/2: parameters sha256 ([0-9a-f]{64})", result.stdout))
    assert set(digests) == {"0", "1"}, result.stdout
    assert digests["0"] == digests["1"], "identical parameters and BatchNorm statistics on both ranks"
    assert result.stdout.count("epoch   1 ") == 1, "rank 0 alone prints"

    loaded = load_checkpoint(out)
    assert _parameters_sha256(loaded.model) == digests["0"]
    assert loaded.training["world_size"] == 2
    report = json.loads(out.with_name("model.metrics.json").read_text())
    assert report["training"]["world_size"] == 2 and len(report["history"]) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "model.confusion.png",
        "model.curves.png",
        "model.metrics.json",
        "model.pt",
    ], "one writer, no temporary files left"

    args = argparse.Namespace(limit=605, val_size=5000, seed=3)
    data = load_fashion_mnist(synthetic_data)
    splits: Splits = _split(args, data, loaded.preprocess, torch.device("cpu"))
    whole = evaluate(loaded.model, *splits.val)
    assert report["metrics"]["val_loss"] == pytest.approx(whole.loss, abs=2e-6)
    assert report["metrics"]["val_accuracy"] == pytest.approx(whole.accuracy, abs=1e-6)
