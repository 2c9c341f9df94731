"""Holding work back at the socket: while a worker's queue is long, a connection whose inference
request was just answered is not read again until the queue has room, or for at most `max_hold_s`
(0.4 s: long enough to take a burst's excess off the event loop, short enough that a request held
there is still answered within a second; docs/performance.md has the measurements).

A closed-loop client sends its next request as soon as it is answered; under a burst, reading
and refusing that request costs the event loop almost what answering costs. Not reading it costs
nothing: it waits in the kernel's socket buffer. The connections held are resumed in the order
they were held, a few per tick, once the queue is short again (`busy` turns false), and each
after `max_hold_s` at the latest, so that admission (`app.dataplane.DataPlane.admit`) still
answers it in time. Probes and other routes are never held: only inference answers arm a hold.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.paths import is_inference_path

TICK_S = 0.005
RESUME_PER_TICK = 16  # connections resumed per tick while the queue has room


class Backpressure:
    """One worker's held connections, and the rule that holds them (`busy`, set once the worker is
    ready: `app.worker.Worker`)."""

    def __init__(self, max_hold_s: float = 0.4) -> None:
        self.busy: Callable[[], bool] | None = None
        self.max_hold_s = max_hold_s
        self.held: deque[tuple[float, Callable[[], None]]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def hold(self, loop: asyncio.AbstractEventLoop, resume: Callable[[], None]) -> bool:
        """Whether to stop reading a connection now; if so, `resume` is called later, once."""
        if self.busy is None or not self.busy():
            return False
        self.held.append((time.monotonic() + self.max_hold_s, resume))
        if self._timer is None:
            self._timer = loop.call_later(TICK_S, self._tick, loop)
        return True

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = time.monotonic()
        room = self.busy is None or not self.busy()
        resumed = 0
        while self.held and (self.held[0][0] <= now or (room and resumed < RESUME_PER_TICK)):
            self.held.popleft()[1]()
            resumed += 1
        if self.held:
            self._timer = loop.call_later(TICK_S, self._tick, loop)


class HeldAfterAnswerProtocol(HttpToolsProtocol):
    """HttpToolsProtocol that, once an inference request is answered while the worker is busy,
    stops reading the connection until its worker's `backpressure` resumes it (no pipelined
    request waiting, no head being refused on it). Without one (a class made for another app),
    nothing is held."""

    backpressure: Backpressure | None = None  # set on the class the worker makes (`service_protocol`)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if (
            self.cycle is not None
            and not self.pipeline
            and not self.transport.is_closing()
            and not getattr(self, "refusing", False)
            and is_inference_path(self.cycle.scope["path"])
            and self.backpressure is not None
            and self.backpressure.hold(self.loop, self._resume_reading)
        ):
            self.flow.pause_reading()  # the next request waits in the socket while the queue is long

    def _resume_reading(self) -> None:
        if not self.transport.is_closing():
            self.flow.resume_reading()
