"""One served model: a checkpoint loaded on its device, with the inference thread (micro-batcher)
that turns decoded requests into class probabilities in shared batches. It knows nothing of
any protocol; `app.dataplane` decides which requests reach it."""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app import tracing
from app.batching import MicroBatcher
from app.decoding import ModelInput
from app.errors import ServeError, unavailable
from app.settings import Settings
from models import CheckpointError, LoadedModel, load_checkpoint
from models.saliency import saliency_maps
from models.served_form import FormError
from models.trust import out_of_distribution

# What the batcher takes: a decoded request, or a decoder to run on the inference thread
# (cheap decodes ride along with the forward pass: one thread hand-off per request).
Pending = ModelInput | Callable[[], ModelInput]


@contextlib.contextmanager
def accelerator_memory() -> Iterator[None]:
    """CUDA running out of memory becomes a 503, after freeing the cache, so the request is
    retried rather than failed and the next batch can succeed. The one place this is mapped."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise unavailable("the accelerator ran out of memory; retry shortly") from None


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    sha256: str
    size_bytes: int
    format: str


@dataclass
class Scored:
    """A request's model input and the model's answer for each of its valid images."""

    input: ModelInput
    probabilities: np.ndarray  # (valid images, classes) float32, calibrated when the checkpoint says how
    ood_scores: np.ndarray | None = None  # (valid images,) float32; None without the checkpoint's statistics
    flagged: np.ndarray | None = None  # (valid images,) bool: the OOD verdict; None without a threshold

    def per_image(self) -> list[int | ServeError]:
        """In request order: each image's row in `probabilities`, or the error that refused it."""
        errors = self.input.errors
        if not errors:
            return list(range(len(self.input.names)))
        row = iter(range(len(self.probabilities)))
        return [errors[i] if i in errors else next(row) for i in range(len(self.input.names))]


