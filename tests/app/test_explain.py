from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.protocols import explain
from app.settings import Settings
from models import PreprocessConfig, saliency
from models.preprocessing import preprocess_image
from tests.helpers import encode, garment, multipart, png, tiny_model

BUNDLED = Path(__file__).resolve().parents[2] / "models" / "fashion_cnn.pt"


def served_pixels(data: bytes, invert: str | None = None) -> list[list[int]]:
    """The model input `preprocess_image` makes of these bytes, as 0..255 pixels."""
    x = preprocess_image(Image.open(io.BytesIO(data)), PreprocessConfig(), invert)  # type: ignore[arg-type]
    return np.clip(np.rint((x[0] * 0.5 + 0.5) * 255), 0, 255).astype(int).tolist()


def explain_one(client: TestClient, data: bytes, query: str = "") -> dict[str, object]:
    response = client.post(f"/explain?{query}", files={"file": ("x.png", data, "image/png")})
    assert response.status_code == 200, response.text
    [explanation] = response.json()["explanations"]
    return explanation


def dark_on_white() -> np.ndarray:
    return (255 - garment((28, 28), seed=3)).astype(np.uint8)


def test_shapes_ranges_and_the_same_classes_as_predict(client: TestClient) -> None:
    images = [
        ("a.png", png(seed=1)),
        ("b.png", png((40, 20), seed=2)),
        ("c.png", encode(Image.fromarray(dark_on_white()))),
    ]
    body, content_type = multipart(images)
    response = client.post("/explain?k=4", content=body, headers={"content-type": content_type})
    assert response.status_code == 200
    answer = response.json()
    predicted = client.post("/predict?k=4", content=body, headers={"content-type": content_type}).json()
    assert answer["model"] == "tiny"
    assert answer["saliency_method"] == explain.SALIENCY_METHOD
    assert [e["filename"] for e in answer["explanations"]] == ["a.png", "b.png", "c.png"]
    for explanation, prediction in zip(answer["explanations"], predicted["predictions"], strict=True):
        assert set(explanation) == {*prediction, "inverted", "input", "saliency"}
        assert explanation["top_k"] == prediction["top_k"]
        assert explanation["ood_score"] is None and explanation["out_of_distribution"] is None
        pixels = np.array(explanation["input"])
        saliency = np.array(explanation["saliency"])
        assert pixels.shape == saliency.shape == (28, 28)
        assert pixels.dtype.kind == "i" and pixels.min() >= 0 and pixels.max() <= 255
        assert saliency.min() >= 0 and saliency.max() == 1.0
    assert [e["inverted"] for e in answer["explanations"]] == [False, False, True]


@pytest.mark.parametrize(
    "image",
    [
        Image.fromarray(garment((28, 28), seed=4)),
        Image.fromarray(garment((50, 30), seed=5)).convert("RGB"),  # fitted into 28x28
        Image.fromarray(dark_on_white()),  # inverted by the auto rule
    ],
    ids=["plain", "fitted", "inverted"],
)
def test_input_is_what_preprocess_image_gives(client: TestClient, image: Image.Image) -> None:
    data = encode(image)
    assert explain_one(client, data)["input"] == served_pixels(data)


def test_inverted_input_is_the_negative_of_the_upload(client: TestClient) -> None:
    pixels = dark_on_white()
    explanation = explain_one(client, encode(Image.fromarray(pixels)))
    assert explanation["inverted"] is True
    assert explanation["input"] == (255 - pixels.astype(int)).tolist()


def test_input_is_after_exif_rotation(client: TestClient) -> None:
    upright = Image.fromarray(garment((20, 28), seed=6))  # not square: rotation changes the input
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera stores, tagged "rotate 90 CW to show"
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, exif=exif.tobytes())
    explanation = explain_one(client, data)
    assert explanation["input"] == served_pixels(data) == served_pixels(encode(upright))
    assert explanation["input"] != served_pixels(encode(stored))


@pytest.mark.parametrize(
    ("pixels", "query", "inverted"),
    [
        (garment(seed=7), "", False),
        (garment(seed=7), "invert=auto", False),
        (garment(seed=7), "invert=true", True),
        (dark_on_white(), "", True),
        (dark_on_white(), "invert=false", False),
        (dark_on_white(), "invert=true", True),
    ],
)
def test_inverted_follows_the_rule_and_the_override(
    client: TestClient, pixels: np.ndarray, query: str, inverted: bool
) -> None:
    explanation = explain_one(client, encode(Image.fromarray(pixels)), query)
    assert explanation["inverted"] is inverted
    expected = 255 - pixels.astype(int) if inverted else pixels.astype(int)
    assert explanation["input"] == expected.tolist()


def test_saliency_lies_on_the_object_and_is_repeatable(client: TestClient) -> None:
    pixels = garment(seed=8)
    data = encode(Image.fromarray(pixels))
    saliency = np.array(explain_one(client, data)["saliency"])
    assert saliency.max() == 1.0
    assert (saliency[pixels == 0] == 0).all()
    assert (saliency[pixels > 0] > 0).mean() > 0.9
    assert explain_one(client, data)["saliency"] == saliency.tolist()


