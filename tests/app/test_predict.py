from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.protocols import predict
from app.settings import Settings
from models import FASHION_MNIST_CLASSES, PreprocessConfig, preprocess_image
from tests.helpers import encode, garment, png, tiny_model

NO_OOD = {"ood_score": None, "out_of_distribution": None}  # the tiny checkpoint has no OOD statistics


def expected_top_k(data: bytes, k: int) -> list[dict[str, object]]:
    """What the tiny model says for these bytes, computed without the service."""
    x = torch.from_numpy(preprocess_image(Image.open(io.BytesIO(data)), PreprocessConfig())).unsqueeze(0)
    with torch.inference_mode():
        probs = tiny_model()(x).exp()[0]
    values, indices = probs.topk(k)
    return [
        {"label": FASHION_MNIST_CLASSES[i], "index": i, "probability": pytest.approx(p, abs=1e-6)}
        for p, i in zip(values.tolist(), indices.tolist(), strict=True)
    ]


def test_single_png_gives_the_exact_top_k(client: TestClient) -> None:
    data = png()
    response = client.post("/predict?k=3", files={"file": ("shirt.png", data, "image/png")})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "tiny"
    assert body["predictions"] == [{"filename": "shirt.png", "top_k": expected_top_k(data, 3), **NO_OOD}]
    probabilities = [t["probability"] for t in body["predictions"][0]["top_k"]]
    assert probabilities == sorted(probabilities, reverse=True)


def test_default_k_and_k_bounds(client: TestClient) -> None:
    data = png()
    default = client.post("/predict", files={"file": ("a.png", data)}).json()
    assert len(default["predictions"][0]["top_k"]) == 3
    all_classes = client.post("/predict?k=10", files={"file": ("a.png", data)}).json()
    top = all_classes["predictions"][0]["top_k"]
    assert sorted(t["index"] for t in top) == list(range(10))
    assert sum(t["probability"] for t in top) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(
    ("query", "error_type"),
    [
        ("k=0", "greater_than_equal"),
        ("k=11", "less_than_equal"),
        ("k=-1", "greater_than_equal"),
        ("k=abc", "int_parsing"),
        ("k=1.5", "int_parsing"),
        ("k=", "int_parsing"),
        ("k=1&k=2", "duplicate"),
        ("invert=maybe", "literal_error"),
        ("invert=true&invert=false", "duplicate"),
    ],
)
def test_bad_parameters_are_422_in_fastapis_shape(client: TestClient, query: str, error_type: str) -> None:
    response = client.post(f"/predict?{query}", files={"file": ("a.png", png())})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["type"] == error_type
    assert error["loc"] == ["query", query.split("=")[0]]
    assert error["msg"]


def test_other_query_parameters_are_ignored_and_encoded_ones_understood(client: TestClient) -> None:
    response = client.post("/predict?utm=x&%6B=2&invert=%66alse", files={"file": ("a.png", png())})
    assert response.status_code == 200
    assert len(response.json()["predictions"][0]["top_k"]) == 2


def test_predict_only_accepts_post(client: TestClient) -> None:
    response = client.get("/predict")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert response.json() == {"detail": "Method Not Allowed"}
    assert response.headers["x-request-id"]


