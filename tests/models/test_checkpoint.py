from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import models.checkpoint as checkpoint_module
from models import (
    FASHION_MNIST_CLASSES,
    CheckpointError,
    PreprocessConfig,
    build_model,
    load_checkpoint,
    save_checkpoint,
)
from tests.helpers import TINY_ARGS, tiny_model, write_tiny_checkpoint


class CourseNetwork(nn.Module):
    """The course's fc_model.Network, written as the course wrote it, to produce its checkpoints."""

    def __init__(self, input_size: int, output_size: int, hidden_layers: list[int], drop_p: float = 0.5) -> None:
        super().__init__()
        self.hidden_layers = nn.ModuleList([nn.Linear(input_size, hidden_layers[0])])
        layer_sizes = zip(hidden_layers[:-1], hidden_layers[1:], strict=True)  # noqa: RUF007 (as the course wrote it)
        self.hidden_layers.extend([nn.Linear(h1, h2) for h1, h2 in layer_sizes])
        self.output = nn.Linear(hidden_layers[-1], output_size)
        self.dropout = nn.Dropout(p=drop_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for each in self.hidden_layers:
            x = self.dropout(F.relu(each(x)))
        return F.log_softmax(self.output(x), dim=1)


def raw_v1(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def test_round_trip_rebuilds_from_the_checkpoint_alone(tmp_path: Path) -> None:
    model = tiny_model(seed=3)
    path = save_checkpoint(
        tmp_path / "m.pt",
        model,
        "network",
        TINY_ARGS,
        PreprocessConfig(mean=0.25, std=0.4, invert="true"),
        metrics={"test_accuracy": 0.9},
        training={"epochs": 2},
    )
    loaded = load_checkpoint(path)
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(loaded.model(x), model(x))
    assert not loaded.model.training
    assert loaded.arch == "network"
    assert loaded.model_args == TINY_ARGS
    assert loaded.class_names == FASHION_MNIST_CLASSES
    assert loaded.preprocess == PreprocessConfig(mean=0.25, std=0.4, invert="true")
    assert loaded.metrics == {"test_accuracy": 0.9}
    assert loaded.training == {"epochs": 2}
    assert loaded.format == "v1"
    assert loaded.created_at is not None


@pytest.mark.parametrize("arch", ["network", "classifier", "cnn"])
def test_every_architecture_round_trips(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, {}).eval()
    loaded = load_checkpoint(save_checkpoint(tmp_path / "m.pt", model, arch, {}, PreprocessConfig()))
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(loaded.model(x), model(x))


def test_checkpoint_holds_only_what_weights_only_load_accepts(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "m.pt")
    raw = raw_v1(path)
    assert raw["format_version"] == 1
    assert set(raw) >= {
        "arch",
        "model_args",
        "state_dict",
        "class_names",
        "preprocess",
        "metrics",
        "training",
        "created_at",
    }


def test_course_checkpoint_loads_and_predicts_identically(tmp_path: Path) -> None:
    torch.manual_seed(1)
    course = CourseNetwork(784, 10, [512, 256, 128]).eval()
    checkpoint = {
        "input_size": 784,
        "output_size": 10,
        "hidden_layers": [each.out_features for each in course.hidden_layers],
        "state_dict": course.state_dict(),
    }
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    loaded = load_checkpoint(tmp_path / "checkpoint.pth")
    x = torch.randn(4, 784)
    assert torch.equal(loaded.model(x.view(4, 1, 28, 28)), course(x))
    assert loaded.format == "course"
    assert loaded.preprocess == PreprocessConfig(mean=0.5, std=0.5)
    assert loaded.class_names[9] == "Ankle boot"
    assert str(loaded.model).startswith("Network(\n  (hidden_layers): ModuleList(")


class RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": tiny_model().state_dict(), "payload": RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_checkpoint(path)
    assert not marker.exists()


def test_plain_pickle_file_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not marker.exists()


def _rewrite(path: Path, **changes: Any) -> Path:
    raw = raw_v1(path)
    raw.update(changes)
    torch.save(raw, path)
    return path


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda sd: sd.pop("output.bias"), r"missing keys \['output.bias'\]"),
        (lambda sd: sd.update({"extra.weight": torch.zeros(1)}), r"unexpected keys \['extra.weight'\]"),
        (
            lambda sd: sd.update({"output.weight": torch.zeros(10, 17)}),
            r"shape \(10, 17\), the architecture needs \(10, 16\)",
        ),
        (lambda sd: sd.update({"output.bias": torch.zeros(10, dtype=torch.int64)}), "dtype"),
        (lambda sd: sd.update({"output.bias": [0.0] * 10}), "not a tensor"),
    ],
)
def test_state_dict_mismatches_fail_clearly(tmp_path: Path, mutate: Any, message: str) -> None:
    path = write_tiny_checkpoint(tmp_path / "m.pt")
    raw = raw_v1(path)
    mutate(raw["state_dict"])
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"arch": "resnet152"}, "unknown architecture 'resnet152'"),
        ({"format_version": 2}, "unsupported checkpoint format_version 2"),
        ({"model_args": {**TINY_ARGS, "hidden_layers": [10**9]}}, r"hidden_layers\[0\] must be an integer"),
        ({"model_args": {**TINY_ARGS, "hidden_layers": [16] * 1000}}, "hidden_layers must be a list of 1 to 16"),
        ({"model_args": {**TINY_ARGS, "hidden_layers": [16384] * 16}}, "parameters; the limit is"),
        ({"model_args": {**TINY_ARGS, "input_size": "784"}}, "input_size must be an integer"),
        ({"model_args": {**TINY_ARGS, "bogus": 1}}, "unexpected arguments"),
        ({"preprocess": {"size": 28, "mean": 0.5, "std": 0.0, "invert": "auto"}}, "std must be > 0"),
        ({"preprocess": {"size": 28, "mean": 0.5, "std": 0.5, "invert": "maybe"}}, "invert must be one of"),
        ({"class_names": ["a", "b"]}, "class_names must be 10 strings"),
        ({"class_names": "abc"}, "'class_names' has type str"),
    ],
)
def test_invalid_metadata_fails_before_building_anything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, changes: dict[str, Any], message: str
) -> None:
    path = _rewrite(write_tiny_checkpoint(tmp_path / "m.pt"), **changes)
    devices: list[Any] = []
    real_build = checkpoint_module.build_model

    def spy(arch: str, args: Any, device: Any = None) -> nn.Module:
        devices.append(device)
        return real_build(arch, args, device)

    monkeypatch.setattr(checkpoint_module, "build_model", spy)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    assert set(devices) <= {"meta"}, "only shape-only (meta) models may be built before validation passes"


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


