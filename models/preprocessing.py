"""Image -> model input, in exactly one place for training and serving.

Fashion-MNIST items are light garments on a black 28x28 background, fitted into the
square keeping their aspect ratio. `preprocess_image` turns any PIL image into that
form (the only image -> model input code); `normalize` is the last step, and training applies it to the raw data set, so
a 28x28 grayscale image gives the same tensor in both.

The `invert="auto"` rule: the mean of the image's outermost ring of pixels (after
grayscale conversion) is its background. A background brighter than mid-grey (> 0.5)
means a dark object on a light background, as in product photos, so the image is
inverted; otherwise it is used as it is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args, overload

import numpy as np
import torch
from PIL import Image, ImageOps

Invert = Literal["auto", "true", "false"]
INVERT_CHOICES: tuple[str, ...] = get_args(Invert)

# Transparent pixels are composited on white, the usual background of a product photo;
# the invert rule then turns that background black, as in the data set.
TRANSPARENT_BACKGROUND = 255


@dataclass(frozen=True)
class PreprocessConfig:
    """The preprocessing a model was trained with; stored in its checkpoint."""

    size: int = 28
    mean: float = 0.5
    std: float = 0.5
    invert: Invert = "auto"

    def __post_init__(self) -> None:
        if self.size != 28:
            raise ValueError(f"size must be 28 (Fashion-MNIST), got {self.size!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if self.std == 0:
            raise ValueError("std must be > 0")
        if self.invert not in INVERT_CHOICES:
            raise ValueError(f"invert must be one of {INVERT_CHOICES}, got {self.invert!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageError(ValueError):
    """The image cannot be turned into model input (an unsupported mode, no pixels)."""


def normalize(pixels: np.ndarray, config: PreprocessConfig, invert: bool = False) -> np.ndarray:
    """uint8 (or 0..255 float) pixels -> normalized float32: the training transform's last step.

    Plain numpy, so decoding threads in the server never start torch's thread pools.
    """
    x = pixels.astype(np.float32) / np.float32(255.0)
    if invert:
        x = np.float32(1.0) - x
    x -= np.float32(config.mean)
    x /= np.float32(config.std)
    return x


def normalize_tensor(pixels: torch.Tensor, config: PreprocessConfig) -> torch.Tensor:
    """`normalize` for a CPU tensor of images (the training data set)."""
    return torch.from_numpy(normalize(pixels.numpy(), config))


def _first_frame(image: Image.Image) -> Image.Image:
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    return image


def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite a transparent image on the background; 'LA' and 'RGBA' both come out 'L'."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (TRANSPARENT_BACKGROUND,) * 3 + (255,))
    return Image.alpha_composite(background, rgba).convert("L")


def to_grayscale(image: Image.Image) -> Image.Image:
    """Any mode -> 'L' (8-bit) or 'F' (0..255 float, for 16/32-bit input, scaled not clipped)."""
    mode = image.mode
    if mode == "L":
        return image
    if mode.startswith("I"):
        # 16-bit data (Pillow opens 16-bit PNGs as 'I;16' or 'I'): scale 0..65535 to 0..255.
        values = np.asarray(image, dtype=np.float32) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(values, 0.0, 255.0), mode="F")
    if mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(values, 0.0, 255.0), mode="F")
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        return _flatten_alpha(image)
    if mode in ("1", "P", "RGB"):
        return image.convert("L")
    try:  # CMYK, YCbCr, HSV, ...: through RGB, which Pillow converts them to.
        return image.convert("RGB").convert("L")
    except (ValueError, OSError) as exc:
        raise ImageError(f"unsupported image mode {mode!r}") from exc


def _border_mean(pixels: np.ndarray) -> float:
    """The mean of the outermost ring of pixels: all of them minus the interior."""
    height, width = pixels.shape
    if height <= 2 or width <= 2:
        return float(pixels.mean(dtype=np.float64))
    ring = pixels.sum(dtype=np.float64) - pixels[1:-1, 1:-1].sum(dtype=np.float64)
    return float(ring / (2 * (height + width) - 4))


def should_invert(background: float, invert: Invert) -> bool:
    """Apply the invert setting: 'auto' inverts when the background is brighter than mid-grey."""
    if invert == "auto":
        return background > 127.5
    return invert == "true"


def fit_square(gray: Image.Image, size: int, fill: float) -> Image.Image:
    """Scale so the longer side is `size`, keeping aspect, and centre on a `fill` square."""
    width, height = gray.size
    if (width, height) == (size, size):
        return gray
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = gray.resize(new_size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    canvas = Image.new(gray.mode, (size, size), fill if gray.mode == "F" else round(fill))
    canvas.paste(resized, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


@overload
def preprocess_image(
    image: Image.Image, config: PreprocessConfig, invert: Invert | None = None, *, tell_inverted: Literal[False] = False
) -> np.ndarray: ...
@overload
def preprocess_image(
    image: Image.Image, config: PreprocessConfig, invert: Invert | None = None, *, tell_inverted: Literal[True]
) -> tuple[np.ndarray, bool]: ...
def preprocess_image(
    image: Image.Image, config: PreprocessConfig, invert: Invert | None = None, *, tell_inverted: bool = False
) -> np.ndarray | tuple[np.ndarray, bool]:
    """A PIL image of any mode and size -> a (1, size, size) float32 array for the model (numpy:
    what the server batches; `torch.from_numpy` makes it a tensor).

    `invert` overrides the config's setting for this image; with `tell_inverted`, also which
    way the invert rule went (True: inverted).
    """
    image = _first_frame(image)
    ImageOps.exif_transpose(image, in_place=True)
    if image.width < 1 or image.height < 1:
        raise ImageError("image has no pixels")
    gray = to_grayscale(image)
    pixels = np.asarray(gray)
    background = _border_mean(pixels)
    flip = should_invert(background, invert or config.invert)
    if gray.size != (config.size, config.size):
        pixels = np.asarray(fit_square(gray, config.size, background))
    if gray.mode == "F":
        # Lanczos overshoots ('L' images clamp by themselves); float files may hold NaN or inf.
        pixels = np.clip(np.nan_to_num(pixels, nan=0.0, posinf=255.0, neginf=0.0), 0.0, 255.0)
    array = normalize(pixels, config, invert=flip)[np.newaxis]
    return (array, flip) if tell_inverted else array
