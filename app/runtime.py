"""What the running service holds (the model, the batcher, health, admission) and the one way
into it that every protocol takes: `Runtime.infer`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from app.batching import BatcherClosed
from app.errors import unavailable
from app.observability import Metrics
from app.service import ClassifierService, Pending, Scored
from app.settings import Settings

# Requests whose encoded images are up to this size are decoded on the inference thread,
# batched with the forward pass (one thread hand-off per request); larger ones (photos) are
# decoded in the threadpool first, so a big image never holds up the small ones behind it.
INLINE_DECODE_BYTES = 64 * 1024


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
class Runtime:
    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    health: Health = field(default_factory=Health)
    service: ClassifierService | None = None  # the current model; a reload replaces it whole
    in_flight: int = 0

    def require_model(self) -> ClassifierService:
        """The current model, or a 503 saying why there is none yet."""
        if self.service is None or self.service.batcher is None:
            raise unavailable(self.health.reason)
        return self.service

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Bound the requests in progress: past `max_concurrency`, answer 503 instead of queueing."""
        if self.in_flight >= self.settings.max_concurrency:
            raise unavailable(f"server busy: {self.in_flight} requests in progress; retry shortly")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def infer(self, service: ClassifierService, request: Pending, encoded_bytes: int = 0) -> Scored:
        """Score a request's model input in `service`'s shared batches: the model the request was
        decoded for, even if a reload has replaced it since. A decoder (encoded images) runs on
        the inference thread with its batch when the images are small, else in the threadpool.

        Raises ServeError: the request refused as a whole, not ready, or out of accelerator memory.
        """
        batcher = service.batcher
        if batcher is None:
            raise unavailable(self.health.reason)
        if callable(request) and encoded_bytes > INLINE_DECODE_BYTES:
            request = await run_in_threadpool(request)
        try:
            scored = await batcher.submit(request)
        except BatcherClosed:  # its model was replaced long ago (a reload), or the service is stopping
            raise unavailable("the model was replaced while this request waited; retry") from None
        self.metrics.images_per_request.observe(len(scored.input.names))
        return scored
