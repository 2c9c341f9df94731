"""The service's own protocol: POST /predict, top-k classes for one or more uploaded images.

The adapter parses the query and the body (multipart or one raw image) under the limits before
anything is queued, hands `DataPlane.run` a decoder for the images (it runs with the batch), and
encodes the probabilities as ranked classes. `/models/{model}[/versions/{version}]/predict`
are the same endpoint for a model and version named in the path.
The hot path, so it is a plain ASGI endpoint: no dependency injection, no response model,
no per-request validation objects: FastAPI's route machinery cost as much as decoding and
the forward pass together (docs/performance.md). The contract is the same as a FastAPI
route's: 422 bodies in FastAPI's shape, `{"detail": ...}` for every refusal (`render_error`,
also the app's handler for its FastAPI routes), and OPERATION below is what /openapi.json
and /docs show.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from functools import partial
from typing import Annotated, Any
from urllib.parse import parse_qsl

from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.types import Receive, Scope

from app import tracing
from app.dataplane import DataPlane
from app.decoding import ModelInput, decode_images
from app.errors import ServeError
from app.http.messages import Reply, dump_json, header, receive_body, timeout_header
from app.inference import Parsed
from app.protocols.calls import call_of
from app.protocols.uploads import FIELD, IMAGE_TYPES, split_body
from app.served_model import Scored, ServedModel
from app.settings import Settings
from models.preprocessing import INVERT_CHOICES, Invert, PreprocessConfig


class TopK(BaseModel):
    label: str
    index: int
    probability: float


class ImageFailure(BaseModel):
    status: int
    message: str


class Prediction(BaseModel):
    filename: str | None
    top_k: list[TopK] | None = None
    ood_score: float | None = Field(None, description="higher = less like the training data; null without statistics")
    out_of_distribution: bool | None = Field(None, description="ood_score past the checkpoint's threshold")
    error: ImageFailure | None = None


class PredictResponse(BaseModel):
    model: str
    model_version: str = Field(description="the version that answered (also the X-Model-Version header)")
    predictions: list[Prediction]


_K = TypeAdapter(Annotated[int, Field(ge=1)])
_INVERT: TypeAdapter[Invert] = TypeAdapter(Invert)


def parse_query(query_string: bytes, default_k: int, limit: int) -> tuple[int, Invert | None]:
    """`k` and `invert` from the query string, validated as FastAPI validates query parameters:
    every error at once, in its 422 body shape. Other parameters are ignored. Clients repeat the
    same few short query strings, so their answers are kept (parsing one cost 2 µs of the event
    loop's 60 per request); a refusal is never kept, it is raised each time."""
    if len(query_string) <= MAX_KEPT_QUERY:
        return _kept_query(query_string, default_k, limit)
    return _parse_query(query_string, default_k, limit)


MAX_KEPT_QUERY = 64  # bytes: at most 256 of these are kept


def _parse_query(query_string: bytes, default_k: int, limit: int) -> tuple[int, Invert | None]:
    given: dict[str, list[str]] = {}
    for name, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
        if name in ("k", "invert"):
            given.setdefault(name, []).append(value)
    errors: list[dict[str, Any]] = []
    parsed: dict[str, Any] = {}
    for name, adapter in (("k", _K), ("invert", _INVERT)):
        values = given.get(name, [])
        if len(values) > 1:
            errors.append({"type": "duplicate", "loc": ["query", name], "msg": f"{name} given more than once"})
        elif values:
            try:
                parsed[name] = adapter.validate_python(values[0])
            except ValidationError as exc:
                errors += [{**error, "loc": ["query", name]} for error in exc.errors(include_url=False)]
    k = parsed.get("k")
    if k is not None and k > limit:
        message = f"Input should be less than or equal to {limit}"
        errors.append(
            {"type": "less_than_equal", "loc": ["query", "k"], "msg": message, "input": k, "ctx": {"le": limit}}
        )
    if errors:
        raise ServeError(422, errors)
    return (min(default_k, limit) if k is None else k), parsed.get("invert")


_kept_query = functools.lru_cache(maxsize=256)(_parse_query)


def decode_body(
    body: bytes, content_type: str, preprocess: PreprocessConfig, settings: Settings, invert: Invert | None = None
) -> ModelInput:
    """A /predict body -> its images as model input (each image's failure kept apart): what the
    endpoint does in two steps, split before the queue and decoded with the batch (the benchmarks' one call)."""
    images = split_body(body, content_type, settings.max_files)
    return decode_images(images, preprocess, settings.max_image_pixels, invert)


def none_classified(model_input: ModelInput) -> ServeError:
    """The request's error when no image could be used: the image's own, or the first of several."""
    first = next(iter(model_input.errors.values()))
    count = len(model_input.names)
    if count == 1:
        return first
    return ServeError(first.status, f"none of the {count} images could be classified; first: {first.message}")


def top_k(probabilities: list[float], k: int, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """One row of probabilities -> the k most likely classes, most likely first (ties: lower index)."""
    order = sorted(range(len(probabilities)), key=probabilities.__getitem__, reverse=True)[:k]
    return [{"label": class_names[i], "index": i, "probability": round(probabilities[i], 6)} for i in order]


def encode(scored: Scored, k: int, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per image, in request order: its top-k and OOD verdict, or the error that kept it from being classified."""
    rows = scored.probabilities.tolist()
    scores = None if scored.ood_scores is None else scored.ood_scores.tolist()
    verdicts = None if scored.flagged is None else scored.flagged.tolist()
    results: list[dict[str, Any]] = []
    for name, outcome in zip(scored.input.names, scored.per_image(), strict=True):
        if isinstance(outcome, ServeError):
            results.append({"filename": name, "error": {"status": outcome.status, "message": outcome.message}})
            continue
        score = None if scores is None else scores[outcome]
        flagged = None if verdicts is None else verdicts[outcome]
        results.append(
            {
                "filename": name,
                "top_k": top_k(rows[outcome], k, class_names),
                "ood_score": None if score is None else round(score, 4),
                "out_of_distribution": flagged,
            }
        )
    return results


def render_error(exc: ServeError) -> Reply:
    """Every refusal of this protocol (and of the app's FastAPI routes): FastAPI's `{"detail": ...}`."""
    return Reply(exc.status, dump_json({"detail": exc.detail}), headers=exc.headers)


def read_query(settings: Settings, model: ServedModel, query_string: bytes) -> tuple[int, Invert | None]:
    """`k` and `invert` for /predict and /explain, bounded by the model's classes."""
    return parse_query(query_string, settings.default_k, min(settings.max_k, model.num_classes))


def answered_by(model: ServedModel) -> dict[str, str]:
    """The header every answer of this protocol carries: which version produced it."""
    return {"X-Model-Version": model.version}


async def predict(plane: DataPlane, scope: Scope, receive: Receive) -> Reply:
    """POST /predict: classify images sent as multipart parts named `file`, or one image as the raw body."""
    settings = plane.settings

    async def parse(model: ServedModel) -> Parsed[int]:
        k, invert = read_query(settings, model, scope["query_string"])
        timeout = timeout_header(scope)
        length, content_type = header(scope, b"content-length"), header(scope, b"content-type")
        body = await receive_body(receive, length, settings.max_upload_bytes, settings.body_timeout_s)
        uploads = split_body(body, (content_type or b"").decode("latin-1"), settings.max_files)
        decode = partial(decode_images, uploads, model.loaded.preprocess, settings.max_image_pixels, invert)
        return Parsed(decode, k, len(body), timeout)

    answer = await plane.run(call_of(scope), parse)
    model, scored = answer.model, answer.scored
    if scored.input.inputs is None:
        raise none_classified(scored.input)
    with tracing.stage("encode"):
        predictions = encode(scored, answer.request, model.class_names)
    body = {"model": model.name, "model_version": model.version, "predictions": predictions}
    return Reply(200, dump_json(body), headers=answered_by(model))


def _responses(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPError"}}},
    }


def openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the /predict operation (and the models it refers to) to FastAPI's generated schema."""
    _, definitions = models_json_schema(
        [(PredictResponse, "serialization")], ref_template="#/components/schemas/{model}"
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.update(definitions.get("$defs", {}))
    components["HTTPError"] = {
        "title": "HTTPError",
        "type": "object",
        "properties": {"detail": {"title": "Detail"}},
        "required": ["detail"],
    }
    schema["paths"]["/predict"] = {"post": OPERATION}
    for path in ("/models/{model}/predict", "/models/{model}/versions/{version}/predict"):
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "title": name.title()}}
            for name in ("model", "version")
            if "{" + name + "}" in path
        ]
        operation_id = "predict_" + path.strip("/").replace("/", "_").replace("{", "").replace("}", "") + "_post"
        schema["paths"][path] = {
            "post": {**OPERATION, "operationId": operation_id, "parameters": parameters + OPERATION["parameters"]}
        }
    return schema


OPERATION: dict[str, Any] = {
    "tags": ["predict"],
    "summary": "Predict",
    "operationId": "predict_predict_post",  # the id FastAPI gave the route: generated clients keep their names
    "description": (
        "Classify images sent as multipart parts named `file`, or one image as the raw body.\n\n"
        "Predictions come back in request order; an image that cannot be decoded gets an\n"
        "`error` in its place while the others are answered."
    ),
    "parameters": [
        {
            "name": "k",
            "in": "query",
            "required": False,
            "description": "how many classes to return (default: the service's)",
            "schema": {"type": "integer", "minimum": 1, "title": "K"},
        },
        {
            "name": "invert",
            "in": "query",
            "required": False,
            "description": "override the model's invert rule",
            "schema": {"type": "string", "enum": list(INVERT_CHOICES), "title": "Invert"},
        },
    ],
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {FIELD: {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            },
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
        },
    },
    "responses": {
        "200": {
            "description": "top-k classes per image, in request order",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictResponse"}}},
        },
        "400": _responses("empty, undecodable or malformed upload"),
        "405": _responses("method not allowed"),
        "408": _responses("the body did not arrive in time"),
        "413": _responses("too large: bytes, pixels or number of files"),
        "415": _responses("not an accepted image type"),
        "422": _responses("bad parameters or no 'file' part"),
        "504": _responses(
            "the deadline (X-Request-Timeout, FASHION_SERVE_REQUEST_TIMEOUT_S) passed before the model ran"
        ),
        "503": _responses("not ready, busy, or out of accelerator memory; see Retry-After"),
    },
}