def test_saliency_is_the_top_class_gradient_times_input(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(saliency, "SMOOTHGRAD_SAMPLES", 1)
    monkeypatch.setattr(saliency, "SMOOTHGRAD_NOISE", 0.0)
    data = png(seed=9)
    explanation = explain_one(client, data, "k=1")
    x = torch.tensor(preprocess_image(Image.open(io.BytesIO(data)), PreprocessConfig()))[None].requires_grad_(True)
    log_ps = tiny_model()(x)
    top = int(log_ps.argmax())
    assert explanation["top_k"][0]["index"] == top  # type: ignore[index]
    (gradient,) = torch.autograd.grad(log_ps[0, top], x)
    expected = (gradient * (x + 1.0)).abs()[0, 0].detach().numpy()  # black is -1 after normalize(0.5, 0.5)
    np.testing.assert_allclose(explanation["saliency"], expected / expected.max(), atol=2e-4)


def test_each_image_fails_alone_as_in_predict(client: TestClient) -> None:
    body, content_type = multipart([("ok.png", png()), ("empty.png", b""), ("junk.png", b"not an image")])
    headers = {"content-type": content_type}
    explained = client.post("/explain", content=body, headers=headers).json()["explanations"]
    predicted = client.post("/predict", content=body, headers=headers).json()["predictions"]
    assert "saliency" in explained[0]
    assert explained[1:] == predicted[1:]
    assert [e["error"]["status"] for e in explained[1:]] == [400, 400]


@pytest.mark.parametrize(
    ("query", "files", "status"),
    [
        ("k=0", [("a.png", png())], 422),
        ("invert=maybe", [("a.png", png())], 422),
        ("k=1&k=2", [("a.png", png())], 422),
        ("", [("empty.png", b"")], 400),
        ("", [("a.png", b"junk"), ("b.png", b"")], 400),
        ("", [("a.png", png())] * 3, 413),
    ],
)
def test_refused_requests_answer_as_predict_does(
    tiny_checkpoint: Path, query: str, files: list[tuple[str, bytes]], status: int
) -> None:
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, device="cpu", max_files=2))) as client:
        body, content_type = multipart(files)
        headers = {"content-type": content_type}
        explained = client.post(f"/explain?{query}", content=body, headers=headers)
        predicted = client.post(f"/predict?{query}", content=body, headers=headers)
    assert explained.status_code == predicted.status_code == status
    assert explained.json() == predicted.json()


def test_bodies_refused_before_decoding(client: TestClient) -> None:
    assert client.post("/explain", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    no_file = client.post("/explain", files={"other": ("a.png", png())})
    assert no_file.status_code == 422
    assert "no 'file' part" in no_file.json()["detail"]
    assert client.get("/explain").status_code == 405


def test_one_raw_image_body(client: TestClient) -> None:
    data = png(seed=10)
    response = client.post("/explain", content=data, headers={"content-type": "image/png"})
    assert response.status_code == 200
    [explanation] = response.json()["explanations"]
    assert explanation["filename"] is None
    assert explanation["input"] == served_pixels(data)


def test_openapi_documents_explain(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/explain"]["post"]
    assert [p["name"] for p in operation["parameters"]] == ["k", "invert"]
    assert "multipart/form-data" in operation["requestBody"]["content"]
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/ExplainResponse"}
    fields = schema["components"]["schemas"]["Explanation"]["properties"]
    assert {"inverted", "input", "saliency", "top_k", "ood_score", "error"} <= set(fields)
    assert operation["responses"]["413"]["content"]["application/json"]["schema"]["$ref"].endswith("/HTTPError")


@pytest.fixture(scope="module")
def bundled() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(checkpoint=BUNDLED, device="cpu"))) as client:
        yield client


def test_bundled_model_gives_the_ood_verdict_of_predict(bundled: TestClient) -> None:
    data = png(seed=11)
    explanation = explain_one(bundled, data)
    prediction = bundled.post("/predict", files={"file": ("x.png", data, "image/png")}).json()["predictions"][0]
    assert explanation["top_k"] == prediction["top_k"]
    assert explanation["ood_score"] == prediction["ood_score"]
    assert isinstance(explanation["out_of_distribution"], bool)
    assert explanation["out_of_distribution"] == prediction["out_of_distribution"]


def test_accelerator_out_of_memory_in_the_gradient_pass_is_503(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one out-of-memory mapping (app.served_model.accelerator_memory) covers saliency too."""

    def out_of_memory(*args: object) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("app.served_model.saliency_maps", out_of_memory)
    response = client.post("/explain", files={"file": ("a.png", png())})
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert "out of memory" in response.json()["detail"]
    assert client.post("/predict", files={"file": ("a.png", png())}).status_code == 200
