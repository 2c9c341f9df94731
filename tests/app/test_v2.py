"""The Open Inference Protocol v2 over raw HTTP: every input form, classification, binary data,
versions, errors, and agreement with /predict."""

from __future__ import annotations

import base64
import io
import json
import struct
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.protocols.predict import decode_body
from app.settings import Settings
from models import FASHION_MNIST_CLASSES, PreprocessConfig, preprocess_image
from models.preprocessing import normalize
from tests.helpers import garment, multipart, png, tiny_model

INFER = "/v2/models/tiny/infer"


def _expected(x: np.ndarray) -> np.ndarray:
    """What the tiny model says for normalized (N, 1, 28, 28) inputs, without the service."""
    with torch.inference_mode():
        return tiny_model()(torch.from_numpy(x)).exp().numpy()


def _inputs(n: int = 3) -> np.ndarray:
    return np.stack([normalize(garment(seed=s), PreprocessConfig())[np.newaxis] for s in range(n)])


def _fp32(x: np.ndarray, shape: list[int] | None = None, **extra: object) -> dict[str, object]:
    tensor = {"name": "input", "datatype": "FP32", "shape": shape or list(x.shape), "data": x.ravel().tolist()}
    return {"inputs": [tensor], **extra}


def _probabilities(response_json: dict[str, object]) -> np.ndarray:
    (output,) = response_json["outputs"]  # type: ignore[misc]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32"
    return np.asarray(output["data"], np.float32).reshape(output["shape"])


def _binary_request(header: dict[str, object], blob: bytes) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(header).encode()
    return text + blob, {"Inference-Header-Content-Length": str(len(text))}


def _split_binary(response: object) -> tuple[dict[str, object], bytes]:
    length = int(response.headers["inference-header-content-length"])  # type: ignore[attr-defined]
    content: bytes = response.content  # type: ignore[attr-defined]
    return json.loads(content[:length]), content[length:]


def test_server_metadata_health_and_model_metadata(client: TestClient) -> None:
    meta = client.get("/v2").json()
    assert meta["name"] == "fashion-serve" and meta["version"]
    assert {"binary_tensor_data", "classification", "model_configuration"} <= set(meta["extensions"])
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    expected = {
        "name": "tiny",
        "versions": ["1"],
        "platform": "pytorch_libtorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 28, 28]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}],
    }
    assert client.get("/v2/models/tiny").json() == expected
    assert client.get("/v2/models/tiny/versions/1").json() == expected
    assert client.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
    assert client.get("/v2/models/tiny/versions/1/ready").status_code == 200
    config = client.get("/v2/models/tiny/config").json()
    assert config["name"] == "tiny" and config["max_batch_size"] == 256
    assert config["input"] == [
        {"name": "input", "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [1, 28, 28]}
    ]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}]


def test_unknown_model_or_version_is_404_in_v2_error_shape(client: TestClient) -> None:
    for path in ("/v2/models/other", "/v2/models/other/ready", "/v2/models/tiny/versions/2", "/v2/models/nope/config"):
        response = client.get(path)
        assert response.status_code == 404, path
        assert set(response.json()) == {"error"}, path
    response = client.post("/v2/models/tiny/versions/7/infer", json=_fp32(_inputs(1)))
    assert response.status_code == 404 and "version '7'" in response.json()["error"]
    assert client.post("/v2/models/nope/infer", json=_fp32(_inputs(1))).status_code == 404


