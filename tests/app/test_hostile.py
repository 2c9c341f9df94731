"""Hostile input: each case gets the right 4xx (or a correct 200), never a 5xx, and the
service is still ready afterwards."""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.main import create_app
from app.settings import Settings
from tests.helpers import encode, garment, png

BOUNDARY = "hostileboundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with(width: int, height: int, idat: bytes, extra: bytes = b"") -> bytes:
    """A hand-made 8-bit grayscale PNG: any declared size, any compressed payload."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def pixel_bomb() -> bytes:
    """Declares 50,000 x 50,000 = 2.5 Gpx in a few hundred bytes."""
    return png_with(50_000, 50_000, zlib.compress(b"\0" * 1000))


def zlib_bomb() -> bytes:
    """A 64x64 image whose IDAT inflates to 64 MB: far past what the header needs."""
    return png_with(64, 64, zlib.compress(b"\0" * (64 * 2**20), 9))


def ztxt_bomb() -> bytes:
    """A valid image carrying a compressed text chunk that inflates to 64 MB."""
    payload = b"comment\0\0" + zlib.compress(b"A" * (64 * 2**20), 9)
    rows = b"".join(b"\0" + bytes(28) for _ in range(28))
    return png_with(28, 28, zlib.compress(rows), extra=_chunk(b"zTXt", payload))


def gif_header_bomb() -> bytes:
    """A GIF whose logical screen and frame are 65535 x 65535."""
    return (
        b"GIF89a"
        + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0)
        + b","
        + struct.pack("<HHHHB", 0, 0, 65535, 65535, 0)
        + b"\x02\x02\x44\x01\x00;"
    )


def animated_gif() -> bytes:
    frames = [Image.fromarray(garment(seed=i)) for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def sixteen_bit_png() -> bytes:
    return encode(Image.fromarray(garment().astype(np.uint16) * 257))


def multipart(*parts: tuple[str, str | None, str | None, bytes], preamble: bytes = b"") -> bytes:
    """Raw multipart body from (name, filename, content type, data) parts."""
    out = [preamble]
    for name, filename, content_type, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        headers = f"Content-Disposition: {disposition}\r\n" + (
            f"Content-Type: {content_type}\r\n" if content_type else ""
        )
        out.append(f"--{BOUNDARY}\r\n{headers}\r\n".encode() + data + b"\r\n")
    out.append(f"--{BOUNDARY}--\r\n".encode())
    return b"".join(out)


@dataclass
class Case:
    name: str
    status: int
    body: bytes | Callable[[], bytes] = b""
    content_type: str | None = MULTIPART
    query: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    check: Callable[[Any], None] | None = None


def one(
    data: bytes | Callable[[], bytes], content_type: str | None = "image/png", filename: str = "x.png"
) -> Callable[[], bytes]:
    return lambda: multipart(("file", filename, content_type, data() if callable(data) else data))


def _filename_is(expected: str) -> Callable[[Any], None]:
    def check(body: Any) -> None:
        assert body["predictions"][0]["filename"] == expected

    return check


CASES = [
    Case("empty file", 400, one(b"")),
    Case("text as image/png", 400, one(b"hello, I am text")),
    Case("text as text/plain", 415, one(b"hello", "text/plain", "a.txt")),
    Case("truncated PNG", 400, one(lambda: png()[:70])),
    Case("truncated JPEG", 400, one(lambda: encode(Image.fromarray(garment()), "JPEG")[:200], "image/jpeg")),
    Case("pixel bomb PNG", 413, one(pixel_bomb)),
    Case("zlib bomb PNG (oversized IDAT)", 200, one(zlib_bomb)),
    Case("zTXt text-chunk bomb", 400, one(ztxt_bomb)),
    Case("huge GIF dimensions, tiny bytes", 413, one(gif_header_bomb, "image/gif")),
    Case("ICO bytes (format not allowed)", 400, one(lambda: encode(Image.new("RGB", (16, 16)), "ICO"), None)),
    Case("SVG", 415, one(b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml", "a.svg")),
    Case("wrong field name", 422, lambda: multipart(("image", "a.png", "image/png", png()))),
    Case("no body, no content type", 422, b"", None),
    Case("no body, multipart type", 400, b"", MULTIPART),
    Case("wrong content type (JSON)", 415, b'{"file": "a.png"}', "application/json"),
    Case("urlencoded form", 415, b"file=a.png", "application/x-www-form-urlencoded"),
    Case(
        "multipart without boundary",
        400,
        lambda: multipart(("file", "a.png", "image/png", png())),
        "multipart/form-data",
    ),
    Case("multipart with a 200-byte boundary", 400, b"--x--", "multipart/form-data; boundary=" + "b" * 200),
    Case(
        "part without Content-Disposition",
        422,
        lambda: (
            f"--{BOUNDARY}\r\nContent-Type: image/png\r\n\r\n".encode() + png() + f"\r\n--{BOUNDARY}--\r\n".encode()
        ),
    ),
    Case(
        "malformed part headers",
        400,
        lambda: f"--{BOUNDARY}\r\nno colon here\r\n\r\ndata\r\n--{BOUNDARY}--\r\n".encode(),
    ),
    Case(
        "missing closing boundary", 400, lambda: multipart(("file", "a.png", "image/png", png()))[: -len(BOUNDARY) - 8]
    ),
    Case(
        "huge preamble",
        400,
        lambda: multipart(("file", "a.png", "image/png", png()), preamble=b"junk " * 200_000 + b"\r\n"),
    ),
    Case("too many files", 413, lambda: multipart(*[("file", f"{i}.png", "image/png", png()) for i in range(17)])),
    Case("many tiny parts", 413, lambda: multipart(*[(f"f{i}", None, None, b"x") for i in range(5000)])),
    Case("oversized body", 413, lambda: multipart(("file", "big.png", "image/png", b"\0" * (10 * 2**20 + 1)))),
    Case("animated GIF", 200, one(animated_gif, "image/gif", "a.gif")),
    Case("CMYK JPEG", 200, one(lambda: encode(Image.fromarray(garment()).convert("CMYK"), "JPEG"), "image/jpeg")),
    Case("16-bit PNG", 200, one(sixteen_bit_png)),
    Case("non-numeric k", 422, one(png), query="k=three"),
    Case("out-of-range k", 422, one(png), query="k=11"),
    Case("negative k", 422, one(png), query="k=-3"),
    Case("huge k", 422, one(png), query="k=99999999999999999999999"),
    Case("duplicate k", 422, one(png), query="k=1&k=2"),
    Case("unicode filename", 200, one(png, filename="ジャケット👗.png"), check=_filename_is("ジャケット👗.png")),
    Case(
        "path-like filename", 200, one(png, filename="../../../etc/passwd"), check=_filename_is("../../../etc/passwd")
    ),
    Case("filename with NUL", 200, one(png, filename="a\0b.png"), check=_filename_is("a\0b.png")),
    Case("filename with a bare CR (malformed header)", 400, one(png, filename="a\0b\rc.png")),
    Case("raw body: empty image/png", 400, b"", "image/png"),
    Case("raw body: text/plain", 415, b"hello", "text/plain"),
    Case("raw body: JPEG bytes labelled PNG", 200, lambda: encode(Image.fromarray(garment()), "JPEG"), "image/png"),
    Case("non-numeric Content-Length", 400, one(png), headers={"content-length": "12abc"}),
]


@pytest.fixture(scope="module")
def hostile_client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.helpers import write_tiny_checkpoint

    checkpoint = write_tiny_checkpoint(tmp_path_factory.mktemp("hostile") / "tiny.pt")
    with TestClient(create_app(Settings(checkpoint=checkpoint, device="cpu"))) as client:
        yield client


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_input(hostile_client: TestClient, case: Case) -> None:
    body = case.body() if callable(case.body) else case.body
    headers = dict(case.headers)
    if case.content_type is not None:
        headers["content-type"] = case.content_type
    response = hostile_client.post(f"/predict?{case.query}", content=body, headers=headers)
    assert response.status_code == case.status, response.text
    assert "detail" in response.json() or response.status_code == 200
    if case.check:
        case.check(response.json())
    assert hostile_client.get("/health/ready").status_code == 200


def test_a_flood_beyond_the_concurrency_cap_is_refused_not_queued(tiny_checkpoint: Path) -> None:
    """100 simultaneous uploads against a cap of 4: some 503 + Retry-After, the rest 200, no other status."""

    async def flood() -> list[httpx.Response]:
        app = create_app(Settings(checkpoint=tiny_checkpoint, device="cpu", max_concurrency=4))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                body = multipart(*[("file", f"{i}.png", "image/png", png(seed=i)) for i in range(4)])
                requests = [
                    client.post("/predict", content=body, headers={"content-type": MULTIPART}) for _ in range(100)
                ]
                responses = await asyncio.gather(*requests)
                ready = await client.get("/health/ready")
                assert ready.status_code == 200
                return responses

    responses = asyncio.run(flood())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}
    assert statuses.count(200) >= 4
    refused = [r for r in responses if r.status_code == 503]
    assert all(r.headers["retry-after"] == "1" and "busy" in r.json()["detail"] for r in refused)


def test_float_tiff_with_nan_and_inf_is_answered_not_500(hostile_client: TestClient) -> None:
    """Found in review: a NaN pixel reached the model and JSON-encoding NaN was a 500."""
    values = np.full((28, 28), np.nan, dtype=np.float32)
    values[10:18, 10:18] = np.inf
    values[0, 0] = -np.inf
    data = encode(Image.fromarray(values, mode="F"), "TIFF")
    response = hostile_client.post("/predict?k=3", files={"file": ("nan.tif", data, "image/tiff")})
    assert response.status_code == 200, response.text
    assert all(0.0 <= t["probability"] <= 1.0 for t in response.json()["predictions"][0]["top_k"])


# --- the v2 protocol ---------------------------------------------------------------------------

V2_INFER = "/v2/models/tiny/infer"


def _v2_bytes(*images: bytes) -> tuple[bytes, dict[str, str]]:
    blob = b"".join(struct.pack("<I", len(i)) + i for i in images)
    tensor = {
        "name": "input",
        "datatype": "BYTES",
        "shape": [len(images)],
        "parameters": {"binary_data_size": len(blob)},
    }
    text = json.dumps({"inputs": [tensor]}).encode()
    return text + blob, {"Inference-Header-Content-Length": str(len(text))}


@pytest.mark.parametrize(
    ("name", "image", "status"),
    [
        ("pixel bomb", pixel_bomb, 413),
        ("zTXt text-chunk bomb", ztxt_bomb, 400),
        ("gif header bomb", gif_header_bomb, 413),
        ("truncated png", lambda: png()[:60], 400),
        ("empty", lambda: b"", 400),
    ],
)
def test_hostile_images_through_v2_are_refused_by_status(
    hostile_client: TestClient, name: str, image: Callable[[], bytes], status: int
) -> None:
    body, headers = _v2_bytes(png(), image())
    response = hostile_client.post(V2_INFER, content=body, headers=headers)
    assert response.status_code == status, (name, response.text)
    assert response.json()["error"].startswith("image 1:")
    assert hostile_client.get("/v2/health/ready").status_code == 200


def test_v2_declared_oversized_body_is_refused_before_reading(hostile_client: TestClient) -> None:
    response = hostile_client.post(V2_INFER, content=b"{}", headers={"content-length": "99999999999"})
    assert response.status_code in (400, 413)
    assert "error" in response.json()


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-300, 300) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    datatype=st.sampled_from(["FP32", "UINT8", "BYTES", "INT8"]) | _JSON,
    shape=st.lists(st.integers(-2, 800), max_size=4) | _JSON,
    data=_JSON,
    parameters=_JSON,
    outputs=_JSON,
)
def test_any_v2_json_gets_an_answer_never_a_500(
    hostile_client: TestClient, datatype: object, shape: object, data: object, parameters: object, outputs: object
) -> None:
    request = {
        "inputs": [{"name": "input", "datatype": datatype, "shape": shape, "data": data}],
        "parameters": parameters,
        "outputs": outputs,
    }
    response = hostile_client.post(V2_INFER, content=json.dumps(request).encode())
    assert response.status_code in (200, 400, 413), response.text
    assert response.status_code == 200 or "error" in response.json()
