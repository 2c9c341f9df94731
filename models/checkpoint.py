"""Self-describing checkpoints: save, and load safely.

Format v1 is a dict of tensors and primitive values only, so
`torch.load(path, map_location="cpu", weights_only=True)` reads it and no pickled code
can run. It carries everything needed to serve: the architecture and its arguments,
the weights, class names, preprocessing, metrics and how it was trained.
The course's four-key format (`input_size`, `output_size`, `hidden_layers`,
`state_dict`) is accepted as it is.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import os
import pickle
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.devices import resolve_device
from models.fashion_mnist import FASHION_MNIST_CLASSES
from models.networks import ARCHITECTURES, Architecture, build_model, for_inference, model_args_for
from models.preprocessing import PreprocessConfig, normalize
from models.served_form import RECORD_KEY, FormRecord, ServedForm, build_form
from models.trust import Calibration, OODStats, RecordError, Trust

FORMAT_VERSION = 1
COURSE_KEYS = frozenset({"input_size", "output_size", "hidden_layers", "state_dict"})
# The course normalized with transforms.Normalize((0.5,), (0.5,)).
COURSE_PREPROCESS = PreprocessConfig(mean=0.5, std=0.5)
MAX_PARAMETERS = 50_000_000
MAX_FILE_BYTES = 1 << 30  # torch.load materializes every tensor in the file, so cap the file first


class CheckpointError(Exception):
    """A checkpoint cannot be loaded; the message says why and what to do."""


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for inference (eval mode, on its device) and what its checkpoint said."""

    model: nn.Module
    arch: str
    model_args: dict[str, Any]
    class_names: tuple[str, ...]
    preprocess: PreprocessConfig
    format: str
    metrics: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    created_at: str | None = None
    calibration: Calibration | None = None  # None: the checkpoint has no calibration record
    ood: OODStats | None = None  # None: no out-of-distribution statistics
    served_form: FormRecord | None = None  # None: no faster form made by `python -m training optimize`

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]

    def trust(self) -> Trust:
        """What serves this checkpoint's calibration and OOD records (either may be absent)."""
        return Trust(self.calibration, self.ood, self.device, self.architecture.output_layer)

    def form(self, choice: str = "auto", threads: int = 1) -> ServedForm:
        """The form to serve (`models.served_form.build_form`; raises FormError): the fp32 copy
        from `for_inference`, or the record's faster form where it is sound and `choice` allows."""
        served = for_inference(self.model, self.architecture)
        layer = self.architecture.output_layer(served) if self.ood is not None else None
        record = self.served_form
        reference = None
        if record is not None:
            reference = torch.from_numpy(normalize(record.reference, self.preprocess)).unsqueeze(1)
        return build_form(served, self.model, layer, record, reference, choice, threads)


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    arch: str,
    model_args: Mapping[str, Any],
    preprocess: PreprocessConfig,
    class_names: Sequence[str] = FASHION_MNIST_CLASSES,
    metrics: Mapping[str, Any] | None = None,
    training: Mapping[str, Any] | None = None,
    calibration: Calibration | None = None,
    ood: OODStats | None = None,
    created_at: str | None = None,
    served_form: FormRecord | None = None,
) -> Path:
    """Write a format-v1 checkpoint atomically (temp file, then rename) and return its path.

    `calibration`, `ood` and `served_form` are optional records; `created_at` defaults to now.
    """
    path = Path(path)
    checkpoint = {
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "model_args": dict(model_args_for(arch, model_args)),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": list(class_names),
        "preprocess": preprocess.to_dict(),
        "metrics": dict(metrics or {}),
        "training": dict(training or {}),
        "created_at": created_at or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    if calibration is not None:
        checkpoint["calibration"] = calibration.to_record()
    if ood is not None:
        checkpoint["ood"] = ood.to_record()
    if served_form is not None:
        checkpoint[RECORD_KEY] = served_form.to_record()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)
    return path


