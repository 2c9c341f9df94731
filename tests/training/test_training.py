from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import training.data as data_module
import training.pipeline
import training.trust_commands
from models import build_model, load_checkpoint
from tests.helpers import garment
from training.cli import main
from training.data import DataNotFoundError, load_fashion_mnist, read_idx
from training.fit_trust import fit_trust
from training.train import EpochResult, Recipe, augment, batches, erase, evaluate, fit, reseed


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> None:
    path.write_bytes(gzip.compress(idx_bytes(array)))


def synthetic_images(labels: np.ndarray, seed: int) -> np.ndarray:
    """Each class is a bright bar at its own row band, plus noise: learnable in a few epochs."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, (len(labels), 28, 28))
    for i, label in enumerate(labels):
        images[i, 2 + 2 * label : 4 + 2 * label, 4:24] = 230
    return images.astype(np.uint8)


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 1200), ("t10k", 300)):
        labels = rng.integers(0, 10, n)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", synthetic_images(labels, seed=n))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def test_evaluate_averages_per_example_when_the_last_batch_is_short() -> None:
    torch.manual_seed(0)
    model = build_model("network", {"hidden_layers": [8], "drop_p": 0.0})
    x = torch.randn(10, 1, 28, 28)
    y = torch.randint(0, 10, (10,))
    with torch.no_grad():
        per_example = F.nll_loss(model(x), y, reduction="none")
    result = evaluate(model, x, y, batch_size=4)  # batches of 4, 4 and 2
    assert result.loss == pytest.approx(per_example.mean().item(), rel=1e-6)
    per_batch_mean = torch.stack([per_example[i].mean() for i in batches(10, 4)]).mean().item()
    assert result.loss != pytest.approx(per_batch_mean, rel=1e-6), "the course's per-batch average differs here"
    assert result.confusion.sum().item() == 10


def test_training_loss_is_averaged_per_example() -> None:
    torch.manual_seed(0)
    model = build_model("network", {"hidden_layers": [8], "drop_p": 0.0})
    x, y = torch.randn(10, 1, 28, 28), torch.randint(0, 10, (10,))
    with torch.no_grad():
        expected = F.nll_loss(model(x), y).item()
    result = fit(model, x, y, x, y, recipe=Recipe(epochs=1, batch_size=4, lr=1e-12), generator=reseed(0))
    assert result.history[0].train_loss == pytest.approx(expected, rel=1e-4)


def _train_once(seed: int) -> tuple[list[float], torch.Tensor]:
    generator = reseed(seed)
    model = build_model("classifier", {})
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    result = fit(
        model,
        x,
        y,
        x[:16],
        y[:16],
        recipe=Recipe(epochs=2, batch_size=16, lr=1e-3, max_shift=2, fill=-1.0),
        generator=generator,
    )
    return [r.train_loss for r in result.history], model.fc1.weight.detach().clone()


def test_same_seed_same_result() -> None:
    losses_a, weights_a = _train_once(7)
    losses_b, weights_b = _train_once(7)
    losses_c, _ = _train_once(8)
    assert losses_a == losses_b
    assert torch.equal(weights_a, weights_b)
    assert losses_a != losses_c


def test_flip_only_mirrors_half_the_images() -> None:
    x = torch.zeros(200, 1, 28, 28)
    x[:, :, :, :5] = 1.0  # a bar on the left
    out = augment(x, 0, -1.0, torch.Generator().manual_seed(0))
    mirrored = out[:, 0, 0, -1] == 1.0
    assert 60 < mirrored.sum() < 140
    assert torch.equal(out[~mirrored], x[~mirrored])
    assert torch.equal(out[mirrored], x[mirrored].flip(-1))


def test_shift_moves_content_and_keeps_the_fill() -> None:
    x = torch.full((64, 1, 28, 28), -1.0)
    x[:, :, 10:18, 10:18] = 1.0
    shifted = augment(x, 2, -1.0, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    assert set(shifted.unique().tolist()) == {-1.0, 1.0}
    assert (shifted == 1.0).sum(dim=(1, 2, 3)).eq(64).all(), "the 8x8 square is moved whole, never cut"
    assert not torch.equal(shifted, x)


def test_erase_blanks_one_rectangle_in_the_chosen_share() -> None:
    x = torch.ones(400, 1, 28, 28)
    out = erase(x, 0.5, -1.0, torch.Generator().manual_seed(0))
    erased = (out == -1.0).flatten(1)
    touched = erased.any(dim=1)
    assert 150 < touched.sum() < 250, "about half the images"
    assert torch.equal(out[~touched], x[~touched])
    areas = erased[touched].sum(dim=1).float() / (28 * 28)
    assert areas.min() >= 0.005 and areas.max() <= 0.6
    for image in out[touched][:20, 0] == -1.0:  # each erased region is one filled rectangle
        rows, cols = image.any(dim=1).nonzero(), image.any(dim=0).nonzero()
        box = image[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all()


def test_ema_keeps_the_averaged_weights() -> None:
    torch.manual_seed(0)
    model = build_model("classifier", {})
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    result = fit(model, x, y, x, y, recipe=Recipe(epochs=2, batch_size=16, lr=1e-2, ema_decay=0.9), generator=reseed(0))
    assert result.best_state is not None
    kept = result.best_state["fc1.weight"]
    assert not torch.equal(kept, model.fc1.weight), "the kept weights are the average, not the last step's"


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path: Path) -> None:
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    recipe = Recipe(epochs=3, batch_size=16, lr=1e-3, max_shift=2, erase_p=0.5, weight_decay=0.05, ema_decay=0.9)

    def run(epochs: int, progress: Path | None) -> tuple[torch.nn.Module, list[float]]:
        reseed(1)
        model = build_model("cnn", {"channels": [4, 8], "hidden": 8})
        generator = reseed(3)
        result = fit(model, x, y, x[:16], y[:16], recipe=recipe, generator=generator, progress=progress)
        return model, [r.train_loss for r in result.history][:epochs]

    whole, losses = run(3, None)
    progress = tmp_path / "m.pt.progress"
    # Stop after two epochs: run a fit that raises once the second epoch's progress is written.
    reseed(1)
    model = build_model("cnn", {"channels": [4, 8], "hidden": 8})
    generator = reseed(3)

    class Stop(Exception):
        pass

    def stop_after_two(record: EpochResult) -> None:
        if record.epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        fit(model, x, y, x[:16], y[:16], recipe=recipe, generator=generator, progress=progress, on_epoch=stop_after_two)
    assert progress.exists()
    resumed, resumed_losses = run(3, progress)
    assert resumed_losses == losses, "the history carries over and the last epoch matches"
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_short_training_run_lowers_the_loss_and_writes_a_loadable_checkpoint(
    synthetic_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run" / "model.pt"
    code = main(
        [
            "train",
            "--arch",
            "classifier",
            "--epochs",
            "4",
            "--batch-size",
            "64",
            "--lr",
            "3e-3",
            "--data-dir",
            str(synthetic_data),
            "--out",
            str(out),
            "--limit",
            "1000",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "run" / "model.metrics.json").read_text())
    losses = [epoch["train_loss"] for epoch in report["history"]]
    assert losses[-1] < losses[0] * 0.5
    assert report["metrics"]["test_accuracy"] > 0.9
    assert report["training"]["seed"] == 0 and report["training"]["train_examples"] == 800
    assert (tmp_path / "run" / "model.curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "run" / "model.confusion.png").read_bytes()[:4] == b"\x89PNG"

    loaded = load_checkpoint(out)
    assert loaded.arch == "classifier"
    assert loaded.metrics["test_accuracy"] == report["metrics"]["test_accuracy"]
    assert loaded.training["data_source"] == f"idx:{synthetic_data}"

    capsys.readouterr()
    assert main(["evaluate", str(out), "--data-dir", str(synthetic_data), "--json", "--limit", "300"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["test_accuracy"] == pytest.approx(report["metrics"]["test_accuracy"])
    assert sum(map(sum, evaluated["confusion_matrix"])) == 300
    assert evaluated["training"]["epochs"] == 4 and evaluated["training"]["optimizer"] == "Adam"
    assert main(["evaluate", str(out), "--data-dir", str(synthetic_data), "--limit", "300"]) == 0
    assert "trained with: epochs 4, batch_size 64, optimizer Adam" in capsys.readouterr().out


def test_a_preset_sets_the_recipe_and_the_command_line_wins() -> None:
    from training.cli import build_parser

    args = build_parser("fashion-cnn-v2").parse_args(["train", "--preset", "fashion-cnn-v2", "--epochs", "3"])
    assert (args.epochs, args.erase, args.ema, args.weight_decay, args.augment) == (3, 0.5, 0.999, 0.05, "shift")
    three = build_parser("fashion-cnn-v3").parse_args(["train", "--preset", "fashion-cnn-v3"])
    assert three.channels == [32, 64, 128] and three.epochs == 60
    wider = build_parser("fashion-cnn-v3").parse_args(
        ["train", "--preset", "fashion-cnn-v3", "--channels", "8", "16", "32"]
    )
    assert wider.channels == [8, 16, 32]
    four = build_parser("fashion-cnn-v4").parse_args(["train", "--preset", "fashion-cnn-v4"])
    assert four.channels == [32, 64, 128] and four.distill_mirror and four.teacher.name == "fashion_cnn_v3.pt"
    assert four.teacher.is_file(), "the teacher is bundled"
    five = build_parser("fashion-cnn-v5").parse_args(["train", "--preset", "fashion-cnn-v5"])
    assert (five.channels, five.epochs, five.erase, five.teacher) == ([32, 64, 128], 80, 0.5, None)
    six = build_parser("fashion-cnn-v6").parse_args(["train", "--preset", "fashion-cnn-v6"])
    assert (six.channels, six.depths, six.epochs) == ([32, 64, 128], [1, 2, 2], 80)
    teacher = build_parser("fashion-cnn-teacher").parse_args(["train", "--preset", "fashion-cnn-teacher"])
    assert (teacher.channels, teacher.epochs, teacher.erase, teacher.teacher) == ([64, 128, 256], 60, 0.5, None)
    seven = build_parser("fashion-cnn-v7").parse_args(["train", "--preset", "fashion-cnn-v7"])
    assert (seven.channels, seven.epochs, seven.distill_mirror) == ([24, 48, 96], 80, True)
    assert teacher.precision == seven.precision == "auto" and five.precision is None
    assert seven.teacher.parts[-2:] == ("models", "fashion_cnn_teacher.pt")
    assert seven.teacher.is_file(), "the teacher is bundled"


def test_evaluate_reads_course_checkpoints(
    synthetic_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(0)
    model = build_model("network", {})
    course = {"input_size": 784, "output_size": 10, "hidden_layers": [512, 256, 128], "state_dict": model.state_dict()}
    torch.save(course, tmp_path / "checkpoint.pth")
    assert main(["evaluate", str(tmp_path / "checkpoint.pth"), "--data-dir", str(synthetic_data)]) == 0
    out = capsys.readouterr().out
    assert "course format" in out
    assert "Ankle boot" in out and "confusion matrix" in out


def test_missing_data_says_what_to_do(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_module, "DEBIAN_DIR", tmp_path / "no-debian")
    monkeypatch.setattr(data_module, "TORCHVISION_ROOT", tmp_path / "no-cache")
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    with pytest.raises(DataNotFoundError, match=r"apt-get install dataset-fashion-mnist.*--data-dir.*--download"):
        load_fashion_mnist(tmp_path)
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        main(["train", "--epochs", "1", "--out", str(tmp_path / "m.pt")])


def test_torchvision_layout_and_raw_files_are_found(tmp_path: Path) -> None:
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    labels = np.arange(10) % 10
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", labels)
        images = np.stack([garment(seed=i) for i in range(10)])
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images))  # uncompressed, as torchvision keeps it
    found = load_fashion_mnist(tmp_path)
    assert found.train.images.shape == (10, 28, 28) and found.train.images.dtype == torch.uint8
    assert found.test.labels.tolist() == list(range(10))


def test_read_idx_rejects_a_bad_file(tmp_path: Path) -> None:
    (tmp_path / "bad-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(ValueError, match="declares"):
        read_idx(tmp_path / "bad-idx1-ubyte")
    (tmp_path / "text").write_bytes(b"hello world")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        read_idx(tmp_path / "text")


def test_cuda_without_cuda_is_a_clear_exit(synthetic_data: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit, match="--device cuda: device 'cuda' requested but CUDA is not available"):
        main(["train", "--device", "cuda", "--data-dir", str(synthetic_data), "--out", str(tmp_path / "m.pt")])


def test_calibrate_holds_out_what_training_held_out_under_limit(
    synthetic_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint trained with --limit: calibrate fits the temperature and the OOD threshold on
    images the model never trained on, and the Gaussians on exactly the images it trained on."""
    trained: list[torch.Tensor] = []
    fitted: dict[str, torch.Tensor] = {}

    def spy_fit(model: torch.nn.Module, train_x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        trained.append(train_x.cpu())
        return fit(model, train_x, *args, **kwargs)

    def spy_fit_trust(model: torch.nn.Module, train: Any, val: Any, *args: Any, **kwargs: Any) -> Any:
        fitted.update(train=train[0].cpu(), val=val[0].cpu())
        return fit_trust(model, train, val, *args, **kwargs)

    out = tmp_path / "limited.pt"
    monkeypatch.setattr(training.pipeline, "fit", spy_fit)
    options = ["--data-dir", str(synthetic_data), "--device", "cpu"]
    common = ["--arch", "network", "--hidden-layers", "16", "--epochs", "1", "--limit", "600", "--seed", "1"]
    assert main(["train", *common, *options, "--out", str(out)]) == 0
    monkeypatch.setattr(training.trust_commands, "fit_trust", spy_fit_trust)
    assert main(["calibrate", str(out), *options]) == 0

    def rows(x: torch.Tensor) -> set[bytes]:
        return {image.numpy().tobytes() for image in x}

    [train_x] = trained
    assert len(rows(train_x)) == len(train_x) == 480, "synthetic images are distinct"
    overlap = len(rows(fitted["val"]) & rows(train_x))
    assert overlap == 0, f"calibration validated on {overlap} of {len(fitted['val'])} images the model trained on"
    assert rows(fitted["train"]) == rows(train_x), "the Gaussians are fitted on what the model trained on"


def test_calibrate_mirror_fits_the_mirrored_cnn_and_refuses_other_architectures(
    synthetic_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    mirrored_when_fitted: list[bool] = []

    def spy_fit_trust(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        mirrored_when_fitted.append(model.mirror)
        return fit_trust(model, *args, **kwargs)

    options = ["--data-dir", str(synthetic_data), "--device", "cpu"]
    cnn = tmp_path / "cnn.pt"
    common = ["--epochs", "1", "--limit", "300", *options]
    shape = ["--channels", "4", "8", "--depths", "1", "2", "--hidden", "8"]
    assert main(["train", "--arch", "cnn", *shape, *common, "--out", str(cnn)]) == 0
    monkeypatch.setattr(training.trust_commands, "fit_trust", spy_fit_trust)
    assert main(["calibrate", str(cnn), "--mirror", "--out", str(tmp_path / "mirrored.pt"), *options]) == 0
    assert mirrored_when_fitted == [True], "the temperature and the OOD statistics are fitted on the mirrored answers"
    assert load_checkpoint(tmp_path / "mirrored.pt").model_args["mirror"] is True
    assert load_checkpoint(cnn).model_args["mirror"] is False
    gated = tmp_path / "gated.pt"
    assert main(["calibrate", str(cnn), "--mirror", "--mirror-below", "0.8", "--out", str(gated), *options]) == 0
    for path in (tmp_path / "mirrored.pt", gated):  # its recorded test figures are its own, not the plain model's
        capsys.readouterr()
        assert main(["evaluate", str(path), "--json", *options]) == 0
        measured = json.loads(capsys.readouterr().out)
        recorded = load_checkpoint(path).metrics
        assert (recorded["test_accuracy"], recorded["test_loss"]) == (measured["test_accuracy"], measured["test_loss"])
    assert load_checkpoint(gated).model_args["mirror_below"] == 0.8
    assert load_checkpoint(gated).model_args["depths"] == [1, 2]
    assert load_checkpoint(gated).model.mirror_below == 0.8
    with pytest.raises(SystemExit, match="--mirror-below applies with --mirror only"):
        main(["calibrate", str(cnn), "--mirror-below", "0.8", *options])
    with pytest.raises(SystemExit, match=r"--mirror-below: mirror_below must be a number in \(0, 1\]"):
        main(["calibrate", str(cnn), "--mirror", "--mirror-below", "1.5", *options])
    with pytest.raises(SystemExit, match="--mirror-below applies with --mirror only"):
        main(["calibrate", str(cnn), "--mirror-below", "auto", *options])
    with pytest.raises(SystemExit):
        main(["calibrate", str(cnn), "--mirror", "--mirror-below", "often", *options])
    mlp = tmp_path / "mlp.pt"
    assert main(["train", "--arch", "network", "--hidden-layers", "16", *common, "--out", str(mlp)]) == 0
    with pytest.raises(SystemExit, match="--mirror: the network architecture has no mirrored form"):
        main(["calibrate", str(mlp), "--mirror", *options])
    with pytest.raises(SystemExit, match="--mirror: the network architecture has no mirrored form"):
        main(["calibrate", str(mlp), "--mirror", "--mirror-below", "auto", *options])


def test_mirror_below_auto_chooses_the_smallest_threshold_as_good_as_always(
    synthetic_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`calibrate --mirror --mirror-below auto` measures the always-mirrored form and each
    threshold of the grid on the validation split, and keeps the smallest that reaches it."""
    from training.trust_commands import MIRROR_BELOW_GRID

    options = ["--data-dir", str(synthetic_data), "--device", "cpu"]
    cnn, chosen = tmp_path / "cnn.pt", tmp_path / "auto.pt"
    assert main(["train", "--arch", "cnn", "--channels", "4", "8", "--hidden", "8", "--epochs", "1",
                 "--limit", "300", *options, "--out", str(cnn)]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["calibrate", str(cnn), "--mirror", "--mirror-below", "auto", "--out", str(chosen), *options]) == 0
    printed = capsys.readouterr().out
    always = float(printed.split("mirrored always: ")[1].split("%")[0])
    swept = {float(line.split("below ")[1].split(":")[0]): float(line.split(": ")[1].split("%")[0])
             for line in printed.splitlines() if line.startswith("  mirrored below")}  # fmt: skip
    assert list(swept) == list(MIRROR_BELOW_GRID)
    below = load_checkpoint(chosen).model_args["mirror_below"]
    reaching = [p for p, accuracy in swept.items() if accuracy >= always]
    assert below == (reaching[0] if reaching else None)
    assert load_checkpoint(chosen).model_args["mirror"] is True


def _distillation_case() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A teacher, a batch, a student's log-probabilities and their summed labels' loss."""
    torch.manual_seed(0)
    teacher_model = build_model("classifier", {}).eval()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    student = torch.log_softmax(torch.randn(8, 10), dim=1)
    return teacher_model, x, student, torch.nn.functional.nll_loss(student, y, reduction="sum")


def _softened_kl(p_teacher: torch.Tensor, student: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 x KL(teacher || student), the student's log-probabilities softened by T."""
    q_student = torch.softmax(student / temperature, dim=1)
    return (p_teacher * (p_teacher.log() - q_student.log())).sum() * temperature**2


def test_the_teacher_part_of_the_loss_is_the_softened_kl_divergence() -> None:
    from training.train import Teacher

    teacher_model, x, student, label_loss = _distillation_case()
    teacher = Teacher(teacher_model, alpha=0.25, temperature=3.0)
    blended = teacher.blend(label_loss, student, x)
    with torch.no_grad():
        p_teacher = torch.softmax(teacher_model(x) / 3.0, dim=1)  # its log-probabilities / T: logits / T
    kl = _softened_kl(p_teacher, student, 3.0)
    assert blended.item() == pytest.approx((0.75 * label_loss + 0.25 * kl).item(), rel=1e-5)
    # A student that already answers as the teacher does pays only for the labels.
    with torch.no_grad():
        same = teacher_model(x)
    assert teacher.blend(label_loss, same, x).item() == pytest.approx(0.75 * label_loss.item(), rel=1e-5)


def test_a_mirrored_teacher_answers_with_the_mean_of_an_image_and_its_mirror() -> None:
    from training.train import Teacher

    teacher_model, x, student, label_loss = _distillation_case()
    blended = Teacher(teacher_model, alpha=1.0, temperature=2.0, mirror=True).blend(label_loss, student, x)
    with torch.no_grad():
        p_teacher = (
            torch.softmax(teacher_model(x) / 2, dim=1) + torch.softmax(teacher_model(x.flip(-1)) / 2, dim=1)
        ) / 2
    kl = _softened_kl(p_teacher, student, 2.0)
    assert blended.item() == pytest.approx(kl.item(), rel=1e-5)
    plain = Teacher(teacher_model, alpha=1.0, temperature=2.0).blend(label_loss, student, x)
    assert plain.item() != pytest.approx(blended.item(), rel=1e-3), "the mirror changes the teacher's answer"


def test_a_bf16_teacher_answers_as_the_fp32_one_to_within_rounding() -> None:
    """Under bfloat16 autocast the teacher's softened answers differ from fp32's by rounding only
    (what `--teacher-precision bf16` trades for speed); the student's part is unchanged."""
    from training.train import Teacher

    teacher_model, x, _, _ = _distillation_case()
    exact = Teacher(teacher_model, temperature=4.0, mirror=True).answer(x)
    rounded = Teacher(teacher_model, temperature=4.0, mirror=True, precision="bf16").answer(x)
    assert rounded.dtype == torch.float32 and not torch.equal(rounded, exact), "autocast was applied"
    gap = torch.nn.functional.kl_div(rounded, exact, log_target=True, reduction="batchmean")
    assert gap.item() < 1e-3 and torch.equal(rounded.argmax(1), exact.argmax(1))


def test_a_resumed_distillation_keeps_the_teacher_precision_it_began_with(tmp_path: Path) -> None:
    from training.train import Teacher

    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    recipe = Recipe(epochs=2, batch_size=16, lr=1e-3)
    progress = tmp_path / "s.pt.progress"
    teacher_model = build_model("classifier", {}).eval()

    def stop(record: EpochResult) -> None:
        raise KeyboardInterrupt  # the session ends after the first epoch

    student = build_model("cnn", {"channels": [4, 8], "hidden": 8})
    began = Teacher(teacher_model, precision="bf16")
    with pytest.raises(KeyboardInterrupt):
        fit(student, x, y, x, y, recipe=recipe, generator=reseed(0), progress=progress, teacher=began, on_epoch=stop)
    resumed = Teacher(teacher_model, precision="fp32")  # resumed where auto chose otherwise
    fit(student, x, y, x, y, recipe=recipe, generator=reseed(0), progress=progress, teacher=resumed)
    assert resumed.precision == "bf16"


def test_native_bf16_follows_the_cpu_flags(tmp_path: Path) -> None:
    from models import devices

    with_bf16, without = tmp_path / "bf16", tmp_path / "plain"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_vnni\n")
    assert devices._cpu_flags(with_bf16) >= {"avx512_bf16"}
    assert "avx512_bf16" not in devices._cpu_flags(without)
    assert devices._cpu_flags(tmp_path / "missing") == frozenset()
    assert devices.native_bf16(torch.device("meta")) is False


def test_a_student_learns_from_a_teacher_and_records_it(synthetic_data: Path, tmp_path: Path) -> None:
    common = ["--data-dir", str(synthetic_data), "--limit", "600", "--device", "cpu", "--batch-size", "64"]
    teacher = tmp_path / "teacher.pt"
    assert main(["train", "--arch", "classifier", "--epochs", "3", "--out", str(teacher), *common]) == 0
    student = tmp_path / "student.pt"
    args = ["train", "--arch", "cnn", "--channels", "4", "8", "--hidden", "16", "--epochs", "3", "--out", str(student)]
    assert main([*args, "--teacher", str(teacher), "--distill-alpha", "0.7", "--distill-mirror", *common]) == 0
    training = load_checkpoint(student).training
    assert training["teacher_sha256"] == hashlib.sha256(teacher.read_bytes()).hexdigest()
    assert (training["distill_alpha"], training["distill_temperature"], training["distill_mirror"]) == (0.7, 4.0, True)
    assert training["teacher_precision"] in ("fp32", "bf16")
    report = json.loads((tmp_path / "student.metrics.json").read_text())
    assert report["metrics"]["test_accuracy"] > 0.5, "the student learned from the labels and the teacher"
    with pytest.raises(SystemExit, match="cannot load the teacher"):
        main([*args, "--teacher", str(tmp_path / "missing.pt"), *common])
    with pytest.raises(SystemExit, match="--distill-alpha must be in"):
        main([*args, "--teacher", str(teacher), "--distill-temperature", "0", *common])
    with pytest.raises(SystemExit, match="apply with --teacher only"):
        main([*args, "--distill-alpha", "0.3", *common])
    with pytest.raises(SystemExit, match="applies with --teacher only"):
        main([*args, "--teacher-precision", "bf16", *common])


def test_a_bf16_recipe_trains_under_autocast_and_keeps_fp32_weights() -> None:
    """`Recipe(precision="bf16")`: the forward passes run in bfloat16 (the first layer's output is
    bfloat16), the weights and their updates stay fp32, and the loss falls as in fp32."""
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    model = build_model("cnn", {"channels": [4, 8], "hidden": 8})
    seen: list[torch.dtype] = []
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    recipe = Recipe(epochs=3, batch_size=16, lr=3e-3, precision="bf16")
    result = fit(model, x, y, x, y, recipe=recipe, generator=reseed(0))
    assert result.precision == "bf16"
    assert torch.bfloat16 in seen and all(p.dtype == torch.float32 for p in model.parameters())
    assert result.history[-1].train_loss < result.history[0].train_loss
    plain: list[torch.dtype] = []
    model = build_model("cnn", {"channels": [4, 8], "hidden": 8})
    next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d)).register_forward_hook(
        lambda module, inputs, output: plain.append(output.dtype)
    )
    assert (
        fit(model, x, y, x, y, recipe=Recipe(epochs=1, batch_size=16, lr=3e-3), generator=reseed(0)).precision == "fp32"
    )
    assert set(plain) == {torch.float32}


def test_a_resumed_run_keeps_the_precision_it_began_with(tmp_path: Path) -> None:
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    progress = tmp_path / "m.pt.progress"

    def stop(record: EpochResult) -> None:
        raise KeyboardInterrupt  # the session ends after the first epoch

    model = build_model("cnn", {"channels": [4, 8], "hidden": 8})
    began = Recipe(epochs=2, batch_size=16, lr=1e-3, precision="bf16")
    with pytest.raises(KeyboardInterrupt):
        fit(model, x, y, x, y, recipe=began, generator=reseed(0), progress=progress, on_epoch=stop)
    elsewhere = Recipe(epochs=2, batch_size=16, lr=1e-3)  # resumed where auto chose fp32
    assert fit(model, x, y, x, y, recipe=elsewhere, generator=reseed(0), progress=progress).precision == "bf16"


def test_the_precision_is_chosen_by_the_device_and_recorded(
    synthetic_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--precision auto` trains in bf16 only where the device has it natively; the checkpoint and
    `evaluate` say which; the teacher's and the v7 student's presets choose auto, older ones fp32."""
    from training import pipeline

    common = ["--data-dir", str(synthetic_data), "--limit", "300", "--device", "cpu", "--epochs", "1"]
    args = ["train", "--arch", "cnn", "--channels", "4", "8", "--hidden", "8", *common]
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(pipeline, "native_bf16", lambda device, native=native: native)
        out = tmp_path / f"{expected}.pt"
        assert main([*args, "--precision", "auto", "--out", str(out)]) == 0
        assert load_checkpoint(out).training["precision"] == expected
    assert main([*args, "--out", str(tmp_path / "plain.pt")]) == 0
    assert load_checkpoint(tmp_path / "plain.pt").training["precision"] == "fp32"
    assert "precision bf16" in pipeline.describe_recipe(load_checkpoint(tmp_path / "bf16.pt").training)
    assert (
        pipeline.PRESETS["fashion-cnn-teacher"]["precision"]
        == pipeline.PRESETS["fashion-cnn-v7"]["precision"]
        == "auto"
    )
    assert "precision" not in pipeline.PRESETS["fashion-cnn-v5"]
