"""The v2 routes that describe rather than infer: server metadata and health, and per model its
metadata, readiness and Triton configuration, each served unversioned and versioned by one handler.
The handlers' bodies (`describe_server`, `model_metadata`, `model_ready`, `model_config`) are
plain functions of the data plane, which the gRPC adapter answers with too."""

# No `from __future__ import annotations`: `_pair` builds the route functions' signatures from objects.

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from app.dataplane import DataPlane
from app.deps import AuthorizedPlaneDep, PlaneDep
from app.http.routing import protocol_route
from app.protocols.v2.request import INPUT, OOD_SCORE, PROBABILITIES
from app.protocols.v2.response import render_error
from app.repository.registry import READY
from app.served_model import ServedModel
from models.served_form import ONNX_INT8

EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "model_repository", "health", "metadata"]
SERVER_NAME = "fashion-serve"

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], route_class=protocol_route(render_error))


@router.get("")
async def server_metadata(request: Request) -> dict[str, Any]:
    """Server name, version and the protocol extensions it supports."""
    return describe_server(request.app.version)


def describe_server(version: str) -> dict[str, Any]:
    """The server metadata every transport answers with."""
    return {"name": SERVER_NAME, "version": version, "extensions": EXTENSIONS}


@router.get("/health/live")
async def server_live() -> dict[str, bool]:
    """200 while the process can answer (the same truth as /health/live)."""
    return {"live": True}


@router.get("/health/ready", responses={503: {"description": "not ready: loading or draining"}})
async def server_ready(plane: PlaneDep) -> dict[str, bool]:
    """200 once the model is loaded and warmed up; 503 before that and while draining (as /health/ready)."""
    plane.check_ready()
    return {"ready": True}


ModelHandler = Callable[[DataPlane, str, str | None], dict[str, Any]]


def _pair(suffix: str, handler: ModelHandler, plane_dep: Any, doc: str, **route: Any) -> None:
    """Serve `handler` at /models/{model}`suffix` and /models/{model}/versions/{version}`suffix`."""

    async def unversioned(plane: plane_dep, model: str) -> dict[str, Any]:
        return handler(plane, model, None)

    async def versioned(plane: plane_dep, model: str, version: str) -> dict[str, Any]:
        return handler(plane, model, version)

    name = handler.__name__.lstrip("_")
    router.add_api_route(f"/models/{{model}}{suffix}", unversioned, name=name, description=doc, **route)
    router.add_api_route(
        f"/models/{{model}}/versions/{{version}}{suffix}", versioned, name=f"{name}_version", description=doc, **route
    )


def _outputs(model: ServedModel) -> list[tuple[str, int]]:
    """The output tensors by name and width (the OOD score only with the checkpoint's statistics)."""
    return [(PROBABILITIES, model.num_classes)] + ([(OOD_SCORE, 1)] if model.ood_threshold is not None else [])


def _platform(model: ServedModel) -> str:
    """The served form in Triton's platform names (its `backend` field: the same, in its words)."""
    return "onnxruntime_onnx" if model.form.name == ONNX_INT8 else "pytorch_libtorch"


def _versions(plane: DataPlane, model: ServedModel) -> list[str]:
    """The model's ready versions, lowest first."""
    return [v.version for v in plane.registry if v.model == model.name and v.state == READY]


def model_metadata(plane: DataPlane, name: str, version: str | None) -> dict[str, Any]:
    model = plane.current_model(name, version)
    side = model.input_size
    return {
        "name": model.name,
        "versions": _versions(plane, model),
        "platform": _platform(model),
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, 1, side, side]}],
        "outputs": [{"name": n, "datatype": "FP32", "shape": [-1, width]} for n, width in _outputs(model)],
    }


def model_ready(plane: DataPlane, name: str, version: str | None) -> dict[str, Any]:
    plane.current_model(name, version)
    plane.check_ready()
    return {"name": name, "ready": True}


def model_config(plane: DataPlane, name: str, version: str | None) -> dict[str, Any]:
    model = plane.current_model(name, version)
    side = model.input_size
    return {
        "name": model.name,
        "platform": _platform(model),
        "backend": "onnxruntime" if model.form.name == ONNX_INT8 else "pytorch",
        "parameters": {"precision": {"string_value": model.form.precision}},
        "max_batch_size": model.settings.v2_max_images,
        "input": [{"name": INPUT, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [1, side, side]}],
        "output": [{"name": n, "data_type": "TYPE_FP32", "dims": [width]} for n, width in _outputs(model)],
        "version_policy": {
            "specific": {"versions": [v.version for v in plane.registry.models.get(model.name, {}).values()]}
        },
    }


_pair("", model_metadata, AuthorizedPlaneDep, "The model's name, versions, platform and its input and output tensors.")
_pair(
    "/ready",
    model_ready,
    PlaneDep,
    "200 when this model can infer now (the KServe readiness probe path).",
    responses={503: {"description": "not ready"}, 404: {"description": "unknown"}},
)
_pair("/config", model_config, AuthorizedPlaneDep, "Triton's model configuration JSON (what get_model_config reads).")
