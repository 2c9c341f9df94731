"""The drift signals in /metrics: top-1 classes, OOD scores and flags counted once per image
answered, whatever the protocol, and the checkpoint's OOD baseline beside them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.observability import OOD_SCORE_BUCKETS, observe_many
from app.settings import Settings
from models import FASHION_MNIST_CLASSES, PreprocessConfig
from models.preprocessing import normalize
from models.trust import OODStats
from tests.helpers import garment, png
from tests.models.test_trust import records, small_model, write

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
# Scaling the test records' whitening spreads their scores over the buckets; the threshold splits them.
SCALE = 5.0
THRESHOLD = 450.0
VAL_FLAG_RATE = 0.045


def scrape(client: TestClient) -> Samples:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    text = client.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def predicted(samples: Samples) -> dict[str, float]:
    return {
        dict(labels)["class"]: v for (name, labels), v in samples.items() if name == "fashion_serve_predictions_total"
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def v2_request(n: int, first_seed: int = 0) -> dict[str, object]:
    x = np.stack(
        [normalize(garment(seed=s), PreprocessConfig())[np.newaxis] for s in range(first_seed, first_seed + n)]
    )
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}


def v2_outputs(response: object) -> dict[str, np.ndarray]:
    body = response.json()  # type: ignore[attr-defined]
    return {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in body["outputs"]}


@pytest.fixture
def ood_client(tmp_path: Path) -> Iterator[TestClient]:
    model = small_model("network")
    calibration, ood = records(model)
    ood = OODStats(
        ood.whiten * SCALE, ood.centers * SCALE, THRESHOLD, {"flag_rate": 0.05, "val_flag_rate": VAL_FLAG_RATE}
    )
    path = write(tmp_path / "ood.pt", "network", calibration=calibration, ood=ood)
    with TestClient(create_app(Settings(checkpoint=path, device="cpu"))) as client:
        yield client


def test_observe_many_equals_one_observe_per_value() -> None:
    values = np.array([0.0, 25.0, 25.5, 270.0, 275.0, 999.0, 3000.0, np.inf, np.nan, 12.0], np.float32)
    registry = CollectorRegistry()
    one_by_one = Histogram("one", "", buckets=OOD_SCORE_BUCKETS, registry=registry)
    together = Histogram("many", "", buckets=OOD_SCORE_BUCKETS, registry=registry)
    for v in values[~np.isnan(values)]:
        one_by_one.observe(float(v))
    observe_many(together, values)
    observe_many(together, values[:0])
    expected = {(s.name.removeprefix("one"), tuple(s.labels.items())): s.value for s in one_by_one.collect()[0].samples}
    got = {(s.name.removeprefix("many"), tuple(s.labels.items())): s.value for s in together.collect()[0].samples}
    expected.pop(("_created", ())), got.pop(("_created", ()))
    assert got == expected
    assert got[("_bucket", (("le", "25.0"),))] == 3  # the bound itself belongs to its bucket, as in `observe`


def test_predict_and_v2_count_the_top1_class_of_each_answered_image(client: TestClient) -> None:
    before = predicted(scrape(client))
    files = [
        ("file", ("a.png", png(seed=1), "image/png")),
        ("file", ("broken.png", b"\x89PNG\r\n\x1a\n garbage", "image/png")),
        ("file", ("b.png", png(seed=2), "image/png")),
    ]
    answer = client.post("/predict?k=1", files=files).json()["predictions"]
    top1 = [p["top_k"][0]["label"] for p in answer if "top_k" in p]
    assert len(top1) == 2  # the broken image is not an answered one
    v2 = client.post("/v2/models/tiny/infer", json=v2_request(3))
    assert v2.status_code == 200, v2.text
    top1 += [FASHION_MNIST_CLASSES[i] for i in v2_outputs(v2)["probabilities"].argmax(axis=1)]

    samples = scrape(client)
    after = predicted(samples)
    moved = {name: count - before.get(name, 0) for name, count in after.items() if count != before.get(name, 0)}
    assert moved == Counter(top1)
    # no OOD statistics in the tiny checkpoint: no scores, no flags, no baseline
    assert value(samples, "fashion_serve_ood_score_count") == 0
    assert value(samples, "fashion_serve_ood_flagged_total") == 0
    assert not any(name.startswith("fashion_serve_ood_expected") for name, _ in samples)


def test_ood_scores_and_flags_are_counted_for_predict_and_v2(ood_client: TestClient) -> None:
    samples = scrape(ood_client)
    assert value(samples, "fashion_serve_ood_expected_flagged_ratio") == VAL_FLAG_RATE
    assert value(samples, "fashion_serve_ood_threshold") == THRESHOLD

    files = [("file", (f"{s}.png", png(seed=s), "image/png")) for s in range(4)]
    answer = ood_client.post("/predict?k=1", files=files[:3]).json()["predictions"]
    answer += ood_client.post("/predict?k=1", files=files[3:]).json()["predictions"]  # one image: its own path
    scores = [p["ood_score"] for p in answer]
    flags = [p["out_of_distribution"] for p in answer]
    v2 = ood_client.post("/v2/models/ood/infer", json=v2_request(4, first_seed=4))
    assert v2.status_code == 200, v2.text
    v2_scores = v2_outputs(v2)["ood_score"].ravel().tolist()
    scores += v2_scores
    flags += [s > THRESHOLD for s in v2_scores]
    assert 0 < sum(flags) < len(flags), scores  # the data sits on both sides of the threshold

    samples = scrape(ood_client)
    served = {"model": "ood", "version": "1"}  # the version that answered
    assert value(samples, "fashion_serve_ood_score_count", **served) == len(scores)
    assert value(samples, "fashion_serve_ood_score_sum", **served) == pytest.approx(sum(scores), rel=1e-5)
    for bound in OOD_SCORE_BUCKETS:
        below = sum(s <= bound for s in scores)
        assert value(samples, "fashion_serve_ood_score_bucket", le=str(float(bound)), **served) == below, bound
    assert value(samples, "fashion_serve_ood_flagged_total", **served) == sum(flags)
    assert {dict(labels)["version"] for (name, labels) in samples if name == "fashion_serve_predictions_total"} == {"1"}
    assert sum(predicted(samples).values()) == len(scores)
