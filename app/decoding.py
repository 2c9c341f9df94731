"""Untrusted image bytes -> model input: type and format allow-lists, size limits, every way an
image can fail as a ServeError with its status, and `ModelInput`, what every protocol hands
the service."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, overload

import numpy as np
from PIL import Image, UnidentifiedImageError

from app.errors import ServeError
from models.preprocessing import ImageError, Invert, PreprocessConfig, preprocess_image

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


@dataclass
class ModelInput:
    """One request's images as the model takes them: inputs for those that decoded, errors for
    the rest (each image's failure kept apart from the others)."""

    names: list[str | None]  # per image, in request order: a filename, or None
    inputs: np.ndarray | None  # (valid images, 1, S, S) float32, in request order
    errors: dict[int, ServeError] = field(default_factory=dict)  # request position -> why refused

    @classmethod
    def of(cls, inputs: np.ndarray) -> ModelInput:
        """Inputs that are all valid (tensor protocols)."""
        return cls([None] * len(inputs), inputs)


def check_content_type(content_type: str | None) -> None:
    """Refuse a declared type we do not decode (no declared type is fine: the bytes decide)."""
    if not content_type:
        return
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type not in ALLOWED_CONTENT_TYPES:
        raise ServeError(415, f"unsupported content type {media_type!r}; send PNG, JPEG, GIF, WEBP, BMP or TIFF")


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> a loaded PIL image, refusing non-images, other formats and oversized images."""
    if not data:
        raise ServeError(400, "empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        raise ServeError(400, f"not a decodable image (accepted formats: {', '.join(ALLOWED_FORMATS)})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ServeError(413, f"image has more than {max_pixels} pixels") from None
    except Exception as exc:  # malformed headers make Pillow raise many types; all are the client's
        raise ServeError(400, f"corrupt image header: {exc!r}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ServeError(413, f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}")
    try:
        image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ServeError(413, f"image has more than {max_pixels} pixels") from None
    except MemoryError:
        raise ServeError(413, "image too large to decode") from None
    except Exception as exc:  # malformed files make Pillow raise many types; all are the client's
        raise ServeError(400, f"image data is truncated or corrupt: {exc!r}") from None
    return image


@overload
def image_to_input(
    data: bytes,
    content_type: str | None,
    preprocess: PreprocessConfig,
    max_pixels: int,
    invert: Invert | None = None,
    tell_inverted: Literal[False] = False,
) -> np.ndarray: ...
@overload
def image_to_input(
    data: bytes,
    content_type: str | None,
    preprocess: PreprocessConfig,
    max_pixels: int,
    invert: Invert | None,
    tell_inverted: Literal[True],
) -> tuple[np.ndarray, bool]: ...
def image_to_input(
    data: bytes,
    content_type: str | None,
    preprocess: PreprocessConfig,
    max_pixels: int,
    invert: Invert | None = None,
    tell_inverted: bool = False,
) -> np.ndarray | tuple[np.ndarray, bool]:
    """Untrusted upload bytes -> a (1, 28, 28) float32 model input (with `tell_inverted`, also which
    way the invert rule went); every failure is ServeError."""
    check_content_type(content_type)
    image = decode_image(data, max_pixels)
    try:
        array, inverted = preprocess_image(image, preprocess, invert, tell_inverted=True)
    except ImageError as exc:
        raise ServeError(415, str(exc)) from None
    except MemoryError:
        raise ServeError(413, "image too large to decode") from None
    except Exception as exc:
        # Decoders are lazy (frames, tiles) and Pillow's parsers raise many types on
        # malformed files (TypeError, KeyError, ... found by fuzz/fuzz_decode.py): all are 400.
        raise ServeError(400, f"image data is truncated or corrupt: {exc!r}") from None
    return (array, inverted) if tell_inverted else array


Uploads = Sequence[tuple[str | None, bytes, str | None]]


@overload
def decode_images(
    uploads: Uploads,
    preprocess: PreprocessConfig,
    max_pixels: int,
    invert: Invert | None,
    tell_inverted: Literal[False] = False,
) -> ModelInput: ...
@overload
def decode_images(
    uploads: Uploads,
    preprocess: PreprocessConfig,
    max_pixels: int,
    invert: Invert | None,
    tell_inverted: Literal[True],
) -> tuple[ModelInput, list[bool | None]]: ...
def decode_images(
    uploads: Uploads,
    preprocess: PreprocessConfig,
    max_pixels: int,
    invert: Invert | None,
    tell_inverted: bool = False,
) -> ModelInput | tuple[ModelInput, list[bool | None]]:
    """Decode (name, bytes, content type) uploads, isolating each image's failure; with
    `tell_inverted`, also per upload in request order whether it was inverted (None: refused)."""
    arrays: list[np.ndarray] = []
    inverted: list[bool | None] = []
    errors: dict[int, ServeError] = {}
    for position, (_, data, content_type) in enumerate(uploads):
        try:
            array, flipped = image_to_input(data, content_type, preprocess, max_pixels, invert, True)
        except ServeError as exc:
            errors[position] = exc
            inverted.append(None)
            continue
        arrays.append(array)
        inverted.append(flipped)
    model_input = ModelInput([u[0] for u in uploads], np.stack(arrays) if arrays else None, errors)
    return (model_input, inverted) if tell_inverted else model_input
