"""The form a checkpoint is served in: its torch model in fp32, or a faster artifact made from it.

`python -m training optimize` exports the model to an ONNX graph with two outputs (the
log-probabilities and the penultimate features the OOD score reads), quantizes it to int8 with
ONNX Runtime's static quantization, checks the quality gates on the test set and stores the
graph in the checkpoint as the optional `served_form` record (docs/performance.md has the
comparison that chose it). The record carries its own hashes: the graph's, and that of the
weights it was made from, so a graph left beside other weights is never served.

One name for one thing: the *served form* is what runs a model's forward passes in the service
(`ServedForm`: `TorchForm` or `OnnxForm`), chosen by FASHION_SERVE_SERVED_FORM, reported as
`served_form` by /model, as the span attribute `fashion_serve.model.served_form`, and as the OIP v2
metadata's `platform` and Triton config's `backend` (those fields' own vocabulary).

At load, `build_form` turns a checkpoint and the requested form into a `ServedForm`: a callable
from a normalized (N, 1, H, W) batch to (log-probabilities, features or None). `auto` serves the
record's graph when it is sound and agrees with the fp32 model on the record's reference images,
else the torch model with one WARNING saying why; an explicit form that cannot serve raises
FormError. Calibration and the OOD score are applied to either form's outputs by `models.trust`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from models.trust import RecordError, forward_with_features

log = logging.getLogger(__name__)

TORCH_FP32 = "torch-fp32"
ONNX_INT8 = "onnx-int8"
FORMS = ("auto", TORCH_FP32, ONNX_INT8)
RECORD_KEY = "served_form"
# At load, the graph must give the fp32 model's top class on this share of the reference images.
MIN_AGREEMENT = 0.98
MAX_GRAPH_BYTES = 64 << 20
MAX_REFERENCE_IMAGES = 1024


class FormError(ValueError):
    """The requested form cannot serve this checkpoint; the message says why."""


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A hash of the weights (names, then bytes, in order): what a served form was made from."""
    digest = hashlib.sha256()
    for name, tensor in state_dict.items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class FormRecord:
    """An ONNX graph made from the checkpoint's weights, with what `optimize` measured of it."""

    name: str
    graph: bytes
    graph_sha256: str
    weights_sha256: str
    reference: np.ndarray  # (N, H, W) uint8 images the graph's answers are checked on at load
    info: Mapping[str, Any]  # precision, runtime version, calibration, the gates' figures

    def to_record(self) -> dict[str, Any]:
        return {
            **self.info,
            "name": self.name,
            "graph": torch.frombuffer(bytearray(self.graph), dtype=torch.uint8),
            "graph_sha256": self.graph_sha256,
            "weights_sha256": self.weights_sha256,
            "reference": torch.from_numpy(self.reference.copy()),
        }

    @classmethod
    def from_record(cls, record: Any) -> FormRecord:
        """Check the record's structure (RecordError); whether it can serve is `build_form`'s call."""
        if not isinstance(record, Mapping) or record.get("name") != ONNX_INT8:
            raise RecordError(f"served_form must be a dict with name {ONNX_INT8!r}")
        graph, reference = record.get("graph"), record.get("reference")
        if not isinstance(graph, torch.Tensor) or graph.dtype != torch.uint8 or graph.dim() != 1:
            raise RecordError("served_form graph must be a 1-D uint8 tensor")
        if graph.numel() > MAX_GRAPH_BYTES:
            raise RecordError(f"served_form graph is {graph.numel():,} bytes; the limit is {MAX_GRAPH_BYTES:,}")
        if not isinstance(reference, torch.Tensor) or reference.dtype != torch.uint8 or reference.dim() != 3:
            raise RecordError("served_form reference must be an (N, H, W) uint8 tensor")
        if not 0 < len(reference) <= MAX_REFERENCE_IMAGES:
            raise RecordError(f"served_form reference must hold 1 to {MAX_REFERENCE_IMAGES} images")
        hashes = {key: record.get(key) for key in ("graph_sha256", "weights_sha256")}
        if not all(isinstance(h, str) and len(h) == 64 for h in hashes.values()):
            raise RecordError("served_form needs graph_sha256 and weights_sha256 hex digests")
        info = {k: v for k, v in record.items() if k not in {"name", "graph", "reference", *hashes}}
        if any(isinstance(v, torch.Tensor) for v in info.values()):
            raise RecordError("served_form holds an unexpected tensor")
        return cls(
            ONNX_INT8, graph.numpy().tobytes(), str(hashes["graph_sha256"]), str(hashes["weights_sha256"]),
            reference.numpy().copy(), info,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """What /model shows: everything but the bytes."""
        return {**self.info, "name": self.name, "graph_sha256": self.graph_sha256, "graph_bytes": len(self.graph)}


class ServedForm(Protocol):
    """A served form: normalized inputs -> (log-probabilities (N, C), penultimate features (N, D) or None)."""

    name: str
    precision: str

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class TorchForm:
    """The checkpoint's own torch model (the served copy from `for_inference`)."""

    precision = "fp32"
    name = TORCH_FP32

    def __init__(self, model: nn.Module, output_layer: nn.Linear | None) -> None:
        self.model = model
        self.output_layer = output_layer  # None: the features are not needed (no OOD statistics)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.output_layer is None:
            return self.model(x), None
        return forward_with_features(self.model, x, self.output_layer)


class OnnxForm:
    """The record's graph run by ONNX Runtime on the CPU, `threads` threads, no spinning."""

    precision = "int8"
    name = ONNX_INT8

    def __init__(self, graph: bytes, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        log_ps, features = self.session.run(None, {self.input: x.numpy()})
        return torch.from_numpy(log_ps), torch.from_numpy(features)


def build_form(
    served: nn.Module,
    original: nn.Module,
    output_layer: nn.Linear | None,
    record: FormRecord | None,
    reference_inputs: torch.Tensor | None,
    choice: str = "auto",
    threads: int = 1,
) -> ServedForm:
    """The form to serve: `served` is the torch model as served, `original` the checkpoint's (its
    weights are what the record's hash must match), `reference_inputs` the record's reference
    images normalized. Raises FormError when `choice` names a form that cannot serve."""
    if choice not in FORMS:
        raise FormError(f"unknown served form {choice!r}; choose one of {', '.join(FORMS)}")
    torch_form = TorchForm(served, output_layer)
    if choice == TORCH_FP32:
        return torch_form
    device = next(original.parameters()).device
    if record is None or device.type != "cpu":
        reason = "the checkpoint has no served_form record" if record is None else f"it runs on the CPU, not {device}"
        if choice == ONNX_INT8:
            raise FormError(f"served form {ONNX_INT8} cannot serve: {reason} (`python -m training optimize` makes one)")
        return torch_form
    try:
        form = _checked_onnx(record, original, torch_form, reference_inputs, threads)
    except FormError as exc:
        if choice == ONNX_INT8:
            raise
        log.warning("serving %s instead of the checkpoint's %s form: %s", TORCH_FP32, ONNX_INT8, exc)
        return torch_form
    return form


def _checked_onnx(
    record: FormRecord, original: nn.Module, reference: TorchForm, inputs: torch.Tensor | None, threads: int
) -> OnnxForm:
    """The record's graph, once its hashes match and it agrees with the fp32 model (FormError otherwise)."""
    if hashlib.sha256(record.graph).hexdigest() != record.graph_sha256:
        raise FormError("its graph does not match its graph_sha256 (corrupt)")
    if weights_sha256(original.state_dict()) != record.weights_sha256:
        raise FormError("it was made from other weights (stale): run `python -m training optimize` again")
    try:
        form = OnnxForm(record.graph, threads)
    except ImportError:
        raise FormError("onnxruntime is not installed") from None
    except Exception as exc:  # onnxruntime raises its own types for graphs it cannot run
        raise FormError(f"onnxruntime cannot run its graph: {exc}") from None
    if inputs is not None:
        agreement = _agreement(form, reference, inputs)
        if agreement < MIN_AGREEMENT:
            raise FormError(
                f"it gives the fp32 model's top class on {100 * agreement:.1f}% of its reference images "
                f"on this machine (at least {100 * MIN_AGREEMENT:.0f}% needed)"
            )
    return form


@torch.inference_mode()
def _agreement(form: ServedForm, reference: ServedForm, inputs: torch.Tensor) -> float:
    try:
        got, features = form(inputs)
    except Exception as exc:  # a graph that loads but fails on real input
        raise FormError(f"its graph fails on the reference images: {exc}") from None
    want, _ = reference(inputs)
    if got.shape != want.shape or (features is not None and features.shape[0] != len(inputs)):
        raise FormError(f"its graph answers shape {tuple(got.shape)}, the model {tuple(want.shape)}")
    return float((got.argmax(1) == want.argmax(1)).double().mean())
