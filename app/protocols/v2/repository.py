"""The v2 model repository extension, as Triton serves it: the index, and loading and unloading a
model (or, with `{"parameters": {"version": "N"}}`, one version of it).

Loading and unloading need an admin key (`FASHION_SERVE_ADMIN_KEYS`; with none configured they
answer 403); the index can be read with an inference key too. Each change answers once every
worker serves it (`app.repository.control`); its generation is in `X-Repository-Generation`.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response

from app.auth import bearer_key
from app.dataplane import DataPlane
from app.errors import ServeError
from app.http.routing import protocol_route
from app.protocols.v2.response import render_error
from app.repository.control import Repository
from app.repository.layout import check_name

GENERATION_HEADER = "X-Repository-Generation"
router = APIRouter(prefix="/v2/repository", tags=["v2 model repository"], route_class=protocol_route(render_error))


def _key(request: Request) -> bytes | None:
    return bearer_key(request.headers.get("authorization", "").encode("latin-1"))


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ServeError(400, f"the body must be JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ServeError(400, "the body must be a JSON object")
    return body


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise ServeError(400, "'parameters' must be an object")
    return parameters


def _version(parameters: dict[str, Any]) -> str | None:
    value = parameters.get("version")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).isdigit():
        raise ServeError(400, "parameter 'version' must be a positive integer (as a string or a number)")
    return str(value)


def _repository(request: Request) -> Repository:
    repository: Repository | None = request.app.state.worker.repository
    if repository is None:
        raise ServeError(400, "no model repository is configured (FASHION_SERVE_MODEL_REPOSITORY)")
    return repository


def index_rows(plane: DataPlane, repository: Repository | None, ready_only: bool) -> list[dict[str, object]]:
    """The index every transport answers with: the repository's rows, or the served model alone."""
    if repository is not None:
        return repository.index(ready_only)
    return [v.row() for v in plane.registry if not ready_only or v.state == "READY"]


@router.post("/index")
async def repository_index(request: Request, response: Response) -> list[dict[str, object]]:
    """Every model version on disk and served, with its state (READY, LOADING, UNLOADING,
    UNAVAILABLE), the reason, and the resident memory it takes in this worker."""
    plane: DataPlane = request.app.state.worker.plane
    plane.authorize(_key(request))
    ready = (await _body(request)).get("ready", False)
    if not isinstance(ready, bool):
        raise ServeError(400, "'ready' must be true or false")
    response.headers[GENERATION_HEADER] = str(plane.registry.generation)
    return index_rows(plane, request.app.state.worker.repository, ready)


@router.post("/models/{name}/load")
async def load_model(name: str, request: Request, response: Response) -> dict[str, object]:
    """Load the model's policy versions (or `parameters.version` beside those loaded) on every
    worker, each validated before it serves; answered once every worker serves them."""
    plane: DataPlane = request.app.state.worker.plane
    plane.authorize_admin(_key(request))
    check_name(name)
    parameters = _parameters(await _body(request))
    unsupported = sorted(k for k in parameters if k != "version")
    if unsupported:
        raise ServeError(
            400, f"unsupported load parameters {unsupported}: only 'version' (no config or file overrides)"
        )
    generation = await _repository(request).load(name, _version(parameters))
    response.headers[GENERATION_HEADER] = str(generation)
    return {"name": name, "generation": generation}


@router.post("/models/{name}/unload")
async def unload_model(name: str, request: Request, response: Response) -> dict[str, object]:
    """Unload every version of the model (or `parameters.version`): new requests for it are
    refused at once, those admitted finish, then its memory is freed, on every worker."""
    plane: DataPlane = request.app.state.worker.plane
    plane.authorize_admin(_key(request))
    check_name(name)
    parameters = _parameters(await _body(request))
    generation = await _repository(request).unload(name, _version(parameters))
    response.headers[GENERATION_HEADER] = str(generation)
    return {"name": name, "generation": generation}


def _rollout_part(body: dict[str, Any], key: str) -> dict[str, object] | None:
    """`canary` or `shadow`: null, or `{"version": "N", "percent": 0..100}`."""
    part = body.get(key)
    if part is None:
        return None
    if not isinstance(part, dict) or set(part) - {"version", "percent"}:
        raise ServeError(400, f'\'{key}\' must be null or {{"version": "N", "percent": 0..100}}')
    version = _version(part)
    percent = part.get("percent", 100)
    if version is None:
        raise ServeError(400, f"'{key}.version' is required")
    if isinstance(percent, bool) or not isinstance(percent, int | float) or not 0 <= percent <= 100:
        raise ServeError(400, f"'{key}.percent' must be a number from 0 to 100")
    return {"version": version, "percent": percent}


@router.get("/models/{name}/rollout")
async def get_rollout(name: str, request: Request) -> dict[str, Any]:
    """The model's default version, canary and shadow, and per version how it has answered so far
    (summed over the workers): requests, images, OOD-flagged share, mean confidence and latency,
    and for a shadow its top-1 `agreement` with the default version on the same inputs."""
    plane: DataPlane = request.app.state.worker.plane
    plane.authorize(_key(request))
    check_name(name)
    return _repository(request).rollout(name)


@router.put("/models/{name}/rollout")
async def put_rollout(name: str, request: Request, response: Response) -> dict[str, Any]:
    """Set `default_version` (promote, or roll back; null: the highest loaded), `canary` and
    `shadow` (each null or `{"version", "percent"}`; a field left out keeps its value): on every
    worker before it answers."""
    plane: DataPlane = request.app.state.worker.plane
    plane.authorize_admin(_key(request))
    check_name(name)
    body = await _body(request)
    unknown = sorted(set(body) - {"default_version", "canary", "shadow"})
    if unknown:
        raise ServeError(400, f"unknown rollout fields {unknown}: default_version, canary, shadow")
    # A field left out keeps its value; null clears it.
    changes: dict[str, Any] = {key: _rollout_part(body, key) for key in ("canary", "shadow") if key in body}
    if "default_version" in body:
        changes["default_version"] = _version({"version": body["default_version"]})
    repository = _repository(request)
    generation = await repository.set_rollout(name, changes)
    response.headers[GENERATION_HEADER] = str(generation)
    return repository.rollout(name)
