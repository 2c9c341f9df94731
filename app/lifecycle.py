"""One worker's life, top to bottom: load and warm up the model, mark ready, serve gRPC beside
HTTP, follow reloads, drain on SIGTERM, stop the inference thread. `lifespan` is what the app
factory hands FastAPI."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from app import tracing
from app.dataplane import DataPlane, Health
from app.decoding import ModelInput
from app.http.backpressure import BACKPRESSURE
from app.logs import configure_logging, stop_holding_logs
from app.reload.snapshot import snapshot_path
from app.reload.worker import follow_snapshot
from app.repository.control import Repository
from app.repository.shared import STATE_DIR_ENV, SharedState
from app.served_model import ServedModel
from models import CheckpointError

if TYPE_CHECKING:
    from app.protocols.grpc.server import GrpcServer

logger = logging.getLogger("app")
# The inference thread runs at a lower CPU priority than the event loop: where the CPUs are
# busy (workers = CPUs, and each worker has both threads), the loop's I/O and health probes
# are scheduled first and the model gets the rest, in bigger batches (docs/performance.md).
INFERENCE_NICE = 10


def lifespan(plane: DataPlane) -> Callable[[Any], contextlib.AbstractAsyncContextManager[None]]:
    """The worker's lifespan: ready once the model is warm; on the way out, drained and stopped."""

    @asynccontextmanager
    async def run(app: Any) -> AsyncIterator[None]:
        configure_logging(plane.settings.log_format, plane.settings.log_level)
        tracing.start()  # after the fork: each worker has its own exporter thread
        repository = open_repository(plane)
        app.state.repository = repository
        follower: asyncio.Task[None] | None = None
        if repository is not None:
            await start_repository(plane, repository)
            follower = asyncio.create_task(repository.follow())
        else:
            await start(plane)
            snapshot = snapshot_path()
            follower = asyncio.create_task(follow_snapshot(plane, snapshot, partial(load, plane))) if snapshot else None
        grpc_server = await start_grpc(plane, repository)
        drain_on_sigterm(plane.health, grpc_server.drain if grpc_server else None)
        try:
            yield
        finally:
            stop_holding_logs()
            plane.health.start_draining()
            if follower:
                follower.cancel()
            if grpc_server:
                await grpc_server.stop()
            await stop(plane)
            if repository is not None:
                repository.shared.unregister(os.getpid())
            tracing.stop()

    return run


def open_repository(plane: DataPlane) -> Repository | None:
    """This worker's side of the model repository, when FASHION_SERVE_MODEL_REPOSITORY is set: in
    the directory the supervisor shares with its workers, or a private one in a lone process."""
    root = plane.settings.model_repository
    if root is None:
        return None
    shared_dir = os.environ.get(STATE_DIR_ENV) or tempfile.mkdtemp(prefix="fashion-serve-repository-")
    shared = SharedState(Path(shared_dir))
    return Repository(plane.registry, plane.settings, plane.metrics.totals, root, shared, partial(load, plane))


async def start_repository(plane: DataPlane, repository: Repository) -> None:
    """Serve the repository's shared state (or make the first one), then ready."""
    if not plane.settings.model_repository or not plane.settings.model_repository.is_dir():
        raise CheckpointError(f"FASHION_SERVE_MODEL_REPOSITORY {plane.settings.model_repository} is not a directory")
    plane.registry.default_model = plane.settings.default_model
    await repository.start()
    gc.collect()
    gc.freeze()
    BACKPRESSURE.busy = plane.backlogged
    plane.health.mark_ready()
    served = [f"{v.model}/{v.version}" for v in plane.registry]
    logger.info("ready: serving %s from %s", ", ".join(served) or "no models", plane.settings.model_repository)


async def load(
    plane: DataPlane,
    source: Path | None,
    name: str | None = None,
    version: str | None = None,
    origin: Path | None = None,
) -> ServedModel:
    """A model loaded, its inference thread started, warmed up through the real path. Loaded in
    asyncio's executor, not anyio's: an anyio worker thread keeps its last result referenced
    until its next job, which kept an unloaded model's memory alive."""
    model = await asyncio.to_thread(
        ServedModel.load, plane.settings, source, _observe(plane), name=name, version=version, origin=origin
    )
    batcher = model.start(nice=INFERENCE_NICE, on_drop=_count_drops(plane))
    side = model.input_size
    await batcher.submit(ModelInput.of(np.zeros((1, 1, side, side), np.float32)))
    return model


async def start(plane: DataPlane) -> None:
    """Load the model (the supervisor's validated snapshot, else the configured path), then ready."""
    try:
        plane.serve(await load(plane, snapshot_path()))
    except CheckpointError as exc:
        logger.critical("cannot start: checkpoint %s: %s", plane.settings.checkpoint, exc)
        raise
    # Everything loaded so far (torch, the model) lives for the whole process: keeping it out
    # of the collector's scans removes the long gen-2 pauses that showed as p99 spikes.
    gc.collect()
    gc.freeze()
    BACKPRESSURE.busy = plane.backlogged
    plane.health.mark_ready()
    logger.info("ready: %s", ", ".join(v.served.summary() for v in plane.registry if v.served))


async def start_grpc(plane: DataPlane, repository: Repository | None = None) -> GrpcServer | None:
    """This worker's gRPC server, unless FASHION_SERVE_GRPC_PORT is 0. grpc is imported here, in
    the worker after the fork, never in the supervisor: grpc is not fork-safe."""
    if not plane.settings.grpc_port:
        return None
    from app.protocols.grpc.server import GrpcServer

    return await GrpcServer.start(plane, repository)


async def stop(plane: DataPlane) -> None:
    """End the inference thread; uvicorn has already drained the connections within the grace period."""
    for version in list(plane.registry):
        model = version.served
        if model is not None and model.batcher is not None:
            model.batcher.close()
            await run_in_threadpool(model.batcher.join, 1.0)


def drain_on_sigterm(health: Health, also: Callable[[], None] | None = None) -> None:
    """Turn readiness off the moment SIGTERM arrives, call `also` (the gRPC server's drain), then
    let the server's own handler run."""
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:
        return
    if not callable(previous):
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        health.start_draining("draining: SIGTERM received")
        stop_holding_logs()  # the worker may end with this signal, re-raised: no exit handler runs
        logger.info("SIGTERM: readiness off, finishing requests in progress")
        if also is not None:
            also()
        previous(signum, frame)

    with contextlib.suppress(ValueError):  # not the main thread (e.g. under TestClient): no signals
        signal.signal(signal.SIGTERM, handler)


def _count_drops(plane: DataPlane) -> Callable[[str, int], None]:
    def on_drop(reason: str, count: int) -> None:
        plane.metrics.dropped.labels(reason).inc(count)

    return on_drop


def _observe(plane: DataPlane) -> Callable[[int, float], None]:
    def on_batch(rows: int, seconds: float) -> None:
        plane.metrics.batch_size.observe(rows)
        plane.metrics.inference_latency.observe(seconds)

    return on_batch