@pytest.mark.parametrize("shape", [[3, 1, 28, 28], [3, 28, 28], [3, 784]])
def test_fp32_json_in_every_shape_gives_the_models_probabilities(client: TestClient, shape: list[int]) -> None:
    x = _inputs(3)
    response = client.post(INFER, json=_fp32(x, shape, id="req-1"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "tiny" and body["model_version"] == "1" and body["id"] == "req-1"
    np.testing.assert_allclose(_probabilities(body), _expected(x), atol=1e-6)
    assert response.headers["x-request-id"]


def test_fp32_binary_in_and_out(client: TestClient) -> None:
    x = _inputs(4)
    header = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [4, 1, 28, 28], "parameters": {"binary_data_size": x.nbytes}}
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    body, headers = _binary_request(header, x.astype("<f4").tobytes())
    response = client.post(INFER, content=body, headers=headers)  # no Content-Type: some clients send none
    assert response.status_code == 200, response.text
    meta, blob = _split_binary(response)
    (output,) = meta["outputs"]  # type: ignore[misc]
    assert output["shape"] == [4, 10] and output["parameters"] == {"binary_data_size": 4 * 10 * 4}
    np.testing.assert_allclose(np.frombuffer(blob, "<f4").reshape(4, 10), _expected(x), atol=1e-6)


def test_binary_data_output_applies_to_every_output(client: TestClient) -> None:
    x = _inputs(2)
    response = client.post(INFER, json=_fp32(x, parameters={"binary_data_output": True}))
    meta, blob = _split_binary(response)
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": len(blob)}  # type: ignore[index]
    np.testing.assert_allclose(np.frombuffer(blob, "<f4").reshape(2, 10), _expected(x), atol=1e-6)


@pytest.mark.parametrize("shape", [[2, 28, 28], [2, 1, 28, 28]])
def test_uint8_raw_pixels_are_normalized_by_the_server(client: TestClient, shape: list[int]) -> None:
    pixels = np.stack([garment(seed=s) for s in range(2)])
    tensor = {"name": "input", "datatype": "UINT8", "shape": shape, "data": pixels.ravel().tolist()}
    response = client.post(INFER, json={"inputs": [tensor]})
    assert response.status_code == 200, response.text
    np.testing.assert_allclose(_probabilities(response.json()), _expected(_inputs(2)), atol=1e-6)
    header = {"inputs": [{**tensor, "data": None, "parameters": {"binary_data_size": pixels.nbytes}}]}
    del header["inputs"][0]["data"]  # type: ignore[attr-defined]
    body, headers = _binary_request(header, pixels.tobytes())
    binary = client.post(INFER, content=body, headers=headers)
    np.testing.assert_allclose(_probabilities(binary.json()), _expected(_inputs(2)), atol=1e-6)


def _encoded_images() -> list[bytes]:
    rgb = io.BytesIO()
    Image.fromarray(255 - garment((40, 30), seed=5)).convert("RGB").save(rgb, "JPEG")  # dark on light: auto inverts
    return [png(seed=1), png((56, 56), seed=2), rgb.getvalue()]


def _decoded(images: list[bytes]) -> np.ndarray:
    return np.stack([preprocess_image(Image.open(io.BytesIO(b)), PreprocessConfig()) for b in images])


def test_bytes_images_binary_and_base64_are_decoded_as_predict_decodes_them(client: TestClient) -> None:
    images = _encoded_images()
    blob = b"".join(struct.pack("<I", len(b)) + b for b in images)
    header = {
        "inputs": [{"name": "input", "datatype": "BYTES", "shape": [3], "parameters": {"binary_data_size": len(blob)}}]
    }
    body, headers = _binary_request(header, blob)
    binary = client.post(INFER, content=body, headers=headers)
    assert binary.status_code == 200, binary.text
    np.testing.assert_allclose(_probabilities(binary.json()), _expected(_decoded(images)), atol=1e-6)
    strings = [base64.b64encode(b).decode() for b in images]
    tensor = {"name": "input", "datatype": "BYTES", "shape": [3, 1], "data": strings}
    as_json = client.post(INFER, json={"inputs": [tensor]})
    assert as_json.json()["outputs"] == binary.json()["outputs"]

    body, content_type = multipart([(f"{i}.img", b) for i, b in enumerate(images)])
    predicted = client.post("/predict?k=10", content=body, headers={"Content-Type": content_type}).json()
    v2_rows = _probabilities(binary.json())
    for row, prediction in zip(v2_rows, predicted["predictions"], strict=True):
        assert prediction["top_k"][0]["index"] == int(row.argmax())
        assert [t["probability"] for t in prediction["top_k"]] == pytest.approx(sorted(row, reverse=True), abs=1e-6)


def test_classification_extension_returns_ranked_strings(client: TestClient) -> None:
    x = _inputs(2)
    request = _fp32(x, outputs=[{"name": "probabilities", "parameters": {"classification": 3}}])
    (output,) = client.post(INFER, json=request).json()["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [2, 3]
    expected = _expected(x)
    for image, row in enumerate(expected):
        for rank, index in enumerate(np.argsort(-row, kind="stable")[:3]):
            value, idx, label = output["data"][image * 3 + rank].split(":", 2)
            assert (int(idx), label) == (index, FASHION_MNIST_CLASSES[index])
            assert float(value) == pytest.approx(row[index], abs=1e-6)
    request["outputs"][0]["parameters"]["binary_data"] = True  # type: ignore[index]
    _, blob = _split_binary(client.post(INFER, json=request))
    strings, offset = [], 0
    while offset < len(blob):
        (length,) = struct.unpack_from("<I", blob, offset)
        strings.append(blob[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    assert strings == output["data"]


def _tensor_json(datatype: str, shape: list[int], data: object = None, **parameters: object) -> bytes:
    tensor: dict[str, object] = {"name": "input", "datatype": datatype, "shape": shape}
    if data is not None:
        tensor["data"] = data
    if parameters:
        tensor["parameters"] = parameters
    return json.dumps({"inputs": [tensor]}).encode()


_ZEROS = _fp32(np.zeros((1, 1, 28, 28), np.float32))
# (case, JSON part, binary part or None for a JSON-only body)
BAD_REQUESTS: list[tuple[str, bytes, bytes | None]] = [
    ("not json", b"{oops", None),
    ("not an object", b"[1, 2]", None),
    ("two inputs", json.dumps({"inputs": [{}, {}]}).encode(), None),
    (
        "wrong name",
        json.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 1], "data": [0]}]}).encode(),
        None,
    ),
    ("wrong datatype", _tensor_json("INT64", [1, 784], [0] * 784), None),
    ("wrong shape", _tensor_json("FP32", [1, 3, 28, 28], [0] * 2352), None),
    ("data vs shape", _tensor_json("FP32", [2, 784], [0] * 784), None),
    ("non-finite", _tensor_json("FP32", [1, 784], [0] * 784).replace(b"[0,", b"[NaN,", 1), None),
    ("strings as numbers", _tensor_json("FP32", [1, 784], ["a"] * 784), None),
    ("uint8 out of range", _tensor_json("UINT8", [1, 28, 28], [256] * 784), None),
    ("uint8 fractions", _tensor_json("UINT8", [1, 28, 28], [0.5] * 784), None),
    ("negative shape", _tensor_json("FP32", [-1, 784], []), None),
    ("no images", _tensor_json("FP32", [0, 784], []), None),
    ("undecodable image", _tensor_json("BYTES", [1], [base64.b64encode(b"nope").decode()]), None),
    ("not base64", _tensor_json("BYTES", [1], ["%%%"]), None),
    ("deep nesting", _tensor_json("FP32", [1], 0).replace(b"0", b"[" * 100_000 + b"]" * 100_000), None),
    ("unknown output", json.dumps({**_ZEROS, "outputs": [{"name": "logits"}]}).encode(), None),
    (
        "bad classification",
        json.dumps({**_ZEROS, "outputs": [{"name": "probabilities", "parameters": {"classification": 11}}]}).encode(),
        None,
    ),
    ("binary size mismatch", _tensor_json("FP32", [1, 784], binary_data_size=3136), b"\0" * 100),
    ("binary without a size", _tensor_json("FP32", [1, 784], [0] * 784), b"\0" * 8),
    ("binary vs shape", _tensor_json("FP32", [1, 784], binary_data_size=100), b"\0" * 100),
    ("truncated bytes element", _tensor_json("BYTES", [1], binary_data_size=6), b"\x09\0\0\0ab"),
    ("bytes count vs shape", _tensor_json("BYTES", [2], binary_data_size=6), b"\x02\0\0\0ab"),
    # Found in review: millions of empty elements were all collected before the count was checked.
    ("more bytes elements than the shape", _tensor_json("BYTES", [1], binary_data_size=40_000), b"\0" * 40_000),
    # Found in review: 500s (OverflowError converting to float; a lone surrogate could not be encoded).
    ("int too large for float", _tensor_json("FP32", [1, 784], [5] * 784).replace(b"5", b"1" + b"0" * 400, 1), None),
    ("uint8 too large", _tensor_json("UINT8", [1, 28, 28], [5] * 784).replace(b"5", b"1" + b"0" * 400, 1), None),
    ("id not unicode", _tensor_json("FP32", [1, 784], [0] * 784).replace(b"{", b'{"id": "\\ud800", ', 1), None),
]


