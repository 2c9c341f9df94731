"""Holding connections back at the socket while the queue is long (app.http.backpressure)."""

from __future__ import annotations

import asyncio

from app.http.backpressure import RESUME_PER_TICK, Backpressure
from app.paths import is_inference_path


def test_nothing_is_held_while_the_queue_has_room_or_no_rule_is_set() -> None:
    loop = asyncio.new_event_loop()
    try:
        pressure = Backpressure()
        assert not pressure.hold(loop, lambda: None)  # no rule: a worker before its model is loaded
        pressure.busy = lambda: False
        assert not pressure.hold(loop, lambda: None) and not pressure.held
    finally:
        loop.close()


def test_held_connections_resume_in_order_when_room_comes_and_at_their_latest_time() -> None:
    busy = [True]
    pressure = Backpressure(max_hold_s=0.2)
    pressure.busy = lambda: busy[0]
    resumed: list[int] = []

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        for i in range(RESUME_PER_TICK + 4):
            assert pressure.hold(loop, lambda i=i: resumed.append(i))
        await asyncio.sleep(0.05)
        assert resumed == []  # still busy, not yet at their latest time
        busy[0] = False
        await asyncio.sleep(0.002)
        await asyncio.sleep(0.01)
        assert resumed[:RESUME_PER_TICK] == list(range(RESUME_PER_TICK))  # a tick's worth, in order
        busy[0] = True
        assert pressure.hold(loop, lambda: resumed.append(99))
        await asyncio.sleep(0.3)  # past max_hold_s: everyone resumed though the queue is still long
        assert sorted(resumed) == [*range(RESUME_PER_TICK + 4), 99] and not pressure.held

    asyncio.run(scenario())


def test_only_inference_is_held_or_traced() -> None:
    assert all(map(is_inference_path, ["/predict", "/explain", "/v2/models/m/infer", "/v2/models/m/versions/1/infer"]))
    assert all(map(is_inference_path, ["/models/m/predict", "/models/m/versions/2/explain"]))
    assert not any(map(is_inference_path, ["/health/live", "/metrics", "/", "/v2/models/m", "/model", "/models/m"]))
    assert not is_inference_path("/v2/repository/models/m/load")
