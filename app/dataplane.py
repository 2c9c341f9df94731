"""The transport-neutral core every protocol calls: which model serves, whether it can, who may
ask, admission, and `infer` into the one micro-batcher. It knows no wire format.

The shape of KServe's and MLServer's `DataPlane`: an adapter (HTTP today) parses its request,
asks `admit` for the model, hands `infer` the decoded input and encodes what comes back; every
refusal is a `ServeError` that the adapter renders in its own shape, in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from app import tracing
from app.batching import BatcherClosed, DeadlineExpired
from app.errors import ServeError, unavailable
from app.observability import Metrics
from app.served_model import Pending, Scored, ServedModel
from app.settings import Settings
from models.trust import out_of_distribution

# Requests whose encoded images are up to this size are decoded on the inference thread,
# batched with the forward pass (one thread hand-off per request); larger ones (photos) are
# decoded in the threadpool first, so a big image never holds up the small ones behind it.
INLINE_DECODE_BYTES = 64 * 1024
UNAUTHORIZED = "missing or invalid API key: send Authorization: Bearer <key>"
# Admission refusals are answered late (`ServeError.hold_s`): a deadline refusal just before the
# deadline, a busy one once the excess work ahead would have drained (at most MAX_HOLD_S).
HOLD_MARGIN_S = 0.1
SOCKET_HOLD_SHARE = 0.5
MAX_HOLD_S = 1.0
TIMEOUT_HEADER = b"x-request-timeout"  # seconds, fractions allowed: the client's deadline over HTTP


def parse_timeout_s(value: bytes | str | None) -> float | None:
    """A client's timeout in seconds (the X-Request-Timeout header): a positive finite number, else 400."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ServeError(400, "X-Request-Timeout must be a positive number of seconds")
    return seconds


@dataclass
class Health:
    """Readiness: a model on its device, a warm-up passed, and not draining."""

    ready: bool = False
    draining: bool = False
    reason: str = "starting: model not loaded yet"

    def mark_ready(self) -> None:
        self.ready, self.reason = True, "ready"

    def start_draining(self, reason: str = "draining: shutting down") -> None:
        self.draining, self.reason = True, reason

    @property
    def is_ready(self) -> bool:
        return self.ready and not self.draining


