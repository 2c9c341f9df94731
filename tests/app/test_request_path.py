"""The one way through the core: every inference route and RPC holds its refusals alike, and a
request the adapter can refuse by itself is refused before it reaches the queue."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from httpx import Response

from app.dataplane import DataPlane
from app.main import create_app
from app.protocols.grpc.proto import grpc_predict_v2_pb2 as pb
from app.protocols.grpc.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from app.settings import Settings
from bench.server import free_port
from tests.helpers import png

MODEL = "tiny"
MULTIPART_X = "multipart/form-data; boundary=x"
V2_BODY = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}]}

ROUTES: dict[str, Callable[[TestClient], Response]] = {
    "/predict": lambda c: c.post("/predict", files={"file": ("a.png", png())}),
    "/models/{m}/predict": lambda c: c.post(f"/models/{MODEL}/predict", files={"file": ("a.png", png())}),
    "/models/{m}/versions/{v}/predict": lambda c: c.post(
        f"/models/{MODEL}/versions/1/predict", files={"file": ("a.png", png())}
    ),
    "/explain": lambda c: c.post("/explain", files={"file": ("a.png", png())}),
    "/models/{m}/explain": lambda c: c.post(f"/models/{MODEL}/explain", files={"file": ("a.png", png())}),
    "/v2/models/{m}/infer": lambda c: c.post(f"/v2/models/{MODEL}/infer", json=V2_BODY),
    "/v2/models/{m}/versions/{v}/infer": lambda c: c.post(f"/v2/models/{MODEL}/versions/1/infer", json=V2_BODY),
}


@pytest.fixture
def served(tiny_checkpoint: Path) -> Iterator[tuple[TestClient, grpc.Channel]]:
    settings = Settings(checkpoint=tiny_checkpoint, device="cpu", grpc_port=free_port())
    with TestClient(create_app(settings)) as client, grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}") as chan:
        yield client, chan


def _busy(plane: DataPlane, monkeypatch: pytest.MonkeyPatch) -> None:
    """Any work ahead now takes too long: every admission is refused, held for MAX_HOLD_S (1 s)."""
    assert plane.model is not None and plane.model.batcher is not None
    monkeypatch.setattr(plane.model.batcher, "seconds_per_item", 10.0)
    plane.in_flight = 1


@pytest.mark.parametrize("route", ROUTES)
def test_every_route_holds_its_refusal(
    route: str, served: tuple[TestClient, grpc.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, _ = served
    plane = client.app.state.worker.plane  # type: ignore[attr-defined]
    _busy(plane, monkeypatch)
    try:
        began = time.monotonic()
        response = ROUTES[route](client)
        held_for = time.monotonic() - began
    finally:
        plane.in_flight = 0
    assert response.status_code == 503, response.text
    assert held_for >= 0.9, f"{route} answered its refusal after {held_for:.2f} s, not held"
    assert ROUTES[route](client).status_code == 200


def test_the_grpc_inference_call_holds_its_refusal(
    served: tuple[TestClient, grpc.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    client, channel = served
    plane = client.app.state.worker.plane  # type: ignore[attr-defined]
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    message = pb.ModelInferRequest(model_name=MODEL)
    message.inputs.add(name="input", datatype="FP32", shape=[1, 1, 28, 28])
    message.raw_input_contents.append(np.zeros((1, 1, 28, 28), "<f4").tobytes())
    _busy(plane, monkeypatch)
    try:
        began = time.monotonic()
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(message)
        held_for = time.monotonic() - began
    finally:
        plane.in_flight = 0
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert held_for >= 0.9
    assert stub.ModelInfer(message).model_version == "1"


@pytest.mark.parametrize(
    ("path", "kwargs", "status"),
    [
        ("/predict", {"content": b"text", "headers": {"content-type": "text/plain"}}, 415),
        (
            "/predict",
            {"content": b"--x\r\nbroken", "headers": {"content-type": "multipart/form-data; boundary=x"}},
            400,
        ),
        ("/predict", {"files": {"other": ("a.png", png())}}, 422),
        ("/predict", {"files": [("file", (f"{i}.png", png())) for i in range(17)]}, 413),
        ("/explain", {"content": b"text", "headers": {"content-type": "text/plain"}}, 415),
        (f"/v2/models/{MODEL}/infer", {"content": b"{not json"}, 400),
    ],
)
def test_a_malformed_request_is_refused_before_admission(
    path: str, kwargs: dict[str, object], status: int, client: TestClient
) -> None:
    plane = client.app.state.worker.plane  # type: ignore[attr-defined]
    plane.in_flight = plane.settings.max_concurrency  # admission would refuse anything (503)
    try:
        response = client.post(path, **kwargs)  # type: ignore[arg-type]
    finally:
        plane.in_flight = 0
    assert response.status_code == status, response.text
    assert plane.metrics.refused.labels("concurrency")._value.get() == 0, "it reached admission"


def test_answers_say_which_version_produced_them(client: TestClient) -> None:
    response = client.post("/predict", files={"file": ("a.png", png())})
    assert response.headers["x-model-version"] == "1" and response.json()["model_version"] == "1"
    explained = client.post(f"/models/{MODEL}/explain", files={"file": ("a.png", png())})
    assert explained.headers["x-model-version"] == "1" and explained.json()["model_version"] == "1"
    unknown = client.post("/models/nope/predict", files={"file": ("a.png", png())})
    assert unknown.status_code == 404 and "'tiny'" in unknown.json()["detail"]
    missing = client.post(f"/models/{MODEL}/versions/7/predict", files={"file": ("a.png", png())})
    assert missing.status_code == 404 and "it has 1" in missing.json()["detail"]


def test_only_a_large_json_part_or_typed_contents_is_parsed_in_a_thread(
    served: tuple[TestClient, grpc.Channel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Binary tensor data is only sliced: 32 raw FP32 images (100 KB) are parsed on the event loop,
    over REST and gRPC, with no thread hand-off; the same images as JSON numbers or typed contents
    are parsed in a thread, where a long parse holds up no other request."""
    import app.protocols.grpc.infer as grpc_infer
    import app.protocols.v2.infer as v2_infer

    on_loop: list[bool] = []

    def spy(parse: Callable[..., object]) -> Callable[..., object]:
        def parse_and_note(*args: object) -> object:
            on_loop.append(asyncio_loop_running())
            return parse(*args)

        return parse_and_note

    monkeypatch.setattr(v2_infer, "_parse", spy(v2_infer._parse))
    monkeypatch.setattr(grpc_infer, "parse", spy(grpc_infer.parse))
    client, channel = served
    images = np.random.default_rng(0).random((32, 1, 28, 28), dtype=np.float32)
    shape = list(images.shape)
    header = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": shape,
                                     "parameters": {"binary_data_size": images.nbytes}}]}).encode()  # fmt: skip
    binary = client.post(
        f"/v2/models/{MODEL}/infer",
        content=header + images.tobytes(),
        headers={"inference-header-content-length": str(len(header))},
    )
    as_json = client.post(
        f"/v2/models/{MODEL}/infer",
        json={"inputs": [{"name": "input", "datatype": "FP32", "shape": shape, "data": images.ravel().tolist()}]},
    )
    assert (binary.status_code, as_json.status_code) == (200, 200), (binary.text, as_json.text)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
    raw = pb.ModelInferRequest(model_name=MODEL)
    raw.inputs.add(name="input", datatype="FP32", shape=shape)
    raw.raw_input_contents.append(images.tobytes())
    typed = pb.ModelInferRequest(model_name=MODEL)
    typed.inputs.add(name="input", datatype="FP32", shape=shape).contents.fp32_contents.extend(images.ravel())
    assert stub.ModelInfer(raw).raw_output_contents == stub.ModelInfer(typed).raw_output_contents
    assert on_loop == [True, False, True, False]


def asyncio_loop_running() -> bool:
    """Whether the caller runs on an event loop's thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
