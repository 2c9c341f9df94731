"""POST /v2/models/{model}[/versions/{version}]/infer: parse (before any queue), one call into the
core, encode."""

from __future__ import annotations

import asyncio

from starlette.types import Receive, Scope

from app import tracing
from app.dataplane import INLINE_DECODE_BYTES, DataPlane
from app.http.messages import Reply, earliest, header, receive_body, timeout_header
from app.inference import Parsed
from app.protocols.calls import call_of
from app.protocols.v2.request import (
    HEADER_LENGTH,
    InferRequest,
    json_length,
    model_input,
    output_names,
    parse_infer_request,
)
from app.protocols.v2.response import encode
from app.served_model import Pending, ServedModel
from app.settings import Settings


def _parse(scope: Scope, body: bytes, model: ServedModel, settings: Settings) -> tuple[InferRequest, Pending]:
    """The request and its model input: tensors now, encoded images as a decoder for the batcher."""
    outputs = output_names(model)
    request = parse_infer_request(
        body, header(scope, HEADER_LENGTH), outputs, model.num_classes, settings.v2_max_images
    )
    return request, model_input(request, model, settings.max_image_pixels)


async def infer(plane: DataPlane, scope: Scope, receive: Receive) -> Reply:
    settings = plane.settings

    async def parse(model: ServedModel) -> Parsed[InferRequest]:
        header_timeout_s = timeout_header(scope)
        body = await receive_body(
            receive, header(scope, b"content-length"), settings.max_upload_bytes, settings.body_timeout_s
        )
        # Parsing a large JSON part (numbers, many BYTES elements) takes the event loop for too
        # long: like decoding, it moves to a thread. Binary data after it is only sliced, at
        # any size, so a binary request never pays for the hand-off.
        if json_length(body, header(scope, HEADER_LENGTH)) <= INLINE_DECODE_BYTES:
            request, pending = _parse(scope, body, model, settings)
        else:
            request, pending = await asyncio.to_thread(_parse, scope, body, model, settings)
        return Parsed(pending, request, len(body), earliest(header_timeout_s, request.timeout_s))

    answer = await plane.run(call_of(scope), parse)
    with tracing.stage("encode"):
        return encode(answer.request, answer.scored, answer.model)
