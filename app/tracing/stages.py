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

# The request's server span while it is sampled, else None (one lookup, where OpenTelemetry's
# current span takes several calls).
request_span: contextvars.ContextVar[Span | None] = contextvars.ContextVar("fashion_serve_request_span", default=None)


def stage(name: str) -> contextlib.AbstractContextManager[Any]:
    """Time a stage of the current request (`receive`, `encode`) into its server span's attribute
    `fashion_serve.<name>_ms`; nothing when off or untraced."""
    if (span := request_span.get()) is None:
        return _OFF
    return _Stage(span, name)


class _Stage:
    """`stage`'s timer: the attribute is set on exit, whatever the outcome."""

    __slots__ = ("attribute", "span", "started")

    def __init__(self, span: Span, name: str) -> None:
        self.span, self.attribute, self.started = span, f"fashion_serve.{name}_ms", 0

    def __enter__(self) -> None:
        self.started = time.perf_counter_ns()

    def __exit__(self, *exc: object) -> None:
        if self.span.is_recording():  # not ended: a cancelled request's span ends while its batch runs
            self.span.set_attribute(self.attribute, (time.perf_counter_ns() - self.started) / 1e6)


def current() -> Span | None:
    """The request's server span, to carry across the thread hand-off; None when off or untraced."""
    return request_span.get()


def timed(work: Callable[[], T], span: Span | None, name: str = "decode") -> Callable[[], T]:
    """`work`, timed into `span`'s attribute `fashion_serve.<name>_ms` on whatever thread runs it."""
    if span is None:
        return work

    def timing() -> T:
        with _Stage(span, name):
            return work()

    return timing


def queued(spans: Sequence[tuple[Span | None, int]]) -> None:
    """Each traced request's `fashion_serve.queue_ms`: from when it was submitted
    (`time.perf_counter_ns()`) until now, when its batch starts."""
    now = time.perf_counter_ns()
    for span, submitted_ns in spans:
        if span is not None and span.is_recording():  # see `_Stage.__exit__`
            span.set_attribute("fashion_serve.queue_ms", (now - submitted_ns) / 1e6)


class _Batch:
    """A traced batch, open on its inference thread while it runs: its forward passes add up
    here, and on exit every traced request it served gets the batch's figures as attributes."""

    __slots__ = ("forward_ns", "images", "requests", "spans", "token")

    def __init__(self, spans: list[Span], requests: int) -> None:
        self.spans, self.requests, self.forward_ns, self.images = spans, requests, 0, 0
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
        for span in self.spans:
            if span.is_recording():  # see `_Stage.__exit__`
                span.set_attributes(attributes)


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


def batch(spans: Sequence[Span | None]) -> contextlib.AbstractContextManager[Any]:
    """The batch serving these requests' spans (None: untraced), open while it runs. On exit
    each traced request's server span gets the batch's number (`fashion_serve.batch.id`, one
    per process: the requests that shared a batch share it), its request and image counts, and
    `fashion_serve.forward_ms`, its forward passes' time. Attributes, not a span of its own:
    Triton's traces do the same (a request's compute timestamps, no batch span), and a span
    costs the Python SDK far more (docs/performance.md)."""
    traced = [s for s in spans if s is not None]
    if not traced:
        return _OFF
    return _Batch(traced, len(spans))


def forward(images: int) -> contextlib.AbstractContextManager[Any]:
    """One forward pass of the running batch, timed into it; nothing outside a traced batch."""
    if (opened := _batch.get()) is None:
        return _OFF
    return _Forward(opened, images)


def describe(attributes: Mapping[str, Any]) -> None:
    """Attributes for the request's server span: model, version, served form, images, OOD flags."""
    if (span := request_span.get()) is not None:
        span.set_attributes(dict(attributes))
