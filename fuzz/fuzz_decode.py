"""Coverage-guided fuzzing of upload decoding and preprocessing (atheris / libFuzzer).

    scripts/fuzz -max_total_time=60 [corpus_dir]

Any exception other than ServeError is a finding: the service would answer 500.
Findings so far are kept in tests/fuzz_findings/ and replayed by the test suite.
Seeds: a few valid images of every accepted format, written to the corpus on first run.
"""

from __future__ import annotations

import io
import sys
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from PIL import Image

    from app.decoding import image_to_input
    from app.errors import ServeError
    from app.settings import Settings
    from models.preprocessing import PreprocessConfig

warnings.simplefilter("ignore", UserWarning)  # Pillow warns about corrupt EXIF; not a finding
CONFIG = PreprocessConfig()
MAX_PIXELS = Settings().max_image_pixels


def seeds(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        return
    base = Image.radial_gradient("L").resize((40, 30))
    for i, (fmt, mode) in enumerate(
        [
            ("PNG", "L"),
            ("PNG", "RGBA"),
            ("PNG", "P"),
            ("JPEG", "RGB"),
            ("JPEG", "CMYK"),
            ("GIF", "P"),
            ("WEBP", "RGB"),
            ("BMP", "RGB"),
            ("TIFF", "L"),
            ("PNG", "I;16"),
        ]
    ):
        buf = io.BytesIO()
        base.convert(mode).save(buf, fmt)
        (folder / f"seed_{i}.{fmt.lower()}").write_bytes(buf.getvalue())


def test_one_input(data: bytes) -> None:
    """Exactly what the service runs on each upload; ServeError is the only allowed failure."""
    try:
        x = image_to_input(data, None, CONFIG, MAX_PIXELS)
    except ServeError as exc:
        assert exc.status in (400, 413, 415), exc.status
        return
    assert x.shape == (1, 28, 28)


def main() -> None:
    corpus = next((Path(a) for a in sys.argv[1:] if not a.startswith("-")), Path("fuzz/corpus"))
    seeds(corpus)
    args = [sys.argv[0], *[a for a in sys.argv[1:] if a.startswith("-")], str(corpus)]
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
