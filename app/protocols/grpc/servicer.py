"""The RPCs of `inference.GRPCInferenceService` over the data plane, and `grpc.health.v1.Health`
following readiness. Each RPC runs through `_Call`: request id, API key, status code, metrics, log."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from app import __version__, tracing
from app.auth import bearer_key
from app.dataplane import DataPlane, Health
from app.errors import ServeError
from app.http.middleware import VALID_REQUEST_ID, RefusalLog
from app.logs import request_id_var
from app.protocols.grpc.infer import model_infer
from app.protocols.grpc.proto import grpc_predict_v2_pb2 as pb
from app.protocols.grpc.proto import grpc_predict_v2_pb2_grpc as pb_grpc
from app.protocols.grpc.status import status_code
from app.protocols.v2.metadata import describe_server, model_config, model_metadata, model_ready
from app.protocols.v2.repository import index_rows
from app.repository.control import Repository
from app.repository.layout import check_name

logger = logging.getLogger("app.access")
SERVICE = "inference.GRPCInferenceService"
METHOD = "GRPC"  # the `method` label of fashion_serve_requests_total for gRPC calls

Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[Any]]
H = TypeVar("H", bound=Handler)


def rpc(keyed: bool = True) -> Callable[[H], H]:
    """An RPC handler run through `InferenceServicer.call`; `keyed`: it needs an API key when keys are set."""

    def wrap(method: H) -> H:
        @functools.wraps(method)
        async def handle(self: InferenceServicer, request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await self.call(method.__name__, keyed, method, request, context)

        return handle  # type: ignore[return-value]

    return wrap


def _key(context: grpc.aio.ServicerContext) -> bytes | None:
    """The API key of the call's `authorization: Bearer <key>` metadata."""
    authorization = _metadata(context, "authorization")
    return bearer_key(authorization.encode("latin-1") if authorization is not None else None)


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str | None:
    for item in context.invocation_metadata() or ():
        if item[0] == key and isinstance(item[1], str):
            return item[1]
    return None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Every RPC asks the data plane: the current model each call, so reloads serve gRPC too."""

    def __init__(self, plane: DataPlane, repository: Repository | None = None) -> None:
        self.plane = plane
        self.repository = repository
        self.refusals = RefusalLog()

    async def call(
        self, name: str, keyed: bool, method: Handler, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        """One RPC: its request id (the x-request-id metadata if plain, else a new one, sent back in
        the trailing metadata), the key check, ServeError -> status code, and the metrics and log line."""
        started = time.perf_counter()
        incoming = _metadata(context, "x-request-id") or ""
        request_id = incoming if VALID_REQUEST_ID.fullmatch(incoming) else os.urandom(16).hex()
        token = request_id_var.set(request_id)
        trailing = (("x-request-id", request_id),)
        code = grpc.StatusCode.OK
        try:
            if keyed:
                self.plane.authorize(_key(context))
            response = await method(self, request, context)
            context.set_trailing_metadata(trailing)
            return response
        except ServeError as exc:
            code = status_code(exc)
            await context.abort(code, exc.message, trailing)
        except asyncio.CancelledError:  # the client went away, or the server is stopping
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            if context.code() is not None:  # already aborted
                raise
            code = grpc.StatusCode.INTERNAL
            logger.exception("gRPC %s failed", name)
            await context.abort(code, "internal error", trailing)
        finally:
            self._account(name, code, time.perf_counter() - started)
            request_id_var.reset(token)

    def _account(self, name: str, code: grpc.StatusCode, seconds: float) -> None:
        self.plane.metrics.count_request(name, METHOD, code.name, seconds)
        if code is grpc.StatusCode.UNAVAILABLE:
            self.refusals.refused()
        else:
            logger.info("gRPC %s %s %.1fms", name, code.name, seconds * 1000)

    @rpc(keyed=False)
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    @rpc(keyed=False)
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.plane.health.is_ready)

    @rpc(keyed=False)
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """ready: false while loading or draining, and for a model of the repository not loaded
        (as Triton answers); NOT_FOUND for a model it does not know."""
        try:
            model_ready(self.plane, request.name, request.version or None)
        except ServeError as exc:
            in_repository = self.repository is not None and self.repository.on_disk(request.name)
            if exc.status != 503 and not (exc.status == 404 and in_repository):
                raise
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @rpc()
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return json_format.ParseDict(describe_server(__version__), pb.ServerMetadataResponse())

    @rpc()
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = model_metadata(self.plane, request.name, request.version or None)
        return json_format.ParseDict(metadata, pb.ModelMetadataResponse())

    @rpc()
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        """REST's configuration in Triton's ModelConfig message (the fields this server fills in)."""
        config = model_config(self.plane, request.name, request.version or None)
        versions = config["version_policy"]["specific"]["versions"]
        if not all(v.isdigit() for v in versions):  # Triton's versions are integers
            del config["version_policy"]
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, pb.ModelConfig()))

    @rpc(keyed=False)  # the data plane checks its key, as for every protocol's inference
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        with tracing.rpc_server_span(SERVICE, "ModelInfer", context.invocation_metadata() or ()):
            return await model_infer(self.plane, request, _key(context), context.time_remaining())

    @rpc(keyed=False)  # inference or admin keys, checked below
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.plane.authorize(_key(context))
        rows = index_rows(self.plane, self.repository, request.ready)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(**{key: str(r[key]) for key in ("name", "version", "state", "reason")}) for r in rows]
        )

    @rpc(keyed=False)  # an admin key, checked below
    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.plane.authorize_admin(_key(context))
        version = _repository_version(request.parameters, allowed=("version",))
        await self._repository().load(_model_name(request.model_name), version)
        return pb.RepositoryModelLoadResponse()

    @rpc(keyed=False)  # an admin key, checked below
    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self.plane.authorize_admin(_key(context))
        version = _repository_version(request.parameters, allowed=("version", "unload_dependents"))
        await self._repository().unload(_model_name(request.model_name), version)
        return pb.RepositoryModelUnloadResponse()

    def _repository(self) -> Repository:
        if self.repository is None:
            raise ServeError(400, "no model repository is configured (FASHION_SERVE_MODEL_REPOSITORY)")
        return self.repository


def _model_name(name: str) -> str:
    check_name(name)
    return name


def _repository_version(parameters: Any, allowed: tuple[str, ...]) -> str | None:
    """The `version` parameter (a string or an integer), refusing parameters this server does not take."""
    unsupported = sorted(set(parameters) - set(allowed))
    if unsupported:
        raise ServeError(400, f"unsupported parameters {unsupported}: only {', '.join(allowed)}")
    if "version" not in parameters:
        return None
    parameter = parameters["version"]
    value = getattr(parameter, parameter.WhichOneof("parameter_choice") or "string_param")
    if isinstance(value, bool) or not str(value).isdigit():
        raise ServeError(400, "parameter 'version' must be a positive integer")
    return str(value)


async def health_service(health: Health) -> health_aio.HealthServicer:
    """grpc.health.v1 (grpcio-health-checking's servicer): SERVING while the worker is ready,
    NOT_SERVING while loading or draining, for the server as a whole ("") and for the inference
    service by name; told of every change (Watch streams are pushed it), never polled. No key."""
    servicer = health_aio.HealthServicer()
    loop = asyncio.get_running_loop()
    updates: set[asyncio.Task[None]] = set()  # referenced until done

    async def publish() -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if health.is_ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE):
            await servicer.set(service, status)

    def changed() -> None:
        def start() -> None:
            task = loop.create_task(publish())
            updates.add(task)
            task.add_done_callback(updates.discard)

        with contextlib.suppress(RuntimeError):  # the server's loop is closed: nobody to tell
            loop.call_soon_threadsafe(start)

    await publish()
    health.listeners.append(changed)
    return servicer