# b"a broken copy": found by bench.reload, the unpickler raised IndexError, not CheckpointError.
@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04garbage", b"a broken copy"])
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "x.pt")


@settings(max_examples=300, deadline=None)
@given(content=st.binary(max_size=64))
def test_any_bytes_are_a_checkpoint_or_a_checkpoint_error(content: bytes) -> None:
    with pytest.raises(CheckpointError):
        load_checkpoint("x.pt", data=content)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "m.pt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(path)


def test_unknown_layout_names_what_it_found(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match=r"not the course format.*weights"):
        load_checkpoint(tmp_path / "x.pt")


def test_non_dict_checkpoint(tmp_path: Path) -> None:
    torch.save(torch.zeros(3), tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a dict"):
        load_checkpoint(tmp_path / "x.pt")


def test_cuda_requested_without_cuda(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(CheckpointError, match="CUDA is not available"):
        load_checkpoint(write_tiny_checkpoint(tmp_path / "m.pt"), device="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_loads_onto_the_gpu(tmp_path: Path) -> None:
    loaded = load_checkpoint(write_tiny_checkpoint(tmp_path / "m.pt"), device="cuda")
    assert loaded.device.type == "cuda"
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(loaded.model(x.cuda()).cpu(), tiny_model()(x), atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"metrics": "x"}, "'metrics' must be a dict of plain values"),
        ({"metrics": {"acc": torch.tensor(0.9)}}, "'metrics' must be a dict of plain values"),
        ({"training": {"lr": float("nan")}}, "'training' must be a dict of plain values"),
        ({"created_at": 12}, "'created_at' has type int"),
        ({"model_args": {**TINY_ARGS, "input_size": 100}}, r"input_size must be an integer in \[784, 784\]"),
    ],
)
def test_metadata_that_serving_could_not_show_is_refused(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    """Found in review: these once loaded and then broke /model (500) or start-up (traceback)."""
    path = _rewrite(write_tiny_checkpoint(tmp_path / "m.pt"), **changes)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(tmp_path / "m.pt")
    raw = raw_v1(path)
    raw["state_dict"]["output.bias"][3] = float("nan")
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=r"state_dict\['output.bias'\] holds NaN"):
        load_checkpoint(path)


def test_oversized_file_is_refused_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint_module, "MAX_FILE_BYTES", 1000)
    with pytest.raises(CheckpointError, match="bytes; the limit is 1,000"):
        load_checkpoint(write_tiny_checkpoint(tmp_path / "m.pt"))


def test_loaded_tensors_do_not_keep_a_larger_storage_alive(tmp_path: Path) -> None:
    model = tiny_model()
    big = torch.zeros(1_000_000)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["output.bias"] = big[:10]  # a view into a 4 MB storage
    raw = raw_v1(write_tiny_checkpoint(tmp_path / "m.pt"))
    raw["state_dict"] = state
    torch.save(raw, tmp_path / "m.pt")
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert loaded.model.output.bias.untyped_storage().nbytes() == 10 * 4
