from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from app.batching import MicroBatcher
from app.runtime import Runtime
from app.settings import Settings


def _gated_infer(gate: threading.Event, sizes: list[int]):  # type: ignore[no-untyped-def]
    def infer(batch: torch.Tensor) -> list[list[float]]:
        gate.wait(5)
        sizes.append(len(batch))
        if (batch < 0).any():
            raise ValueError("negative input")
        return (batch.view(len(batch), -1)[:, :2] * 10).tolist()

    return infer


def test_waiting_requests_are_batched_in_order_with_their_own_rows() -> None:
    async def scenario() -> tuple[list[list[list[float]]], list[int]]:
        gate, sizes = threading.Event(), []
        batcher = MicroBatcher(_gated_infer(gate, sizes), max_batch_size=8)
        batcher.start()
        inputs = [torch.full((1 + i % 3, 4), float(i)) for i in range(6)]
        tasks = [asyncio.create_task(batcher.submit(inputs[0]))]
        await asyncio.sleep(0.05)  # the first request is taken at once, alone, and held at the gate
        tasks += [asyncio.create_task(batcher.submit(x)) for x in inputs[1:]]
        await asyncio.sleep(0.05)  # the other five queue up meanwhile
        gate.set()
        results = await asyncio.gather(*tasks)
        batcher.stop(5)
        return results, sizes

    results, sizes = asyncio.run(scenario())
    for i, rows in enumerate(results):
        assert rows == [[10.0 * i, 10.0 * i]] * (1 + i % 3)
    assert sizes[0] == 1, "the first request ran alone: the batcher never waits for company"
    assert sum(sizes) == 12 and all(s <= 8 for s in sizes)
    assert len(sizes) < 6, "requests that queued up meanwhile shared a forward pass"


def test_a_failing_batch_fails_only_its_own_requests() -> None:
    async def scenario() -> list[object]:
        gate, sizes = threading.Event(), []
        batcher = MicroBatcher(_gated_infer(gate, sizes), max_batch_size=2)
        batcher.start()
        inputs = [torch.ones(1, 4), torch.ones(1, 4), -torch.ones(1, 4), torch.ones(1, 4), torch.ones(1, 4)]
        tasks = [asyncio.create_task(batcher.submit(inputs[0]))]
        await asyncio.sleep(0.05)
        tasks += [asyncio.create_task(batcher.submit(x)) for x in inputs[1:]]
        await asyncio.sleep(0.05)
        gate.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        batcher.stop(5)
        return results

    results = asyncio.run(scenario())
    # Batches: [0], [1, 2], [3, 4]: only the batch holding the negative input fails.
    assert results[0] == [[10.0, 10.0]]
    assert isinstance(results[1], ValueError) and isinstance(results[2], ValueError)
    assert results[3] == [[10.0, 10.0]] and results[4] == [[10.0, 10.0]]


def test_batched_results_equal_unbatched(client: object) -> None:
    service = client.app.state.runtime.service  # type: ignore[attr-defined]
    torch.manual_seed(0)
    batch = torch.randn(16, 1, 28, 28)
    together = torch.tensor(service.probabilities(batch))
    alone = torch.tensor([service.probabilities(batch[i : i + 1])[0] for i in range(16)])
    assert torch.allclose(together, alone, atol=1e-6)


def test_concurrency_cap_answers_503_with_retry_after() -> None:
    from fastapi import HTTPException

    runtime = Runtime(Settings(max_concurrency=2))
    with runtime.admit(), runtime.admit():
        with pytest.raises(HTTPException) as refused, runtime.admit():
            pass
        assert refused.value.status_code == 503
        assert refused.value.headers == {"Retry-After": "1"}
    assert runtime.in_flight == 0
    with runtime.admit():
        assert runtime.in_flight == 1
