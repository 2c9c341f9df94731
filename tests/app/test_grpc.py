"""The gRPC adapter in process: the worker's lifespan starts a real grpc.aio server beside the
TestClient's app, called through the generated stub: typed contents, errors and their codes, keys,
health, metrics by RPC, and REST and gRPC requests in one forward pass. The same RPCs through
tritonclient.grpc against `python -m app` are in tests/test_grpc_client.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.errors import ServeError
from app.main import create_app
from app.protocols.grpc.proto import grpc_predict_v2_pb2 as pb
from app.protocols.grpc.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from app.protocols.grpc.status import status_code
from app.settings import Settings
from bench.server import free_port
from tests.app.test_v2 import _expected, _inputs
from tests.helpers import garment, png

MODEL = "tiny"


@pytest.fixture
def served(tiny_checkpoint: Path, request: pytest.FixtureRequest) -> Iterator[tuple[TestClient, grpc.Channel]]:
    options = getattr(request, "param", {})
    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", grpc_port=free_port(), **options)
    with TestClient(create_app(settings)) as client, grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as chan:
        yield client, chan


def _stub(channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]


def _request(x: np.ndarray, shape: list[int] | None = None, **fields: object) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=MODEL, **fields)  # type: ignore[arg-type]
    message.inputs.add(name="input", datatype="FP32", shape=shape or list(x.shape))
    message.raw_input_contents.append(x.astype("<f4").tobytes())
    return message


def _probabilities(response: pb.ModelInferResponse, index: int = 0) -> np.ndarray:
    shape = list(response.outputs[index].shape)
    return np.frombuffer(response.raw_output_contents[index], "<f4").reshape(shape)


def _code(call: object, *args: object, **kwargs: object) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        call(*args, **kwargs)  # type: ignore[operator]
    return error.value.code()  # type: ignore[attr-defined, no-any-return]


def test_status_codes_are_mapped_in_one_place() -> None:
    assert status_code(ServeError(400, "")) is grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(ServeError(413, "")) is grpc.StatusCode.INVALID_ARGUMENT
    assert status_code(ServeError(404, "")) is grpc.StatusCode.NOT_FOUND
    assert status_code(ServeError(401, "")) is grpc.StatusCode.UNAUTHENTICATED
    assert status_code(ServeError(503, "")) is grpc.StatusCode.UNAVAILABLE
    assert status_code(ServeError(504, "")) is grpc.StatusCode.DEADLINE_EXCEEDED
    assert status_code(ServeError(507, "")) is grpc.StatusCode.INTERNAL


def test_the_supervisor_imports_no_grpc() -> None:
    """grpc is not fork-safe: the app the supervisor preloads must not import it (the worker does)."""
    code = "import sys, app.main, app.server; print([m for m in sys.modules if m.split('.')[0] == 'grpc'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_input_form_as_raw_and_typed_contents(served: tuple[TestClient, grpc.Channel]) -> None:
    _, channel = served
    stub = _stub(channel)
    x = _inputs(3)
    expected = _expected(x)
    for shape in ([3, 1, 28, 28], [3, 28, 28], [3, 784]):
        np.testing.assert_allclose(_probabilities(stub.ModelInfer(_request(x, shape))), expected, atol=1e-6)
    typed = pb.ModelInferRequest(model_name=MODEL, model_version="1")
    typed.inputs.add(name="input", datatype="FP32", shape=[3, 784]).contents.fp32_contents.extend(x.ravel().tolist())
    np.testing.assert_allclose(_probabilities(stub.ModelInfer(typed)), expected, atol=1e-6)

    pixels = np.stack([garment(seed=s) for s in range(2)])
    raw_uint8 = pb.ModelInferRequest(model_name=MODEL)
    raw_uint8.inputs.add(name="input", datatype="UINT8", shape=[2, 28, 28])
    raw_uint8.raw_input_contents.append(pixels.tobytes())
    typed_uint8 = pb.ModelInferRequest(model_name=MODEL)
    typed_uint8.inputs.add(name="input", datatype="UINT8", shape=[2, 28, 28]).contents.uint_contents.extend(
        pixels.ravel().tolist()
    )
    from_raw = _probabilities(stub.ModelInfer(raw_uint8))
    np.testing.assert_array_equal(from_raw, _probabilities(stub.ModelInfer(typed_uint8)))

    images = [png(seed=s) for s in range(2)]
    typed_bytes = pb.ModelInferRequest(model_name=MODEL)
    typed_bytes.inputs.add(name="input", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(images)
    raw_bytes = pb.ModelInferRequest(model_name=MODEL)
    raw_bytes.inputs.add(name="input", datatype="BYTES", shape=[2])
    raw_bytes.raw_input_contents.append(b"".join(len(b).to_bytes(4, "little") + b for b in images))
    from_typed_bytes = _probabilities(stub.ModelInfer(typed_bytes))
    np.testing.assert_array_equal(from_typed_bytes, _probabilities(stub.ModelInfer(raw_bytes)))


def test_refusals_carry_their_codes(served: tuple[TestClient, grpc.Channel]) -> None:
    _, channel = served
    stub = _stub(channel)
    x = _inputs(1)
    assert _code(stub.ModelInfer, _request(x, [1, 2, 392])) is grpc.StatusCode.INVALID_ARGUMENT
    assert _code(stub.ModelInfer, _request(x, model_version="9")) is grpc.StatusCode.NOT_FOUND
    assert _code(stub.ModelMetadata, pb.ModelMetadataRequest(name="other")) is grpc.StatusCode.NOT_FOUND
    too_many = _request(np.zeros((257, 784), np.float32))
    assert _code(stub.ModelInfer, too_many) is grpc.StatusCode.INVALID_ARGUMENT  # v2_max_images
    bad_pixels = pb.ModelInferRequest(model_name=MODEL)
    bad_pixels.inputs.add(name="input", datatype="UINT8", shape=[1, 784 // 28, 28]).contents.uint_contents.extend(
        [256] * 784
    )
    with pytest.raises(grpc.RpcError) as error:
        stub.ModelInfer(bad_pixels)
    assert "UINT8 data must be integers from 0 to 255" in error.value.details()  # REST's check, REST's words
    expired = _request(x)
    expired.parameters["timeout"].int64_param = 1  # microseconds
    assert _code(stub.ModelInfer, expired) is grpc.StatusCode.DEADLINE_EXCEEDED


@pytest.mark.parametrize("served", [{"max_upload_bytes": 64 * 1024}], indirect=True)
def test_a_message_over_the_upload_limit_is_resource_exhausted(served: tuple[TestClient, grpc.Channel]) -> None:
    _, channel = served
    big = _request(np.zeros((32, 784), np.float32))  # 100 KB of raw floats
    assert _code(_stub(channel).ModelInfer, big) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _stub(channel).ModelInfer(_request(_inputs(1))).outputs[0].name == "probabilities"


@pytest.mark.parametrize("served", [{"api_keys": "k1,k2"}], indirect=True)
def test_keys_guard_every_rpc_but_the_probes(served: tuple[TestClient, grpc.Channel]) -> None:
    _, channel = served
    stub = _stub(channel)
    assert stub.ServerLive(pb.ServerLiveRequest()).live
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
    for call, message in (
        (stub.ModelInfer, _request(_inputs(1))),
        (stub.ServerMetadata, pb.ServerMetadataRequest()),
        (stub.ModelMetadata, pb.ModelMetadataRequest(name=MODEL)),
        (stub.ModelConfig, pb.ModelConfigRequest(name=MODEL)),
    ):
        assert _code(call, message) is grpc.StatusCode.UNAUTHENTICATED
        assert _code(call, message, metadata=[("authorization", "Bearer nope")]) is grpc.StatusCode.UNAUTHENTICATED
        call(message, metadata=[("authorization", "Bearer k2")])


def test_metadata_config_health_and_metrics(served: tuple[TestClient, grpc.Channel]) -> None:
    client, channel = served
    stub = _stub(channel)
    assert "classification" in stub.ServerMetadata(pb.ServerMetadataRequest()).extensions
    metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL, version="1"))
    rest = client.get(f"/v2/models/{MODEL}").json()
    assert list(metadata.inputs[0].shape) == rest["inputs"][0]["shape"] and list(metadata.versions) == ["1"]
    config = stub.ModelConfig(pb.ModelConfigRequest(name=MODEL)).config
    assert list(config.input[0].dims) == [1, 28, 28] and config.input[0].data_type == pb.TYPE_FP32
    assert list(config.version_policy.specific.versions) == [1] and config.max_batch_size == 256
    assert _code(stub.ModelReady, pb.ModelReadyRequest(name=MODEL, version="2")) is grpc.StatusCode.NOT_FOUND
    health = health_pb2_grpc.HealthStub(channel)
    check = health.Check(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"))
    assert check.status == health_pb2.HealthCheckResponse.SERVING
    assert _code(health.Check, health_pb2.HealthCheckRequest(service="nope")) is grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService"), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    client.app.state.worker.plane.health.start_draining()  # type: ignore[attr-defined]
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING, "the change is pushed to a watcher"
    watch.cancel()
    assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert not stub.ServerReady(pb.ServerReadyRequest()).ready
    assert not stub.ModelReady(pb.ModelReadyRequest(name=MODEL)).ready
    _, call = stub.ModelInfer.with_call(_request(_inputs(1)), metadata=[("x-request-id", "abc-1")])
    assert ("x-request-id", "abc-1") in call.trailing_metadata()  # type: ignore[attr-defined]
    metrics = client.get("/metrics").text
    assert 'fashion_serve_requests_total{method="GRPC",route="ModelInfer",status="OK"} 1.0' in metrics
    assert 'fashion_serve_requests_total{method="GRPC",route="ModelMetadata",status="OK"} 1.0' in metrics


def _batches(client: TestClient) -> tuple[float, float]:
    """Forward passes so far and the images they held (fashion_serve_batch_images)."""
    histogram = client.app.state.worker.plane.metrics.batch_size  # type: ignore[attr-defined]
    samples = {s.name: s.value for s in histogram.collect()[0].samples if not s.labels}
    return samples["fashion_serve_batch_images_count"], samples["fashion_serve_batch_images_sum"]


@pytest.mark.parametrize("served", [{"max_batch_wait_ms": 500}], indirect=True)
def test_grpc_and_rest_requests_share_a_forward_pass(served: tuple[TestClient, grpc.Channel]) -> None:
    client, channel = served
    x = _inputs(1)
    before = _batches(client)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": x.ravel().tolist()}]}
    rest: list[object] = []
    thread = threading.Thread(target=lambda: rest.append(client.post(f"/v2/models/{MODEL}/infer", json=body)))
    thread.start()
    from_grpc = _probabilities(_stub(channel).ModelInfer(_request(x, [1, 784])))
    thread.join()
    passes, images = (a - b for a, b in zip(_batches(client), before, strict=True))
    assert (passes, images) == (1, 2)  # one forward pass held both requests' images
    from_rest = json.loads(rest[0].content)["outputs"][0]["data"]  # type: ignore[attr-defined]
    np.testing.assert_allclose(from_grpc.ravel(), from_rest, atol=1e-6)
