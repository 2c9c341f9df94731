"""POST /explain: /predict's answer plus what the model saw and where it looked, per image.

The same bodies, query and limits as /predict (its helpers parse them), the same forward pass
for the classes (`DataPlane.infer`, the shared batcher), and then, in the threadpool, a gradient
pass for the saliency maps: gradients cannot be taken in the batcher's inference-mode step.
Nothing here runs unless /explain is asked, so /predict's path is untouched. Not a hot path,
so an ordinary FastAPI route.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from app.dataplane import parse_timeout_s
from app.decoding import decode_images
from app.deps import AuthorizedPlaneDep
from app.http.messages import header, receive_body
from app.protocols import predict
from app.protocols.predict import ImageFailure, TopK, none_classified, read_query, split_body
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
    saliency_method: str
    explanations: list[Explanation]


def to_pixels(inputs: np.ndarray, preprocess: PreprocessConfig) -> np.ndarray:
    """Normalized (N, 1, S, S) model input -> (N, S, S) uint8 grayscale pixels (`normalize` undone)."""
    pixels = (inputs[:, 0] * preprocess.std + preprocess.mean) * 255.0
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


@router.post(
    "/explain",
    response_model=ExplainResponse,
    response_model_exclude_unset=True,
    openapi_extra={
        "parameters": predict.OPERATION["parameters"],
        "requestBody": predict.OPERATION["requestBody"],
        "responses": {
            status: response
            for status, response in predict.OPERATION["responses"].items()
            if status not in ("200", "405")
        },
    },
)
async def explain(request: Request, plane: AuthorizedPlaneDep) -> dict[str, Any]:
    """/predict's answer per image, plus the 28x28 input the model saw, which way the invert
    rule went, and a saliency map for the top class.

    The same bodies, `k`, `invert` and limits as /predict; an image that cannot be used gets
    an `error` in its place while the others are answered.
    """
    started = time.monotonic()
    settings = plane.settings
    deadline = plane.deadline(started, parse_timeout_s(request.headers.get("x-request-timeout")))
    k, invert = read_query(plane, request.scope["query_string"])
    with plane.admit(deadline=deadline) as model:
        preprocess = model.loaded.preprocess
        body = await receive_body(
            request.receive,
            header(request.scope, b"content-length"),
            settings.max_upload_bytes,
            settings.body_timeout_s,
        )
        uploads = split_body(body, request.headers.get("content-type", ""), settings.max_files)
        decoded, inverted = await run_in_threadpool(
            decode_images, uploads, preprocess, settings.max_image_pixels, invert, True
        )
        if decoded.inputs is None:
            raise none_classified(decoded)
        scored = await plane.infer(model, decoded, deadline=deadline)
        targets = scored.probabilities.argmax(axis=1)
        maps = await run_in_threadpool(model.saliency, decoded.inputs, targets)
    pixels = to_pixels(decoded.inputs, preprocess)
    explanations = predict.encode(scored, k, model.class_names, model.ood_threshold)
    for position, row in enumerate(scored.per_image()):
        if isinstance(row, int):
            explanations[position].update(
                inverted=inverted[position],
                input=pixels[row].tolist(),
                saliency=np.round(maps[row].astype(np.float64), 4).tolist(),  # float32 prints 17 digits
            )
    return {"model": model.name, "saliency_method": SALIENCY_METHOD, "explanations": explanations}
