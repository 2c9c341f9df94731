from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from functools import partial
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from starlette.types import Receive

from app.batching import DeadlineExpired, MicroBatcher
from app.dataplane import DataPlane
from app.decoding import image_to_input
from app.errors import ServeError
from app.http.messages import receive_body
from app.protocols.predict import decode_body
from app.repository.registry import READY, Version
from app.served_model import Pending, Scored
from app.settings import Settings
from tests.helpers import multipart, png


def _gated(gate: threading.Event, batches: list[list[int]]):  # type: ignore[no-untyped-def]
    """run_batch that waits at the gate, records each batch and fails items that are negative."""

    def run_batch(items: list[int]) -> list[int | BaseException]:
        gate.wait(5)
        batches.append(list(items))
        if 99 in items:
            raise RuntimeError("the whole batch fails")
        return [ValueError(f"bad {i}") if i < 0 else i * 10 for i in items]

    return run_batch


async def _submit_while_busy(batcher: MicroBatcher[int, int], gate: threading.Event, items: list[int]) -> list[object]:
    tasks = [asyncio.create_task(batcher.submit(items[0]))]
    await asyncio.sleep(0.05)  # the first item is taken at once, alone, and held at the gate
    tasks += [asyncio.create_task(batcher.submit(i)) for i in items[1:]]
    await asyncio.sleep(0.05)  # the others queue up meanwhile
    gate.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    batcher.close()
    batcher.join(5)
    return results


def test_waiting_items_are_batched_in_order_and_each_gets_its_own_result() -> None:
    gate, batches = threading.Event(), []
    batcher: MicroBatcher[int, int] = MicroBatcher(_gated(gate, batches), max_batch_size=4)
    batcher.start()
    results = asyncio.run(_submit_while_busy(batcher, gate, list(range(1, 8))))
    assert results == [10, 20, 30, 40, 50, 60, 70]
    assert batches == [[1], [2, 3, 4, 5], [6, 7]], "never waits when idle; groups what queued, up to the limit"


def test_errors_stay_with_their_item_and_a_failed_batch_fails_only_itself() -> None:
    gate, batches = threading.Event(), []
    batcher: MicroBatcher[int, int] = MicroBatcher(_gated(gate, batches), max_batch_size=2)
    batcher.start()
    results = asyncio.run(_submit_while_busy(batcher, gate, [1, 2, -3, 99, 5, 6]))
    # Batches: [1], [2, -3], [99, 5], [6].
    assert results[0] == 10 and results[1] == 20
    assert isinstance(results[2], ValueError)
    assert isinstance(results[3], RuntimeError) and isinstance(results[4], RuntimeError)
    assert results[5] == 60


def _pending(service: object, body: bytes, content_type: str) -> Pending:
    return partial(decode_body, body, content_type, service.loaded.preprocess, service.settings)  # type: ignore[attr-defined]


def _images(*seeds: int) -> tuple[bytes, str]:
    return multipart([(f"{s}.png", png(seed=s)) for s in seeds])


def test_batched_results_equal_unbatched_and_keep_request_order(client: object) -> None:
    service = client.app.state.worker.plane.model  # type: ignore[attr-defined]
    items = [
        _pending(service, *_images(1, 2)),
        _pending(service, b"garbage", "image/png"),
        _pending(service, b"", "application/json"),
        _pending(service, *_images(3)),
    ]
    together = service.run_batch(items)
    alone = [service.run_batch([item])[0] for item in items]
    assert isinstance(together[2], ServeError) and together[2].status == 415
    for batched, single in zip(together, alone, strict=True):
        if isinstance(batched, BaseException):
            continue
        assert np.allclose(batched.probabilities, single.probabilities, atol=1e-6)
    assert [s.input.names for s in (together[0], together[3])] == [["1.png", "2.png"], ["3.png"]]
    assert together[1].input.errors[0].status == 400 and len(together[1].probabilities) == 0
    assert together[1].per_image() == [together[1].input.errors[0]]
    x = np.stack([image_to_input(png(seed=s), None, service.loaded.preprocess, 10**6) for s in (1, 2)])
    assert np.allclose(together[0].probabilities, service.score(x)[0], atol=1e-6)


def test_a_forward_pass_never_holds_more_than_max_batch_size_images(tiny_checkpoint: object) -> None:
    """Found in review: the limit counted requests, so 32 requests of 16 images made one pass of 512."""
    from app.served_model import ServedModel

    service = ServedModel.load(Settings(checkpoint=tiny_checkpoint, device="cpu", max_batch_size=3))
    passes: list[int] = []
    service.observe_batch = lambda images, seconds: passes.append(images)
    items = [_pending(service, *_images(*range(5)))] * 2
    answers = service.run_batch(items)
    assert passes == [3, 3, 3, 1]
    x = np.stack([image_to_input(png(seed=s), None, service.loaded.preprocess, 10**6) for s in range(5)])
    expected = service.score(x)[0]
    for answer in answers:
        assert isinstance(answer, Scored)
        assert np.allclose(answer.probabilities, expected, atol=1e-6)


