"""models.served_form and `python -m training optimize`: the int8 form is made from the checkpoint,
stored with its hashes, checked at load, and never serves when it is stale, corrupt or wrong."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.served_model import ServedModel
from app.settings import Settings
from models import CheckpointError, LoadedModel, PreprocessConfig, load_checkpoint, save_checkpoint
from models import served_form as sf
from models.preprocessing import normalize
from models.served_form import ONNX_INT8, TORCH_FP32, FormError, FormRecord, OnnxForm
from tests.models.test_trust import ARCHS, records, small_model, write
from training.optimize import GATES, export_onnx, gate_failures, make_record, measure


def _images(n: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(uint8 images, labels) of ten easy classes: a bright square whose place is the class, on noise."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for image, label in zip(images, labels, strict=True):
        top, left = 2 + (label // 5) * 13, 1 + (label % 5) * 5
        image[top : top + 10, left : left + 5] = rng.integers(180, 256)
    return images, torch.from_numpy(labels)


def _inputs(loaded: LoadedModel, n: int, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    """(uint8 images, their normalized model inputs)."""
    images, _ = _images(n, seed)
    return images, torch.from_numpy(normalize(images, loaded.preprocess)).unsqueeze(1)


def _trained(arch: str) -> torch.nn.Module:
    """A small model trained until it is confident on `_images`, as a real checkpoint is."""
    model = small_model(arch).train()
    images, labels = _images(640, seed=1)
    x = torch.from_numpy(normalize(images, PreprocessConfig())).unsqueeze(1)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(120):
        batch = slice((step * 64) % 640, (step * 64) % 640 + 64)
        optimizer.zero_grad()
        torch.nn.functional.nll_loss(model(x[batch]), labels[batch]).backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module", params=sorted(ARCHS))
def optimized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A small trained checkpoint of each architecture with calibration, OOD statistics and its int8 form."""
    arch = request.param
    model = _trained(arch)
    calibration, ood = records(model)
    path = tmp_path_factory.mktemp(arch) / "m.pt"
    path = save_checkpoint(path, model, arch, ARCHS[arch], PreprocessConfig(), calibration=calibration, ood=ood)
    loaded = load_checkpoint(path)
    images, x = _inputs(loaded, 96)
    record = make_record(loaded, x[:64].numpy(), images[64:])
    return _save(loaded, path, record), arch


def _save(loaded: LoadedModel, path: Path, record: FormRecord | None, model: torch.nn.Module | None = None) -> Path:
    return save_checkpoint(
        path, model or loaded.model, loaded.arch, loaded.model_args, loaded.preprocess, loaded.class_names,
        calibration=loaded.calibration, ood=loaded.ood, served_form=record,
    )  # fmt: skip