class ServedModel:
    """A loaded model and what it takes to turn model input into class probabilities."""

    def __init__(
        self,
        loaded: LoadedModel,
        checkpoint: CheckpointInfo,
        settings: Settings,
        observe_batch: Callable[[int, float], None] | None = None,
        name: str | None = None,
        version: str | None = None,
    ) -> None:
        self.loaded = loaded
        self.checkpoint = checkpoint
        self.settings = settings
        self.observe_batch = observe_batch  # told (images, seconds) of every forward pass
        self.loaded_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.name = name or settings.served_name
        self.version = version or settings.model_version
        self.class_names = tuple(loaded.class_names)
        self.device = loaded.device  # asked once: it walks the model's parameters
        self.trust = loaded.trust()  # calibration and OOD statistics, when the checkpoint has them
        try:  # the fp32 copy or the checkpoint's faster form; /model shows the original
            self.form = loaded.form(settings.served_form, settings.torch_threads)
        except FormError as exc:
            raise CheckpointError(str(exc)) from None
        self.batcher: MicroBatcher[Pending, Scored] | None = None  # this model's inference thread, once started

    def start(self, nice: int = 0, on_drop: Callable[[str, int], None] | None = None) -> MicroBatcher[Pending, Scored]:
        """Start this model's inference thread: the micro-batcher every protocol submits to;
        `on_drop` is told (reason, count) of requests dropped before a forward pass."""
        self.batcher = MicroBatcher(
            self.run_batch,
            self.settings.max_batch_size,
            self.settings.max_batch_wait_ms / 1000,
            nice=nice,
            on_drop=on_drop,
        )
        self.batcher.start()
        return self.batcher

    @classmethod
    def load(
        cls,
        settings: Settings,
        source: Path | None = None,
        observe_batch: Callable[[int, float], None] | None = None,
        name: str | None = None,
        version: str | None = None,
        origin: Path | None = None,
    ) -> ServedModel:
        """Load the checkpoint on the configured device (raises CheckpointError): from `source`,
        a validated copy, when given; /model reports `origin` (default: the configured path)."""
        torch.set_num_threads(settings.torch_threads)
        path = Path(source or settings.checkpoint)
        try:
            data: bytes | None = path.read_bytes()  # once: what is hashed is what is loaded
        except OSError:
            data = None  # load_checkpoint says what is wrong with the path, in its words
        loaded = load_checkpoint(path, device=settings.device, data=data)
        data = data if data is not None else path.read_bytes()
        shown = origin or settings.checkpoint
        info = CheckpointInfo(str(shown), hashlib.sha256(data).hexdigest(), len(data), loaded.format)
        return cls(loaded, info, settings, observe_batch, name, version)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_size(self) -> int:
        return self.loaded.preprocess.size

    @property
    def ood_threshold(self) -> float | None:
        return self.trust.threshold

    @property
    def ood_expected_flagged_ratio(self) -> float | None:
        """The share of validation garments the OOD threshold flags, as the checkpoint records it
        (training.fit_trust: `val_flag_rate`, else the `flag_rate` aimed at); None if unrecorded."""
        info = self.loaded.ood.info if self.loaded.ood is not None else None
        value = (info or {}).get("val_flag_rate", (info or {}).get("flag_rate"))
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    @torch.inference_mode()
    def score(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(N, 1, S, S) float32 inputs -> class probabilities (N, classes) and OOD scores (N,) or None.

        Raises ServeError 503 when the accelerator runs out of memory (`accelerator_memory`), 500
        when the model answers with a non-finite number (a broken model: never sent as an answer).
        """
        with accelerator_memory():
            x = torch.from_numpy(batch)
            if self.device.type != "cpu":
                x = x.to(self.device, non_blocking=True)
            probabilities, scores = self.trust.apply(*self.form(x))
            rows, ood = probabilities.cpu().numpy(), None if scores is None else scores.cpu().numpy()
        if not (np.isfinite(rows).all() and (ood is None or np.isfinite(ood).all())):
            raise ServeError(500, f"model {self.name} version {self.version} answered with a non-finite score")
        return rows, ood

    def saliency(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """SmoothGrad maps (models.saliency) for (N, 1, S, S) inputs and (N,) target classes, on the
        checkpoint's own fp32 model, never the served copy the inference thread runs.

        Raises ServeError 503 when the accelerator runs out of memory (`accelerator_memory`).
        """
        with accelerator_memory():
            return saliency_maps(self.loaded.model, inputs, targets, self.loaded.preprocess)

    def run_batch(self, items: list[Pending]) -> list[Scored | BaseException]:
        """The micro-batcher's step: decode what is not decoded yet, then forward passes of at
        most `max_batch_size` images over every image of every request, in order. A request
        refused as a whole gets its ServeError."""
        decoded: list[ModelInput | ServeError] = []
        for item in items:
            if isinstance(item, ModelInput):
                decoded.append(item)
                continue
            try:
                decoded.append(item())
            except ServeError as exc:
                decoded.append(exc)
        arrays = [d.inputs for d in decoded if isinstance(d, ModelInput) and d.inputs is not None]
        if arrays:
            rows, scores = self._forward(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
        else:
            rows, scores = np.empty((0, self.num_classes), np.float32), None
        answers: list[Scored | BaseException] = []
        offset = 0
        for d in decoded:
            if isinstance(d, ServeError):
                answers.append(d)
                continue
            part = slice(offset, offset + (0 if d.inputs is None else len(d.inputs)))
            part_scores = None if scores is None else scores[part]
            answers.append(Scored(d, rows[part], part_scores, self._flagged(part_scores)))
            offset = part.stop
        return answers

    def _flagged(self, scores: np.ndarray | None) -> np.ndarray | None:
        """The OOD verdict per image (`models.trust`, the one place it is made), once per request."""
        threshold = self.ood_threshold
        return None if scores is None or threshold is None else out_of_distribution(scores, threshold)

    def _forward(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Forward passes of at most `max_batch_size` images over `inputs`, joined."""
        step = self.settings.max_batch_size
        chunks = []
        for first in range(0, len(inputs), step):
            start = time.perf_counter()
            with tracing.forward(min(step, len(inputs) - first)):
                chunks.append(self.score(inputs[first : first + step]))
            if self.observe_batch:
                self.observe_batch(len(chunks[-1][0]), time.perf_counter() - start)
        if len(chunks) == 1:
            return chunks[0]
        rows = np.concatenate([c[0] for c in chunks])
        return rows, None if chunks[0][1] is None else np.concatenate([c[1] for c in chunks])

    def summary(self) -> str:
        """One line for the logs: name, architecture, checkpoint hash, device, served form."""
        where = f"on {self.device} as {self.form.name}"
        return f"{self.name} ({self.loaded.arch}, {self.checkpoint.sha256[:12]}) {where}"

    def form_description(self) -> dict[str, Any]:
        """Which form serves (`models.served_form`), its precision, and what `optimize` recorded of it."""
        record = self.loaded.served_form
        recorded = record.describe() if record is not None and record.name == self.form.name else {}
        return {**recorded, "name": self.form.name, "precision": self.form.precision}

    def describe(self) -> dict[str, Any]:
        model = self.loaded.model
        state_dict = model.state_dict()
        return {
            "name": self.name,
            "version": self.version,
            "arch": self.loaded.arch,
            "model_args": self.loaded.model_args,
            "architecture": str(model),
            "state_dict_keys": list(state_dict),
            "parameters": {key: list(t.shape) for key, t in state_dict.items()},
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "classes": list(self.class_names),
            "input_shape": [1, self.input_size, self.input_size],
            "device": str(self.device),
            "served_form": self.form_description(),
            "preprocess": self.loaded.preprocess.to_dict(),
            "metrics": self.loaded.metrics,
            "training": self.loaded.training,
            "created_at": self.loaded.created_at,
            "checkpoint": vars(self.checkpoint),
            "loaded_at": self.loaded_at,
        }
