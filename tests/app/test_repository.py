"""The model repository in one process: layout, policies, the v2 repository API over REST, admin
keys, per-version serving, a broken version refused while the old one serves, unload draining,
and names that try to leave the repository."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import app.repository.control
from app.main import create_app
from app.repository.layout import Policy, checkpoint_path, scan
from app.repository.local import LocalCopy
from app.repository.shared import SharedState, State
from app.settings import Settings
from app.worker import Handoff
from models import PreprocessConfig, build_model, save_checkpoint
from tests.helpers import png, wait_for, write_repository, write_tiny_checkpoint

ADMIN = {"Authorization": "Bearer admin-key"}


def _version(root: Path, name: str, version: int, seed: int) -> Path:
    return write_tiny_checkpoint(root / name / str(version) / "model.pt", seed=seed)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return write_repository(tmp_path / "repo", {"version_policy": {"latest": {"num_versions": 1}}})


def _client(root: Path, **settings: object) -> TestClient:
    options: dict[str, object] = {"device": "cpu", "grpc_port": 0, "model_repository": root, "admin_keys": "admin-key"}
    return TestClient(create_app(Settings(**{**options, **settings})))  # type: ignore[arg-type]


@pytest.fixture
def client(repository: Path) -> Iterator[TestClient]:
    with _client(repository, default_model="shirts") as client:
        yield client


def _rows(client: TestClient) -> dict[tuple[str, str], dict[str, object]]:
    response = client.post("/v2/repository/index", headers=ADMIN)
    assert response.status_code == 200, response.text
    return {(r["name"], r["version"]): r for r in response.json()}


def test_policies_select_versions() -> None:
    assert Policy(latest=2).select([3, 1, 2]) == [2, 3]
    assert Policy(latest=None).select([3, 1]) == [1, 3]
    assert Policy(latest=None, specific=(1, 3)).select([1, 2, 3]) == [1, 3]
    assert Policy.parse({"all": {}}) == Policy(latest=None)
    with pytest.raises(ValueError, match="num_versions"):
        Policy.parse({"latest": {"num_versions": 0}})


def test_start_loads_each_policy_and_the_index_lists_every_version(client: TestClient) -> None:
    rows = _rows(client)
    assert rows[("shirts", "2")]["state"] == "READY" and rows[("shoes", "1")]["state"] == "READY"
    assert rows[("shirts", "1")] == {"name": "shirts", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
    assert int(rows[("shirts", "2")]["memory_bytes"]) > 0  # type: ignore[call-overload]
    ready = client.post("/v2/repository/index", json={"ready": True}, headers=ADMIN).json()
    assert {(r["name"], r["version"]) for r in ready} == {("shirts", "2"), ("shoes", "1")}
    answer = client.post("/predict", files={"file": ("a.png", png())})
    assert answer.json()["model"] == "shirts" and answer.headers["x-model-version"] == "2"
    shoes = client.post("/models/shoes/predict", files={"file": ("a.png", png())})
    assert shoes.json()["model"] == "shoes" and shoes.json()["model_version"] == "1"
    assert "model_repository" in client.get("/v2").json()["extensions"]


def test_load_one_version_beside_and_unload_it(client: TestClient) -> None:
    loaded = client.post("/v2/repository/models/shirts/load", json={"parameters": {"version": "1"}}, headers=ADMIN)
    assert loaded.status_code == 200, loaded.text
    generation = int(loaded.headers["x-repository-generation"])
    rows = _rows(client)
    assert rows[("shirts", "1")]["state"] == rows[("shirts", "2")]["state"] == "READY"
    v1 = client.post("/v2/models/shirts/versions/1/infer", json=_tensor())
    assert v1.status_code == 200 and v1.json()["model_version"] == "1"
    assert client.post("/predict", files={"file": ("a.png", png())}).headers["x-model-version"] == "2"
    assert client.get("/v2/models/shirts/versions/1/ready").status_code == 200
    counted = {
        (line.split('model="')[1].split('"')[0], line.split('version="')[1].split('"')[0])
        for line in client.get("/metrics").text.splitlines()
        if line.startswith("fashion_serve_predictions_total{")
    }
    assert {("shirts", "1"), ("shirts", "2")} <= counted, "metrics name the version that answered"
    unloaded = client.post("/v2/repository/models/shirts/unload", json={"parameters": {"version": "1"}}, headers=ADMIN)
    assert unloaded.status_code == 200 and int(unloaded.headers["x-repository-generation"]) == generation + 1
    gone = client.post("/v2/models/shirts/versions/1/infer", json=_tensor())
    assert gone.status_code in (404, 503), gone.text
    assert client.get("/model").json()["generation"] == generation + 1


def test_a_broken_version_never_serves_and_the_old_one_keeps_serving(client: TestClient, repository: Path) -> None:
    (repository / "shirts" / "3").mkdir()
    (repository / "shirts" / "3" / "model.pt").write_bytes(b"not a checkpoint")
    refused = client.post("/v2/repository/models/shirts/load", headers=ADMIN)
    assert refused.status_code == 400 and "error" in refused.json()
    rows = _rows(client)
    assert rows[("shirts", "3")]["state"] == "UNAVAILABLE" and rows[("shirts", "3")]["reason"]
    assert rows[("shirts", "2")]["state"] == "READY"
    assert client.post("/predict", files={"file": ("a.png", png())}).headers["x-model-version"] == "2"


def test_unload_a_whole_model_then_load_it_again(client: TestClient) -> None:
    assert client.post("/v2/repository/models/shoes/unload", headers=ADMIN).status_code == 200
    missing = client.post("/models/shoes/predict", files={"file": ("a.png", png())})
    assert missing.status_code == 404 and "'shirts'" in missing.json()["detail"]
    assert client.post("/v2/repository/models/shoes/load", headers=ADMIN).status_code == 200
    assert client.post("/models/shoes/predict", files={"file": ("a.png", png())}).status_code == 200


def test_the_repository_api_needs_an_admin_key(repository: Path) -> None:
    with _client(repository, admin_keys="", api_keys="user-key", default_model="shirts") as client:
        user = {"Authorization": "Bearer user-key"}
        assert client.post("/v2/repository/models/shoes/unload", headers=user).status_code == 403
        assert client.post("/v2/repository/index", headers=user).status_code == 200
        assert client.post("/v2/repository/index").status_code == 401
    with _client(repository, admin_keys="admin-key", api_keys="user-key", default_model="shirts") as client:
        assert (
            client.post("/v2/repository/models/shoes/unload", headers={"Authorization": "Bearer user-key"}).status_code
            == 401
        )
        assert client.post("/v2/repository/models/shoes/unload", headers=ADMIN).status_code == 200
        assert client.post("/predict", headers=ADMIN, files={"file": ("a.png", png())}).status_code == 200


@pytest.mark.parametrize("name", ["..", "a/..", "%2e%2e", "shirts%2f..%2f..", ".hidden"])
def test_names_that_leave_the_repository_are_refused(client: TestClient, name: str) -> None:
    response = client.post(f"/v2/repository/models/{name}/load", headers=ADMIN)
    assert response.status_code in (400, 404), response.text


def test_a_symlink_out_of_the_repository_is_refused(repository: Path, tmp_path: Path) -> None:
    outside = _version(tmp_path / "elsewhere", "x", 1, seed=5).parent
    os.symlink(outside, repository / "shoes" / "2")
    with pytest.raises(Exception, match="outside the repository"):
        checkpoint_path(repository, "shoes", 2)
    assert 2 in scan(repository)["shoes"].problems
    assert 2 not in scan(repository)["shoes"].versions


def test_a_load_past_the_memory_limit_is_refused(repository: Path) -> None:
    args = {"input_size": 784, "output_size": 10, "hidden_layers": [512], "drop_p": 0.5}  # 1.6 MB of weights
    big = build_model("network", args).eval()
    save_checkpoint(repository / "shoes" / "1" / "model.pt", big, "network", args, PreprocessConfig())
    with _client(repository, default_model="shirts", load_models="shirts", max_model_memory_mb=2) as client:
        refused = client.post("/v2/repository/models/shoes/load", headers=ADMIN)
        assert refused.status_code == 400 and "FASHION_SERVE_MAX_MODEL_MEMORY_MB" in refused.json()["error"]
        assert ("shoes", "1") not in {k for k, r in _rows(client).items() if r["state"] == "READY"}


def test_without_a_default_model_a_request_must_name_one(repository: Path) -> None:
    with _client(repository) as client:
        response = client.post("/predict", files={"file": ("a.png", png())})
        assert response.status_code == 404 and "name a model" in response.json()["detail"]


def _tensor() -> dict[str, object]:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}]}


def _worker_client(repository: Path, state: Path) -> TestClient:
    """A worker of a supervisor whose workers share the state directory `state`."""
    settings = Settings(device="cpu", grpc_port=0, model_repository=repository, default_model="shirts")
    return TestClient(create_app(settings, Handoff(repository_state=state)))


def test_a_state_published_while_a_worker_applies_the_one_before_is_followed(
    repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: the follower took the state file's identity after applying what it had
    read, so a state another worker published meanwhile looked applied and was never served."""
    monkeypatch.setattr(app.repository.control, "FOLLOW_POLL_S", 0.02)
    shared = SharedState(tmp_path / "state")
    with _worker_client(repository, shared.directory) as client:
        registry = client.app.state.worker.plane.registry  # type: ignore[attr-defined]
        start = shared.read().generation
        apply = LocalCopy.apply

        async def apply_while_another_publishes(copy: LocalCopy, state: State) -> None:
            await apply(copy, state)
            if state.generation == start + 1:  # another worker publishes the next one meanwhile
                later = shared.read()
                later.generation = start + 2
                del later.models["shoes"]
                shared.write(later)

        monkeypatch.setattr(LocalCopy, "apply", apply_while_another_publishes)
        published = shared.read()
        published.generation = start + 1
        shared.write(published)
        assert wait_for(lambda: registry.generation == start + 2, timeout=10)
        assert ("shoes", "1") not in {(r["name"], r["version"]) for r in _ready(client)}


def test_a_reconcile_asked_before_a_worker_follows_is_carried_out(repository: Path, tmp_path: Path) -> None:
    """Found in review: a follower counted the reconciles already asked for as done, so a SIGHUP
    that came while every worker was starting was never carried out."""
    shared = SharedState(tmp_path / "state")
    with _worker_client(repository, shared.directory):
        pass  # the first state, as a supervisor's first workers make it
    _version(repository, "shirts", 3, seed=7)
    shared.request_reconcile()  # SIGHUP while no worker follows yet
    with _worker_client(repository, shared.directory) as client:
        assert wait_for(lambda: shared.read().reconciled == 1, timeout=10)
        assert ("shirts", "3") in {(r["name"], r["version"]) for r in _ready(client)}


def _ready(client: TestClient) -> list[dict[str, str]]:
    response = client.post("/v2/repository/index", json={"ready": True}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return list(response.json())
