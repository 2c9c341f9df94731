"""An adaptive micro-batcher: one worker thread that runs whatever is already waiting as one batch.

It never waits for a batch to fill: an idle service runs a lone request at once, and a
busy one groups the requests that queued up while the previous batch ran. `run_batch`
gets the waiting items in arrival order and returns one result per item, in the same
order; a result that is an exception is raised to that item's caller only. If `run_batch`
itself fails, every item of that batch gets the error; later batches are unaffected.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from app import tracing

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class BatcherClosed(RuntimeError):
    """The batcher was closed (its model replaced, or the service stopping)."""


class DeadlineExpired(TimeoutError):
    """The item's deadline passed while it waited: dropped before the batch, never computed."""


@dataclass
class _Job(Generic[Item, Result]):
    item: Item
    future: asyncio.Future[Result]
    loop: asyncio.AbstractEventLoop
    deadline: float | None  # time.monotonic() past which nobody wants the result
    trace: Any = None  # the request's server span (app.tracing.current()), None when untraced
    submitted_ns: int = 0  # time.perf_counter_ns() at submit, where traced: the start of its queue stage


def _resolve(future: asyncio.Future[Result], outcome: Result | BaseException) -> None:
    if future.done():  # the client went away and the handler was cancelled
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


class MicroBatcher(Generic[Item, Result]):
    """Runs `run_batch` on one dedicated thread over at most `max_batch_size` waiting items.

    `max_wait_s` > 0 trades latency for bigger batches: a batch that is not full waits up
    to that long for more items. The default, 0, never waits.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], list[Result | BaseException]],
        max_batch_size: int,
        max_wait_s: float = 0.0,
        nice: int = 0,
        on_drop: Callable[[str, int], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._on_drop = on_drop  # told (reason, count) of items dropped before a batch
        self._max_batch_size = max_batch_size
        self._max_wait_s = max_wait_s
        self._nice = nice
        self._queue: queue.SimpleQueue[_Job[Item, Result] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="inference", daemon=True)
        self._closed = False
        # Seconds of this thread's work per item, a moving average over recent batches (0 until
        # the first): how fast the queue drains, which admission turns into a queue delay.
        self.seconds_per_item = 0.0

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def close(self) -> None:
        """Take no more items; the thread finishes those already queued, then ends. Call it from
        the event loop that submits, so that no item can slip in behind the end."""
        self._closed = True
        self._queue.put(None)

    async def submit(self, item: Item, deadline: float | None = None, trace: Any = None) -> Result:
        """Queue one item and wait for its result (or its exception); BatcherClosed once closed.
        Past `deadline` (a `time.monotonic()` value) an item still waiting is dropped with
        DeadlineExpired; one whose caller was cancelled is dropped too. `trace`: the request's
        server span (`app.tracing.current()`), for its queue time and its batch's links."""
        if self._closed or not self._thread.is_alive():
            raise BatcherClosed("the inference thread is not running")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        self._queue.put(_Job(item, future, loop, deadline, trace, time.perf_counter_ns() if trace is not None else 0))
        return await future

    def _drop_abandoned(self, jobs: list[_Job[Item, Result]]) -> list[_Job[Item, Result]]:
        """The jobs still wanted; those past their deadline get DeadlineExpired, those whose
        caller is gone nothing, and neither reaches the model."""
        now = time.monotonic()
        live, expired, cancelled = [], 0, 0
        for job in jobs:
            if job.future.done():
                cancelled += 1
            elif job.deadline is not None and now >= job.deadline:
                expired += 1
                self._answer(job, DeadlineExpired("the request's deadline passed while it waited"))
            else:
                live.append(job)
        if self._on_drop:
            for reason, count in (("deadline", expired), ("cancelled", cancelled)):
                if count:
                    self._on_drop(reason, count)
        return live

    @staticmethod
    def _answer(job: _Job[Item, Result], outcome: Result | BaseException) -> None:
        try:
            job.loop.call_soon_threadsafe(_resolve, job.future, outcome)
        except RuntimeError:  # that caller's event loop is closed: nobody is waiting
            logger.debug("dropped a result for a closed event loop")

    def _take_waiting(self, first: _Job[Item, Result]) -> tuple[list[_Job[Item, Result]], bool]:
        """The first job plus those queued (or arriving within `max_wait_s`), up to the batch
        size; and whether to stop."""
        jobs = [first]
        deadline = time.monotonic() + self._max_wait_s
        while len(jobs) < self._max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
        return jobs, False

    def _lower_priority(self) -> None:
        """Raise this thread's nice value by `nice` (Linux: nice is per thread)."""
        if self._nice and sys.platform == "linux":
            tid = threading.get_native_id()
            try:
                os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + self._nice)
            except OSError as exc:
                logger.warning("could not lower the inference thread's priority: %s", exc)

    def _run(self) -> None:
        self._lower_priority()
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                break
            jobs, stopping = self._take_waiting(first)
            jobs = self._drop_abandoned(jobs)
            if not jobs:
                continue
            began = time.perf_counter()
            tracing.queued([(job.trace, job.submitted_ns) for job in jobs])
            try:
                with tracing.batch([job.trace for job in jobs]):
                    outcomes = self._run_batch([job.item for job in jobs])
                if len(outcomes) != len(jobs):
                    raise RuntimeError(f"run_batch returned {len(outcomes)} results for {len(jobs)} items")
            except BaseException as exc:  # handed to every waiting request, never lost
                logger.warning("a batch of %d requests failed: %r", len(jobs), exc)
                outcomes = [exc] * len(jobs)
            self._measured((time.perf_counter() - began) / len(jobs))
            for job, outcome in zip(jobs, outcomes, strict=True):
                self._answer(job, outcome)

    def _measured(self, seconds_per_item: float, weight: float = 0.2) -> None:
        previous = self.seconds_per_item
        self.seconds_per_item = previous + weight * (seconds_per_item - previous) if previous else seconds_per_item
