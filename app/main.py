"""The FastAPI application: `create_app(settings)` builds it; `app` is what uvicorn serves."""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from app.batching import MicroBatcher
from app.middleware import RequestContextMiddleware, route_path
from app.observability import configure_logging
from app.routes import docs, health, metrics, model, predict
from app.routes.docs import STATIC_DIR
from app.runtime import Health, Runtime
from app.service import Answer, ClassifierService
from app.settings import Settings
from app.upload import DecodedRequest, Upload
from models import CheckpointError

logger = logging.getLogger("app")
# The inference thread runs at a lower CPU priority than the event loop: where the CPUs are
# busy (workers = CPUs, and each worker has both threads), the loop's I/O and health probes
# are scheduled first and the model gets the rest, in bigger batches. Measured on 2 cores,
# c=32: /health/live p99 4.6-5.3 ms -> 4.0-4.3 ms, same throughput (docs/performance.md).
INFERENCE_NICE = 10


def _drain_on_sigterm(health: Health) -> None:
    """Turn readiness off the moment SIGTERM arrives, then let the server's own handler run."""
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:
        return
    if not callable(previous):
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        health.start_draining("draining: SIGTERM received")
        logger.info("SIGTERM: readiness off, finishing requests in progress")
        previous(signum, frame)

    with contextlib.suppress(ValueError):  # not the main thread (e.g. under TestClient): no signals
        signal.signal(signal.SIGTERM, handler)


async def _start(runtime: Runtime) -> None:
    settings = runtime.settings
    try:
        service = await run_in_threadpool(ClassifierService.load, settings, _observe(runtime))
    except CheckpointError as exc:
        logger.critical("cannot start: checkpoint %s: %s", settings.checkpoint, exc)
        raise
    batcher: MicroBatcher[Upload | DecodedRequest, Answer] = MicroBatcher(
        service.run_batch, settings.max_batch_size, settings.max_batch_wait_ms / 1000, nice=INFERENCE_NICE
    )
    batcher.start()
    runtime.service, runtime.batcher = service, batcher
    blank = DecodedRequest([None], np.zeros((1, 1, 28, 28), np.float32), {})
    await batcher.submit(blank)  # warm-up through the real path
    runtime.metrics.model_info.labels(
        service.name, service.loaded.arch, service.checkpoint.sha256, str(service.loaded.device)
    ).set(1)
    # Everything loaded so far (torch, the model) lives for the whole process: keeping it out
    # of the collector's scans removes the long gen-2 pauses that showed as p99 spikes.
    gc.collect()
    gc.freeze()
    runtime.health.mark_ready()
    logger.info(
        "ready: %s (%s, %s) on %s",
        service.name,
        service.loaded.arch,
        service.checkpoint.sha256[:12],
        service.loaded.device,
    )


def _observe(runtime: Runtime) -> Callable[[int, float], None]:
    def on_batch(rows: int, seconds: float) -> None:
        runtime.metrics.batch_size.observe(rows)
        runtime.metrics.inference_latency.observe(seconds)

    return on_batch


class ServiceApp(FastAPI):
    """FastAPI with one change to how requests flow: request context (id, metrics, access log)
    wraps everything, and `/predict`, the hot path, is answered by its plain ASGI endpoint
    before FastAPI's exception middleware and router. Every other path is ordinary FastAPI.

    So middleware, exception handlers and dependency overrides added to this app do not
    apply to `/predict`; a layer every request must pass (auth, rate limits) belongs in
    front of it, or in `build_middleware_stack` below.
    """

    def __init__(self, runtime: Runtime, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state.runtime = runtime
        self.predict = predict.PredictEndpoint(runtime)
        # The router knows the path too: `/predict/` gets FastAPI's redirect to `/predict`.
        self.router.routes.append(Route("/predict", self.predict, methods=["POST"], include_in_schema=False))

    def build_middleware_stack(self) -> ASGIApp:
        rest = super().build_middleware_stack()
        predict_endpoint = self.predict

        async def route(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and route_path(scope) == "/predict":
                await predict_endpoint(scope, receive, send)
            else:
                await rest(scope, receive, send)

        known_paths = frozenset(r.path for r in self.routes if isinstance(r, Route))
        return RequestContextMiddleware(route, metrics=self.state.runtime.metrics, routes=known_paths)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = predict.openapi(super().openapi())
        return self.openapi_schema


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; the model loads when the app starts (its lifespan), never at import."""
    settings = settings or Settings()
    runtime = Runtime(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format, settings.log_level)
        await _start(runtime)
        _drain_on_sigterm(runtime.health)
        try:
            yield
        finally:
            runtime.health.start_draining()
            if runtime.batcher is not None:
                # uvicorn has already drained the connections within the grace period.
                await run_in_threadpool(runtime.batcher.stop, 1.0)

    app = ServiceApp(
        runtime,
        title="fashion-serve",
        summary="Fashion-MNIST image classification over HTTP",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    for router in (model.router, health.router, metrics.router, docs.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


app = create_app()
