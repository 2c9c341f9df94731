"""Shadow runs collected into shared model runs: fewer runs than requests, every request compared
once with its own primary answer, dropped (never queued) when the server is busy."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from app import shadow as shadow_module
from app.decoding import ModelInput
from app.repository.registry import Version
from app.rollout_metrics import RolloutMetrics
from app.served_model import Scored
from app.shadow import Shadows


class _RecordingBatcher:
    """Answers each image with a one-hot of its mean pixel's class; records each job's images and
    when it was submitted."""

    def __init__(self, seconds_per_item: float = 0.0) -> None:
        self.seconds_per_item = seconds_per_item
        self.runs: list[int] = []
        self.submitted_at: list[float] = []

    async def submit(self, item: ModelInput, deadline: float | None = None, trace: Any = None) -> Scored:
        assert item.inputs is not None
        self.runs.append(len(item.inputs))
        self.submitted_at.append(time.monotonic())
        classes = item.inputs.reshape(len(item.inputs), -1).mean(axis=1).astype(int) % 10
        return Scored(item, np.eye(10, dtype=np.float32)[classes])


def _version(batcher: _RecordingBatcher) -> Version:
    served = SimpleNamespace(name="shirts", version="3", batcher=batcher)
    return Version("shirts", "3", served=served)  # type: ignore[arg-type]


def _primary(value: int, images: int = 1, agree: bool = True) -> Scored:
    inputs = np.full((images, 1, 28, 28), float(value), dtype=np.float32)
    row = np.eye(10, dtype=np.float32)[value % 10 if agree else (value + 1) % 10]
    return Scored(ModelInput.of(inputs), np.tile(row, (images, 1)))


def _figures(registry: CollectorRegistry) -> dict[str, float]:
    labels = {"model": "shirts", "version": "3"}
    return {
        name: registry.get_sample_value(f"fashion_serve_rollout_{name}_total", {**labels, **extra}) or 0.0
        for name, extra in (
            ("requests", {"role": "shadow"}),
            ("images", {"role": "shadow"}),
            ("agreed", {}),
            ("dropped", {}),
        )
    }


def test_shadowed_requests_share_model_runs_and_each_is_compared_once() -> None:
    registry = CollectorRegistry()
    shadows = Shadows(RolloutMetrics(registry), max_queue_delay_s=1.0, batch_images=8)
    batcher = _RecordingBatcher()
    version = _version(batcher)

    async def scenario() -> None:
        for value in range(10):  # 10 one-image requests, every third answered differently by the primary
            shadows.offer(version, _primary(value, agree=value % 3 != 0), users_wait_s=0.0)
        shadows.offer(version, _primary(4, images=3), users_wait_s=0.0)
        assert version.in_flight == 11, "an offered request holds its version until compared"
        await asyncio.sleep(shadow_module.COLLECT_S * 3)
        while shadows._runs:
            await asyncio.sleep(0.001)

    asyncio.run(scenario())
    assert batcher.runs == [1] * 10 + [3], "each request its own job (the batcher batches them)"
    first, later = batcher.submitted_at[:8], batcher.submitted_at[8:]
    assert max(first) - min(first) < shadow_module.COLLECT_S / 2, "a full batch is queued at once"
    assert min(later) - min(first) >= shadow_module.COLLECT_S * 0.9, "the rest once the first waited long enough"
    assert _figures(registry) == {"requests": 11.0, "images": 13.0, "agreed": 13.0 - 4, "dropped": 0.0}
    assert version.in_flight == 0 and shadows.in_flight == 0


def test_a_busy_server_drops_shadow_work_instead_of_queueing_it() -> None:
    registry = CollectorRegistry()
    shadows = Shadows(RolloutMetrics(registry), max_queue_delay_s=0.1, batch_images=8)
    batcher = _RecordingBatcher(seconds_per_item=0.001)
    version = _version(batcher)

    async def scenario() -> None:
        shadows.offer(version, _primary(1), users_wait_s=0.005)  # the users' work: within 10 ms
        shadows.offer(version, _primary(2), users_wait_s=0.05)  # past the shadow's share
        await asyncio.sleep(shadow_module.COLLECT_S * 3)
        while shadows._runs:
            await asyncio.sleep(0.001)

    asyncio.run(scenario())
    assert batcher.runs == [1]
    assert _figures(registry) == {"requests": 1.0, "images": 1.0, "agreed": 1.0, "dropped": 1.0}
    assert version.in_flight == 0


def test_a_steady_trickle_is_never_dropped_while_it_collects() -> None:
    """Found walking a rollout: one client, one request at a time, and 3 in 10 shadow runs were
    dropped, because the images waiting to share a run counted as queued work."""
    registry = CollectorRegistry()
    shadows = Shadows(RolloutMetrics(registry), max_queue_delay_s=0.1, batch_images=256)
    batcher = _RecordingBatcher(seconds_per_item=0.001)  # 10 images' work fill the shadow's share
    version = _version(batcher)

    async def scenario() -> None:
        for value in range(100):
            shadows.offer(version, _primary(value), users_wait_s=0.001)
        await asyncio.sleep(shadow_module.COLLECT_S * 3)
        while shadows._runs:
            await asyncio.sleep(0.001)

    asyncio.run(scenario())
    assert len(batcher.runs) == 100
    assert _figures(registry)["requests"] == 100.0 and _figures(registry)["dropped"] == 0.0
