"""The FastAPI application: `create_app(settings)` builds it; `app` is what uvicorn serves."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import URL
from starlette.responses import RedirectResponse
from starlette.routing import Route, get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from app.auth import ApiKeyGuard, load_api_keys
from app.decoding import ModelInput
from app.errors import ServeError
from app.middleware import RequestContextMiddleware
from app.observability import configure_logging
from app.protocols import explain, predict, v2
from app.reload import ModelCollector, snapshot_path
from app.routes import docs, health, metrics, model, page
from app.routes.docs import STATIC_DIR
from app.runtime import Health, Runtime
from app.service import ClassifierService
from app.settings import Settings
from models import CheckpointError

logger = logging.getLogger("app")
# The inference thread runs at a lower CPU priority than the event loop: where the CPUs are
# busy (workers = CPUs, and each worker has both threads), the loop's I/O and health probes
# are scheduled first and the model gets the rest, in bigger batches (measured: see
# docs/performance.md).
INFERENCE_NICE = 10
SNAPSHOT_POLL_S = 0.5  # how often a worker looks for a reloaded model (one stat of a tmpfs file)


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


async def _load(runtime: Runtime, source: Path | None) -> ClassifierService:
    """A model loaded, its inference thread started, warmed up through the real path."""
    service = await run_in_threadpool(ClassifierService.load, runtime.settings, source, _observe(runtime))
    batcher = service.start(nice=INFERENCE_NICE)
    side = service.input_size
    await batcher.submit(ModelInput.of(np.zeros((1, 1, side, side), np.float32)))
    return service


def _describe(service: ClassifierService) -> str:
    return f"{service.name} ({service.loaded.arch}, {service.checkpoint.sha256[:12]}) on {service.device}"


async def _start(runtime: Runtime) -> None:
    settings = runtime.settings
    try:
        runtime.service = await _load(runtime, snapshot_path())
    except CheckpointError as exc:
        logger.critical("cannot start: checkpoint %s: %s", settings.checkpoint, exc)
        raise
    # Everything loaded so far (torch, the model) lives for the whole process: keeping it out
    # of the collector's scans removes the long gen-2 pauses that showed as p99 spikes.
    gc.collect()
    gc.freeze()
    runtime.health.mark_ready()
    logger.info("ready: %s", _describe(runtime.service))


async def _follow_snapshot(runtime: Runtime, snapshot: Path) -> None:
    """Swap in the supervisor's new snapshot when it appears (a validated reload): loaded and
    warmed up beside the current model, which keeps serving until the swap. Requests already
    holding the old model finish on it; its inference thread stops once none can be left."""
    seen = os.stat(snapshot)
    retiring: set[asyncio.Task[None]] = set()  # kept referenced until done
    while True:
        await asyncio.sleep(SNAPSHOT_POLL_S)
        try:
            now = os.stat(snapshot)
        except FileNotFoundError:  # the supervisor is exiting
            continue
        if (now.st_ino, now.st_mtime_ns) == (seen.st_ino, seen.st_mtime_ns):
            continue
        seen = now
        try:
            service = await _load(runtime, snapshot)
        except Exception as exc:  # validated by the supervisor, so unexpected: keep serving the old one
            logger.error("reload: the new model did not load in this worker, keeping the old one: %r", exc)
            continue
        old, runtime.service = runtime.service, service
        logger.info("reloaded: now serving %s", _describe(service))
        if old is not None:
            retiring.add(asyncio.create_task(_retire(old, runtime.settings.body_timeout_s + 5)))
            retiring = {task for task in retiring if not task.done()}
        del old, service  # _retire holds the old model now, and lets it go


async def _retire(old: ClassifierService, delay: float) -> None:
    """End a replaced model's inference thread once no request can still reach it (one admitted
    before the swap has at most body_timeout_s to send its body), and let it be freed."""
    await asyncio.sleep(delay)
    # Dropping the batcher breaks the service <-> batcher (run_batch) cycle, so reference counting
    # frees the model: the collector never would, as start-up froze it (gc.freeze; found in review).
    batcher, old.batcher = old.batcher, None
    if batcher is not None:
        batcher.close()
        await run_in_threadpool(batcher.join, 5.0)


def _observe(runtime: Runtime) -> Callable[[int, float], None]:
    def on_batch(rows: int, seconds: float) -> None:
        runtime.metrics.batch_size.observe(rows)
        runtime.metrics.inference_latency.observe(seconds)

    return on_batch


class FastRoutes:
    """Route HTTP requests for `routes` (plain ASGI endpoints) to them; everything else to `rest`.

    Starlette's own Router does the same but cost the hot path measurably more per request
    (docs/performance.md); this keeps its semantics that matter here: `scope["route"]` and
    `path_params` set, and `/predict/` redirected to `/predict`.
    """

    def __init__(self, routes: list[Route], rest: ASGIApp) -> None:
        self.routes = [(route, route.path_regex.match) for route in routes]
        self.rest = rest

    def _match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        for route, match in self.routes:
            found = match(path)
            if found:
                return route, found.groupdict()
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = get_route_path(scope)
            matched = self._match(path)
            if matched:
                scope["route"], scope["path_params"] = matched
                await matched[0].app(scope, receive, send)
                return
            if path.endswith("/") and self._match(path.rstrip("/")):
                url = URL(scope=scope)
                await RedirectResponse(url.replace(path=url.path.rstrip("/")))(scope, receive, send)
                return
        await self.rest(scope, receive, send)


class ServiceApp(FastAPI):
    """FastAPI with one change to how requests flow: request context (id, metrics, access log)
    wraps everything, and the inference endpoints (`fast_routes`, the hot paths) are routed
    and answered as plain ASGI before FastAPI's exception middleware and router. Every other
    path is ordinary FastAPI.

    So middleware, exception handlers and dependency overrides added to this app do not
    apply to the fast routes; a layer every request must pass (auth, rate limits) belongs in
    front of them, in `build_middleware_stack` below.
    """

    def __init__(self, runtime: Runtime, fast_routes: list[Route], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state.runtime = runtime
        self.fast_routes = fast_routes
        self.api_key_digests = load_api_keys(runtime.settings)  # empty: no keys needed

    def build_middleware_stack(self) -> ASGIApp:
        rest = super().build_middleware_stack()
        routed: ASGIApp = FastRoutes(self.fast_routes, rest)
        if self.api_key_digests:
            routed = ApiKeyGuard(routed, self.api_key_digests)
        return RequestContextMiddleware(routed, metrics=self.state.runtime.metrics)

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is None:
            self.openapi_schema = v2.openapi(predict.openapi(super().openapi()))
        return self.openapi_schema


async def _serve_error(request: Request, exc: Exception) -> Response:
    """ServeError from a FastAPI route: FastAPI's `{"detail": ...}` body (v2 routes answer their own)."""
    assert isinstance(exc, ServeError)
    return JSONResponse({"detail": exc.detail}, exc.status, exc.headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the service; the model loads when the app starts (its lifespan), never at import."""
    settings = settings or Settings()
    runtime = Runtime(settings)
    runtime.metrics.add_live(ModelCollector(runtime))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(settings.log_format, settings.log_level)
        await _start(runtime)
        _drain_on_sigterm(runtime.health)
        snapshot = snapshot_path()
        follower = asyncio.create_task(_follow_snapshot(runtime, snapshot)) if snapshot else None
        try:
            yield
        finally:
            runtime.health.start_draining()
            if follower:
                follower.cancel()
            if runtime.service is not None and runtime.service.batcher is not None:
                # uvicorn has already drained the connections within the grace period.
                runtime.service.batcher.close()
                await run_in_threadpool(runtime.service.batcher.join, 1.0)

    infer = v2.V2InferEndpoint(runtime)
    fast_routes = [
        Route("/predict", predict.PredictEndpoint(runtime)),
        Route("/v2/models/{model}/infer", infer),
        Route("/v2/models/{model}/versions/{version}/infer", infer),
    ]
    app = ServiceApp(
        runtime,
        fast_routes,
        title="fashion-serve",
        summary="Fashion-MNIST image classification over HTTP",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
    )
    app.add_exception_handler(ServeError, _serve_error)
    for router in (model.router, health.router, metrics.router, docs.router, v2.router, explain.router, page.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


app = create_app()
