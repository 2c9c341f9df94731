"""One worker process: the object that owns its parts (the data plane, the model repository or the
reload follower, the gRPC server, tracing, the socket back-pressure) and runs its life, top to
bottom: load and warm up the model, mark ready, serve gRPC beside HTTP, follow reloads, drain on
SIGTERM, stop the inference thread. The app factory makes one `Worker` and hands FastAPI its
`lifespan`; under `python -m app` the supervisor makes the app, so each forked worker process
starts with its own copy, configured by what the supervisor passed in (`Handoff`)."""

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
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from app import tracing
from app.dataplane import DataPlane
from app.decoding import ModelInput
from app.http.backpressure import Backpressure
from app.http.protocol import ServiceProtocol, service_protocol
from app.logs import configure_logging, stop_holding_logs
from app.reload.worker import follow_snapshot
from app.repository.control import Repository
from app.repository.shared import SharedState
from app.served_model import ServedModel
from models import CheckpointError

if TYPE_CHECKING:
    from app.protocols.grpc.server import GrpcServer

logger = logging.getLogger("app")
# The inference thread runs at a lower CPU priority than the event loop: where the CPUs are
# busy (workers = CPUs, and each worker has both threads), the loop's I/O and health probes
# are scheduled first and the model gets the rest, in bigger batches (docs/performance.md).
INFERENCE_NICE = 10


@dataclass(frozen=True)
class Handoff:
    """What a supervisor gives its workers, beside the settings; empty for a lone process."""

    snapshot: Path | None = None  # the validated copy of the checkpoint to serve (app/reload)
    repository_state: Path | None = None  # the model repository's state, shared by the workers


class Worker:
    """One worker's parts, each made here from explicit configuration, and its life (`lifespan`)."""

    def __init__(self, plane: DataPlane, handoff: Handoff | None = None) -> None:
        self.plane = plane
        self.settings = plane.settings
        self.handoff = handoff or Handoff()
        self.backpressure = Backpressure()  # holds nothing until ready (`busy` unset)
        self.repository: Repository | None = None
        self.grpc: GrpcServer | None = None
        self._follower: asyncio.Task[None] | None = None

    def http_protocol(self) -> type[ServiceProtocol]:
        """The HTTP protocol class uvicorn runs for this worker: its head limits and its hold."""
        return service_protocol(self.settings.max_header_bytes, self.settings.header_timeout_s, self.backpressure)

    @asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """Ready once the model is warm; on the way out, drained and stopped."""
        configure_logging(self.settings.log_format, self.settings.log_level)  # a no-op if the supervisor did
        tracing.start()  # after the fork: each worker has its own exporter thread
        try:
            await self._start()
            drain_on_sigterm(self.plane, self.grpc.drain if self.grpc else None)
            yield
        finally:
            await self._stop()

    async def _start(self) -> None:
        self.repository = self._open_repository()
        if self.repository is not None:
            await self._start_repository(self.repository)
            self._follower = asyncio.create_task(self.repository.follow())
        else:
            snapshot = self.handoff.snapshot
            seen = os.stat(snapshot) if snapshot is not None else None  # before the load (follow_snapshot)
            await self._start_model()
            if snapshot is not None and seen is not None:
                self._follower = asyncio.create_task(follow_snapshot(self.plane, snapshot, self.load, seen))
        if self.settings.grpc_port:
            # grpc is imported here, in the worker after the fork, never in the supervisor: grpc
            # is not fork-safe.
            from app.protocols.grpc.server import GrpcServer

            self.grpc = await GrpcServer.start(self.plane, self.repository)

    async def _stop(self) -> None:
        stop_holding_logs()
        self.plane.health.start_draining()
        if self._follower:
            self._follower.cancel()
        if self.grpc:
            await self.grpc.stop()
        await self._stop_inference()
        if self.repository is not None:
            self.repository.shared.unregister(os.getpid())
        tracing.stop()

    def _open_repository(self) -> Repository | None:
        """This worker's side of the model repository, when one is configured: in the directory
        the supervisor shares with its workers, or a private one in a lone process."""
        root = self.settings.model_repository
        if root is None:
            return None
        if not root.is_dir():
            raise CheckpointError(f"FASHION_SERVE_MODEL_REPOSITORY {root} is not a directory")
        state = self.handoff.repository_state or Path(tempfile.mkdtemp(prefix="fashion-serve-repository-"))
        plane = self.plane
        return Repository(plane.registry, self.settings, plane.metrics.totals, root, SharedState(state), self.load)

    async def _start_repository(self, repository: Repository) -> None:
        """Serve the repository's shared state (or make the first one), then ready."""
        self.plane.registry.default_model = self.settings.default_model
        await repository.start()
        self._ready()
        served = [f"{v.model}/{v.version}" for v in self.plane.registry]
        logger.info("ready: serving %s from %s", ", ".join(served) or "no models", self.settings.model_repository)

    async def _start_model(self) -> None:
        """Load the model (the supervisor's validated snapshot, else the configured path), then ready."""
        try:
            self.plane.serve(await self.load(self.handoff.snapshot))
        except CheckpointError as exc:
            logger.critical("cannot start: checkpoint %s: %s", self.settings.checkpoint, exc)
            raise
        self._ready()
        logger.info("ready: %s", ", ".join(v.served.summary() for v in self.plane.registry if v.served))

    def _ready(self) -> None:
        # Everything loaded so far (torch, the model) lives for the whole process: keeping it out
        # of the collector's scans removes the long gen-2 pauses that showed as p99 spikes.
        gc.collect()
        gc.freeze()
        self.backpressure.busy = self.plane.backlogged
        self.plane.health.mark_ready()

    async def load(
        self, source: Path | None, name: str | None = None, version: str | None = None, origin: Path | None = None
    ) -> ServedModel:
        """A model loaded, its inference thread started, warmed up through the real path. Loaded in
        asyncio's executor, not anyio's: an anyio worker thread keeps its last result referenced
        until its next job, which kept an unloaded model's memory alive."""
        plane = self.plane
        model = await asyncio.to_thread(
            ServedModel.load, self.settings, source, _observe(plane), name=name, version=version, origin=origin
        )
        batcher = model.start(nice=INFERENCE_NICE, on_drop=_count_drops(plane))
        side = model.input_size
        await batcher.submit(ModelInput.of(np.zeros((1, 1, side, side), np.float32)))
        return model

    async def _stop_inference(self) -> None:
        """End the inference threads; uvicorn has already drained the connections within the grace period."""
        for version in list(self.plane.registry):
            model = version.served
            if model is not None and model.batcher is not None:
                model.batcher.close()
                await run_in_threadpool(model.batcher.join, 1.0)


def drain_on_sigterm(plane: DataPlane, also: Callable[[], None] | None = None) -> None:
    """Turn readiness off the moment SIGTERM arrives, call `also` (the gRPC server's drain), then
    let the server's own handler run."""
    try:
        previous = signal.getsignal(signal.SIGTERM)
    except ValueError:
        return
    if not callable(previous):
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        plane.health.start_draining("draining: SIGTERM received")
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
