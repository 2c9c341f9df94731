"""Non-garment images for judging the out-of-distribution score, made offline and seeded.

Every image is a PIL image, as an upload would be, and goes through the service's own
preprocessing (`preprocess_image` with the checkpoint's settings, so the `invert=auto` rule
applies): what is judged is what users hit, not a hand-made tensor. Kinds: uniform noise,
blank (constant) images, simple shapes, rendered words, handwritten digits (scikit-learn's
bundled 8x8 digits) and crops of photographs (scikit-learn's and scikit-image's bundled photos).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from models.preprocessing import PreprocessConfig, preprocess_image

WORDS = (
    "hello",
    "world",
    "invoice",
    "total",
    "receipt",
    "meeting",
    "notes",
    "python",
    "torch",
    "fashion",
    "serve",
    "model",
    "shirt",
    "coat",
    "error",
    "warning",
    "lorem",
    "ipsum",
    "dolor",
    "sit",
    "amet",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "monday",
    "tuesday",
    "report",
    "summary",
    "chapter",
    "page",
    "figure",
    "table",
    "account",
    "password",
    "cat",
    "house",
)
PHOTOS_SKIMAGE = (
    "astronaut",
    "camera",
    "cat",
    "coffee",
    "coins",
    "moon",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "clock",
    "brick",
    "grass",
    "gravel",
)


def _color(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _size(rng: np.random.Generator, low: int = 28, high: int = 256) -> tuple[int, int]:
    return int(rng.integers(low, high + 1)), int(rng.integers(low, high + 1))


def noise(rng: np.random.Generator) -> Image.Image:
    width, height = _size(rng)
    if rng.random() < 0.5:
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), mode="L")
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), mode="RGB")


def blank(rng: np.random.Generator) -> Image.Image:
    return Image.new("RGB", _size(rng, 1, 512), _color(rng))


def shapes(rng: np.random.Generator) -> Image.Image:
    width, height = _size(rng, 48, 256)
    image = Image.new("RGB", (width, height), _color(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 4))):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        box = (x0, y0, max(x1, x0 + 4), max(y1, y0 + 4))
        fill = _color(rng) if rng.random() < 0.7 else None
        outline, line_width = _color(rng), int(rng.integers(1, 8))
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.rectangle(box, fill=fill, outline=outline, width=line_width)
        elif kind == 1:
            draw.ellipse(box, fill=fill, outline=outline, width=line_width)
        elif kind == 2:
            corners = int(rng.integers(3, 7))
            points = [(int(rng.integers(0, width)), int(rng.integers(0, height))) for _ in range(corners)]
            draw.polygon(points, fill=fill, outline=outline, width=line_width)
        else:
            draw.line([box[:2], box[2:]], fill=outline, width=line_width)
    return image


def text(rng: np.random.Generator) -> Image.Image:
    words = " ".join(rng.choice(WORDS, int(rng.integers(1, 4))).tolist())
    font = ImageFont.load_default(size=int(rng.integers(12, 48)))
    left, top, right, bottom = (int(v) for v in font.getbbox(words))
    pad = int(rng.integers(2, 20))
    background = _color(rng)
    ink = tuple(255 - c for c in background)  # readable: the opposite colour
    image = Image.new("RGB", (right - left + 2 * pad, bottom - top + 2 * pad), background)
    ImageDraw.Draw(image).text((pad - left, pad - top), words, fill=ink, font=font)
    return image


class _Digits:
    def __init__(self) -> None:
        from sklearn.datasets import load_digits

        self.images = (load_digits().images * (255.0 / 16.0)).round().astype(np.uint8)

    def __call__(self, rng: np.random.Generator) -> Image.Image:
        pixels = self.images[int(rng.integers(len(self.images)))]
        if rng.random() < 0.5:
            pixels = 255 - pixels  # dark ink on paper; the invert rule turns it back
        image = Image.fromarray(pixels, mode="L")
        scale = int(rng.integers(1, 9))
        return image.resize((8 * scale, 8 * scale), Image.Resampling.NEAREST) if scale > 1 else image


class _Photos:
    def __init__(self) -> None:
        import skimage.data
        from sklearn.datasets import load_sample_images

        photos = list(load_sample_images().images)
        photos += [getattr(skimage.data, name)() for name in PHOTOS_SKIMAGE]
        self.photos = [Image.fromarray(np.asarray(p)) for p in photos]

    def __call__(self, rng: np.random.Generator) -> Image.Image:
        photo = self.photos[int(rng.integers(len(self.photos)))]
        width, height = photo.size
        crop_w = int(rng.integers(min(32, width), width + 1))
        crop_h = int(np.clip(crop_w * rng.uniform(0.6, 1.6), min(32, height), height))
        x, y = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
        return photo.crop((x, y, x + crop_w, y + crop_h))


def generators() -> dict[str, Callable[[np.random.Generator], Image.Image]]:
    """Kind -> a function drawing one image of that kind from a random generator."""
    return {
        "noise": noise,
        "blank": blank,
        "shapes": shapes,
        "text": text,
        "digits": _Digits(),
        "photos": _Photos(),
    }


def ood_inputs(config: PreprocessConfig, per_kind: int = 500, seed: int = 0) -> dict[str, np.ndarray]:
    """Kind -> (per_kind, 1, 28, 28) float32 model inputs, made by `preprocess_image` from PIL images."""
    out = {}
    for i, (kind, draw) in enumerate(generators().items()):
        rng = np.random.default_rng([seed, i])
        out[kind] = np.stack([preprocess_image(draw(rng), config) for _ in range(per_kind)])
    return out