def test_a_bug_in_predict_is_a_logged_500_and_the_service_goes_on(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(predict, "top_k", lambda *args: 1 / 0)
    response = client.post("/predict", files={"file": ("a.png", png())}, headers={"X-Request-ID": "bug-1"})
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal Server Error"}
    log = capsys.readouterr().err
    assert "[bug-1] unhandled error in POST /predict" in log and "ZeroDivisionError" in log
    monkeypatch.undo()
    assert client.post("/predict", files={"file": ("a.png", png())}).status_code == 200


def test_openapi_documents_predict(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/predict"]["post"]
    assert {p["name"] for p in operation["parameters"]} == {"k", "invert"}
    assert set(operation["requestBody"]["content"]) >= {"multipart/form-data", "image/png", "image/jpeg"}
    ok = operation["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ok == "#/components/schemas/PredictResponse"
    for name in ("PredictResponse", "Prediction", "TopK", "ImageFailure", "HTTPError"):
        assert name in schema["components"]["schemas"]


def test_raw_image_body(client: TestClient) -> None:
    data = png()
    response = client.post("/predict?k=2", content=data, headers={"content-type": "image/png"})
    assert response.status_code == 200
    assert response.json()["predictions"] == [{"filename": None, "top_k": expected_top_k(data, 2), **NO_OOD}]


def _image(mode: str, size: tuple[int, int]) -> Image.Image:
    base = Image.fromarray(garment(size))
    if mode == "I;16":
        return Image.fromarray(garment(size).astype(np.uint16) * 257)
    return base.convert(mode)


@pytest.mark.parametrize(
    ("fmt", "mode", "size"),
    [
        ("PNG", "L", (28, 28)),
        ("PNG", "RGB", (31, 17)),
        ("PNG", "RGBA", (64, 64)),
        ("PNG", "P", (5, 300)),
        ("PNG", "I;16", (28, 28)),
        ("PNG", "1", (40, 40)),
        ("JPEG", "RGB", (101, 77)),
        ("JPEG", "L", (28, 28)),
        ("JPEG", "CMYK", (50, 50)),
        ("GIF", "P", (28, 28)),
        ("WEBP", "RGB", (45, 45)),
        ("WEBP", "RGBA", (33, 20)),
        ("BMP", "RGB", (28, 28)),
        ("TIFF", "L", (60, 30)),
    ],
)
def test_formats_modes_and_sizes(client: TestClient, fmt: str, mode: str, size: tuple[int, int]) -> None:
    data = encode(_image(mode, size), fmt)
    response = client.post("/predict?k=1", files={"file": (f"x.{fmt.lower()}", data)})
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["top_k"] == expected_top_k(data, 1)


def test_several_images_with_one_bad_keep_order_and_isolate_the_error(client: TestClient) -> None:
    good_a, good_b = png(seed=1), png((50, 40), "RGB", seed=2)
    files = [
        ("file", ("a.png", good_a, "image/png")),
        ("file", ("broken.png", b"\x89PNG\r\n\x1a\n garbage", "image/png")),
        ("file", ("b.png", good_b, "image/png")),
        ("file", ("notes.txt", b"hello", "text/plain")),
    ]
    response = client.post("/predict?k=2", files=files)
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == ["a.png", "broken.png", "b.png", "notes.txt"]
    assert predictions[0]["top_k"] == expected_top_k(good_a, 2)
    assert predictions[1]["error"]["status"] == 400
    assert predictions[2]["top_k"] == expected_top_k(good_b, 2)
    assert predictions[3]["error"]["status"] == 415


def test_when_every_image_fails_the_request_fails(client: TestClient) -> None:
    files = [("file", ("a.png", b"nope", "image/png")), ("file", ("b.png", b"", "image/png"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 400
    assert "none of the 2 images" in response.json()["detail"]


@pytest.mark.parametrize(
    ("files", "status", "message"),
    [
        ({"file": ("e.png", b"", "image/png")}, 400, "empty file"),
        ({"file": ("t.png", b"this is text", "image/png")}, 400, "not a decodable image"),
        ({"file": ("t.png", png()[:60], "image/png")}, 400, "truncated or corrupt"),
        ({"file": ("t.txt", png(), "text/plain")}, 415, "unsupported content type 'text/plain'"),
        ({"file": ("i.svg", b"<svg/>", "image/svg+xml")}, 415, "unsupported content type"),
        ({"image": ("a.png", png(), "image/png")}, 422, "no 'file' part"),
    ],
)
def test_single_image_errors(
    client: TestClient, files: dict[str, tuple[str, bytes, str]], status: int, message: str
) -> None:
    response = client.post("/predict", files=files)
    assert response.status_code == status
    assert message in response.json()["detail"]


def test_request_level_errors(client: TestClient) -> None:
    assert client.post("/predict").status_code == 422
    response = client.post("/predict", content=b'{"a": 1}', headers={"content-type": "application/json"})
    assert response.status_code == 415
    response = client.post("/predict", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert response.status_code == 400
    assert "boundary" in response.json()["detail"]


def test_limits(tiny_checkpoint: object) -> None:
    settings = Settings(
        checkpoint=tiny_checkpoint, device="cpu", max_upload_bytes=4096, max_files=2, max_image_pixels=10_000
    )
    with TestClient(create_app(settings)) as client:
        big = client.post("/predict", files={"file": ("big.bmp", encode(Image.new("L", (80, 80)), "BMP"))})
        assert big.status_code == 413 and "exceeds the limit of 4096 bytes" in big.json()["detail"]
        wide = client.post("/predict", files={"file": ("wide.png", encode(Image.new("L", (200, 100)), "PNG"))})
        assert wide.status_code == 413 and "pixels" in wide.json()["detail"]
        many = client.post("/predict", files=[("file", ("a.png", png(), "image/png"))] * 3)
        assert many.status_code == 413 and "too many files" in many.json()["detail"]
        assert client.post("/predict", files=[("file", ("a.png", png(), "image/png"))] * 2).status_code == 200


def test_invert_override_changes_the_input(client: TestClient) -> None:
    data = png()
    plain = client.post("/predict?k=10&invert=false", files={"file": ("a.png", data)}).json()
    flipped = client.post("/predict?k=10&invert=true", files={"file": ("a.png", data)}).json()
    assert plain["predictions"] != flipped["predictions"]


def test_default_k_is_capped_by_max_k_and_the_class_count(tmp_path: Path) -> None:
    """Found in review: a model with fewer classes than the default k made every request without k a 422."""
    from pydantic import ValidationError

    from models import build_model, save_checkpoint

    with pytest.raises(ValidationError, match="default_k"):
        Settings(max_k=2)
    args = {"input_size": 784, "output_size": 2, "hidden_layers": [8], "drop_p": 0.0}
    checkpoint = save_checkpoint(
        tmp_path / "two.pt", build_model("network", args), "network", args, PreprocessConfig(), class_names=["a", "b"]
    )
    with TestClient(create_app(Settings(checkpoint=checkpoint, device="cpu"))) as client:  # default_k is 3
        response = client.post("/predict", files={"file": ("a.png", png())})
        assert response.status_code == 200, response.text
        assert [t["label"] for t in response.json()["predictions"][0]["top_k"]] in (["a", "b"], ["b", "a"])
        assert client.post("/predict?k=3", files={"file": ("a.png", png())}).status_code == 422


def test_predict_below_a_root_path_and_with_a_trailing_slash(settings: Settings) -> None:
    """Found in review: `/predict` was matched on the raw path, so a proxy's root_path gave 404,
    and `/predict/` lost FastAPI's redirect."""
    with TestClient(create_app(settings), root_path="/api") as client:
        response = client.post("/api/predict", files={"file": ("a.png", png())})
        assert response.status_code == 200, response.text
        assert client.get("/api/health/live").status_code == 200
    with TestClient(create_app(settings)) as client:
        redirect = client.post("/predict/", files={"file": ("a.png", png())}, follow_redirects=False)
        assert redirect.status_code == 307
        assert redirect.headers["location"].endswith("/predict")


def test_every_query_error_is_reported_at_once_as_fastapi_does(client: TestClient) -> None:
    """Found in review: only the first error came back, without pydantic's `ctx`."""
    response = client.post("/predict?invert=bad&k=0", files={"file": ("a.png", png())})
    assert response.status_code == 422
    errors = {e["loc"][1]: e for e in response.json()["detail"]}
    assert errors["k"]["type"] == "greater_than_equal" and errors["k"]["ctx"] == {"ge": 1}
    assert errors["invert"]["type"] == "literal_error" and errors["invert"]["input"] == "bad"


def test_kept_query_answers_equal_fresh_ones_and_refusals_are_raised_every_time() -> None:
    from app.errors import ServeError

    for query in (b"", b"k=3", b"k=2&invert=auto", b"x=1&k=5"):
        assert predict.parse_query(query, 3, 10) == predict._parse_query(query, 3, 10)
        assert predict.parse_query(query, 3, 10) == predict._parse_query(query, 3, 10)  # now kept
    assert predict.parse_query(b"", 3, 10) == (3, None) and predict.parse_query(b"", 4, 10) == (4, None)
    assert predict.parse_query(b"", 3, 2) == (2, None), "the settings are part of what is kept"
    for _ in range(2):
        with pytest.raises(ServeError) as refused:
            predict.parse_query(b"k=0", 3, 10)
        assert refused.value.status == 422
    long = b"k=4&" + b"pad=" + b"x" * predict.MAX_KEPT_QUERY
    assert predict.parse_query(long, 3, 10) == (4, None)
