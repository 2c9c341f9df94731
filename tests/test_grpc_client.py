"""The gRPC endpoint through a real client of the ecosystem (Triton's `tritonclient.grpc`), against
`python -m app` serving the bundled model: every RPC, every input form, classification, BYTES,
errors with their codes, keys on a two-worker server sharing the port, health, and the same
answers as REST v2 and /predict. The REST twin is tests/test_v2_client.py."""

from __future__ import annotations

import io
import json
import os
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.server import free_port, serving
from models import FASHION_MNIST_CLASSES, PreprocessConfig, preprocess_image
from models.preprocessing import normalize
from tests.helpers import (
    LISTEN,
    garment,
    garment_pngs,
    multipart,
    sockets_by_process,
    wait_for,
    workers_of,
    write_tiny_checkpoint,
)

grpcclient = pytest.importorskip("tritonclient.grpc")
httpclient = pytest.importorskip("tritonclient.http")
grpc = pytest.importorskip("grpc")
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "fashion_cnn"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[object, object, int]]:
    grpc_port = free_port()
    with serving({"FASHION_SERVE_GRPC_PORT": str(grpc_port)}) as (_, port):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        rest = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        yield client, rest, port
        client.close()
        rest.close()


def _tensor(module: object, x: np.ndarray, datatype: str, shape: list[int] | None = None) -> object:
    tensor = module.InferInput("input", shape or list(x.shape), datatype)  # type: ignore[attr-defined]
    tensor.set_data_from_numpy(x.reshape(shape or x.shape))
    return tensor


def test_every_rpc_answers(server: tuple[object, object, int]) -> None:
    client: object = server[0]
    assert client.is_server_live() and client.is_server_ready()  # type: ignore[attr-defined]
    assert client.is_model_ready(MODEL) and client.is_model_ready(MODEL, "1")  # type: ignore[attr-defined]
    with pytest.raises(InferenceServerException) as unknown:
        client.is_model_ready("other")  # type: ignore[attr-defined]
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert "classification" in client.get_server_metadata().extensions  # type: ignore[attr-defined]
    meta = client.get_model_metadata(MODEL, "1")  # type: ignore[attr-defined]
    assert list(meta.inputs[0].shape) == [-1, 1, 28, 28] and list(meta.outputs[0].shape) == [-1, 10]
    config = client.get_model_config(MODEL, as_json=True)["config"]  # type: ignore[attr-defined]
    assert config["input"][0]["dims"] == ["1", "28", "28"] and config["max_batch_size"] >= 256


def test_every_input_form_agrees_with_rest_v2_and_predict(server: tuple[object, object, int]) -> None:
    client, rest, port = server
    images = garment_pngs()
    config = PreprocessConfig(invert="auto")
    x = np.stack([preprocess_image(Image.open(io.BytesIO(b)), config) for b in images]).astype(np.float32)

    def both(x: np.ndarray, datatype: str, shape: list[int] | None = None) -> np.ndarray:
        by_grpc = client.infer(MODEL, [_tensor(grpcclient, x, datatype, shape)]).as_numpy("probabilities")  # type: ignore[attr-defined]
        by_rest = rest.infer(MODEL, [_tensor(httpclient, x, datatype, shape)]).as_numpy("probabilities")  # type: ignore[attr-defined]
        np.testing.assert_allclose(by_grpc, by_rest, atol=1e-6)
        return by_grpc  # type: ignore[no-any-return]

    from_fp32 = both(x, "FP32")
    np.testing.assert_allclose(both(x, "FP32", [4, 28, 28]), from_fp32, atol=1e-6)
    np.testing.assert_allclose(both(x, "FP32", [4, 784]), from_fp32, atol=1e-6)
    pixels = np.stack([garment(seed=s) for s in range(4)])
    from_uint8 = both(pixels, "UINT8")
    as_fp32 = np.stack([normalize(p, PreprocessConfig())[np.newaxis] for p in pixels]).astype(np.float32)
    np.testing.assert_allclose(from_uint8, both(as_fp32, "FP32"), atol=1e-6)
    from_bytes = both(np.array(images, dtype=np.object_), "BYTES")
    np.testing.assert_allclose(from_bytes, from_fp32, atol=1e-5)

    body, content_type = multipart([(f"{i}.png", b) for i, b in enumerate(images)])
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict?k=10", body, {"Content-Type": content_type}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        predicted = json.load(response)["predictions"]
    assert [p["top_k"][0]["index"] for p in predicted] == from_bytes.argmax(axis=1).tolist()
    for row, prediction in zip(from_bytes, predicted, strict=True):
        by_index = {entry["index"]: entry["probability"] for entry in prediction["top_k"]}
        np.testing.assert_allclose([by_index[i] for i in range(10)], row, atol=1e-6)


def test_classification_ood_and_request_id(server: tuple[object, object, int]) -> None:
    client = server[0]
    x = np.stack([normalize(garment(seed=s), PreprocessConfig())[np.newaxis] for s in range(2)]).astype(np.float32)
    outputs = [
        grpcclient.InferRequestedOutput("probabilities", class_count=3),
        grpcclient.InferRequestedOutput("ood_score"),
    ]
    result = client.infer(MODEL, [_tensor(grpcclient, x, "FP32")], outputs=outputs, request_id="abc", model_version="1")  # type: ignore[attr-defined]
    top = result.as_numpy("probabilities")
    assert top.shape == (2, 3) and result.get_response().id == "abc"
    assert result.as_numpy("ood_score").shape == (2, 1)
    for row in top:
        fields = [s.decode().split(":", 2) for s in row]
        values = [float(f[0]) for f in fields]
        assert values == sorted(values, reverse=True)
        assert all(FASHION_MNIST_CLASSES[int(f[1])] == f[2] for f in fields)