@pytest.mark.parametrize("below", [None, 0.5], ids=["always", "in-doubt"])
def test_a_mirrored_cnn_exports_one_graph_with_both_halves(tmp_path: Path, below: float | None) -> None:
    """Mirrored always, or only the images in doubt (a second pass over a data-dependent subset)."""
    import onnxruntime as ort

    model = small_model("cnn")
    model.mirror, model.mirror_below = True, below
    calibration, ood = records(model)
    path = save_checkpoint(
        tmp_path / "m.pt", model, "cnn", {**ARCHS["cnn"], "mirror": True, "mirror_below": below}, PreprocessConfig(),
        calibration=calibration, ood=ood,
    )  # fmt: skip
    loaded = load_checkpoint(path)
    assert loaded.model_args["mirror"] is True and loaded.model.mirror and loaded.model.mirror_below == below
    session = ort.InferenceSession(export_onnx(loaded), providers=["CPUExecutionProvider"])
    _, x = _inputs(loaded, 16)
    log_ps, features = session.run(None, {"input": x.numpy()})
    want_log_ps, want_features = loaded.form(TORCH_FP32)(x)
    assert want_features is not None and features.shape == tuple(want_features.shape)
    np.testing.assert_allclose(log_ps, want_log_ps.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(features, want_features.detach().numpy(), atol=1e-4)
    images, x = _inputs(loaded, 96)
    int8 = OnnxForm(make_record(loaded, x[:64].numpy(), images[64:]).graph, threads=1)  # it quantizes, and runs
    assert int8(x[64:])[0].shape == (32, 10)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_the_exported_graph_gives_the_torch_models_log_probabilities_and_features(tmp_path: Path, arch: str) -> None:
    import onnxruntime as ort

    calibration, ood = records(small_model(arch))
    loaded = load_checkpoint(write(tmp_path / "m.pt", arch, calibration=calibration, ood=ood))
    session = ort.InferenceSession(export_onnx(loaded), providers=["CPUExecutionProvider"])
    _, x = _inputs(loaded, 5)
    log_ps, features = session.run(None, {"input": x.numpy()})
    want_log_ps, want_features = loaded.form(TORCH_FP32)(x)
    assert want_features is not None
    np.testing.assert_allclose(log_ps, want_log_ps.detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(features, want_features.detach().numpy(), atol=1e-4)


def test_the_int8_form_round_trips_and_serves_the_fp32_models_classes(optimized: tuple[Path, str]) -> None:
    path, _ = optimized
    raw = torch.load(path, map_location="cpu", weights_only=True)  # still a weights-only checkpoint
    assert raw["served_form"]["name"] == ONNX_INT8 and raw["served_form"]["graph"].dtype == torch.uint8
    loaded = load_checkpoint(path)
    form = loaded.form()
    assert isinstance(form, OnnxForm) and (form.name, form.precision) == (ONNX_INT8, "int8")
    _, x = _inputs(loaded, 64, seed=1000)
    with torch.inference_mode():
        got, features = form(x)
        want, want_features = loaded.form(TORCH_FP32)(x)
    assert features is not None and want_features is not None and features.shape == want_features.shape
    assert float((got.argmax(1) == want.argmax(1)).double().mean()) >= 0.95
    assert torch.allclose(got.exp().sum(1), torch.ones(64), atol=1e-3)
    probabilities, scores = loaded.trust().apply(got, features)
    assert probabilities.shape == (64, 10) and scores is not None and scores.shape == (64,)


def test_only_the_convolutions_of_one_input_channel_stay_fp32(optimized: tuple[Path, str]) -> None:
    """ONNX Runtime's int8 convolution is slower than its fp32 one on the image itself (one channel)."""
    import onnx

    path, arch = optimized
    graph = onnx.load_from_string(load_checkpoint(path).served_form.graph).graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    dequantized = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    convs = [node for node in graph.node if node.op_type == "Conv"]
    assert len(convs) == (4 if arch == "cnn" else 0)
    fp32 = [node for node in convs if node.input[1] in weights]
    assert [tuple(weights[node.input[1]].dims)[1] for node in fp32] == ([1] if arch == "cnn" else [])
    assert all(node.input[1] in dequantized for node in convs if node not in fp32), "every other one is int8"


def test_the_served_form_setting_chooses_and_an_impossible_choice_is_refused(
    optimized: tuple[Path, str], tiny_checkpoint: Path
) -> None:
    path, _ = optimized
    assert load_checkpoint(path).form(TORCH_FP32).name == TORCH_FP32
    assert ServedModel.load(Settings(checkpoint=path, device="cpu")).form.name == ONNX_INT8
    torch_served = ServedModel.load(Settings(checkpoint=path, device="cpu", served_form=TORCH_FP32))
    assert torch_served.form_description() == {"name": TORCH_FP32, "precision": "fp32"}
    # A checkpoint without the form: auto serves torch quietly; asking for int8 refuses to start.
    assert load_checkpoint(tiny_checkpoint).form().name == TORCH_FP32
    with pytest.raises(CheckpointError, match="no served_form record"):
        ServedModel.load(Settings(checkpoint=tiny_checkpoint, device="cpu", served_form=ONNX_INT8))
    with pytest.raises(FormError, match="unknown served form"):
        load_checkpoint(path).form("openvino")


def test_the_served_form_is_read_from_its_variable_or_the_name_it_had_before(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().served_form == "auto"
    monkeypatch.setenv("FASHION_SERVE_BACKEND", TORCH_FP32)  # deployments configured before the rename
    assert Settings().served_form == TORCH_FP32
    monkeypatch.setenv("FASHION_SERVE_SERVED_FORM", ONNX_INT8)  # the new name wins
    assert Settings().served_form == ONNX_INT8
    monkeypatch.setenv("FASHION_SERVE_SERVED_FORM", "openvino")
    with pytest.raises(ValueError, match=r"FASHION_SERVE_SERVED_FORM|served_form"):
        Settings()


def _one_warning(caplog: pytest.LogCaptureFixture, loaded: LoadedModel, words: str) -> None:
    with caplog.at_level(logging.WARNING, logger="models.served_form"):
        caplog.clear()
        assert loaded.form().name == TORCH_FP32
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and words in warnings[0], warnings
    with pytest.raises(FormError, match=words):
        loaded.form(ONNX_INT8)


def test_a_form_made_from_other_weights_is_never_served(
    optimized: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path, arch = optimized
    loaded = load_checkpoint(path)
    retrained = small_model(arch, seed=7)  # same shapes, other weights, the old form kept
    stale = load_checkpoint(_save(loaded, tmp_path / "stale.pt", loaded.served_form, retrained))
    _one_warning(caplog, stale, "stale")


def test_a_corrupt_graph_is_never_served(
    optimized: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loaded = load_checkpoint(optimized[0])
    assert loaded.served_form is not None
    graph = bytearray(loaded.served_form.graph)
    graph[len(graph) // 2] ^= 0xFF
    record = FormRecord(**{**vars(loaded.served_form), "graph": bytes(graph)})
    _one_warning(caplog, load_checkpoint(_save(loaded, tmp_path / "c.pt", record)), "corrupt")


def test_a_form_that_disagrees_with_the_fp32_model_on_this_machine_is_not_served(
    optimized: tuple[Path, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(sf, "MIN_AGREEMENT", 1.01)  # no graph can agree on more than all images
    _one_warning(caplog, load_checkpoint(optimized[0]), "reference images")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"graph": torch.zeros(4)}, "1-D uint8"),
        ({"reference": torch.zeros(2, 28, 28)}, "uint8 tensor"),
        ({"weights_sha256": "abc"}, "hex digests"),
        ({"name": "tensorrt"}, "name 'onnx-int8'"),
        ({"extra": torch.zeros(2)}, "unexpected tensor"),
    ],
)
def test_a_malformed_record_is_refused_at_load(
    optimized: tuple[Path, str], tmp_path: Path, change: dict[str, Any], message: str
) -> None:
    raw = torch.load(optimized[0], map_location="cpu", weights_only=True)
    raw["served_form"].update(change)
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "bad.pt")


def test_measure_and_the_gates(optimized: tuple[Path, str]) -> None:
    loaded = load_checkpoint(optimized[0])
    _, x = _inputs(loaded, 40)
    labels = torch.arange(40) % 10
    ood = {"noise": np.random.default_rng(0).standard_normal((20, 1, 28, 28)).astype(np.float32)}
    figures = measure(loaded.form(TORCH_FP32), loaded.trust(), (x, labels), ood)
    assert set(figures) == {"accuracy", "calibrated_ece", "ood_auroc", "test_flagged"}
    assert 0 <= figures["accuracy"] <= 100 and 0 <= figures["ood_auroc"] <= 1
    base = {"accuracy": 94.0, "calibrated_ece": 0.005, "ood_auroc": 0.98, "test_flagged": 5.0}
    assert gate_failures(base, base) == []
    drop = GATES["max_accuracy_drop_points"]
    worse = {"accuracy": 94.0 - drop - 0.01, "calibrated_ece": 0.011, "ood_auroc": 0.94, "test_flagged": 6.1}
    failures = gate_failures(base, worse)
    assert [f.split()[0] for f in failures] == ["accuracy", "calibrated", "OOD", "test"]