@dataclass
class DataPlane:
    """What one worker serves and the rules every protocol's request goes through."""

    settings: Settings
    api_key_digests: list[bytes] = field(default_factory=list)  # empty: no keys needed
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=Health)
    model: ServedModel | None = None  # the current model; a reload replaces it whole
    in_flight: int = 0

    # --- questions every protocol asks ---------------------------------------------------------

    def check_ready(self) -> None:
        """The readiness probes' rule: 503 (with the reason) until warmed up, and while draining."""
        if not self.health.is_ready:
            raise unavailable(self.health.reason)

    def current_model(self, name: str | None = None, version: str | None = None) -> ServedModel:
        """The served model, if `name` (and `version`) name it: 404 if not; 503 while none is loaded.

        A draining worker still answers with its model: the request reached it before the
        balancer heard of the drain, and answering is better than failing it.
        """
        settings = self.settings
        if name is not None and name != settings.served_name:
            raise ServeError(404, f"unknown model {name!r}: this server serves {settings.served_name!r}")
        if version is not None and version != settings.model_version:
            raise ServeError(404, f"unknown version {version!r} of model {name!r}: it has {settings.model_version!r}")
        if self.model is None or self.model.batcher is None:
            raise unavailable(self.health.reason)
        return self.model

    def authorize(self, authorization: bytes | None) -> None:
        """401 unless keys are off or `authorization` is `Bearer <a configured key>`. Keys are
        compared as SHA-256 digests, against every configured key, so the time says nothing."""
        if not self.api_key_digests:
            return
        scheme, _, key = (authorization or b"").partition(b" ")
        given = hashlib.sha256(key.strip()).digest()
        matched = False
        for digest in self.api_key_digests:  # no early exit
            matched |= hmac.compare_digest(given, digest)
        if not (scheme.lower() == b"bearer" and matched):
            raise ServeError(401, UNAUTHORIZED, {"WWW-Authenticate": 'Bearer realm="fashion-serve"'})

    def backlogged(self) -> bool:
        """Whether the work admitted would take over half of what a request may wait (the queue
        delay, or the server's deadline): then connections are held back at the socket."""
        batcher = self.model.batcher if self.model is not None else None
        if batcher is None:
            return False
        settings = self.settings
        limit = min(settings.max_queue_delay_s, settings.request_timeout_s or settings.max_queue_delay_s)
        return self.in_flight * batcher.seconds_per_item > limit * SOCKET_HOLD_SHARE

    # --- the inference path ----------------------------------------------------------------------

    def deadline(self, started: float, *client_timeouts_s: float | None) -> float | None:
        """The request's deadline (a `time.monotonic()` value): the earliest of the server's
        default (`request_timeout_s`) and the client's timeouts, counted from `started`."""
        timeouts = [t for t in (self.settings.request_timeout_s, *client_timeouts_s) if t is not None]
        return started + min(timeouts) if timeouts else None

    @contextlib.contextmanager
    def admit(
        self, name: str | None = None, version: str | None = None, deadline: float | None = None
    ) -> Iterator[ServedModel]:
        """The one admission step: the model asked for, and a place in its queue if the work
        already admitted would be done within `max_queue_delay_s` (else 503 at once, which costs
        far less than an answer) and before the request's `deadline` (else 504, never computed).
        Both refusals are held before they are sent (`hold_s`), so that a client that sends again
        at once cannot turn the service into a machine that mostly refuses. The wait is Little's
        law: requests in progress times the inference thread's measured seconds per request.
        `max_concurrency` caps the requests in progress whatever the estimate. Held until the
        answer is computed: the model stays the one the request was admitted to, even across a reload."""
        model = self.current_model(name, version)
        self._check_room(model, deadline)
        self.in_flight += 1
        try:
            yield model
        finally:
            self.in_flight -= 1

    def _check_room(self, model: ServedModel, deadline: float | None) -> None:
        settings = self.settings
        if self.in_flight >= settings.max_concurrency:
            self.metrics.refused.labels("concurrency").inc()
            raise unavailable(f"server busy: {self.in_flight} requests in progress; retry shortly")
        batcher = model.batcher
        wait = self.in_flight * (batcher.seconds_per_item if batcher is not None else 0.0)
        if deadline is not None and (left := deadline - time.monotonic()) <= wait:
            self.metrics.dropped.labels("deadline").inc()
            detail = f"deadline exceeded: about {wait:.2f} s of work ahead, {max(left, 0):.2f} s left; not computed"
            raise ServeError(504, detail, hold_s=max(0.0, left - min(HOLD_MARGIN_S, left / 2)))
        if wait > (most := settings.max_queue_delay_s):
            self.metrics.refused.labels("queue_delay").inc()
            busy = unavailable(f"server busy: about {wait:.2f} s of work ahead, more than {most:g} s; retry shortly")
            busy.hold_s = min(wait - most, MAX_HOLD_S)
            raise busy

    async def infer(
        self, model: ServedModel, request: Pending, encoded_bytes: int = 0, deadline: float | None = None
    ) -> Scored:
        """Score a request's model input in `model`'s shared batches. A decoder (encoded images)
        runs on the inference thread with its batch when the images are small, else in the
        threadpool. Work past its `deadline` is dropped before the forward pass (504).

        Raises ServeError: the request refused as a whole, not ready, past its deadline, or out
        of accelerator memory.
        """
        batcher = model.batcher
        if batcher is None:
            raise unavailable(self.health.reason)
        trace = tracing.current()
        if callable(request):
            request = tracing.in_context(request, trace)
        if callable(request) and encoded_bytes > INLINE_DECODE_BYTES:
            request = await run_in_threadpool(request)
        try:
            if deadline is not None and time.monotonic() >= deadline:
                self.metrics.dropped.labels("deadline").inc()
                raise DeadlineExpired("the request's deadline passed before it reached the model")
            scored = await batcher.submit(request, deadline, trace)
        except BatcherClosed:  # its model was replaced long ago (a reload), or the service is stopping
            raise unavailable("the model was replaced while this request waited; retry") from None
        except DeadlineExpired as exc:
            raise ServeError(504, f"deadline exceeded: {exc}; not computed") from None
        self.metrics.images_per_request.observe(len(scored.input.names))
        self.metrics.count_answers(model.class_names, scored.probabilities, scored.ood_scores, model.ood_threshold)
        if trace is not None:
            tracing.describe(_span_attributes(model, scored))
        return scored


def _span_attributes(model: ServedModel, scored: Scored) -> dict[str, object]:
    """What a request's server span says of its model and answer."""
    flagged = 0
    if scored.ood_scores is not None and model.ood_threshold is not None:
        flagged = int(out_of_distribution(scored.ood_scores, model.ood_threshold).sum())
    return {
        "fashion_serve.model.name": model.name,
        "fashion_serve.model.version": model.settings.model_version,
        "fashion_serve.model.backend": model.forward.name,
        "fashion_serve.model.precision": model.forward.precision,
        "fashion_serve.images": len(scored.input.names),
        "fashion_serve.ood.flagged": flagged,
    }
