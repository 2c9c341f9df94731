"""The model repository on `python -m app` with 2 workers, through Triton's own client
(`tritonclient.http`): the whole API, one state across workers (every answer after a load or an
unload agrees, whichever worker answers), a broken version refused while the old one serves, a
load and an unload under load with no failed request for the other models, a SIGKILLed worker
replaced serving the same state, SIGHUP reconciling with the disk, and the admin key."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from bench.server import free_port, serving
from tests.helpers import multipart, png, wait_for, write_repository, write_tiny_checkpoint

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.slow
ADMIN = {"Authorization": "Bearer admin-key"}


def _version(root: Path, name: str, version: int, seed: int) -> None:
    write_tiny_checkpoint(root / name / str(version) / "model.pt", seed=seed)


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    return write_repository(
        tmp_path / "repo", {"version_policy": {"specific": {"versions": [1]}}, "default_version": "1"}
    )


GRPC_PORT = free_port()


@pytest.fixture
def server(repository: Path) -> Iterator[tuple[object, int, object]]:
    env = {
        "FASHION_SERVE_GRPC_PORT": str(GRPC_PORT),
        "FASHION_SERVE_MODEL_REPOSITORY": str(repository),
        "FASHION_SERVE_ADMIN_KEYS": "admin-key",
        "FASHION_SERVE_DEFAULT_MODEL": "shirts",
        "FASHION_SERVE_LOG_LEVEL": "warning",  # the captured output is read at the end: no access lines
    }
    with serving(env, workers=2) as (process, port):
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", concurrency=4)
        yield client, port, process
        client.close()


def _predict(port: int, path: str = "/predict") -> tuple[int, str | None]:
    body, content_type = multipart([("a.png", png())])
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["X-Model-Version"]
    except urllib.error.HTTPError as exc:
        return exc.code, None


def _ready(client: object) -> set[tuple[str, str]]:
    rows = client.get_model_repository_index(headers=ADMIN)  # type: ignore[attr-defined]
    return {(r["name"], r["version"]) for r in rows if r.get("state") == "READY"}


def _many(port: int, path: str, count: int = 40) -> set[object]:
    """What `count` requests (on new connections, so both workers answer) got back."""
    return {_predict(port, path) for _ in range(count)}


def test_the_api_through_tritonclient_with_one_state_across_workers(server: tuple[object, int, object]) -> None:
    client, port, _ = server
    assert _ready(client) == {("shirts", "1"), ("shoes", "1")}
    assert client.is_model_ready("shirts", "1") and not client.is_model_ready("shirts", "2")  # type: ignore[attr-defined]
    with pytest.raises(InferenceServerException, match="admin key"):
        client.load_model("shirts")  # type: ignore[attr-defined]
    # One version chosen (Triton users' #4416), beside the one loaded; then on every worker at once.
    _load_version(port, "shirts", "2")
    assert _ready(client) == {("shirts", "1"), ("shirts", "2"), ("shoes", "1")}
    assert _many(port, "/models/shirts/versions/2/predict") == {(200, "2")}
    assert _many(port, "/predict") == {(200, "1")}, "the configured default does not move when a version appears"
    client.unload_model("shoes", headers=ADMIN)  # type: ignore[attr-defined]
    assert _many(port, "/models/shoes/predict") == {(404, None)}
    assert not client.is_model_ready("shoes")  # type: ignore[attr-defined]
    client.load_model("shoes", headers=ADMIN)  # type: ignore[attr-defined]
    assert _many(port, "/models/shoes/predict") == {(200, "1")}


def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(
    server: tuple[object, int, object], repository: Path
) -> None:
    client, port, _ = server
    (repository / "shoes" / "2").mkdir()
    (repository / "shoes" / "2" / "model.pt").write_bytes(b"broken")
    with pytest.raises(InferenceServerException):
        client.load_model("shoes", headers=ADMIN)  # type: ignore[attr-defined]
    rows = {(r["name"], r["version"]): r for r in client.get_model_repository_index(headers=ADMIN)}  # type: ignore[attr-defined]
    assert rows[("shoes", "2")]["state"] == "UNAVAILABLE" and rows[("shoes", "2")]["reason"]
    assert _many(port, "/models/shoes/predict") == {(200, "1")}


def test_load_and_unload_under_load_fail_no_request_for_the_other_models(server: tuple[object, int, object]) -> None:
    client, port, _ = server
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            results.append(_predict(port, "/models/shirts/predict"))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        for _ in range(3):
            client.unload_model("shoes", headers=ADMIN)  # type: ignore[attr-defined]
            client.load_model("shoes", headers=ADMIN)  # type: ignore[attr-defined]
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert len(results) > 20 and set(results) == {(200, "1")}


def test_a_replaced_worker_serves_the_same_state(server: tuple[object, int, object]) -> None:
    client, port, process = server
    client.unload_model("shoes", headers=ADMIN)  # type: ignore[attr-defined]
    workers = psutil.Process(process.pid).children()  # type: ignore[attr-defined]
    os.kill(workers[0].pid, signal.SIGKILL)
    wait_for(
        lambda: (
            len(psutil.Process(process.pid).children()) == 2
            and workers[0].pid
            not in {  # type: ignore[attr-defined]
                p.pid
                for p in psutil.Process(process.pid).children()  # type: ignore[attr-defined]
            }
        ),
        timeout=30,
    )
    time.sleep(2)  # the new worker loads and becomes ready (a connection it accepts meanwhile waits)
    assert wait_for(lambda: _many(port, "/models/shoes/predict") == {(404, None)}, timeout=30)
    assert _many(port, "/predict") == {(200, "1")}


def test_sighup_reconciles_with_the_disk(server: tuple[object, int, object], repository: Path) -> None:
    client, port, process = server
    (repository / "shirts" / "config.json").write_text(json.dumps({"version_policy": {"latest": {"num_versions": 1}}}))
    os.kill(process.pid, signal.SIGHUP)  # type: ignore[attr-defined]
    # A reconcile is asynchronous, like a reload: each worker applies it when it sees it.
    assert wait_for(lambda: _many(port, "/predict") == {(200, "2")}, timeout=30)
    assert _ready(client) == {("shirts", "2"), ("shoes", "1")}


def test_unloading_frees_the_memory(server: tuple[object, int, object], repository: Path) -> None:
    """A bigger model (about 13 MB of weights) loaded and unloaded: each worker's resident memory
    comes back to within a few MB of what it was before the load."""
    import torch

    from models import PreprocessConfig, build_model, save_checkpoint

    client, _, process = server
    args = {"input_size": 784, "output_size": 10, "hidden_layers": [2048, 1024], "drop_p": 0.5}
    torch.manual_seed(0)
    save_checkpoint(
        repository / "big" / "1" / "model.pt", build_model("network", args).eval(), "network", args, PreprocessConfig()
    )
    workers = psutil.Process(process.pid).children()  # type: ignore[attr-defined]
    # Once first: a load answers when every worker serves it, so both have finished starting
    # (one that was still starting grew by up to 200 MB while the test measured).
    client.load_model("big", headers=ADMIN)  # type: ignore[attr-defined]
    client.unload_model("big", headers=ADMIN)  # type: ignore[attr-defined]
    time.sleep(1)
    before = [w.memory_info().rss for w in workers]
    client.load_model("big", headers=ADMIN)  # type: ignore[attr-defined]
    loaded = [w.memory_info().rss for w in workers]
    client.unload_model("big", headers=ADMIN)  # type: ignore[attr-defined]
    time.sleep(1)
    after = [w.memory_info().rss for w in workers]
    for start, peak, end in zip(before, loaded, after, strict=True):
        assert peak - start > 8 * 2**20, "the load shows in the worker's memory"
        assert end - start < 4 * 2**20, f"{(end - start) / 2**20:.1f} MB still held after the unload"


def test_the_api_over_grpc_through_tritonclient(server: tuple[object, int, object]) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    _, port, _ = server
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}")
    admin = {"authorization": "Bearer admin-key"}
    rows = client.get_model_repository_index(headers=admin, as_json=True)["models"]
    assert {(r["name"], r["version"]) for r in rows if r.get("state") == "READY"} == {("shirts", "1"), ("shoes", "1")}
    with pytest.raises(InferenceServerException, match="admin key"):
        client.unload_model("shoes")
    client.unload_model("shoes", headers=admin)
    assert not client.is_model_ready("shoes")
    assert _many(port, "/models/shoes/predict") == {(404, None)}
    client.load_model("shoes", headers=admin)
    assert client.is_model_ready("shoes", "1")
    x = np.zeros((1, 1, 28, 28), np.float32)
    tensor = grpcclient.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(x)
    answer = client.infer("shoes", [tensor], model_version="1").get_response()
    assert answer.model_name == "shoes" and answer.model_version == "1"
    with pytest.raises(InferenceServerException, match="no model 'nope'"):
        client.load_model("nope", headers=admin)
    client.close()


def _load_version(port: int, name: str, version: str) -> None:
    """Load one chosen version (what tritonclient's load_model cannot ask for), beside those loaded."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/repository/models/{name}/load",
        json.dumps({"parameters": {"version": version}}).encode(),
        {**ADMIN, "Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=60).close()


def _rollout(port: int, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v2/repository/models/shirts/rollout",
        json.dumps(body).encode(),
        {**ADMIN, "Content-Type": "application/json"},
        method="PUT",
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)  # type: ignore[no-any-return]


def test_promote_and_roll_back_under_load_fail_nothing_on_any_worker(server: tuple[object, int, object]) -> None:
    client, port, _ = server
    client.load_model("shirts", headers=ADMIN)  # type: ignore[attr-defined]  # the policy: version 1
    _load_version(port, "shirts", "2")
    results: list[tuple[int, str | None]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            results.append(_predict(port))

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        assert _rollout(port, {"default_version": "2"})["serving_default"] == "2"
        promoted = _many(port, "/predict")
        time.sleep(0.5)
        assert _rollout(port, {"default_version": "1"})["serving_default"] == "1"
        rolled_back = _many(port, "/predict")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert promoted == {(200, "2")} and rolled_back == {(200, "1")}, "every worker switched before the PUT answered"
    assert len(results) > 20 and {status for status, _ in results} == {200}


def test_a_canary_answers_over_grpc_too(server: tuple[object, int, object]) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    _, port, _ = server
    _load_version(port, "shirts", "2")
    _rollout(port, {"canary": {"version": "2", "percent": 50}})
    channel = grpcclient.InferenceServerClient(f"127.0.0.1:{GRPC_PORT}")
    tensor = grpcclient.InferInput("input", [1, 1, 28, 28], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, 1, 28, 28), np.float32))
    versions = [channel.infer("shirts", [tensor]).get_response().model_version for _ in range(60)]
    named = {channel.infer("shirts", [tensor], model_version="1").get_response().model_version for _ in range(10)}
    channel.close()
    assert 10 <= versions.count("2") <= 50 and set(versions) == {"1", "2"}  # 60 x 50 %: 30, sd 3.9
    assert named == {"1"}


def test_a_shadow_agrees_as_offline_summed_over_both_workers(server: tuple[object, int, object]) -> None:
    _, port, _ = server
    _load_version(port, "shirts", "2")
    rng = np.random.default_rng(7)
    images = [(rng.standard_normal((1, 1, 28, 28)) * scale).astype(np.float32) for scale in (1, 3, 10) * 60]

    def top1(image: np.ndarray, version: str = "") -> tuple[int, str]:
        tensor = httpclient.InferInput("input", list(image.shape), "FP32")
        tensor.set_data_from_numpy(image)
        answer = httpclient.InferenceServerClient(f"127.0.0.1:{port}").infer("shirts", [tensor], model_version=version)
        return int(np.argmax(answer.as_numpy("probabilities"))), answer.get_response()["model_version"]

    # Two random tiny models seldom agree: keep every image they agree on (up to 10) beside 30 they
    # do not, so a comparison that counted wrongly could not pass.
    same = [top1(image, "1")[0] == top1(image, "2")[0] for image in images]
    agreeing = [image for image, agree in zip(images, same, strict=True) if agree][:10]
    images = agreeing + [image for image, agree in zip(images, same, strict=True) if not agree][:30]
    assert agreeing, "the two versions agree on none of the candidate images: the test cannot tell"
    _rollout(port, {"shadow": {"version": "2", "percent": 100}})
    assert {top1(image)[1] for image in images} == {"1"}, "the primary answer stays the default version's"

    def figures() -> dict[str, object]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/repository/models/shirts/rollout") as response:
            return json.load(response)["versions"].get("2", {}).get("shadow", {})  # type: ignore[no-any-return]

    assert wait_for(lambda: figures().get("agreement_images") == len(images), timeout=10), figures()
    shadow = figures()
    assert shadow["requests"] == len(images) and shadow["dropped"] == 0
    assert shadow["agreement"] == pytest.approx(len(agreeing) / len(images))
