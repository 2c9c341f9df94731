"""Shadow runs: a rollout's shadow version also answers a request the default version answered,
after that answer has gone, and the two answers are compared (`app.rollout_metrics`).

Off the critical path: a run never delays, changes or fails the primary answer; it is the first
work dropped under load (while the work admitted would take more than a small share of the queue
delay users are admitted within); it keeps the request's decoded input only until the comparison.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from app.decoding import ModelInput
from app.repository.registry import Version
from app.rollout_metrics import RolloutMetrics
from app.served_model import Scored, ServedModel

# Shadow work runs only while the work admitted would be done within this share of the queue
# delay (so it is dropped long before any user is refused), and at most this many runs at once.
SHADOW_QUEUE_SHARE = 0.1
MAX_SHADOW_RUNS = 64


class Shadows:
    """One worker's shadow runs."""

    def __init__(self, metrics: RolloutMetrics, max_queue_delay_s: float) -> None:
        self.metrics = metrics
        self.max_wait_s = SHADOW_QUEUE_SHARE * max_queue_delay_s
        self.in_flight = 0
        self._runs: set[asyncio.Task[None]] = set()  # referenced until done

    def offer(self, shadow: Version, primary: Scored, users_in_flight: int) -> None:
        """Run `primary`'s input on `shadow` too, unless the server is too busy to spare it (dropped,
        and counted)."""
        served = shadow.served
        inputs = primary.input.inputs
        if served is None or served.batcher is None or inputs is None:
            return
        wait = (users_in_flight + self.in_flight) * served.batcher.seconds_per_item
        if self.in_flight >= MAX_SHADOW_RUNS or wait > self.max_wait_s:
            self.metrics.dropped.labels(served.name, served.version).inc()
            return
        self.in_flight += 1
        shadow.enter()
        task = asyncio.create_task(self._run(shadow, served, inputs, primary.probabilities))
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)

    async def _run(self, shadow: Version, served: ServedModel, inputs: np.ndarray, primary: np.ndarray) -> None:
        """The shadow's answer, compared with the default version's and counted; then both let go."""
        began = time.monotonic()
        try:
            assert served.batcher is not None
            scored = await served.batcher.submit(ModelInput.of(inputs))
            self.metrics.count_shadow((served.name, served.version), primary, scored, time.monotonic() - began)
        except Exception:  # the shadow's failure is its own: counted as dropped, never the user's
            self.metrics.dropped.labels(served.name, served.version).inc()
        finally:
            self.in_flight -= 1
            shadow.leave()
