"""POST /predict: top-k classes for one or more uploaded images."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from app.decoding import ALLOWED_CONTENT_TYPES
from app.deps import RuntimeDep
from app.service import ServiceUnavailable, encode_predictions
from app.upload import FIELD, INLINE_DECODE_BYTES, Upload, UploadError, read_body

router = APIRouter(tags=["predict"])
IMAGE_TYPES = sorted(t for t in ALLOWED_CONTENT_TYPES if t.startswith("image/"))


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


REQUEST_BODY: dict[str, Any] = {
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
}


def _check_k(request: Request, k: int | None, default_k: int, limit: int) -> int:
    if len(request.query_params.getlist("k")) > 1:
        raise HTTPException(422, detail=[{"type": "duplicate", "loc": ["query", "k"], "msg": "k given more than once"}])
    if k is None:
        return min(default_k, limit)
    if k > limit:
        raise HTTPException(
            422,
            detail=[
                {
                    "type": "less_than_equal",
                    "loc": ["query", "k"],
                    "msg": f"Input should be less than or equal to {limit}",
                    "input": k,
                }
            ],
        )
    return k


@router.post(
    "/predict",
    response_model=None,
    responses={
        200: {"model": PredictResponse},
        400: {"description": "empty, undecodable or malformed upload"},
        413: {"description": "too large: bytes, pixels or number of files"},
        415: {"description": "not an accepted image type"},
        422: {"description": "bad parameters or no 'file' part"},
        503: {"description": "not ready, busy, or out of accelerator memory; see Retry-After"},
    },
    openapi_extra={"requestBody": REQUEST_BODY},
)
async def predict(
    request: Request,
    runtime: RuntimeDep,
    k: Annotated[int | None, Query(ge=1, description="how many classes to return (default: the service's)")] = None,
    invert: Annotated[
        Literal["auto", "true", "false"] | None, Query(description="override the model's invert rule")
    ] = None,
) -> JSONResponse:
    """Classify images sent as multipart parts named `file`, or one image as the raw body.

    Predictions come back in request order; an image that cannot be decoded gets an
    `error` in its place while the others are answered.
    """
    service, batcher = runtime.require_model()
    settings = runtime.settings
    k = _check_k(request, k, settings.default_k, min(settings.max_k, service.num_classes))
    with runtime.admit():
        try:
            body = await read_body(request, settings.max_upload_bytes, settings.body_timeout_s)
            upload = Upload(body, request.headers.get("content-type", ""), invert)
            item = upload if len(body) <= INLINE_DECODE_BYTES else await run_in_threadpool(service.decode, upload)
            decoded, rows = await batcher.submit(item)
        except UploadError as exc:
            raise HTTPException(exc.status, detail=exc.message) from None
        except ServiceUnavailable as exc:
            raise HTTPException(503, detail=str(exc), headers={"Retry-After": "1"}) from None
    runtime.metrics.images_per_request.observe(len(decoded.filenames))
    if decoded.inputs is None:
        first = next(iter(decoded.errors.values()))
        if len(decoded.filenames) == 1:
            raise HTTPException(first.status, detail=first.message)
        raise HTTPException(
            first.status,
            detail=f"none of the {len(decoded.filenames)} images could be classified; first: {first.message}",
        )
    predictions = encode_predictions(service, decoded.filenames, decoded.merge(rows), k)
    return JSONResponse({"model": service.name, "predictions": predictions})
