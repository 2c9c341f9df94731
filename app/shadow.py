"""Shadow runs: a rollout's shadow version also answers a request the default version answered,
after that answer has gone, and the two answers are compared (`app.rollout_metrics`).

Off the critical path: a run never delays, changes or fails the primary answer; it is the first
work dropped under load (while the work admitted would take more than a small share of the queue
delay users are admitted within); it keeps the request's decoded input only until the comparison.

Shadowed requests are collected into one model run per shadow version (up to a batch, or for a
tenth of a second, whichever comes first): with a 10 % shadow, a run per request would add about
as many small model runs as the primary's batches, each paying the model's fixed cost per call.
A shadow's latency is its own run's, not the collection's wait.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from app.decoding import ModelInput
from app.repository.registry import Version
from app.rollout_metrics import RolloutMetrics
from app.served_model import Scored, ServedModel

# Shadow work runs only while the users' work admitted would be done within this share of the
# queue delay, so it is dropped long before any user is refused (the shadow's own runs delay users
# only by taking CPU, and then the users' work admitted grows); and at most this many images are
# held at once (collecting or running).
SHADOW_QUEUE_SHARE = 0.1
MAX_SHADOW_IMAGES = 1024
# How long the first shadowed request waits for others to share its model run.
COLLECT_S = 0.1


@dataclass
class _Pending:
    """The shadowed requests of one version, waiting to run together."""

    shadow: Version
    served: ServedModel
    inputs: list[np.ndarray] = field(default_factory=list)
    primary: list[np.ndarray] = field(default_factory=list)
    images: int = 0


class Shadows:
    """One worker's shadow runs."""

    def __init__(self, metrics: RolloutMetrics, max_queue_delay_s: float, batch_images: int) -> None:
        self.metrics = metrics
        self.max_wait_s = SHADOW_QUEUE_SHARE * max_queue_delay_s
        self.batch_images = batch_images
        self.in_flight = 0  # images offered and not yet compared
        self._pending: dict[int, _Pending] = {}  # id(Version) -> requests waiting for their run
        self._runs: set[asyncio.Task[None]] = set()  # referenced until done

    def offer(self, shadow: Version, primary: Scored, users_wait_s: float) -> None:
        """Run `primary`'s input on `shadow` too, unless the server is too busy to spare it (dropped,
        and counted): `users_wait_s` is how long the users' work admitted would take."""
        served = shadow.served
        inputs = primary.input.inputs
        if served is None or served.batcher is None or inputs is None or not len(inputs):
            return
        if self.in_flight + len(inputs) > MAX_SHADOW_IMAGES or users_wait_s > self.max_wait_s:
            self.metrics.dropped.labels(served.name, served.version).inc()
            return
        pending = self._pending.get(id(shadow))
        if pending is None or pending.served is not served:
            if pending is not None:
                self._flush(pending)
            pending = self._pending[id(shadow)] = _Pending(shadow, served)
            asyncio.get_running_loop().call_later(COLLECT_S, self._flush, pending)
        self.in_flight += len(inputs)
        shadow.enter()
        pending.inputs.append(inputs)
        pending.primary.append(primary.probabilities)
        pending.images += len(inputs)
        if pending.images >= self.batch_images:
            self._flush(pending)

    def _flush(self, pending: _Pending) -> None:
        """Start the model run of `pending`'s requests (once: its timer may find it started)."""
        if self._pending.get(id(pending.shadow)) is not pending:
            return
        del self._pending[id(pending.shadow)]
        task = asyncio.create_task(self._run(pending))
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)

    async def _run(self, pending: _Pending) -> None:
        """The shadow's answers, compared with the default version's and counted; then both let go.

        Each request is its own job in the shadow's batcher (queued together, they run as one
        batch), so the batcher's time per request, which admission reads, stays per request."""
        served, inputs, primaries = pending.served, pending.inputs, pending.primary
        pending.inputs, pending.primary = [], []  # the requests' inputs are let go with the comparison
        try:
            assert served.batcher is not None
            began = time.monotonic()
            answers = await asyncio.gather(
                *(served.batcher.submit(ModelInput.of(x)) for x in inputs), return_exceptions=True
            )
            seconds = time.monotonic() - began
            done = [
                (primary, answer)
                for primary, answer in zip(primaries, answers, strict=True)
                if isinstance(answer, Scored)
            ]
            if len(done) < len(inputs):  # the shadow's failures are its own: counted as dropped, never the user's
                self.metrics.dropped.labels(served.name, served.version).inc(len(inputs) - len(done))
            if done:
                flagged = [answer.flagged for _, answer in done]
                both = Scored(
                    ModelInput.of(np.concatenate([answer.input.inputs for _, answer in done])),
                    np.concatenate([answer.probabilities for _, answer in done]),
                    flagged=None if any(f is None for f in flagged) else np.concatenate(flagged),  # type: ignore[arg-type]
                )
                primary = np.concatenate([primary for primary, _ in done])
                self.metrics.count_shadow((served.name, served.version), primary, both, seconds * len(done), len(done))
        finally:
            self.in_flight -= pending.images
            for _ in inputs:
                pending.shadow.leave()
