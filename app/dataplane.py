"""The transport-neutral core every protocol calls: which model and version serves, whether it
can, who may ask, admission, and inference in that version's micro-batcher. It knows no wire
format, no header and no web framework.

The shape of MLServer's `DataPlane.infer(payload, name, version)`: an adapter turns its wire
request into one `Call` (the caller's key, its timeout, the model and version it names) and a
parser, makes one `DataPlane.run`, and encodes the `Answer`. Everything between, in this order,
is here: authorize, resolve the version, parse (before any queue), deadline, admit, infer,
count, describe the trace, and hold a refusal (`ServeError.hold_s`) before it leaves. Every
refusal is a `ServeError` that the adapter renders in its own shape, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from app import tracing
from app.batching import BatcherClosed, DeadlineExpired
from app.errors import ServeError, unavailable
from app.inference import Answer, Call, Parser
from app.observability import Metrics
from app.repository.registry import READY, Registry, Route, Version
from app.served_model import Pending, Scored, ServedModel
from app.settings import Settings
from app.shadow import Shadows

T = TypeVar("T")

# Requests whose encoded images are up to this size are decoded on the inference thread,
# batched with the forward pass (one thread hand-off per request); larger ones (photos) are
# decoded in the threadpool first, so a big image never holds up the small ones behind it.
INLINE_DECODE_BYTES = 64 * 1024
UNAUTHORIZED = "missing or invalid API key: send Authorization: Bearer <key>"
ADMIN_ONLY = "this needs an admin key (FASHION_SERVE_ADMIN_KEYS): send Authorization: Bearer <admin key>"
NO_ADMIN_KEYS = "the repository API is off: no admin keys are configured (FASHION_SERVE_ADMIN_KEYS)"
# Admission refusals are answered late (`ServeError.hold_s`): a deadline refusal just before the
# deadline, a busy one once the excess work ahead would have drained (at most MAX_HOLD_S).
HOLD_MARGIN_S = 0.1
SOCKET_HOLD_SHARE = 0.5
MAX_HOLD_S = 1.0


@dataclass
class Health:
    """Readiness: a model on its device, a warm-up passed, and not draining."""

    ready: bool = False
    draining: bool = False
    reason: str = "starting: model not loaded yet"
    # Called after every change (from whichever thread made it): gRPC's health service is told.
    listeners: list[Callable[[], None]] = field(default_factory=list)

    def mark_ready(self) -> None:
        self.ready, self.reason = True, "ready"
        self._changed()

    def start_draining(self, reason: str = "draining: shutting down") -> None:
        self.draining, self.reason = True, reason
        self._changed()

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    @property
    def is_ready(self) -> bool:
        return self.ready and not self.draining


@dataclass
class DataPlane:
    """What one worker serves and the rules every protocol's request goes through."""

    settings: Settings
    api_key_digests: list[bytes] = field(default_factory=list)  # empty: no keys needed
    admin_key_digests: list[bytes] = field(default_factory=list)  # empty: the repository API is off
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=Health)
    registry: Registry = field(default_factory=Registry)
    in_flight: int = 0
    shadows: Shadows = field(init=False)

    def __post_init__(self) -> None:
        self.shadows = Shadows(self.metrics.rollout, self.settings.max_queue_delay_s, self.settings.max_batch_size)

    # --- questions every protocol asks ---------------------------------------------------------

    def check_ready(self) -> None:
        """The readiness probes' rule: 503 (with the reason) until warmed up, and while draining."""
        if not self.health.is_ready:
            raise unavailable(self.health.reason)

    @property
    def model(self) -> ServedModel | None:
        """The default model's default version, if one is ready."""
        try:
            return self.registry.resolve(None, None).served
        except ServeError:
            return None

    def serve(self, model: ServedModel) -> ServedModel | None:
        """Serve `model` as its name and version, ready; the model it replaces, if any."""
        previous = self.registry.put(Version(model.name, model.version, model, READY))
        return previous.served if previous is not None else None

    def current_model(self, name: str | None = None, version: str | None = None) -> ServedModel:
        """The version `name` and `version` ask for (None: the defaults): 404 naming what exists
        if unknown; 503 while none is loaded or it cannot answer now.

        A draining worker still answers with its model: the request reached it before the
        balancer heard of the drain, and answering is better than failing it.
        """
        if not self.registry.models:
            raise unavailable(self.health.reason)
        served = self.registry.resolve(name, version).served
        if served is None or served.batcher is None:
            raise unavailable(self.health.reason)
        return served

    def authorize(self, key: bytes | None) -> None:
        """401 unless keys are off or `key` is a configured key."""
        if self.api_key_digests and not _matches(key, self.api_key_digests + self.admin_key_digests):
            raise ServeError(401, UNAUTHORIZED, {"WWW-Authenticate": 'Bearer realm="fashion-serve"'})

    def authorize_admin(self, key: bytes | None) -> None:
        """The repository API's rule: 403 while no admin key is configured; 401 unless `key` is one."""
        if not self.admin_key_digests:
            raise ServeError(403, NO_ADMIN_KEYS)
        if not _matches(key, self.admin_key_digests):
            raise ServeError(401, ADMIN_ONLY, {"WWW-Authenticate": 'Bearer realm="fashion-serve"'})

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

    async def run(self, call: Call, parse: Parser[T]) -> Answer[T]:
        """The one way an inference request goes through the core, for every protocol: authorize,
        route to a version (the model's rollout: canary, shadow), parse (before any queue: a
        malformed request never waits), deadline, admit, infer, count. A refusal is held as its
        `hold_s` says, then raised to be rendered. A shadow run starts after the answer and never
        delays, changes or fails it."""
        started = time.monotonic()
        try:
            self.authorize(call.key)
            route = self._route(call.model, call.version)
            model = route.entry.served
            assert model is not None
            parsed = await parse(model)
            deadline = self.deadline(started, call.timeout_s, parsed.timeout_s)
            with self.admit(route.entry, deadline):
                scored = await self._infer(model, parsed.input, parsed.encoded_bytes, deadline)
        except ServeError as exc:
            if exc.hold_s > 0:
                hold, exc.hold_s = exc.hold_s, 0.0  # held once, here, whoever renders it
                await asyncio.sleep(hold)
            raise
        rollout = self.registry.rollouts.get(model.name) if route.role != "named" else None
        # The default version's figures are what a candidate is compared with: on the same inputs
        # for a shadow (so only the shadowed requests count), on the same traffic for a canary.
        if rollout is not None and (route.role == "canary" or route.shadow is not None or rollout.canary is not None):
            self.metrics.rollout.count((model.name, model.version), route.role, scored, time.monotonic() - started)
        if route.shadow is not None:
            spent = model.batcher.seconds_per_item if model.batcher is not None else 0.0
            self.shadows.offer(route.shadow, scored, self.in_flight * spent)
        return Answer(model, scored, parsed.request)

    def _route(self, name: str | None, version: str | None) -> Route:
        if not self.registry.models:
            raise unavailable(self.health.reason)
        route = self.registry.route(name, version)
        if route.entry.served is None or route.entry.served.batcher is None:
            raise unavailable(self.health.reason)
        return route

    def deadline(self, started: float, *client_timeouts_s: float | None) -> float | None:
        """The request's deadline (a `time.monotonic()` value): the earliest of the server's
        default (`request_timeout_s`) and the client's timeouts, counted from `started`."""
        timeouts = [t for t in (self.settings.request_timeout_s, *client_timeouts_s) if t is not None]
        return started + min(timeouts) if timeouts else None

    @contextlib.contextmanager
    def admit(self, entry: Version, deadline: float | None = None) -> Iterator[ServedModel]:
        """The one admission step: a place in the version's queue if the work already admitted
        would be done within `max_queue_delay_s` (else 503 at once, which costs far less than an
        answer) and before the request's `deadline` (else 504, never computed). Both refusals
        carry a hold (`hold_s`, waited out by `run`), so that a client that sends again at once
        cannot turn the service into a machine that mostly refuses. The wait is Little's law:
        requests in progress times the inference thread's measured seconds per request.
        `max_concurrency` caps the requests in progress whatever the estimate. Held until the
        answer is computed: the version stays the one the request was admitted to, and an
        unload waits for it (`Version.drained`)."""
        assert entry.served is not None
        self._check_room(entry.served, deadline)
        self.in_flight += 1
        entry.enter()
        try:
            yield entry.served
        finally:
            self.in_flight -= 1
            entry.leave()

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

    async def _infer(self, model: ServedModel, request: Pending, encoded_bytes: int, deadline: float | None) -> Scored:
        """Score a request's model input in `model`'s shared batches. A decoder (encoded images)
        runs on the inference thread with its batch when the images are small, else in a
        thread first. Work past its `deadline` is dropped before the forward pass (504)."""
        batcher = model.batcher
        if batcher is None:
            raise unavailable(self.health.reason)
        trace = tracing.current()
        if callable(request):
            request = tracing.timed(request, trace)
        if callable(request) and encoded_bytes > INLINE_DECODE_BYTES:
            request = await asyncio.to_thread(request)
        try:
            if deadline is not None and time.monotonic() >= deadline:
                self.metrics.dropped.labels("deadline").inc()
                raise DeadlineExpired("the request's deadline passed before it reached the model")
            scored = await batcher.submit(request, deadline, trace)
        except BatcherClosed:  # its model was replaced long ago (a reload), or the service is stopping
            raise unavailable("the model was replaced while this request waited; retry") from None
        except DeadlineExpired as exc:
            raise ServeError(504, f"deadline exceeded: {exc}; not computed") from None
        if trace is not None:  # what the request's server span says of its model and answer
            flagged = 0 if scored.flagged is None else int(scored.flagged.sum())
            tracing.describe(
                {
                    "fashion_serve.model.name": model.name,
                    "fashion_serve.model.version": model.version,
                    "fashion_serve.model.served_form": model.form.name,
                    "fashion_serve.model.precision": model.form.precision,
                    "fashion_serve.images": len(scored.input.names),
                    "fashion_serve.ood.flagged": flagged,
                }
            )
        self.metrics.images_per_request.observe(len(scored.input.names))
        self.metrics.count_answers(
            (model.name, model.version), model.class_names, scored.probabilities, scored.ood_scores, scored.flagged
        )
        return scored


def _matches(key: bytes | None, digests: list[bytes]) -> bool:
    """Whether `key` is one of the keys, compared as SHA-256 digests against every one (no early
    exit), so the time says nothing of which or how close."""
    given = hashlib.sha256((key or b"").strip()).digest()
    matched = False
    for digest in digests:
        matched |= hmac.compare_digest(given, digest)
    return matched and key is not None
