"""Property-based tests: preprocessing, decoding and top-k hold for any input."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from app.decoding import decode_image, image_to_input
from app.errors import ServeError
from models import PreprocessConfig, preprocess_image
from models.preprocessing import Invert
from tests.helpers import tiny_model

MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16", "I", "F"]
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def as_tensor(image: Image.Image, config: PreprocessConfig, invert: Invert | None = None) -> torch.Tensor:
    """`preprocess_image` as a tensor."""
    return torch.from_numpy(preprocess_image(image, config, invert))


@st.composite
def images(draw: st.DrawFn) -> Image.Image:
    height = draw(st.integers(1, 120))
    width = draw(st.integers(1, 120))
    pixels = draw(arrays(np.uint8, (height, width), elements=st.integers(0, 255)))
    mode = draw(st.sampled_from(MODES))
    base = Image.fromarray(pixels)
    if mode == "I;16":
        return Image.fromarray(pixels.astype(np.uint16) * 257)
    return base.convert(mode)


@FAST
@given(image=images(), invert=st.sampled_from(["auto", "true", "false"]), mean=st.floats(0, 1), std=st.floats(0.05, 1))
def test_preprocessing_always_gives_a_bounded_model_input(
    image: Image.Image, invert: str, mean: float, std: float
) -> None:
    config = PreprocessConfig(mean=mean, std=std, invert=invert)  # type: ignore[arg-type]
    x = as_tensor(image, config)
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    low, high = (0 - mean) / std, (1 - mean) / std
    assert x.min() >= low - 1e-4 and x.max() <= high + 1e-4


@FAST
@given(image=images())
def test_inverting_is_an_exact_mirror(image: Image.Image) -> None:
    plain = as_tensor(image, PreprocessConfig(invert="false"))
    flipped = as_tensor(image, PreprocessConfig(invert="true"))
    assert torch.allclose(flipped, -plain, atol=1e-5)  # mean = std = 0.5


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048))
def test_decoding_arbitrary_bytes_only_ever_rejects_cleanly(data: bytes) -> None:
    try:
        decode_image(data, max_pixels=1_000_000)
    except ServeError as exc:
        assert exc.status in (400, 413)


@settings(max_examples=200, deadline=None)
@given(image=images(), cut=st.floats(0.05, 0.95), fmt=st.sampled_from(["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"]))
def test_truncated_files_are_rejected_or_decoded_never_crash(image: Image.Image, cut: float, fmt: str) -> None:
    buf = io.BytesIO()
    image.convert("L" if fmt != "BMP" else "RGB").save(buf, fmt)
    data = buf.getvalue()[: max(1, int(len(buf.getvalue()) * cut))]
    try:
        x = image_to_input(data, None, PreprocessConfig(), max_pixels=1_000_000)
    except ServeError as exc:
        assert exc.status in (400, 413)
    else:
        assert x.shape == (1, 28, 28)


def _service_top_k(probabilities: list[float], k: int) -> list[dict[str, object]]:
    from app.protocols.predict import top_k

    return top_k(probabilities, k, [f"c{i}" for i in range(len(probabilities))])


@settings(max_examples=300, deadline=None)
@given(
    probabilities=st.lists(st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]) | st.floats(0, 1), min_size=2, max_size=12),
    data=st.data(),
)
def test_top_k_is_the_k_largest_sorted_with_ties_to_the_lower_index(
    probabilities: list[float], data: st.DataObject
) -> None:
    k = data.draw(st.integers(1, len(probabilities)))
    top = _service_top_k(probabilities, k)
    assert len(top) == k
    indices = [t["index"] for t in top]
    assert len(set(indices)) == k
    expected = sorted(range(len(probabilities)), key=lambda i: (-probabilities[i], i))[:k]
    assert indices == expected
    assert all(t["label"] == f"c{t['index']}" for t in top)


def test_model_probabilities_sum_to_one() -> None:
    x = torch.randn(8, 1, 28, 28)
    assert torch.allclose(tiny_model()(x).exp().sum(dim=1), torch.ones(8), atol=1e-5)


FINDINGS = sorted((Path(__file__).resolve().parent.parent / "fuzz_findings").iterdir())


@pytest.mark.parametrize("finding", FINDINGS, ids=[f.name for f in FINDINGS])
def test_fuzz_findings_are_rejected_cleanly(finding: Path) -> None:
    """Inputs that once crashed decoding (found by fuzz/fuzz_decode.py) now get a clean 4xx."""
    with pytest.raises(ServeError) as rejected:
        image_to_input(finding.read_bytes(), None, PreprocessConfig(), 1_000_000)
    assert rejected.value.status in (400, 413, 415)
