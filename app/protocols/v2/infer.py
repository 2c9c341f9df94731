"""POST /v2/models/{model}[/versions/{version}]/infer: parse, admit, infer, encode."""

from __future__ import annotations

import time

from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope

from app import tracing
from app.dataplane import INLINE_DECODE_BYTES, TIMEOUT_HEADER, DataPlane, parse_timeout_s
from app.http.messages import Reply, header, receive_body
from app.protocols.v2.request import HEADER_LENGTH, InferRequest, model_input, output_names, parse_infer_request
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
    started = time.monotonic()
    plane.authorize(header(scope, b"authorization"))
    header_timeout_s = parse_timeout_s(header(scope, TIMEOUT_HEADER))
    settings = plane.settings
    params = scope.get("path_params", {})
    # The deadline known before the body (server default, header) decides admission; the
    # body's `timeout` parameter, once parsed, can only make it earlier.
    known_deadline = plane.deadline(started, header_timeout_s)
    with plane.admit(params.get("model", ""), params.get("version"), known_deadline) as model:
        body = await receive_body(
            receive, header(scope, b"content-length"), settings.max_upload_bytes, settings.body_timeout_s
        )
        # Parsing a large body (JSON numbers, many BYTES elements) takes the event loop for
        # too long: like decoding, it moves to the threadpool.
        if len(body) <= INLINE_DECODE_BYTES:
            request, pending = _parse(scope, body, model, settings)
        else:
            request, pending = await run_in_threadpool(_parse, scope, body, model, settings)
        deadline = plane.deadline(started, header_timeout_s, request.timeout_s)
        scored = await plane.infer(model, pending, len(body), deadline)
    with tracing.child("encode"):
        return encode(request, scored, model)