def _weights_only_reason(message: str) -> str:
    """The one informative line of torch's long weights-only error."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Please file", "Check the"))]
    return (useful[-1] if useful else lines[-1] if lines else message)[:300]


def _read(path: Path, data: bytes | None = None) -> Any:
    if data is None and not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a file)")
    size = path.stat().st_size if data is None else len(data)
    if size > MAX_FILE_BYTES:
        raise CheckpointError(f"checkpoint {path} is {size:,} bytes; the limit is {MAX_FILE_BYTES:,}")
    try:
        return torch.load(path if data is None else io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = _weights_only_reason(str(exc))
        if "GLOBAL" in reason or "global" in reason:
            raise CheckpointError(
                f"refusing to load {path}: it holds pickled Python objects, which could run code "
                f"({reason}). Only weights-only checkpoints are accepted: save tensors and primitive "
                "values (e.g. with models.save_checkpoint, or a dict holding model.state_dict())."
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint, or is corrupt: {reason}") from None
    except Exception as exc:  # the unpickler raises many types on garbage
        raise CheckpointError(f"{path} is not a PyTorch checkpoint, or is truncated or corrupt: {exc}") from None


def _require(raw: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in raw:
        raise CheckpointError(f"checkpoint has no {key!r} entry")
    value = raw[key]
    if not isinstance(value, kind):
        raise CheckpointError(f"checkpoint entry {key!r} has type {type(value).__name__}")
    return value


def _normalize(raw: Any) -> dict[str, Any]:
    """Bring a v1 or course-format checkpoint to the v1 layout."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(raw).__name__}, not a dict")
    if "format_version" not in raw:
        if set(raw) == COURSE_KEYS:
            return {
                "format": "course",
                "arch": "network",
                "model_args": {
                    "input_size": raw["input_size"],
                    "output_size": raw["output_size"],
                    "hidden_layers": raw["hidden_layers"],
                    "drop_p": 0.5,
                },
                "state_dict": raw["state_dict"],
                "class_names": list(FASHION_MNIST_CLASSES),
                "preprocess": COURSE_PREPROCESS.to_dict(),
            }
        raise CheckpointError(
            "checkpoint has no 'format_version' and is not the course format "
            f"(keys {sorted(COURSE_KEYS)}); its keys are {sorted(map(str, raw))[:10]}"
        )
    version = raw["format_version"]
    if version != FORMAT_VERSION:
        raise CheckpointError(f"unsupported checkpoint format_version {version!r}; this build reads {FORMAT_VERSION}")
    return {"format": f"v{FORMAT_VERSION}", **raw}


