"""One `grpc.aio` server per worker process, on the worker's own event loop: started by the
worker's lifespan after the fork, bound with SO_REUSEPORT so that every worker shares the port
(grpc's examples/python/multiprocessing), drained on SIGTERM like HTTP."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2_grpc

from app.dataplane import DataPlane
from app.protocols.grpc.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from app.protocols.grpc.servicer import InferenceServicer, health_service
from app.repository.control import Repository

logger = logging.getLogger("app")


class GrpcServer:
    """The worker's gRPC server: `start`, then `drain` (safe from a signal handler), then `stop`."""

    def __init__(self, server: grpc.aio.Server, grace_s: float) -> None:
        self.server = server
        self.grace_s = grace_s
        self.loop = asyncio.get_running_loop()
        self.stopping: asyncio.Future[None] | None = None

    @classmethod
    async def start(cls, plane: DataPlane, repository: Repository | None = None) -> GrpcServer:
        """Serve on FASHION_SERVE_HOST:FASHION_SERVE_GRPC_PORT. Messages over max_upload_bytes are
        refused by grpc itself (RESOURCE_EXHAUSTED). Raises RuntimeError if the port cannot be bound."""
        settings = plane.settings
        server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 1),
                ("grpc.max_receive_message_length", settings.max_upload_bytes),
            ]
        )
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane, repository), server)
        health_pb2_grpc.add_HealthServicer_to_server(await health_service(plane.health), server)
        host, port = settings.host, settings.grpc_port
        server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
        await server.start()
        logger.info("serving gRPC (Open Inference Protocol v2, grpc.health.v1) on %s:%d", host, port)
        return cls(server, settings.shutdown_grace_s)

    def drain(self) -> None:
        """Stop taking calls and give those in flight `grace_s` to finish; callable from a signal handler."""
        self.loop.call_soon_threadsafe(self._begin_stop)

    def _begin_stop(self) -> None:
        if self.stopping is None:
            self.stopping = asyncio.ensure_future(self.server.stop(self.grace_s))

    async def stop(self) -> None:
        """Drain (if SIGTERM has not begun it) and wait until the server has stopped."""
        self._begin_stop()
        assert self.stopping is not None
        await self.stopping
