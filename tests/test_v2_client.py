"""The v2 endpoints through a real client of the ecosystem (Triton's `tritonclient.http`), against
`python -m app` serving the bundled model: JSON and binary, every input form, classification,
versions, errors, and the same answers as /predict."""

from __future__ import annotations

import io
import json
import urllib.request
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from bench.server import serving
from models import FASHION_MNIST_CLASSES, PreprocessConfig, preprocess_image
from models.preprocessing import normalize
from tests.helpers import garment, garment_pngs, multipart

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "fashion_cnn"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[object, int]]:
    with serving() as (_, port):
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        yield client, port
        client.close()


def _infer(client: object, inputs: list[object], outputs: list[object] | None = None, **kwargs: object) -> object:
    return client.infer(MODEL, inputs, outputs=outputs, **kwargs)  # type: ignore[attr-defined]


def test_health_metadata_and_config(server: tuple[object, int]) -> None:
    client, _ = server
    assert client.is_server_live() and client.is_server_ready()  # type: ignore[attr-defined]
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")  # type: ignore[attr-defined]
    assert not client.is_model_ready("other")  # type: ignore[attr-defined]
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]  # type: ignore[attr-defined]
    meta = client.get_model_metadata(MODEL, "1")  # type: ignore[attr-defined]
    assert meta["inputs"][0]["shape"] == [-1, 1, 28, 28] and meta["outputs"][0]["shape"] == [-1, 10]
    config = client.get_model_config(MODEL)  # type: ignore[attr-defined]
    assert config["input"][0]["dims"] == [1, 28, 28] and config["max_batch_size"] >= 256


@pytest.mark.parametrize("binary", [True, False])
def test_every_input_form_agrees_with_predict(server: tuple[object, int], binary: bool) -> None:
    client, port = server
    images = garment_pngs()
    config = PreprocessConfig(invert="auto")
    x = np.stack([preprocess_image(Image.open(io.BytesIO(b)), config) for b in images])
    pixels = np.stack([garment(seed=s) for s in range(4)])

    fp32 = httpclient.InferInput("input", [4, 1, 28, 28], "FP32")
    fp32.set_data_from_numpy(x, binary_data=binary)
    uint8 = httpclient.InferInput("input", [4, 28, 28], "UINT8")
    uint8.set_data_from_numpy(pixels, binary_data=binary)
    out = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
    from_fp32 = _infer(client, [fp32], out).as_numpy("probabilities")  # type: ignore[attr-defined]
    from_uint8 = _infer(client, [uint8], out).as_numpy("probabilities")  # type: ignore[attr-defined]
    pixel_inputs = np.stack([normalize(p, config)[np.newaxis] for p in pixels])
    from_pixels_as_fp32 = httpclient.InferInput("input", [4, 784], "FP32")
    from_pixels_as_fp32.set_data_from_numpy(pixel_inputs.reshape(4, 784), binary_data=binary)
    np.testing.assert_allclose(
        from_uint8, _infer(client, [from_pixels_as_fp32], out).as_numpy("probabilities"), atol=1e-6
    )  # type: ignore[attr-defined]

    if binary:  # tritonclient sends BYTES as text in JSON, which image files are not
        encoded = httpclient.InferInput("input", [4], "BYTES")
        encoded.set_data_from_numpy(np.array(images, dtype=np.object_), binary_data=True)
        from_bytes = _infer(client, [encoded], out).as_numpy("probabilities")  # type: ignore[attr-defined]
        np.testing.assert_allclose(from_bytes, from_fp32, atol=1e-5)

    body, content_type = multipart([(f"{i}.png", b) for i, b in enumerate(images)])
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict?k=1", body, {"Content-Type": content_type}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        predicted = json.load(response)["predictions"]
    assert [p["top_k"][0]["index"] for p in predicted] == from_fp32.argmax(axis=1).tolist()
    assert np.allclose(from_fp32.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("binary", [True, False])
def test_classification_and_request_id(server: tuple[object, int], binary: bool) -> None:
    client, _ = server
    x = np.stack([normalize(garment(seed=s), PreprocessConfig())[np.newaxis] for s in range(2)])
    tensor = httpclient.InferInput("input", [2, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=3)
    result = _infer(client, [tensor], [out], request_id="abc", model_version="1")
    top = result.as_numpy("probabilities")  # type: ignore[attr-defined]
    assert top.shape == (2, 3)
    assert result.get_response()["id"] == "abc"  # type: ignore[attr-defined]
    for row in top:
        fields = [(s.decode() if isinstance(s, bytes) else s).split(":", 2) for s in row]  # JSON gives str
        values = [float(f[0]) for f in fields]
        assert values == sorted(values, reverse=True)
        assert all(FASHION_MNIST_CLASSES[int(f[1])] == f[2] for f in fields)


def test_errors_reach_the_client_with_their_status(server: tuple[object, int]) -> None:
    client, _ = server
    tensor = httpclient.InferInput("input", [1, 3, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 3, 28, 28), np.float32))
    with pytest.raises(InferenceServerException) as wrong_shape:
        _infer(client, [tensor])
    assert wrong_shape.value.status() == "400" and "shape" in wrong_shape.value.message()
    good = httpclient.InferInput("input", [1, 784], "FP32")
    good.set_data_from_numpy(np.zeros((1, 784), np.float32))
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("other", [good])  # type: ignore[attr-defined]
    assert unknown.value.status() == "404"
    with pytest.raises(InferenceServerException) as version:
        _infer(client, [good], model_version="9")
    assert version.value.status() == "404"
    assert _infer(client, [good]).as_numpy("probabilities").shape == (1, 10)  # type: ignore[attr-defined]
