"""Data-parallel training under torchrun, and the single process left exactly as it was."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.server import ROOT, free_port
from models import load_checkpoint
from tests.training.test_training import synthetic_data  # noqa: F401  (fixture)
from training.cli import main
from training.data import load_fashion_mnist
from training.distributed import Distributed, shard, shard_batches, steps_per_epoch
from training.pipeline import Splits, parameters_sha256, split_data
from training.split import SplitPlan
from training.train import evaluate

# Weights of `python -m training train` on `synthetic_data` with the flags below, computed on main
# at c0f4dae, before data-parallel training existed (a single process must still give them): per
# tensor, its sum and its norm. Compared with a tolerance that no other seed, order or step would
# meet but that other CPUs' last-bit differences do (bit-identity was checked on the development
# machine: the parameters' sha256 were equal).
BEFORE_TORCHRUN = {
    ("classifier", "shift"): {
        "fc1.weight": [106.851074, 9.602521],
        "fc1.bias": [0.121178, 0.339136],
        "fc2.weight": [2.19251, 6.623844],
        "fc2.bias": [-0.10583, 0.411845],
        "fc3.weight": [-0.710624, 4.645824],
        "fc3.bias": [0.207521, 0.371051],
        "fc4.weight": [-1.395261, 1.819534],
        "fc4.bias": [-0.064649, 0.210675],
    },
    ("cnn", "flip"): {
        "features.0.0.weight": [-1.960818, 3.389424],
        "features.0.1.weight": [31.955938, 5.649227],
        "features.0.1.bias": [-0.118594, 0.039048],
        "features.0.1.running_mean": [1.146795, 2.085268],
        "features.0.1.running_var": [7.598367, 1.360646],
        "features.1.0.weight": [4.598536, 3.290047],
        "features.1.1.weight": [32.017761, 5.660098],
        "features.1.1.bias": [-0.079466, 0.034407],
        "features.1.1.running_mean": [0.652006, 0.765095],
        "features.1.1.running_var": [11.215822, 2.024455],
        "features.3.0.weight": [13.03781, 4.694659],
        "features.3.1.weight": [63.985655, 7.998415],
        "features.3.1.bias": [-0.185903, 0.05739],
        "features.3.1.running_mean": [4.248629, 2.141244],
        "features.3.1.running_var": [36.072253, 4.665954],
        "features.4.0.weight": [26.139173, 4.795323],
        "features.4.1.weight": [64.471078, 8.05905],
        "features.4.1.bias": [-0.1122, 0.047882],
        "features.4.1.running_mean": [4.196289, 1.567775],
        "features.4.1.running_var": [40.260695, 5.220372],
        "head.2.weight": [171.420439, 7.623054],
        "head.2.bias": [0.044665, 0.121083],
        "head.5.weight": [-4.363748, 1.919437],
        "head.5.bias": [0.133327, 0.147213],
    },
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


def _has_amx() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and "amx_tile" in cpuinfo.read_text()


@pytest.mark.parametrize(("arch", "augment"), list(BEFORE_TORCHRUN))
def test_a_single_process_trains_bit_identically_to_before(
    synthetic_data: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    arch: str,
    augment: str,
) -> None:
    capability = torch.backends.cpu.get_cpu_capability()
    if arch == "cnn" and (capability != "AVX512" or _has_amx()):
        # Convolutions run other oneDNN kernels without AVX-512 or with AMX, and an epoch of training
        # grows their rounding apart (sums off by up to 0.12 on an AVX2 CPU, norms by 0.3 % on an
        # AMX one); the MLP cases still run.
        pytest.skip(f"the CNN's reference sums were recorded on an AVX-512 CPU without AMX; this one is {capability}")
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    try:
        assert main(_flags(arch, augment, synthetic_data, tmp_path / "m.pt")) == 0
    finally:
        torch.set_num_threads(threads)
    loaded = load_checkpoint(tmp_path / "m.pt")
    state = loaded.model.state_dict()
    expected = BEFORE_TORCHRUN[arch, augment]
    assert sorted(expected) == sorted(k for k, t in state.items() if t.is_floating_point())
    for key, (total, norm) in expected.items():
        tensor = state[key].double()
        assert float(tensor.sum()) == pytest.approx(total, abs=1e-3), key
        assert float(tensor.norm()) == pytest.approx(norm, rel=1e-4), key
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
    assert parameters_sha256(loaded.model) == digests["0"]
    assert loaded.training["world_size"] == 2
    report = json.loads(out.with_name("model.metrics.json").read_text())
    assert report["training"]["world_size"] == 2 and len(report["history"]) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == [
        "model.confusion.png",
        "model.curves.png",
        "model.metrics.json",
        "model.pt",
    ], "one writer, no temporary files left"

    data = load_fashion_mnist(synthetic_data)
    plan = SplitPlan(seed=3, val_size=5000, limit=605)
    splits: Splits = split_data(data, plan, loaded.preprocess, torch.device("cpu"))
    whole = evaluate(loaded.model, *splits.val)
    assert report["metrics"]["val_loss"] == pytest.approx(whole.loss, abs=2e-6)
    assert report["metrics"]["val_accuracy"] == pytest.approx(whole.accuracy, abs=1e-6)
