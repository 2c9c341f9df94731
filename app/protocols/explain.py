"""POST /explain: /predict's answer plus what the model saw and where it looked, per image.

The same bodies, query and limits as /predict (its helpers parse them, before anything queues),
the same one call into the core for the classes (`DataPlane.run`, the shared batcher), and then,
in a thread, a gradient pass for the saliency maps: gradients cannot be taken in the batcher's
inference-mode step. `/models/{model}[/versions/{version}]/explain` name a model and version.
Nothing here runs unless /explain is asked, so /predict's path is untouched. Not a hot path,
so an ordinary FastAPI route.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, Field

from app.decoding import decode_images
from app.deps import PlaneDep
from app.http.messages import header, receive_body, timeout_header
from app.inference import Parsed
from app.protocols import predict
from app.protocols.calls import call_of
from app.protocols.predict import ImageFailure, TopK, answered_by, none_classified, read_query
from app.protocols.uploads import split_body
from app.served_model import ServedModel
from models.preprocessing import PreprocessConfig
from models.saliency import SALIENCY_METHOD

router = APIRouter(tags=["explain"])


class Explanation(BaseModel):
    filename: str | None
    top_k: list[TopK] | None = None
    ood_score: float | None = Field(None, description="as in /predict")
    out_of_distribution: bool | None = Field(None, description="as in /predict")
    inverted: bool | None = Field(None, description="which way the invert rule went for this image: true = inverted")
    input: list[list[int]] | None = Field(
        None,
        description="the 28x28 model input as grayscale pixels 0..255, rows top to bottom, as the model saw it "
        "(after EXIF rotation, inversion and fitting: a light garment on black)",
    )
    saliency: list[list[float]] | None = Field(
        None, description="28x28 in 0..1: how much each input pixel moved the top class (see saliency_method)"
    )
    error: ImageFailure | None = None


class ExplainResponse(BaseModel):
    model: str
    model_version: str
    saliency_method: str
    explanations: list[Explanation]


def to_pixels(inputs: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    """Normalized (N, 1, S, S) model input -> (N, S, S) uint8 grayscale pixels (`normalize` undone)."""
    pixels = (inputs[:, 0] * preprocess.std + preprocess.mean) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


_ROUTE: dict[str, Any] = {
    "response_model": ExplainResponse,
    "response_model_exclude_unset": True,
    "openapi_extra": {
        "parameters": predict.OPERATION["parameters"],
        "requestBody": predict.OPERATION["requestBody"],
        "responses": {
            status: response
            for status, response in predict.OPERATION["responses"].items()
            if status not in ("200", "405")
        },
    },
}


@router.post("/explain", **_ROUTE)
@router.post("/models/{model}/explain", name="explain_model", **_ROUTE)
@router.post("/models/{model}/versions/{version}/explain", name="explain_model_version", **_ROUTE)
async def explain(request: Request, response: Response, plane: PlaneDep) -> dict[str, Any]:
    """/predict's answer per image, plus the 28x28 input the model saw, which way the invert
    rule went, and a saliency map for the top class.

    The same bodies, `k`, `invert` and limits as /predict; an image that cannot be used gets
    an `error` in its place while the others are answered.
    """
    settings = plane.settings

    async def parse(model: ServedModel) -> Parsed[tuple[int, list[bool | None]]]:
        k, invert = read_query(settings, model, request.scope["query_string"])
        timeout = timeout_header(request.scope)
        length = header(request.scope, b"content-length")
        body = await receive_body(request.receive, length, settings.max_upload_bytes, settings.body_timeout_s)
        uploads = split_body(body, request.headers.get("content-type", ""), settings.max_files)
        decoded, inverted = await asyncio.to_thread(
            decode_images, uploads, model.loaded.preprocess, settings.max_image_pixels, invert, True
        )
        if decoded.inputs is None:
            raise none_classified(decoded)
        return Parsed(decoded, (k, inverted), len(body), timeout)

    answer = await plane.run(call_of(request.scope), parse)
    model, scored, (k, inverted) = answer.model, answer.scored, answer.request
    inputs = scored.input.inputs
    assert inputs is not None
    maps = await asyncio.to_thread(model.saliency, inputs, scored.probabilities.argmax(axis=1))
    pixels = to_pixels(inputs, model.loaded.preprocess)
    explanations = predict.encode(scored, k, model.class_names)
    for position, row in enumerate(scored.per_image()):
        if isinstance(row, int):
            explanations[position].update(
                inverted=inverted[position],
                input=pixels[row].tolist(),
                saliency=np.round(maps[row].astype(np.float64), 4).tolist(),  # float32 prints 17 digits
            )
    response.headers.update(answered_by(model))
    return {
        "model": model.name,
        "model_version": model.version,
        "saliency_method": SALIENCY_METHOD,
        "explanations": explanations,
    }
