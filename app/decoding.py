"""Untrusted image bytes -> model input: type and format allow-lists, size limits, and one
exception type (with its HTTP status) for every way an upload can fail."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

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
