"""The serving seam: set up the model on its device, decode requests (app.upload), predict
in batches, encode the answers. Nothing here knows about HTTP beyond status codes."""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.decoding import ImageRejected
from app.settings import Settings
from app.upload import DecodedRequest, Upload, UploadError, decode_request
from models import LoadedModel, for_inference, load_checkpoint

Answer = tuple[DecodedRequest, list[list[float]]]  # a request's decoded images and their probability rows


class ServiceUnavailable(Exception):
    """Inference cannot run right now (e.g. out of accelerator memory); the client should retry."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: str
    sha256: str
    size_bytes: int
    format: str


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ClassifierService:
    """A loaded model and what it takes to turn uploads into ranked classes."""

    def __init__(
        self,
        loaded: LoadedModel,
        checkpoint: CheckpointInfo,
        settings: Settings,
        observe_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self.loaded = loaded
        self.checkpoint = checkpoint
        self.settings = settings
        self.observe_batch = observe_batch  # told (images, seconds) of every forward pass
        self.loaded_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self.name = Path(checkpoint.path).stem
        self.device = loaded.device  # asked once: it walks the model's parameters
        self.model = for_inference(loaded.model)  # BatchNorm folded, channels-last; /model shows the original

    @classmethod
    def load(cls, settings: Settings, observe_batch: Callable[[int, float], None] | None = None) -> ClassifierService:
        """Load the configured checkpoint on the configured device (raises CheckpointError)."""
        torch.set_num_threads(settings.torch_threads)
        path = Path(settings.checkpoint)
        loaded = load_checkpoint(path, device=settings.device)
        info = CheckpointInfo(str(path), _sha256(path), path.stat().st_size, loaded.format)
        return cls(loaded, info, settings, observe_batch)

    @property
    def num_classes(self) -> int:
        return len(self.loaded.class_names)

    def decode(self, upload: Upload) -> DecodedRequest:
        """Split a /predict body into images and decode them (raises UploadError)."""
        return decode_request(upload, self.loaded.preprocess, self.settings)

    @torch.inference_mode()
    def probabilities(self, batch: np.ndarray) -> list[list[float]]:
        """(N, 1, 28, 28) float32 inputs -> N rows of class probabilities.

        CUDA running out of memory becomes ServiceUnavailable, after freeing the cache,
        so the request is retried rather than failed and the next batch can succeed.
        """
        try:
            x = torch.from_numpy(batch)
            if self.device.type != "cpu":
                x = x.to(self.device, non_blocking=True)
            log_ps = self.model(x)
            return log_ps.exp().tolist()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise ServiceUnavailable("the accelerator ran out of memory; retry shortly") from None

    def run_batch(self, items: list[Upload | DecodedRequest]) -> list[Answer | BaseException]:
        """The micro-batcher's step: decode what is not decoded yet, then forward passes of at
        most `max_batch_size` images over every image of every request, in order. A request
        refused as a whole gets its UploadError."""
        decoded: list[DecodedRequest | BaseException] = []
        for item in items:
            if isinstance(item, DecodedRequest):
                decoded.append(item)
                continue
            try:
                decoded.append(self.decode(item))
            except UploadError as exc:
                decoded.append(exc)
        arrays = [d.inputs for d in decoded if isinstance(d, DecodedRequest) and d.inputs is not None]
        rows: list[list[float]] = []
        if arrays:
            inputs = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
            step = self.settings.max_batch_size
            for first in range(0, len(inputs), step):
                start = time.perf_counter()
                chunk = self.probabilities(inputs[first : first + step])
                if self.observe_batch:
                    self.observe_batch(len(chunk), time.perf_counter() - start)
                rows += chunk
        answers: list[Answer | BaseException] = []
        offset = 0
        for d in decoded:
            if isinstance(d, BaseException):
                answers.append(d)
                continue
            count = 0 if d.inputs is None else len(d.inputs)
            answers.append((d, rows[offset : offset + count]))
            offset += count
        return answers

    def top_k(self, probabilities: list[float], k: int) -> list[dict[str, Any]]:
        """One row of probabilities -> the k most likely classes, most likely first (ties: lower index)."""
        order = sorted(range(len(probabilities)), key=probabilities.__getitem__, reverse=True)[:k]
        names = self.loaded.class_names
        return [{"label": names[i], "index": i, "probability": round(probabilities[i], 6)} for i in order]

    def describe(self) -> dict[str, Any]:
        model = self.loaded.model
        state_dict = model.state_dict()
        return {
            "name": self.name,
            "arch": self.loaded.arch,
            "model_args": self.loaded.model_args,
            "architecture": str(model),
            "state_dict_keys": list(state_dict),
            "parameters": {key: list(t.shape) for key, t in state_dict.items()},
            "num_parameters": sum(p.numel() for p in model.parameters()),
            "classes": list(self.loaded.class_names),
            "input_shape": [1, 28, 28],
            "device": str(self.device),
            "preprocess": self.loaded.preprocess.to_dict(),
            "metrics": self.loaded.metrics,
            "training": self.loaded.training,
            "created_at": self.loaded.created_at,
            "checkpoint": vars(self.checkpoint),
            "loaded_at": self.loaded_at,
        }


def encode_predictions(
    service: ClassifierService,
    filenames: Sequence[str | None],
    outcomes: Sequence[list[float] | ImageRejected],
    k: int,
) -> list[dict[str, Any]]:
    """Per image, in request order: its top-k, or the error that kept it from being classified."""
    results: list[dict[str, Any]] = []
    for filename, outcome in zip(filenames, outcomes, strict=True):
        if isinstance(outcome, ImageRejected):
            results.append({"filename": filename, "error": {"status": outcome.status, "message": outcome.message}})
        else:
            results.append({"filename": filename, "top_k": service.top_k(outcome, k)})
    return results
