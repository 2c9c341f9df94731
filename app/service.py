"""The serving seam, as plain functions: set up the model, decode an upload, predict, encode.

Nothing here knows about HTTP beyond the status code an image is rejected with.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from app.settings import Settings
from app.upload import UploadError, parse_multipart
from models import LoadedModel, load_checkpoint
from models.preprocessing import ImageError, Invert, PreprocessConfig, preprocess_array

# Decoders we accept; everything else is refused before any parser runs on the bytes.
ALLOWED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
ALLOWED_CONTENT_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/jpg",
        "image/gif",
        "image/webp",
        "image/bmp",
        "image/x-ms-bmp",
        "image/tiff",
        "application/octet-stream",
    }
)

# Pillow only warns between its limit and twice it; a warning is never acceptable here.
warnings.simplefilter("error", Image.DecompressionBombWarning)


class ServiceUnavailable(Exception):
    """Inference cannot run right now (e.g. out of accelerator memory); the client should retry."""


class ImageRejected(Exception):
    """An upload that cannot be classified, with the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_content_type(content_type: str | None) -> None:
    """Refuse a declared type we do not decode (no declared type is fine: the bytes decide)."""
    if not content_type:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in ALLOWED_CONTENT_TYPES:
        raise ImageRejected(415, f"unsupported content type {media_type!r}; send PNG, JPEG, GIF, WEBP, BMP or TIFF")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> a loaded PIL image, refusing non-images, other formats and oversized images."""
    if not data:
        raise ImageRejected(400, "empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ImageRejected(400, f"not a decodable image (accepted formats: {', '.join(ALLOWED_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(413, f"image has more than {max_pixels} pixels") from None
    except Exception as exc:  # malformed headers make Pillow raise many types; all are the client's
        raise ImageRejected(400, f"corrupt image header: {exc!r}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(413, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageRejected(413, f"image has more than {max_pixels} pixels") from None
    except MemoryError:
        raise ImageRejected(413, "image too large to decode") from None
    except Exception as exc:  # malformed files make Pillow raise many types; all are the client's
        raise ImageRejected(400, f"image data is truncated or corrupt: {exc!r}") from None
    return image


def image_to_input(
    data: bytes,
    content_type: str | None,
    preprocess: PreprocessConfig,
    max_pixels: int,
    invert: Invert | None = None,
) -> np.ndarray:
    """Untrusted upload bytes -> a (1, 28, 28) float32 model input; every failure is ImageRejected."""
    check_content_type(content_type)
    image = decode_image(data, max_pixels)
    try:
        return preprocess_array(image, preprocess, invert=invert)
    except ImageError as exc:
        raise ImageRejected(415, str(exc)) from None
    except MemoryError:
        raise ImageRejected(413, "image too large to decode") from None
    except Exception as exc:
        # Decoders are lazy (frames, tiles) and Pillow's parsers raise many types on
        # malformed files (TypeError, KeyError, ... found by fuzz/fuzz_decode.py): all are 400.
        raise ImageRejected(400, f"image data is truncated or corrupt: {exc!r}") from None


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

    def to_input(self, data: bytes, content_type: str | None = None, invert: Invert | None = None) -> np.ndarray:
        """Decode one upload into a (1, 28, 28) model input, or raise ImageRejected."""
        return image_to_input(data, content_type, self.loaded.preprocess, self.settings.max_image_pixels, invert=invert)

    @torch.inference_mode()
    def probabilities(self, batch: np.ndarray) -> list[list[float]]:
        """(N, 1, 28, 28) float32 inputs -> N rows of class probabilities.

        CUDA running out of memory becomes ServiceUnavailable, after freeing the cache,
        so the request is retried rather than failed and the next batch can succeed.
        """
        try:
            log_ps = self.loaded.model(torch.from_numpy(batch).to(self.loaded.device, non_blocking=True))
            return log_ps.exp().tolist()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise ServiceUnavailable("the accelerator ran out of memory; retry shortly") from None

    def run_batch(self, items: list[Upload | DecodedRequest]) -> list[Answer | BaseException]:
        """The micro-batcher's step: decode what is not decoded yet, then one forward pass for
        every image of every request. A request refused as a whole gets its UploadError."""
        decoded: list[DecodedRequest | BaseException] = []
        for item in items:
            if isinstance(item, DecodedRequest):
                decoded.append(item)
                continue
            try:
                decoded.append(decode_request(self, item))
            except UploadError as exc:
                decoded.append(exc)
        arrays = [d.inputs for d in decoded if isinstance(d, DecodedRequest) and d.inputs is not None]
        rows: list[list[float]] = []
        if arrays:
            start = time.perf_counter()
            rows = self.probabilities(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
            if self.observe_batch:
                self.observe_batch(len(rows), time.perf_counter() - start)
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
            "device": str(self.loaded.device),
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


FIELD = "file"  # the multipart part name that carries images
# Bodies up to this size are decoded on the inference thread, batched with the forward pass
# (one thread hand-off per request); larger ones (photos) are decoded in the threadpool
# first, so a big image never holds up the small ones queued behind it.
INLINE_DECODE_BYTES = 64 * 1024


class Upload(NamedTuple):
    """A /predict body, not decoded yet."""

    body: bytes
    content_type: str
    invert: Invert | None


@dataclass
class DecodedRequest:
    """The images of one request: model inputs for those that decoded, errors for the rest."""

    filenames: list[str | None]
    inputs: np.ndarray | None  # (valid images, 1, 28, 28) float32, in request order
    errors: dict[int, ImageRejected]  # request position -> why that image was refused

    def merge(self, rows: list[list[float]]) -> list[list[float] | ImageRejected]:
        """Put the model's rows back among the errors, in request order."""
        it = iter(rows)
        return [self.errors[i] if i in self.errors else next(it) for i in range(len(self.filenames))]


def missing_file() -> UploadError:
    return UploadError(422, f"no '{FIELD}' part: send images as multipart/form-data parts named '{FIELD}'")


def decode_request(service: ClassifierService, upload: Upload) -> DecodedRequest:
    """Split a /predict body into images and decode them; UploadError for a body we refuse."""
    media_type = upload.content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        parts = parse_multipart(upload.body, upload.content_type, FIELD, service.settings.max_files)
        if not parts:
            raise missing_file()
        uploads = [(p.filename, bytes(p.data), p.content_type) for p in parts]
    elif media_type.startswith("image/"):
        uploads = [(None, upload.body, media_type)]
    elif not media_type and not upload.body:
        raise missing_file()
    else:
        raise UploadError(
            415,
            f"unsupported content type {media_type or '(none)'!r}: send multipart/form-data "
            f"with '{FIELD}' parts, or one image as the body with an image/* content type",
        )
    return decode_uploads(service, uploads, upload.invert)


def decode_uploads(
    service: ClassifierService, uploads: Sequence[tuple[str | None, bytes, str | None]], invert: Invert | None
) -> DecodedRequest:
    """Decode (filename, bytes, content type) uploads, isolating each image's failure."""
    arrays: list[np.ndarray] = []
    errors: dict[int, ImageRejected] = {}
    for position, (_, data, content_type) in enumerate(uploads):
        try:
            arrays.append(service.to_input(data, content_type, invert))
        except ImageRejected as exc:
            errors[position] = exc
    inputs = np.stack(arrays) if arrays else None
    return DecodedRequest([u[0] for u in uploads], inputs, errors)


Answer = tuple[DecodedRequest, list[list[float]]]  # a request's decoded images and their probability rows