def test_max_wait_lets_a_batch_fill_and_zero_never_waits() -> None:
    for wait, expected in ((0.0, [[1], [2]]), (5.0, [[1, 2]])):
        batches: list[list[int]] = []

        def record(items: list[int], batches: list[list[int]] = batches) -> list[int | BaseException]:
            batches.append(list(items))
            return [i * 10 for i in items]

        batcher: MicroBatcher[int, int] = MicroBatcher(record, max_batch_size=2, max_wait_s=wait)
        batcher.start()

        async def two_apart(batcher: MicroBatcher[int, int] = batcher) -> list[int]:
            first = asyncio.ensure_future(batcher.submit(1))
            await asyncio.sleep(0.2)  # long after an idle batcher has taken the first item
            return [*await asyncio.gather(first, batcher.submit(2))]

        assert asyncio.run(two_apart()) == [10, 20]
        assert batches == expected, wait  # with a wait, the full batch goes at once (not after 5 s)
        batcher.close()
        batcher.join(1.0)


def _plane(seconds_per_request: float = 0.0, **settings: Any) -> DataPlane:
    """A data plane whose model's inference thread drains `seconds_per_request` per request."""
    plane = DataPlane(Settings(**settings))
    stand_in = SimpleNamespace(batcher=SimpleNamespace(seconds_per_item=seconds_per_request))
    plane.registry.put(Version("m", "1", stand_in, READY))  # type: ignore[arg-type]
    return plane


def _only(plane: DataPlane) -> Version:
    return next(iter(plane.registry))


def test_concurrency_cap_answers_503_with_retry_after() -> None:
    runtime = _plane(max_concurrency=2)
    with runtime.admit(_only(runtime)), runtime.admit(_only(runtime)):
        with pytest.raises(ServeError) as refused, runtime.admit(_only(runtime)):
            pass
        assert refused.value.status == 503
        assert refused.value.headers == {"Retry-After": "1"}
    assert runtime.in_flight == 0
    with runtime.admit(_only(runtime)):
        assert runtime.in_flight == 1


def test_admission_refuses_when_the_work_ahead_would_take_longer_than_the_queue_delay_or_the_deadline() -> None:
    plane = _plane(seconds_per_request=0.01, max_queue_delay_s=1.0)  # 100 requests drain in 1 s
    plane.in_flight = 99
    with plane.admit(_only(plane)):  # 0.99 s of work ahead: admitted
        assert plane.in_flight == 100
    plane.in_flight = 101
    with pytest.raises(ServeError) as refused, plane.admit(_only(plane)):  # 1.01 s ahead: refused, nothing held
        pass
    assert plane.in_flight == 101 and refused.value.status == 503
    assert "about 1.01 s of work ahead" in refused.value.detail and refused.value.headers == {"Retry-After": "1"}
    assert refused.value.hold_s == pytest.approx(0.01)  # answered once the excess would have drained
    plane.in_flight = 30  # 0.3 s ahead: within the queue delay, not within a deadline 0.2 s away
    with pytest.raises(ServeError) as late, plane.admit(_only(plane), deadline=time.monotonic() + 0.2):
        pass
    assert late.value.status == 504 and "0.30 s of work ahead" in late.value.detail
    assert 0.05 < late.value.hold_s <= 0.1  # answered just before the deadline, not at once
    with plane.admit(_only(plane), deadline=time.monotonic() + 0.5):
        assert plane.in_flight == 31
    assert plane.metrics.refused.labels("queue_delay")._value.get() == 1
    assert plane.metrics.dropped.labels("deadline")._value.get() == 1


