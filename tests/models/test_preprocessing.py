from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from models import PreprocessConfig, normalize, preprocess_image
from models.preprocessing import ImageError, Invert
from tests.helpers import encode, garment

CONFIG = PreprocessConfig()  # mean 0.5, std 0.5: pixel 0 -> -1, pixel 255 -> +1


def as_tensor(image: Image.Image, config: PreprocessConfig, invert: Invert | None = None) -> torch.Tensor:
    """`preprocess_image` as a tensor."""
    return torch.from_numpy(preprocess_image(image, config, invert))


def reopen(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data))


def test_28x28_grayscale_matches_the_training_transform() -> None:
    pixels = garment()
    expected = torch.from_numpy(normalize(pixels, CONFIG)).unsqueeze(0)
    assert torch.equal(as_tensor(Image.fromarray(pixels), CONFIG), expected)


def test_matches_the_course_torchvision_transform() -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    pixels = garment(seed=4)
    course = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5,), (0.5,))])
    assert torch.allclose(as_tensor(Image.fromarray(pixels), CONFIG), course(pixels), atol=1e-6)


def _modes() -> dict[str, Image.Image]:
    base = Image.fromarray(garment((40, 30)))
    rgb = Image.merge("RGB", (base, base.point(lambda v: v // 2), base))
    palette_transparent = base.convert("P")
    palette_transparent.info["transparency"] = 0
    sixteen = Image.fromarray(garment((40, 30)).astype(np.uint16) * 257)
    return {
        "1": base.convert("1"),
        "L": base,
        "LA": Image.merge("LA", (base, base)),
        "P": rgb.convert("P"),
        "P+transparency": palette_transparent,
        "RGB": rgb,
        "RGBA": Image.merge("RGBA", (*rgb.split(), base)),
        "CMYK": rgb.convert("CMYK"),
        "YCbCr": rgb.convert("YCbCr"),
        "I;16": sixteen,
        "I": sixteen.convert("I"),
        "F": base.convert("F"),
        "HSV": rgb.convert("HSV"),
    }


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_mode_gives_a_finite_model_input(mode: str) -> None:
    x = as_tensor(_modes()[mode], CONFIG)
    assert x.shape == (1, 28, 28)
    assert x.dtype == torch.float32
    assert torch.isfinite(x).all()
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    values = np.zeros((28, 28), dtype=np.uint16)
    values[10:18, 10:18] = 32896  # half of 65535 (= 128 * 257)
    values[0:4, 0:4] = 65535
    x = as_tensor(Image.fromarray(values), PreprocessConfig(invert="false"))
    assert x[0, 12, 12].item() == pytest.approx(float(normalize(np.array(128.0), CONFIG)), abs=1e-4)
    assert x[0, 1, 1].item() == pytest.approx(1.0)


def test_transparent_background_is_composited_not_dropped() -> None:
    """A dark product on a transparent background: alpha-drop would lose the object entirely."""
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)  # fully transparent black everywhere
    rgba[8:20, 8:20] = (40, 40, 40, 255)  # an opaque dark object
    x = as_tensor(Image.fromarray(rgba, "RGBA"), CONFIG)
    # Composited on white, then auto-inverted: black background, light object.
    assert x[0, 0, 0].item() == pytest.approx(-1.0)
    assert x[0, 14, 14].item() == pytest.approx(float(normalize(np.array(255.0 - 40), CONFIG)), abs=1e-5)


def test_exif_orientation_is_applied() -> None:
    tall = np.zeros((40, 20), dtype=np.uint8)
    tall[:, 5:15] = 255  # a vertical bar: after a 90-degree turn it is horizontal
    image = Image.fromarray(tall)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    data = encode(image, "JPEG", exif=exif.tobytes(), quality=95)
    x = as_tensor(reopen(data), PreprocessConfig(invert="false"))
    rows_lit = (x[0] > 0).any(dim=1)
    cols_lit = (x[0] > 0).any(dim=0)
    assert cols_lit.sum() > rows_lit.sum(), "the bar should lie horizontally once EXIF rotation is applied"


def test_first_frame_of_an_animated_gif() -> None:
    first = Image.fromarray(garment())
    second = Image.new("L", (28, 28), 0)
    data = encode(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    animated = reopen(data)
    assert animated.n_frames == 2
    animated.seek(1)  # even when the image was left on a later frame
    expected = as_tensor(reopen(encode(first, "GIF")), CONFIG)
    assert torch.equal(as_tensor(animated, CONFIG), expected)


def test_wide_image_is_fitted_keeping_aspect_and_centred() -> None:
    pixels = np.zeros((280, 560), dtype=np.uint8)
    pixels[10:270, 10:550] = 255  # a light object filling a 2:1 frame on black
    x = as_tensor(Image.fromarray(pixels), CONFIG)
    # Scaled to 28x14 and centred: 7 rows of black padding above and below.
    lit_rows = set((x[0] > 0).any(dim=1).nonzero().flatten().tolist())
    assert set(range(8, 20)) <= lit_rows <= set(range(6, 22))
    assert (x[0, :6] == -1).all() and (x[0, 22:] == -1).all()
    assert (x[0, :, 1:27] > 0).any(dim=0).all(), "the object spans the full width"


def test_large_photo_is_downscaled() -> None:
    x = as_tensor(Image.fromarray(garment((1000, 700))), CONFIG)
    assert x.shape == (1, 28, 28)
    assert x[0, 14, 14] > 0 > x[0, 0, 0]


@pytest.mark.parametrize(
    ("background", "object_value", "inverted"), [(255, 30, True), (0, 220, False), (200, 10, True), (90, 250, False)]
)
def test_auto_invert_follows_the_border_brightness(background: int, object_value: int, inverted: bool) -> None:
    pixels = np.full((28, 28), background, dtype=np.uint8)
    pixels[6:22, 6:22] = object_value
    x = as_tensor(Image.fromarray(pixels), CONFIG)
    expected_center = 255 - object_value if inverted else object_value
    assert x[0, 14, 14].item() == pytest.approx(float(normalize(np.array(float(expected_center)), CONFIG)), abs=1e-5)


def test_invert_override() -> None:
    image = Image.fromarray(garment())
    plain = as_tensor(image, CONFIG, invert="false")
    flipped = as_tensor(image, CONFIG, invert="true")
    assert torch.allclose(flipped, -plain, atol=1e-6)  # with mean = std = 0.5, inverting negates


def test_unconvertible_mode_is_an_image_error(monkeypatch: pytest.MonkeyPatch) -> None:
    image = Image.new("LAB", (28, 28))

    def refuse(*args: object, **kwargs: object) -> Image.Image:
        raise ValueError("conversion not supported")

    monkeypatch.setattr(image, "convert", refuse)
    with pytest.raises(ImageError, match="unsupported image mode 'LAB'"):
        as_tensor(image, CONFIG)


def test_tiny_images() -> None:
    for size in [(1, 1), (1, 50), (50, 1), (2, 3)]:
        x = as_tensor(Image.new("L", size, 255), CONFIG)
        assert x.shape == (1, 28, 28)
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("bad", [{"size": 32}, {"mean": 2.0}, {"std": 0}, {"invert": "yes"}, {"mean": True}])
def test_config_is_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        PreprocessConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("background", "invert", "expected"), [(0, "auto", False), (255, "auto", True), (0, "true", True)]
)
def test_preprocess_image_tells_which_way_the_rule_went(background: int, invert: str, expected: bool) -> None:
    image = Image.new("L", (30, 20), background)
    array, inverted = preprocess_image(image, PreprocessConfig(), invert, tell_inverted=True)  # type: ignore[arg-type]
    assert inverted is expected
    np.testing.assert_array_equal(array, preprocess_image(image, PreprocessConfig(), invert))  # type: ignore[arg-type]
