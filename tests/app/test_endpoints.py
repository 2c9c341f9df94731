from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app.logs import flush_logs
from app.main import create_app
from app.settings import Settings
from models import CheckpointError
from tests.helpers import png, tiny_model

V2_ONE = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}]}


def test_model_describes_the_checkpoint(client: TestClient, tiny_checkpoint: Path) -> None:
    body = client.get("/model").json()
    expected = tiny_model().state_dict()
    assert body["name"] == "tiny"
    assert body["arch"] == "network"
    assert body["architecture"] == str(tiny_model())
    assert body["state_dict_keys"] == list(expected)
    assert body["parameters"] == {k: list(v.shape) for k, v in expected.items()}
    assert body["num_parameters"] == sum(v.numel() for v in expected.values())
    assert body["classes"][0] == "T-shirt/top" and len(body["classes"]) == 10
    assert body["input_shape"] == [1, 28, 28]
    assert body["device"] == "cpu"
    assert body["preprocess"] == {"size": 28, "mean": 0.5, "std": 0.5, "invert": "auto"}
    assert body["metrics"]["test_accuracy"] == 0.5
    assert body["checkpoint"] == {
        "path": str(tiny_checkpoint),
        "sha256": hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest(),
        "size_bytes": tiny_checkpoint.stat().st_size,
        "format": "v1",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", body["loaded_at"])


def test_liveness_and_readiness(client: TestClient) -> None:
    assert client.get("/health/live").json() == {"status": "alive"}
    assert client.get("/health/ready").status_code == 200


def test_not_ready_before_the_model_is_loaded_and_warmed_up(settings: Settings) -> None:
    client = TestClient(create_app(settings))  # no `with`: the lifespan has not run
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["reason"].startswith("starting")
    assert client.get("/health/live").status_code == 200
    assert client.post("/predict", files={"file": ("a.png", png())}).status_code == 503
    assert client.get("/model").status_code == 503


def test_not_ready_while_draining(client: TestClient) -> None:
    runtime = client.app.state.worker.plane  # type: ignore[attr-defined]
    runtime.health.start_draining("draining: SIGTERM received")
    response = client.get("/health/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable", "reason": "draining: SIGTERM received"}
    assert client.get("/health/live").status_code == 200


def test_readiness_turns_off_after_shutdown(settings: Settings) -> None:
    app = create_app(settings)
    with TestClient(app) as client:
        assert client.get("/health/ready").status_code == 200
    assert not app.state.worker.plane.health.is_ready


def test_startup_fails_on_a_missing_checkpoint(tmp_path: Path) -> None:
    app = create_app(Settings(checkpoint=tmp_path / "missing.pt", device="cpu"))
    with pytest.raises(CheckpointError, match="does not exist"), TestClient(app):
        pass


def test_request_id_is_echoed_generated_and_logged(capsys: pytest.CaptureFixture[str], client: TestClient) -> None:
    sent = client.get("/health/live", headers={"X-Request-ID": "trace-42.a"})
    assert sent.headers["x-request-id"] == "trace-42.a"
    generated = client.get("/health/live").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    hostile = client.get("/health/live", headers={"X-Request-ID": "a b\tc" + "x" * 200}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", hostile)
    error = client.post("/predict", files={"file": ("a.png", b"")}, headers={"X-Request-ID": "req-err-1"})
    assert error.status_code == 400 and error.headers["x-request-id"] == "req-err-1"
    flush_logs()  # access lines are written together; a test reads them at once
    logs = capsys.readouterr().err
    assert "[trace-42.a] GET /health/live 200" in logs
    assert "[req-err-1] POST /predict 400" in logs


def test_metrics_count_requests(client: TestClient) -> None:
    client.post("/predict", files=[("file", ("a.png", png())), ("file", ("b.png", png(seed=3)))])
    client.post("/predict", files={"file": ("a.png", b"")})
    text = client.get("/metrics").text
    assert 'fashion_serve_requests_total{method="POST",route="/predict",status="200"} 1.0' in text
    assert 'fashion_serve_requests_total{method="POST",route="/predict",status="400"} 1.0' in text
    assert re.search(r'fashion_serve_request_seconds_count\{route="/predict"\} 2\.0', text)
    assert "fashion_serve_request_images_sum 3.0" in text
    assert re.search(r"fashion_serve_inference_seconds_count [1-9]", text)
    assert 'fashion_serve_model_info{arch="network",device="cpu",name="tiny"' in text


def test_docs_work_offline(client: TestClient) -> None:
    html = client.get("/docs").text
    assert "/static/swagger-ui/swagger-ui-bundle.js" in html
    assert "cdn" not in html.lower()
    assert client.get("/static/swagger-ui/swagger-ui-bundle.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_out_of_accelerator_memory_is_503_and_recovers(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    service = client.app.state.worker.plane.model  # type: ignore[attr-defined]
    model = service.form.model  # the torch form: the tiny checkpoint has no other
    calls = {"n": 0}
    real_forward = model.forward

    def forward_once_oom(x: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_forward(x)

    monkeypatch.setattr(model, "forward", forward_once_oom)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    first = client.post("/predict", files={"file": ("a.png", png())})
    assert first.status_code == 503
    assert first.headers["retry-after"] == "1"
    assert "out of memory" in first.json()["detail"]
    assert client.post("/predict", files={"file": ("a.png", png())}).status_code == 200
    assert client.get("/health/ready").status_code == 200


def test_a_model_answering_non_finite_scores_is_500_never_an_answer(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken model's NaN is refused where it is made: the JSON encoder would write it as null."""
    service = client.app.state.worker.plane.model  # type: ignore[attr-defined]
    model = service.form.model
    real_forward = model.forward
    broken = {"on": True}

    def forward(x: torch.Tensor) -> torch.Tensor:
        out = real_forward(x)
        return torch.full_like(out, float("nan")) if broken["on"] else out

    monkeypatch.setattr(model, "forward", forward)
    response = client.post("/predict", files={"file": ("a.png", png())})
    assert response.status_code == 500 and "non-finite" in response.json()["detail"]
    assert client.post("/v2/models/tiny/infer", json=V2_ONE).status_code == 500
    broken["on"] = False
    assert client.post("/predict", files={"file": ("a.png", png())}).status_code == 200


def test_json_answers_are_compact_utf8_and_what_orjson_refuses_is_still_json() -> None:
    from app.http.messages import dump_json

    body = {"label": "T-shirt/top", "name": "été.png", "probability": 0.981234, "tiny": 1e-06, "flag": None}
    encoded = dump_json(body)
    assert json.loads(encoded) == body and b" " not in encoded.replace(b"T-shirt/top", b"")
    assert "été".encode() in encoded  # UTF-8, not escaped
    lone = dump_json({"id": "\ud800"})  # a lone surrogate from a client's JSON
    assert json.loads(lone) == {"id": "\ud800"} and lone.isascii()
    assert json.loads(dump_json({3: "int key"})) == {"3": "int key"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_serves_on_the_gpu(tiny_checkpoint: Path) -> None:
    with TestClient(create_app(Settings(checkpoint=tiny_checkpoint, device="cuda"))) as client:
        assert client.get("/model").json()["device"] == "cuda:0"
        cpu = tiny_model()
        response = client.post("/predict?k=1", files={"file": ("a.png", png())})
        assert response.status_code == 200
        assert response.json()["predictions"][0]["top_k"][0]["index"] in range(10)
        assert cpu is not None


def test_settings_refuse_an_empty_checkpoint_and_a_bad_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("FASHION_SERVE_CHECKPOINT", "")
    with pytest.raises(ValidationError, match="unset it to serve the bundled checkpoint"):
        Settings()
    monkeypatch.delenv("FASHION_SERVE_CHECKPOINT")
    monkeypatch.setenv("FASHION_SERVE_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="auto, cpu, cuda or cuda:N"):
        Settings()
    monkeypatch.setenv("FASHION_SERVE_DEVICE", "cuda:1")
    assert Settings().device == "cuda:1"


def test_every_protocol_takes_one_admission_rule_while_draining(client: TestClient) -> None:
    """Readiness turns off on SIGTERM, but a request that still arrives is answered by every
    protocol alike (they used to disagree: v2 refused, /predict served)."""
    client.app.state.worker.plane.health.start_draining("draining: SIGTERM received")  # type: ignore[attr-defined]
    assert client.get("/health/ready").status_code == 503
    assert client.get("/v2/health/ready").status_code == 503
    assert client.post("/predict", files={"file": ("a.png", png())}).status_code == 200
    v2 = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}]}
    assert client.post("/v2/models/tiny/infer", json=v2).status_code == 200


def test_deadlines_from_every_source_answer_504_in_each_protocol_shape(client: TestClient) -> None:
    """A deadline that has passed is never computed: 504, counted, and the next request is served."""
    expired = {"X-Request-Timeout": "0.000001"}
    response = client.post("/predict", files={"file": ("a.png", png())}, headers=expired)
    assert response.status_code == 504 and "deadline" in response.json()["detail"]
    tensor = {"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}
    v2 = client.post("/v2/models/tiny/infer", json={"inputs": [tensor], "parameters": {"timeout": 1}})
    assert v2.status_code == 504 and "deadline" in v2.json()["error"]
    assert client.post("/explain", files={"file": ("a.png", png())}, headers=expired).status_code == 504
    assert (
        client.post("/predict", files={"file": ("a.png", png())}, headers={"X-Request-Timeout": "x"}).status_code == 400
    )
    bad = client.post("/v2/models/tiny/infer", json={"inputs": [tensor], "parameters": {"timeout": -5}})
    assert bad.status_code == 400
    assert (
        client.post("/predict", files={"file": ("a.png", png())}, headers={"X-Request-Timeout": "30"}).status_code
        == 200
    )
    assert 'fashion_serve_dropped_requests_total{reason="deadline"} 3.0' in client.get("/metrics").text


def test_the_server_default_deadline_applies(settings: Settings) -> None:
    with TestClient(create_app(settings.model_copy(update={"request_timeout_s": 1e-9}))) as client:
        assert client.post("/predict", files={"file": ("a.png", png())}).status_code == 504


def test_refusals_are_summed_in_the_log_not_logged_one_by_one(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    client = TestClient(create_app(settings))  # no `with`: no model, every inference request is 503
    with caplog.at_level(logging.INFO, logger="app.access"):
        statuses = [client.post("/predict", files={"file": ("a.png", png())}).status_code for _ in range(20)]
    assert statuses == [503] * 20
    access = [r.getMessage() for r in caplog.records if r.name == "app.access"]
    assert len(access) == 1 and access[0].startswith("refused 1 requests with 503"), access
    assert (
        'fashion_serve_requests_total{method="POST",route="/predict",status="503"} 20.0' in client.get("/metrics").text
    )