@pytest.mark.parametrize(("case", "text", "blob"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_malformed_requests_are_400_with_an_error_message(
    client: TestClient, case: str, text: bytes, blob: bytes | None
) -> None:
    headers = {} if blob is None else {"Inference-Header-Content-Length": str(len(text))}
    response = client.post(INFER, content=text + (blob or b""), headers=headers)
    assert response.status_code == 400, (case, response.text)
    assert isinstance(response.json()["error"], str) and response.json()["error"]
    assert client.get("/v2/health/ready").status_code == 200


def test_a_header_length_past_the_body_is_400(client: TestClient) -> None:
    response = client.post(INFER, content=b"{}", headers={"Inference-Header-Content-Length": "99"})
    assert response.status_code == 400 and "Inference-Header-Content-Length" in response.json()["error"]


def test_limits_are_413(tiny_checkpoint: Path) -> None:
    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", v2_max_images=4, max_upload_bytes=64 * 1024)
    with TestClient(create_app(settings)) as client:
        assert client.post(INFER, json=_fp32(_inputs(5))).status_code == 413
        assert client.post(INFER, json=_fp32(_inputs(4))).status_code == 200
        big = client.post(INFER, content=b" " * (65 * 1024))
        assert big.status_code == 413 and "limit" in big.json()["error"]


def test_not_ready_is_503_with_retry_after(settings: Settings) -> None:
    client = TestClient(create_app(settings))  # no `with`: the lifespan never ran, no model
    for response in (
        client.get("/v2/health/ready"),
        client.get("/v2/models/tiny/ready"),
        client.post(INFER, json=_fp32(_inputs(1))),
    ):
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1" and "error" in response.json()
    assert client.get("/v2/health/live").status_code == 200


def test_model_name_and_version_come_from_settings(tiny_checkpoint: Path) -> None:
    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", model_name="garments", model_version="2024-1")
    with TestClient(create_app(settings)) as client:
        assert client.get("/v2/models/garments/versions/2024-1").json()["versions"] == ["2024-1"]
        assert client.get("/v2/models/tiny").status_code == 404
        assert client.get("/model").json()["name"] == "garments"
        assert client.post("/predict", files={"file": ("a.png", png())}).json()["model"] == "garments"
        response = client.post("/v2/models/garments/versions/2024-1/infer", json=_fp32(_inputs(1)))
        assert response.json()["model_version"] == "2024-1"


def test_v2_requests_are_counted_documented_and_405_on_get(client: TestClient) -> None:
    client.post(INFER, json=_fp32(_inputs(1)))
    client.get("/v2/models/tiny")
    metrics = client.get("/metrics").text
    assert 'route="/v2/models/{model}/infer",status="200"' in metrics
    assert 'route="/v2/models/{model}",status="200"' in metrics
    paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/v2/models/{model}/infer",
        "/v2/models/{model}/versions/{version}/infer",
        "/v2/models/{model}/config",
    } <= set(paths)
    wrong = client.get(INFER)
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST" and "error" in wrong.json()


def test_predict_and_v2_requests_share_forward_passes(client: TestClient) -> None:
    """Both protocols hand the same batcher model input: one step runs them in one pass."""
    from app.decoding import ModelInput

    service = client.app.state.worker.plane.model  # type: ignore[attr-defined]
    passes: list[int] = []
    observe, service.observe_batch = service.observe_batch, lambda images, seconds: passes.append(images)
    try:
        body, content_type = multipart([("a.png", png(seed=1)), ("b.png", png(seed=2))])
        predict_item = partial(decode_body, body, content_type, service.loaded.preprocess, service.settings)
        answers = service.run_batch([predict_item, ModelInput.of(_inputs(3))])
    finally:
        service.observe_batch = observe
    assert passes == [5]
    np.testing.assert_allclose(answers[1].probabilities, _expected(_inputs(3)), atol=1e-6)
