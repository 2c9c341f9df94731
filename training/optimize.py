"""`python -m training optimize CHECKPOINT`: make the checkpoint's int8 served form, check it, store it.

The model is exported to ONNX with two outputs (log-probabilities and the penultimate features the
OOD score reads, so one pass gives both), quantized statically by ONNX Runtime (QDQ, int8
weights per channel, uint8 activations, calibrated on training images of the checkpoint's own
split; `reduce_range` keeps int8 accurate on CPUs without VNNI), then measured beside the fp32
model on the 10,000 test images and the generated non-garment images. Only a form that passes
every gate in `GATES` is written, as the checkpoint's `served_form` record
(`models.served_form`); the figures go into the record and are printed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import CheckpointError, LoadedModel, for_inference, load_checkpoint, save_checkpoint
from models.preprocessing import normalize_tensor
from models.served_form import ONNX_INT8, TORCH_FP32, FormRecord, ServedForm, weights_sha256
from models.trust import Trust, forward_with_features
from training.data import FashionMNIST
from training.fit_trust import expected_calibration_error, flagged_share
from training.ood_data import ood_inputs
from training.trust_commands import auroc, training_split

CALIBRATION_IMAGES = 512
REFERENCE_IMAGES = 256
# The quality gates a served form must pass against the fp32 model, on the test set.
GATES = {
    "max_accuracy_drop_points": 0.3,
    "max_calibrated_ece": 0.01,
    "min_ood_auroc": 0.95,
    "max_flagged_change_points": 1.0,
}


class _WithFeatures(nn.Module):
    """The model as one graph with both outputs the service reads."""

    def __init__(self, model: nn.Module, output_layer: nn.Linear) -> None:
        super().__init__()
        self.model, self.output_layer = model, output_layer

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return forward_with_features(self.model, x, self.output_layer)


def export_onnx(loaded: LoadedModel) -> bytes:
    """The fp32 served model as an ONNX graph: input `input` (N, C, H, W), any N; outputs `log_probs`, `features`."""
    model = for_inference(loaded.model, loaded.architecture).to(memory_format=torch.contiguous_format).cpu()
    wrapper = _WithFeatures(model, loaded.architecture.output_layer(model)).eval()
    example = torch.zeros(2, *loaded.architecture.input_shape)
    program = torch.onnx.export(
        wrapper,
        (example,),
        dynamo=True,
        input_names=["input"],
        output_names=["log_probs", "features"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
        verbose=False,
    )
    assert program is not None
    return bytes(program.model_proto.SerializeToString())


def quantize_int8(graph: bytes, calibration: np.ndarray, batch: int = 32) -> bytes:
    """ONNX Runtime's static int8 quantization of `graph`, its ranges taken from `calibration` inputs."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": calibration[i : i + batch]} for i in range(0, len(calibration), batch)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        fp32, prepared, int8 = (Path(folder) / name for name in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(graph)
        # ONNX Runtime's symbolic shape inference cannot follow a data-dependent NonZero (the
        # CNN mirrored below a probability); ONNX's own shape inference still runs.
        data_dependent = any(node.op_type == "NonZero" for node in onnx.load_from_string(graph).graph.node)
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=data_dependent)
        quantize_static(
            str(prepared),
            str(int8),
            Batches(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=_single_channel_convolutions(onnx.load(str(prepared))),
        )
        return int8.read_bytes()


def _single_channel_convolutions(model: Any) -> list[str]:
    """The convolutions of one input channel (the CNN's first, on the image): they stay fp32, as
    ONNX Runtime's int8 convolution is slower there than its fp32 one (docs/performance.md)."""
    weights = {tensor.name: tensor.dims for tensor in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type == "Conv" and len(weights.get(node.input[1], ())) == 4 and weights[node.input[1]][1] == 1
    ]


@torch.inference_mode()
def measure(
    form: ServedForm, trust: Trust, test: tuple[torch.Tensor, torch.Tensor], ood: dict[str, np.ndarray]
) -> dict[str, float]:
    """What the gates read, for one form: test accuracy (%), calibrated ECE, OOD AUROC, share flagged (%)."""

    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = [trust.apply(*form(batch.contiguous())) for batch in x.split(500)]
        scores = [s for _, s in parts if s is not None]
        return torch.cat([p for p, _ in parts]), torch.cat(scores) if scores else None

    x, labels = test
    probabilities, scores = run(x)
    figures = {
        "accuracy": 100 * float((probabilities.argmax(1) == labels).double().mean()),
        "calibrated_ece": expected_calibration_error(probabilities, labels),
    }
    if scores is not None and trust.threshold is not None:
        pooled = run(torch.from_numpy(np.concatenate(list(ood.values()))))[1]
        assert pooled is not None
        figures["ood_auroc"] = auroc(pooled, scores)
        figures["test_flagged"] = 100 * flagged_share(scores, trust.threshold)
    return figures


def gate_failures(fp32: dict[str, float], form: dict[str, float]) -> list[str]:
    """Each gate `form` misses against `fp32`, in words; empty when it passes."""
    failures = []
    if fp32["accuracy"] - form["accuracy"] > GATES["max_accuracy_drop_points"]:
        failures.append(f"accuracy {form['accuracy']:.2f}% vs fp32 {fp32['accuracy']:.2f}%")
    if form["calibrated_ece"] > GATES["max_calibrated_ece"]:
        failures.append(f"calibrated ECE {form['calibrated_ece']:.4f}")
    if "ood_auroc" in form and form["ood_auroc"] < GATES["min_ood_auroc"]:
        failures.append(f"OOD AUROC {form['ood_auroc']:.3f}")
    if "test_flagged" in form and abs(form["test_flagged"] - fp32["test_flagged"]) > GATES["max_flagged_change_points"]:
        failures.append(f"test images flagged {form['test_flagged']:.2f}% vs fp32 {fp32['test_flagged']:.2f}%")
    return failures


def make_record(loaded: LoadedModel, calibration: np.ndarray, reference: np.ndarray) -> FormRecord:
    """The int8 form of `loaded`, calibrated on `calibration` (normalized inputs), checked at load on
    `reference` (uint8 images); its figures are added by `run_optimize`."""
    import onnxruntime

    graph = quantize_int8(export_onnx(loaded), calibration)
    info = {
        "precision": "int8",
        "runtime": f"onnxruntime {onnxruntime.__version__}",
        "quantization": (
            "static, QDQ, int8 weights per channel (reduced range), uint8 activations;"
            " convolutions of one input channel fp32"
        ),
        "calibration_images": len(calibration),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return FormRecord(
        ONNX_INT8, graph, hashlib.sha256(graph).hexdigest(), weights_sha256(loaded.model.state_dict()), reference, info
    )


def _images(loaded: LoadedModel, data: FashionMNIST) -> tuple[np.ndarray, np.ndarray]:
    """(calibration inputs, reference images): training images of the checkpoint's own split."""
    train_idx, _ = training_split(loaded, len(data.train.labels))
    chosen = data.train.images[train_idx[: CALIBRATION_IMAGES + REFERENCE_IMAGES]]
    calibration = normalize_tensor(chosen[:CALIBRATION_IMAGES], loaded.preprocess).unsqueeze(1).numpy()
    return calibration, chosen[CALIBRATION_IMAGES:].numpy()


def run_optimize(args: argparse.Namespace, data: FashionMNIST) -> int:
    """Make, measure and store the int8 form (on the CPU, where it serves); exit 1 when it misses a gate."""
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        loaded = load_checkpoint(args.checkpoint, device="cpu")
    except CheckpointError as exc:
        raise SystemExit(f"cannot load checkpoint: {exc}") from None
    record = make_record(loaded, *_images(loaded, data))
    with_record = LoadedModel(**{**vars(loaded), "served_form": record})
    form = with_record.form(ONNX_INT8, threads=args.threads or 1)
    trust = loaded.trust()
    test = (normalize_tensor(data.test.images, loaded.preprocess).unsqueeze(1), data.test.labels)
    ood = ood_inputs(loaded.preprocess, args.per_kind, seed=0)
    fp32_form = loaded.form(TORCH_FP32)
    figures = {"fp32": measure(fp32_form, trust, test, ood), "int8": measure(form, trust, test, ood)}
    _print(figures)
    failures = gate_failures(figures["fp32"], figures["int8"])
    if failures:
        raise SystemExit(f"the int8 form misses its quality gates ({'; '.join(failures)}); nothing written")
    record = FormRecord(**{**vars(record), "info": {**record.info, "gates": GATES, "measured": figures}})
    out = save_checkpoint(
        args.out or args.checkpoint, loaded.model, loaded.arch, loaded.model_args, loaded.preprocess,
        loaded.class_names, metrics=loaded.metrics, training=loaded.training, calibration=loaded.calibration,
        ood=loaded.ood, created_at=loaded.created_at, served_form=record,
    )  # fmt: skip
    print(f"wrote {out} with its {ONNX_INT8} form ({len(record.graph):,} bytes, sha256 {record.graph_sha256[:12]})")
    return 0


def _print(figures: dict[str, dict[str, float]]) -> None:
    names = {"accuracy": "test accuracy %", "calibrated_ece": "calibrated ECE", "ood_auroc": "OOD AUROC"}
    names["test_flagged"] = "test flagged %"
    print(f"  {'':<16} {'fp32':>8} {'int8':>8}")
    for key, name in names.items():
        if key in figures["fp32"]:
            print(f"  {name:<16} {figures['fp32'][key]:8.4f} {figures['int8'][key]:8.4f}")