def test_errors_reach_the_client_with_their_codes(server: tuple[object, object, int]) -> None:
    client = server[0]
    good = _tensor(grpcclient, np.zeros((1, 784), np.float32), "FP32")

    def code(*args: object, **kwargs: object) -> str:
        with pytest.raises(InferenceServerException) as error:
            client.infer(*args, **kwargs)  # type: ignore[attr-defined]
        return str(error.value.status())

    assert (
        code(MODEL, [_tensor(grpcclient, np.zeros((1, 3, 28, 28), np.float32), "FP32")])
        == "StatusCode.INVALID_ARGUMENT"
    )
    assert code("other", [good]) == "StatusCode.NOT_FOUND"
    assert code(MODEL, [good], model_version="9") == "StatusCode.NOT_FOUND"
    assert code(MODEL, [_tensor(grpcclient, np.array([b"not an image"], np.object_), "BYTES")]) == (
        "StatusCode.INVALID_ARGUMENT"
    )
    assert code(MODEL, [good], timeout=1) == "StatusCode.DEADLINE_EXCEEDED"  # the v2 `timeout`, microseconds
    assert client.infer(MODEL, [good], client_timeout=10).as_numpy("probabilities").shape == (1, 10)  # type: ignore[attr-defined]


def test_keys_and_health_on_two_workers_sharing_the_port() -> None:
    grpc_port = free_port()
    env = {"FASHION_SERVE_GRPC_PORT": str(grpc_port), "FASHION_SERVE_API_KEYS": "s3cret"}
    with serving(env, workers=2):
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
        good = _tensor(grpcclient, np.zeros((1, 784), np.float32), "FP32")
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        with pytest.raises(InferenceServerException) as refused:
            client.infer(MODEL, [good])
        assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException):
            client.get_model_metadata(MODEL)
        headers = {"authorization": "Bearer s3cret"}
        for _ in range(8):  # new connections, spread over both workers by the kernel
            fresh = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
            assert fresh.infer(MODEL, [good], headers=headers).as_numpy("probabilities").shape == (1, 10)
            fresh.close()
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        client.close()


def test_grpc_follows_a_reload_and_a_replaced_worker(tmp_path: Path) -> None:
    """SIGHUP reloads serve gRPC too, and a worker that replaces a killed one serves gRPC again."""
    path = write_tiny_checkpoint(tmp_path / "m.pt", seed=1)
    grpc_port = free_port()
    # Warnings only: the captured output is read at the end, and an access line per polling call
    # filled the pipe once a reload took a while, which blocked the server's logging.
    env = {
        "FASHION_SERVE_CHECKPOINT": str(path),
        "FASHION_SERVE_GRPC_PORT": str(grpc_port),
        "FASHION_SERVE_LOG_LEVEL": "warning",
    }
    x = np.zeros((1, 784), np.float32)

    def probabilities() -> np.ndarray:
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")  # a new connection each time
        try:
            return np.asarray(client.infer("m", [_tensor(grpcclient, x, "FP32")]).as_numpy("probabilities"))
        finally:
            client.close()

    def every_worker_answers(want: np.ndarray) -> bool:
        try:
            return all(np.allclose(probabilities(), want) for _ in range(8))
        except InferenceServerException:  # a worker still starting
            return False

    def listens(pid: int) -> bool:
        return sockets_by_process([pid], grpc_port, LISTEN)[pid] > 0

    with serving(env, workers=2) as (process, _port):
        before = probabilities()
        write_tiny_checkpoint(path, seed=2)
        process.send_signal(signal.SIGHUP)
        # The new model's answer is one that differs from the old: an answer read after the wait
        # could come from a worker that had not swapped yet (each polls for the new snapshot), and
        # did in CI once, so the replacement was then held to the old model's answer.
        news: list[np.ndarray] = []

        def swapped() -> bool:
            news.append(probabilities())
            return not np.allclose(news[-1], before)

        # 60 s, as for the replacement below: it took over the default 20 s once on a busy CI run.
        assert wait_for(swapped, timeout=60), "the new model"
        after = news[-1]
        assert wait_for(lambda: every_worker_answers(after), timeout=60), "every worker swapped"
        workers = workers_of(process.pid)
        # Each worker listens on the port itself; the supervisor's claim on it (app.server) never does.
        assert all(listens(pid) for pid in workers) and not listens(process.pid)
        os.kill(workers[0], signal.SIGKILL)
        assert wait_for(lambda: len(set(workers_of(process.pid)) - {workers[0]}) == 2), "a replacement"
        (replacement,) = set(workers_of(process.pid)) - set(workers)
        assert wait_for(lambda: listens(replacement), timeout=60), "the replacement's gRPC server"
        assert wait_for(lambda: every_worker_answers(after), timeout=60), "the replacement serves gRPC, new model"
