"""The per-request hooks of tracing: a traced request's stages timed into attributes of its
server span, and its batch's figures (what `app.tracing` documents). Each reads the request's
span from one ContextVar, set by `app.tracing` while the request is sampled: a request that is
not (tracing off, or the sampler left it out) costs each hook one lookup."""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from opentelemetry.trace import Span

T = TypeVar("T")
_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()  # what every hook returns while untraced


class Traced:
    """A sampled request: its server span, and the attributes its stages and its batch gather,
    set on the span in one call when it ends (each SDK call takes the span's lock and checks every
    value: one call for all costs less than one per stage). What arrives after `end` (a cancelled
    request's batch, still running) goes to a dictionary no one reads."""

    __slots__ = ("attributes", "span")

    def __init__(self, span: Span) -> None:
        self.span, self.attributes = span, dict[str, Any]()

    def end(self) -> None:
        gathered, self.attributes = self.attributes.copy(), {}  # copy: atomic against a late writer
        self.span.set_attributes(gathered)
        self.span.end()


# The request while it is sampled, else None (one lookup, where OpenTelemetry's current span
# takes several calls).
request_span: contextvars.ContextVar[Traced | None] = contextvars.ContextVar("fashion_serve_request", default=None)


def stage(name: str) -> contextlib.AbstractContextManager[Any]:
    """Time a stage of the current request (`receive`, `encode`) into its server span's attribute
    `fashion_serve.<name>_ms`; nothing when off or untraced."""
    if (traced := request_span.get()) is None:
        return _OFF
    return _Stage(traced, name)


class _Stage:
    """`stage`'s timer: the attribute is set on exit, whatever the outcome."""

    __slots__ = ("attribute", "started", "traced")

    def __init__(self, traced: Traced, name: str) -> None:
        self.traced, self.attribute, self.started = traced, f"fashion_serve.{name}_ms", 0

    def __enter__(self) -> None:
        self.started = time.perf_counter_ns()

    def __exit__(self, *exc: object) -> None:
        self.traced.attributes[self.attribute] = (time.perf_counter_ns() - self.started) / 1e6


def current() -> Traced | None:
    """The sampled request, to carry across the thread hand-off; None when off or untraced."""
    return request_span.get()


def timed(work: Callable[[], T], traced: Traced | None, name: str = "decode") -> Callable[[], T]:
    """`work`, timed into the request's attribute `fashion_serve.<name>_ms` on whatever thread runs it."""
    if traced is None:
        return work

    def timing() -> T:
        with _Stage(traced, name):
            return work()

    return timing


def queued(requests: Sequence[tuple[Traced | None, int]]) -> None:
    """Each traced request's `fashion_serve.queue_ms`: from when it was submitted
    (`time.perf_counter_ns()`) until now, when its batch starts."""
    now = time.perf_counter_ns()
    for traced, submitted_ns in requests:
        if traced is not None:
            traced.attributes["fashion_serve.queue_ms"] = (now - submitted_ns) / 1e6


class _Batch:
    """A traced batch, open on its inference thread while it runs: its forward passes add up
    here, and on exit every traced request it served gets the batch's figures as attributes."""

    __slots__ = ("forward_ns", "images", "requests", "token", "traced")

    def __init__(self, traced: list[Traced], requests: int) -> None:
        self.traced, self.requests, self.forward_ns, self.images = traced, requests, 0, 0
        self.token: contextvars.Token[_Batch | None] | None = None

    def __enter__(self) -> _Batch:
        self.token = _batch.set(self)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.token is not None
        _batch.reset(self.token)
        attributes = {
            "fashion_serve.batch.id": next(_batch_ids),
            "fashion_serve.batch.requests": self.requests,
            "fashion_serve.batch.images": self.images,
            "fashion_serve.forward_ms": self.forward_ns / 1e6,
        }
        for traced in self.traced:
            traced.attributes.update(attributes)


class _Forward:
    """`forward`'s timer: one pass's images and duration, added to its batch on exit."""

    __slots__ = ("batch", "images", "started")

    def __init__(self, batch: _Batch, images: int) -> None:
        self.batch, self.images, self.started = batch, images, 0

    def __enter__(self) -> None:
        self.started = time.perf_counter_ns()

    def __exit__(self, *exc: object) -> None:
        self.batch.forward_ns += time.perf_counter_ns() - self.started
        self.batch.images += self.images


# The batch the inference thread is running, while it serves a traced request (ContextVars are
# per thread: each model's inference thread has its own).
_batch: contextvars.ContextVar[_Batch | None] = contextvars.ContextVar("fashion_serve_batch", default=None)
_batch_ids = itertools.count(1)  # numbers this process's traced batches (next() is atomic in CPython)


def batch(requests: Sequence[Traced | None]) -> contextlib.AbstractContextManager[Any]:
    """The batch serving these requests (None: untraced), open while it runs. On exit
    each traced request's server span gets the batch's number (`fashion_serve.batch.id`, one
    per process: the requests that shared a batch share it), its request and image counts, and
    `fashion_serve.forward_ms`, its forward passes' time. Attributes, not a span of its own:
    Triton's traces do the same (a request's compute timestamps, no batch span), and a span
    costs the Python SDK far more (docs/performance.md)."""
    traced = [r for r in requests if r is not None]
    if not traced:
        return _OFF
    return _Batch(traced, len(requests))


def forward(images: int) -> contextlib.AbstractContextManager[Any]:
    """One forward pass of the running batch, timed into it; nothing outside a traced batch."""
    if (opened := _batch.get()) is None:
        return _OFF
    return _Forward(opened, images)


def describe(attributes: Mapping[str, Any]) -> None:
    """Attributes for the request's server span: model, version, served form, images, OOD flags."""
    if (traced := request_span.get()) is not None:
        traced.attributes.update(attributes)
