"""POST /predict: top-k classes for one or more uploaded images.

The hot path, so it is a plain ASGI endpoint: no dependency injection, no response model,
no per-request validation objects. On a 2-core machine FastAPI's route machinery cost as
much as decoding and the forward pass together (docs/performance.md). The contract is the
same as a FastAPI route's: 422 bodies in FastAPI's shape, `{"detail": ...}` for the rest,
and OPERATION below is what /openapi.json and /docs show.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

from fastapi import HTTPException
from pydantic import BaseModel, Field, TypeAdapter, ValidationError
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from app.decoding import ALLOWED_CONTENT_TYPES
from app.runtime import Runtime
from app.service import ServiceUnavailable, encode_predictions
from app.upload import FIELD, INLINE_DECODE_BYTES, Upload, UploadError, receive_body

logger = logging.getLogger("app")
IMAGE_TYPES = sorted(t for t in ALLOWED_CONTENT_TYPES if t.startswith("image/"))
InvertParam = Literal["auto", "true", "false"]


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
    error: ImageFailure | None = None


class PredictResponse(BaseModel):
    model: str
    predictions: list[Prediction]


class Problem(Exception):
    """An answer other than 200: its status, FastAPI-style `detail` and extra headers."""

    def __init__(self, status: int, detail: object, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}


_K = TypeAdapter(Annotated[int, Field(ge=1)])
_INVERT: TypeAdapter[InvertParam] = TypeAdapter(InvertParam)


def parse_query(query_string: bytes, default_k: int, limit: int) -> tuple[int, InvertParam | None]:
    """`k` and `invert` from the query string, validated as FastAPI validates query parameters:
    every error at once, in its 422 body shape. Other parameters are ignored."""
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
        raise Problem(422, errors)
    return (min(default_k, limit) if k is None else k), parsed.get("invert")


Answer = tuple[int, list[tuple[bytes, bytes]], bytes]  # status, raw headers, body


def _json(status: int, content: object, headers: Mapping[str, str] | None = None) -> Answer:
    body = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in (headers or {}).items()]
    return status, raw, body


class PredictEndpoint:
    """Classify images sent as multipart parts named `file`, or one image as the raw body."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope["method"] != "POST":
                raise Problem(405, "Method Not Allowed", {"Allow": "POST"})
            status, headers, body = await self._answer(scope, receive)
        except Problem as exc:
            status, headers, body = _json(exc.status, {"detail": exc.detail}, exc.headers)
        except HTTPException as exc:  # the runtime's refusals (not ready, busy)
            status, headers, body = _json(exc.status_code, {"detail": exc.detail}, exc.headers)
        except Exception:  # a bug: logged with its traceback, answered like FastAPI would
            logger.exception("unhandled error in POST /predict")
            status, headers, body = _json(500, {"detail": "Internal Server Error"})
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _answer(self, scope: Scope, receive: Receive) -> Answer:
        runtime = self.runtime
        settings = runtime.settings
        classes = runtime.service.num_classes if runtime.service else settings.max_k
        k, invert = parse_query(scope["query_string"], settings.default_k, min(settings.max_k, classes))
        service, batcher = runtime.require_model()
        content_type = ""
        content_length: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value.decode("latin-1")
            elif name == b"content-length":
                content_length = value
        with runtime.admit():
            try:
                body = await receive_body(receive, content_length, settings.max_upload_bytes, settings.body_timeout_s)
                upload = Upload(body, content_type, invert)
                item = upload if len(body) <= INLINE_DECODE_BYTES else await run_in_threadpool(service.decode, upload)
                decoded, rows = await batcher.submit(item)
            except UploadError as exc:
                raise Problem(exc.status, exc.message) from None
            except ServiceUnavailable as exc:
                raise Problem(503, str(exc), {"Retry-After": "1"}) from None
        runtime.metrics.images_per_request.observe(len(decoded.filenames))
        if decoded.inputs is None:
            first = next(iter(decoded.errors.values()))
            if len(decoded.filenames) == 1:
                raise Problem(first.status, first.message)
            raise Problem(
                first.status,
                f"none of the {len(decoded.filenames)} images could be classified; first: {first.message}",
            )
        predictions = encode_predictions(service, decoded.filenames, decoded.merge(rows), k)
        return _json(200, {"model": service.name, "predictions": predictions})


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
            "schema": {"type": "string", "enum": ["auto", "true", "false"], "title": "Invert"},
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
        "503": _responses("not ready, busy, or out of accelerator memory; see Retry-After"),
    },
}
