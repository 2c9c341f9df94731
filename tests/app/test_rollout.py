"""Rollout in one process: the rollout API's checks, canary shares and answers, a shadow's live
agreement against the agreement computed offline on the same images, promote and roll back."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from tests.helpers import encode, png, write_tiny_checkpoint

ADMIN = {"Authorization": "Bearer admin-key"}
ROLLOUT = "/v2/repository/models/shirts/rollout"


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    root = tmp_path / "repo"
    for version in (1, 2, 3):
        write_tiny_checkpoint(root / "shirts" / str(version) / "model.pt", seed=version)
    (root / "shirts" / "config.json").write_text(json.dumps({"version_policy": {"all": {}}, "default_version": "1"}))
    settings = Settings(device="cpu", grpc_port=0, model_repository=root, admin_keys="admin-key")  # type: ignore[call-arg]
    with TestClient(create_app(settings)) as client:
        yield client


def _image(seed: int) -> bytes:
    """A garment-like blob, or (odd seeds) noise: images on which two random tiny models sometimes agree."""
    if seed % 2 == 0:
        return png(seed=seed)
    pixels = np.random.default_rng(seed).integers(0, 256, (28, 28), dtype=np.uint8)
    return encode(Image.fromarray(pixels))


def _predict(client: TestClient, seed: int, path: str = "/predict") -> tuple[str, list[float]]:
    response = client.post(f"{path}?k=10", files={"file": ("a.png", _image(seed))})
    assert response.status_code == 200, response.text
    top = sorted(response.json()["predictions"][0]["top_k"], key=lambda t: t["index"])
    return response.headers["x-model-version"], [t["probability"] for t in top]


def test_the_rollout_api_checks_what_it_is_given(client: TestClient) -> None:
    assert client.put(ROLLOUT, json={"canary": {"version": "2", "percent": 10}}).status_code == 401
    for body in (
        {"canary": {"version": "9", "percent": 10}},
        {"canary": {"version": "2", "percent": 150}},
        {"shadow": {"version": "2", "percent": True}},
        {"default_version": "x"},
        {"other": 1},
    ):
        response = client.put(ROLLOUT, json=body, headers=ADMIN)
        assert response.status_code == 400, (body, response.text)
    answer = client.get(ROLLOUT, headers=ADMIN).json()
    assert answer["default_version"] == "1" and answer["canary"] is None and answer["shadow"] is None


def test_a_canary_answers_its_share_each_answer_its_own(client: TestClient) -> None:
    put = client.put(ROLLOUT, json={"canary": {"version": "2", "percent": 30}}, headers=ADMIN)
    assert put.status_code == 200, put.text
    own = {v: _predict(client, 7, f"/models/shirts/versions/{v}/predict")[1] for v in ("1", "2")}
    answers = [_predict(client, 7) for _ in range(400)]
    canaried = sum(version == "2" for version, _ in answers)
    assert 80 <= canaried <= 160, canaried  # 400 x 30 % = 120, sd 9.2: outside is over 4 sd
    assert {version for version, _ in answers} == {"1", "2"}
    for version, probabilities in answers:
        assert probabilities == own[version], "each answer is the version's own"
    named = {_predict(client, 7, "/models/shirts/versions/1/predict")[0] for _ in range(50)}
    assert named == {"1"}, "a request that names a version always gets it"
    figures = client.get(ROLLOUT).json()["versions"]
    assert figures["2"]["canary"]["requests"] == canaried
    assert figures["1"]["default"]["requests"] == 400 - canaried


def test_shadow_agreement_is_the_offline_agreement_on_the_same_images(client: TestClient) -> None:
    assert client.put(ROLLOUT, json={"shadow": {"version": "3", "percent": 100}}, headers=ADMIN).status_code == 200
    seeds = range(60)
    offline = [
        np.argmax(_predict(client, s, "/models/shirts/versions/1/predict")[1])
        == np.argmax(_predict(client, s, "/models/shirts/versions/3/predict")[1])
        for s in seeds
    ]
    for s in seeds:
        assert _predict(client, s)[0] == "1", "the primary answer stays the default version's"
    shadow: dict[str, object] = {}
    for _ in range(100):
        shadow = client.get(ROLLOUT).json()["versions"]["3"]["shadow"]
        if shadow["agreement_images"] == len(seeds):
            break
        time.sleep(0.05)
    assert shadow["agreement_images"] == len(seeds) and shadow["dropped"] == 0
    assert shadow["agreement"] == pytest.approx(sum(offline) / len(seeds))
    assert 0 < sum(offline) < len(seeds), "the two versions disagree on some images: the test can fail"
    assert shadow["mean_abs_diff"] > 0


def test_promote_and_roll_back(client: TestClient) -> None:
    promoted = client.put(ROLLOUT, json={"default_version": "2"}, headers=ADMIN)
    assert promoted.status_code == 200 and promoted.json()["serving_default"] == "2"
    assert {_predict(client, 1)[0] for _ in range(20)} == {"2"}
    back = client.put(ROLLOUT, json={"default_version": "1"}, headers=ADMIN)
    assert back.status_code == 200 and int(back.headers["x-repository-generation"]) > int(
        promoted.headers["x-repository-generation"]
    )
    assert {_predict(client, 1)[0] for _ in range(20)} == {"1"}
