"""What the running service holds: the model, the batcher, health and admission state."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from fastapi import HTTPException

from app.batching import MicroBatcher
from app.observability import Metrics
from app.service import Answer, ClassifierService
from app.settings import Settings
from app.upload import DecodedRequest, Upload


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
    service: ClassifierService | None = None
    batcher: MicroBatcher[Upload | DecodedRequest, Answer] | None = None
    in_flight: int = 0

    def require_model(self) -> tuple[ClassifierService, MicroBatcher[Upload | DecodedRequest, Answer]]:
        if self.service is None or self.batcher is None:
            raise HTTPException(503, detail=self.health.reason, headers={"Retry-After": "1"})
        return self.service, self.batcher

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Bound the requests in progress: past `max_concurrency`, answer 503 instead of queueing."""
        if self.in_flight >= self.settings.max_concurrency:
            raise HTTPException(
                503,
                detail=f"server busy: {self.in_flight} requests in progress; retry shortly",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