def test_a_held_refusal_is_answered_after_its_hold(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    plane = client.app.state.worker.plane  # type: ignore[attr-defined]
    monkeypatch.setattr(plane.model.batcher, "seconds_per_item", 10.0)  # any work ahead takes too long
    plane.in_flight = 1
    try:
        began = time.monotonic()
        response = client.post("/predict", files={"file": ("a.png", png())})
        held_for = time.monotonic() - began
    finally:
        plane.in_flight = 0
    assert response.status_code == 503 and "server busy" in response.json()["detail"]
    assert held_for >= 0.9  # min(10 s of work - the 1 s queue delay, MAX_HOLD_S = 1 s)
    assert client.post("/predict", files={"file": ("a.png", png())}).status_code == 200


def test_the_batcher_measures_how_fast_it_drains() -> None:
    def run_batch(items: list[int]) -> list[int | BaseException]:
        time.sleep(0.004 * len(items))
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(run_batch, max_batch_size=8)
    assert batcher.seconds_per_item == 0.0  # nothing measured: admission refuses nobody yet
    batcher.start()

    async def some() -> list[int]:
        return [*await asyncio.gather(*(batcher.submit(i) for i in range(16)))]

    assert asyncio.run(some()) == list(range(16))
    assert 0.003 <= batcher.seconds_per_item <= 0.02
    batcher.close()
    batcher.join(1.0)


def _receiver(messages: list[dict[str, object]], delay: float = 0.0) -> Receive:
    async def receive() -> dict[str, object]:
        await asyncio.sleep(delay)
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    return receive  # type: ignore[return-value]


def test_receive_body_limits_time_size_and_disconnects() -> None:
    async def read(receive: Receive, length: bytes | None = None, limit: int = 100, timeout: float = 1.0) -> bytes:
        return await receive_body(receive, length, limit, timeout)

    chunks = [
        {"type": "http.request", "body": b"x" * 60, "more_body": True},
        {"type": "http.request", "body": b"y" * 60},
    ]
    with pytest.raises(ServeError) as too_big:
        asyncio.run(read(_receiver(list(chunks))))
    assert too_big.value.status == 413, "a body that grows past the limit is refused mid-stream"
    with pytest.raises(ServeError) as declared:
        asyncio.run(read(_receiver([]), length=b"1000"))
    assert declared.value.status == 413
    with pytest.raises(ServeError) as endless:
        asyncio.run(read(_receiver([]), length=b"9" * 5000))
    assert endless.value.status == 413 and "over 10^18" in endless.value.message
    with pytest.raises(ServeError) as invalid:
        asyncio.run(read(_receiver([]), length=b"-5"))
    assert invalid.value.status == 400
    with pytest.raises(ServeError) as slow:
        asyncio.run(read(_receiver(list(chunks), delay=0.3), limit=1000, timeout=0.4))
    assert slow.value.status == 408
    with pytest.raises(ServeError) as gone:
        asyncio.run(read(_receiver([{"type": "http.request", "body": b"x", "more_body": True}]), limit=1000))
    assert gone.value.status == 400 and "disconnected" in gone.value.message
    assert asyncio.run(read(_receiver(list(chunks)), limit=1000)) == b"x" * 60 + b"y" * 60
    assert asyncio.run(read(_receiver([{"type": "http.request", "body": b"z"}]), b"1", limit=1000)) == b"z"


def test_a_closed_caller_loop_does_not_kill_the_inference_thread() -> None:
    """Found in review: call_soon_threadsafe on a closed loop raised in the worker thread."""
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: [i * 2 for i in items], max_batch_size=4)
    batcher.start()
    gate = threading.Event()

    async def abandon() -> None:
        def slow(items: list[int]) -> list[int | BaseException]:
            gate.wait(5)
            return [i * 2 for i in items]

        batcher._run_batch = slow  # the next batch waits until this loop is gone
        asyncio.get_running_loop().create_task(batcher.submit(1))
        await asyncio.sleep(0.05)

    asyncio.run(abandon())  # closes its loop with the request still in the batcher
    gate.set()
    time.sleep(0.1)
    batcher._run_batch = lambda items: [i * 2 for i in items]
    assert asyncio.run(asyncio.wait_for(batcher.submit(21), 5)) == 42
    batcher.close()
    batcher.join(5)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux behaviour")
def test_the_inference_thread_runs_at_a_lower_priority_than_its_callers() -> None:
    before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    batcher: MicroBatcher[int, int] = MicroBatcher(
        lambda items: [os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) for _ in items],
        max_batch_size=4,
        nice=5,
    )
    batcher.start()

    async def ask() -> int:
        return await batcher.submit(0)

    assert asyncio.run(ask()) == min(before + 5, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == before  # the caller's is untouched
    batcher.close()
    batcher.join(1.0)


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux behaviour")
def test_the_service_starts_its_inference_thread_lowered(client: object) -> None:
    from app.worker import INFERENCE_NICE

    thread = client.app.state.worker.plane.model.batcher._thread  # type: ignore[attr-defined]
    assert thread.name == "inference" and thread.native_id is not None
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert os.getpriority(os.PRIO_PROCESS, thread.native_id) == min(mine + INFERENCE_NICE, 19)


def test_work_past_its_deadline_is_dropped_before_the_batch_and_counted() -> None:
    release = threading.Event()
    seen: list[list[int]] = []
    drops: list[tuple[str, int]] = []

    def run_batch(items: list[int]) -> list[int | BaseException]:
        seen.append(list(items))
        release.wait(5)
        return [i * 10 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(
        run_batch, max_batch_size=8, on_drop=lambda r, n: drops.append((r, n))
    )
    batcher.start()

    async def scenario() -> list[object]:
        busy = asyncio.ensure_future(batcher.submit(1))  # holds the thread
        await asyncio.sleep(0.05)
        late = asyncio.ensure_future(batcher.submit(2, deadline=time.monotonic() + 0.05))
        fine = asyncio.ensure_future(batcher.submit(3, deadline=time.monotonic() + 30))
        await asyncio.sleep(0.2)  # the late one's deadline passes while it waits
        release.set()
        return list(await asyncio.gather(busy, late, fine, return_exceptions=True))

    busy, late, fine = asyncio.run(scenario())
    batcher.close()
    batcher.join(5)
    assert busy == 10 and fine == 30
    assert isinstance(late, DeadlineExpired)
    assert seen == [[1], [3]], "the expired item never reached run_batch"
    assert drops == [("deadline", 1)]