def _check_state_dict(state_dict: Mapping[str, Any], expected: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Match keys, shapes and dtypes against the model built on the meta device."""
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise CheckpointError(
            f"state_dict does not match the architecture: missing keys {missing[:8]}, unexpected keys {unexpected[:8]}"
        )
    checked = {}
    for key, want in expected.items():
        got = state_dict[key]
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(f"state_dict[{key!r}] is a {type(got).__name__}, not a tensor")
        if got.shape != want.shape:
            raise CheckpointError(
                f"state_dict[{key!r}] has shape {tuple(got.shape)}, the architecture needs {tuple(want.shape)}"
            )
        if got.is_floating_point() != want.is_floating_point():
            raise CheckpointError(f"state_dict[{key!r}] has dtype {got.dtype}, expected {want.dtype}")
        if got.is_floating_point() and not torch.isfinite(got).all():
            raise CheckpointError(f"state_dict[{key!r}] holds NaN or infinite values")
        tensor = got.to(want.dtype)
        if tensor.untyped_storage().nbytes() > tensor.nbytes:  # a view: don't keep the rest alive
            tensor = tensor.clone()
        checked[key] = tensor
    return checked


def _is_plain(value: Any, depth: int = 0) -> bool:
    """JSON-like: what /model can show (no tensors, no NaN), nested at most a few levels."""
    if value is None or isinstance(value, str | bool | int):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if depth < 4 and isinstance(value, list | tuple):
        return all(_is_plain(v, depth + 1) for v in value)
    if depth < 4 and isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v, depth + 1) for k, v in value.items())
    return False


def _plain_mapping(ckpt: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = ckpt.get(key) or {}
    if not isinstance(value, Mapping) or not _is_plain(value):
        raise CheckpointError(f"checkpoint entry {key!r} must be a dict of plain values (numbers, strings, lists)")
    return dict(value)


def load_checkpoint(
    path: str | os.PathLike[str], device: torch.device | str = "cpu", data: bytes | None = None
) -> LoadedModel:
    """Load, validate and rebuild a checkpoint; the model comes back in eval mode on `device`.

    Every failure raises CheckpointError. Arguments are range-checked and every tensor's
    shape compared with the architecture (built on the meta device) before anything is
    allocated for the model. `data`: the file's bytes, already read (`path` then only names it).
    """
    path = Path(path)
    ckpt = _normalize(_read(path, data))
    arch, model_args, preprocess = _arguments(ckpt)
    architecture = ARCHITECTURES[arch]
    shapes = _build_on_meta(arch, model_args)
    state_dict = _check_state_dict(_require(ckpt, "state_dict", Mapping), shapes.state_dict())
    class_names = _class_names(ckpt, shapes, architecture)
    metrics, training = _plain_mapping(ckpt, "metrics"), _plain_mapping(ckpt, "training")
    created_at = ckpt.get("created_at")
    if created_at is not None and not isinstance(created_at, str):
        raise CheckpointError(f"checkpoint entry 'created_at' has type {type(created_at).__name__}, not str")
    calibration, ood, served_form = _records(ckpt, architecture.output_layer(shapes))
    target = _device(device)
    # assign=True adopts the loaded tensors in place of the meta ones: no second copy.
    shapes.load_state_dict(state_dict, strict=True, assign=True)
    return LoadedModel(
        model=shapes.to(target).eval(),
        arch=arch,
        model_args=model_args,
        class_names=tuple(class_names),
        preprocess=preprocess,
        format=ckpt["format"],
        metrics=metrics,
        training=training,
        created_at=created_at,
        calibration=calibration,
        ood=ood.to(target) if ood is not None else None,
        served_form=served_form,
    )


def _arguments(ckpt: Mapping[str, Any]) -> tuple[str, dict[str, Any], PreprocessConfig]:
    """The architecture's name, its checked arguments and the preprocessing."""
    arch = _require(ckpt, "arch", str)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unknown architecture {arch!r}; this build knows {', '.join(ARCHITECTURES)}")
    try:
        model_args = model_args_for(arch, _require(ckpt, "model_args", Mapping))
        preprocess = PreprocessConfig(**_require(ckpt, "preprocess", Mapping))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"invalid checkpoint arguments: {exc}") from None
    return arch, model_args, preprocess


def _build_on_meta(arch: str, model_args: Mapping[str, Any]) -> nn.Module:
    """The model's shapes, allocating nothing, refused past MAX_PARAMETERS."""
    shapes = build_model(arch, model_args, device="meta")
    num_parameters = sum(math.prod(p.shape) for p in shapes.parameters())
    if num_parameters > MAX_PARAMETERS:
        raise CheckpointError(f"architecture declares {num_parameters:,} parameters; the limit is {MAX_PARAMETERS:,}")
    return shapes


def _class_names(ckpt: Mapping[str, Any], shapes: nn.Module, architecture: Architecture) -> list[str]:
    """One name per output, checked by probing the meta model with the architecture's input shape."""
    class_names = _require(ckpt, "class_names", list)
    try:
        num_outputs = shapes(torch.empty(1, *architecture.input_shape, device="meta")).shape[1]
    except RuntimeError as exc:
        shape = "x".join(map(str, architecture.input_shape))
        raise CheckpointError(f"the architecture does not take {shape} inputs: {exc}") from None
    if len(class_names) != num_outputs or not all(isinstance(c, str) for c in class_names):
        raise CheckpointError(f"class_names must be {num_outputs} strings, got {class_names!r:.200}")
    return class_names


def _records(
    ckpt: Mapping[str, Any], output: nn.Linear
) -> tuple[Calibration | None, OODStats | None, FormRecord | None]:
    """The optional calibration, OOD and served-form records, checked against the output layer's shape."""
    try:
        calibration = Calibration.from_record(ckpt["calibration"]) if ckpt.get("calibration") is not None else None
        ood = (
            OODStats.from_record(ckpt["ood"], output.out_features, output.in_features)
            if ckpt.get("ood") is not None
            else None
        )
        served_form = FormRecord.from_record(ckpt[RECORD_KEY]) if ckpt.get(RECORD_KEY) is not None else None
    except RecordError as exc:
        raise CheckpointError(f"invalid checkpoint record: {exc}") from None
    return calibration, ood, served_form


def _device(device: torch.device | str) -> torch.device:
    try:
        return resolve_device(device)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
