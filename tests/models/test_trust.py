"""models.trust: the stored records, their checks, and what Trust serves from one forward pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models import (
    ARCHITECTURES,
    CheckpointError,
    PreprocessConfig,
    build_model,
    for_inference,
    load_checkpoint,
    save_checkpoint,
)
from models.networks import last_linear
from models.trust import Calibration, OODStats, Trust, out_of_distribution

SMALL_CNN = {"channels": [4, 8], "hidden": 12, "num_classes": 10, "drop_p": 0.3}
SMALL_MLP = {"input_size": 784, "output_size": 10, "hidden_layers": [32, 16], "drop_p": 0.2}
ARCHS = {"cnn": SMALL_CNN, "network": SMALL_MLP}


def small_model(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(arch, ARCHS[arch]).eval()
    for module in model.modules():  # BatchNorm statistics that are not the identity, so folding matters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    return model


def records(model: torch.nn.Module, seed: int = 1) -> tuple[Calibration, OODStats]:
    output = last_linear(model)
    generator = torch.Generator().manual_seed(seed)
    whiten = torch.randn(output.in_features, output.in_features, generator=generator)
    centers = torch.randn(output.out_features, output.in_features, generator=generator)
    return Calibration(1.7, {"val_examples": 100}), OODStats(whiten, centers, threshold=3.5, info={"flag_rate": 0.05})


def write(path: Path, arch: str, **kwargs: object) -> Path:
    return save_checkpoint(path, small_model(arch), arch, ARCHS[arch], PreprocessConfig(), **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_records_round_trip_through_a_weights_only_load(tmp_path: Path, arch: str) -> None:
    calibration, ood = records(small_model(arch))
    path = write(tmp_path / "m.pt", arch, calibration=calibration, ood=ood)
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["calibration"]["temperature"] == 1.7
    assert set(raw["ood"]) >= {"method", "whiten", "centers", "threshold"}

    loaded = load_checkpoint(path)
    assert loaded.calibration is not None and loaded.ood is not None
    assert loaded.calibration.temperature == 1.7
    assert loaded.calibration.info == {"val_examples": 100}
    assert torch.equal(loaded.ood.whiten, ood.whiten)
    assert torch.equal(loaded.ood.centers, ood.centers)
    assert loaded.ood.threshold == 3.5
    assert loaded.ood.info == {"flag_rate": 0.05}


def test_a_checkpoint_without_records_loads_with_none_and_serves_plain_probabilities(tmp_path: Path) -> None:
    loaded = load_checkpoint(write(tmp_path / "old.pt", "network"))
    assert loaded.calibration is None
    assert loaded.ood is None
    trust = loaded.trust()
    assert trust.threshold is None
    x = torch.randn(3, 1, 28, 28)
    with torch.inference_mode():
        probs, scores = trust(loaded.model, x)
        expected = loaded.model(x).exp()
    assert scores is None
    torch.testing.assert_close(probs, expected)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_trust_serves_tempered_probabilities_and_scores_from_one_forward_pass(tmp_path: Path, arch: str) -> None:
    model = small_model(arch)
    calibration, ood = records(model)
    loaded = load_checkpoint(write(tmp_path / "m.pt", arch, calibration=calibration, ood=ood))
    served = for_inference(loaded.model, loaded.architecture)
    trust = loaded.trust()
    x = torch.randn(5, 1, 28, 28)

    calls = []
    counter = served.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        probs, scores = trust(served, x)
    counter.remove()
    assert len(calls) == 1

    # The same quantities computed by hand on the checkpoint's (unfolded) model.
    features = []
    hook = last_linear(loaded.model).register_forward_hook(lambda _m, inputs, _o: features.append(inputs[0]))
    with torch.inference_mode():
        log_ps = loaded.model(x)
    hook.remove()
    g = F.normalize(features[0], dim=1) @ ood.whiten
    expected_scores = torch.cdist(g, ood.centers).square().min(dim=1).values
    torch.testing.assert_close(probs, torch.softmax(log_ps / 1.7, dim=1), atol=1e-5, rtol=1e-4)
    assert scores is not None
    torch.testing.assert_close(scores, expected_scores, atol=1e-3, rtol=1e-4)
    assert trust.threshold == 3.5
    assert torch.equal(out_of_distribution(scores, trust.threshold), scores > 3.5)
    assert not last_linear(served)._forward_hooks  # the hook does not outlive the call


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("calibration", {"method": "temperature", "temperature": 0.0}, "temperature"),
        ("calibration", {"method": "temperature", "temperature": float("nan")}, "temperature"),
        ("calibration", {"method": "isotonic", "temperature": 1.0}, "method"),
        ("ood", {"method": "mahalanobis_l2_penultimate", "whiten": torch.zeros(3, 3),
                 "centers": torch.zeros(10, 16), "threshold": 1.0}, "whiten has shape"),
        ("ood", {"method": "mahalanobis_l2_penultimate", "whiten": torch.full((16, 16), float("inf")),
                 "centers": torch.zeros(10, 16), "threshold": 1.0}, "NaN or infinite"),
        ("ood", {"method": "mahalanobis_l2_penultimate", "whiten": torch.eye(16),
                 "centers": torch.zeros(10, 16), "threshold": "high"}, "threshold"),
    ],
)  # fmt: skip
def test_malformed_records_are_refused(tmp_path: Path, key: str, value: object, message: str) -> None:
    path = write(tmp_path / "m.pt", "network")
    raw = torch.load(path, weights_only=True)
    raw[key] = value
    torch.save(raw, path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_trust_keeps_everything_on_the_models_cuda_device(tmp_path: Path, arch: str) -> None:
    calibration, ood = records(small_model(arch))
    path = write(tmp_path / "m.pt", arch, calibration=calibration, ood=ood)
    on_cpu, on_gpu = load_checkpoint(path), load_checkpoint(path, device="cuda")
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        cpu_probs, cpu_scores = on_cpu.trust()(for_inference(on_cpu.model, on_cpu.architecture), x)
        gpu_probs, gpu_scores = on_gpu.trust()(for_inference(on_gpu.model, on_gpu.architecture), x.cuda())
    assert gpu_probs.device.type == "cuda"
    assert gpu_scores is not None and gpu_scores.device.type == "cuda"
    assert cpu_scores is not None
    torch.testing.assert_close(gpu_probs.cpu(), cpu_probs, atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(gpu_scores.cpu(), cpu_scores, atol=1e-2, rtol=1e-3)


def test_scores_stay_with_their_own_call_while_another_thread_runs_the_model() -> None:
    """The forward hook is the module's: saliency's gradient passes on the checkpoint's model must
    not add their features to the inference thread's batch, which runs the served copy."""
    import threading

    model = small_model("network").eval()
    served = for_inference(model, ARCHITECTURES["network"])
    calibration, ood = records(model)
    trust = Trust(calibration, ood)
    x = torch.randn(1, 1, 28, 28)
    with torch.inference_mode():
        expected = trust(served, x)[1]
    stop = threading.Event()

    def other_thread() -> None:
        noisy = torch.randn(16, 1, 28, 28)
        while not stop.is_set():
            model(noisy)

    thread = threading.Thread(target=other_thread)
    thread.start()
    try:
        with torch.inference_mode():
            outcomes = [trust(served, x)[1] for _ in range(2000)]
    finally:
        stop.set()
        thread.join()
    assert all(s is not None and s.shape == (1,) and torch.allclose(s, expected) for s in outcomes)
