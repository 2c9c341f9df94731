"""An adaptive micro-batcher: one inference thread that runs whatever is already waiting as one batch.

It never waits for a batch to fill: an idle service runs a lone request at once, and a
busy one groups the requests that queued up while the previous forward pass ran. Each
request gets back exactly its own rows, in order; an exception fails only the batch it
happened in.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


Rows = list[list[float]]


@dataclass
class _Job:
    inputs: torch.Tensor
    future: asyncio.Future[Rows]
    loop: asyncio.AbstractEventLoop


def _resolve(future: asyncio.Future[Rows], result: Rows | None, error: BaseException | None) -> None:
    if future.done():  # the client went away and the handler was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)


class MicroBatcher:
    """Runs `infer` on one dedicated thread over batches of at most `max_batch_size` rows.

    `infer` maps an (N, ...) tensor to N output rows as Python lists, so nothing of torch
    reaches the event loop; `on_batch(rows, seconds)` is told about every forward pass.
    """

    def __init__(
        self,
        infer: Callable[[torch.Tensor], Rows],
        max_batch_size: int,
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        self._infer = infer
        self._max_batch_size = max_batch_size
        self._on_batch = on_batch
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Finish the jobs already queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    async def submit(self, inputs: torch.Tensor) -> Rows:
        """Queue (N, ...) inputs and wait for their N output rows."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Rows] = loop.create_future()
        self._queue.put(_Job(inputs, future, loop))
        return await future

    def _take_waiting(self, first: _Job) -> tuple[list[_Job], bool]:
        """The first job plus those already queued, up to the batch size; and whether to stop."""
        jobs, rows = [first], len(first.inputs)
        while rows < self._max_batch_size:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            rows += len(job.inputs)
        return jobs, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            jobs, stopping = self._take_waiting(first)
            try:
                start = time.perf_counter()
                inputs = jobs[0].inputs if len(jobs) == 1 else torch.cat([job.inputs for job in jobs])
                outputs = self._infer(inputs)
                if self._on_batch:
                    self._on_batch(len(outputs), time.perf_counter() - start)
            except BaseException as exc:  # handed to every waiting request, never lost
                logger.warning("inference failed for a batch of %d requests: %r", len(jobs), exc)
                for job in jobs:
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, exc)
                continue
            offset = 0
            for job in jobs:
                rows = outputs[offset : offset + len(job.inputs)]
                offset += len(job.inputs)
                job.loop.call_soon_threadsafe(_resolve, job.future, rows, None)
