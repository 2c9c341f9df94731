"""ModelInfer: the message -> the v2 request and its model input, through the same checks and
decoders as REST (`app.protocols.v2.request`); the scores -> raw output contents, the tensors
REST encodes (`app.protocols.v2.response.output_tensors`)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from google.protobuf.message import Message

from app import tracing
from app.dataplane import INLINE_DECODE_BYTES, DataPlane
from app.errors import ServeError
from app.inference import Call, Parsed
from app.protocols.grpc.proto import grpc_predict_v2_pb2 as pb
from app.protocols.v2.request import (
    INPUT,
    InferRequest,
    OutputRequest,
    check_input,
    model_input,
    output_names,
    output_request,
    timeout_s,
)
from app.protocols.v2.response import output_tensors
from app.served_model import Pending, Scored, ServedModel
from app.settings import Settings


def _parameter(parameters: Any, name: str, default: object = None) -> object:
    """A parameter's value, whichever of InferParameter's kinds carries it."""
    if name not in parameters:  # a lookup by [] would add the key
        return default
    parameter: Message = parameters[name]
    kind = parameter.WhichOneof("parameter_choice")
    return default if kind is None else getattr(parameter, kind)


def _typed_contents(tensor: Any) -> Any:
    """The input's typed contents, as the JSON path's `data` (numbers) or a list of BYTES elements."""
    contents = tensor.contents
    if tensor.datatype == "FP32":
        return np.asarray(contents.fp32_contents, dtype=np.float32)
    if tensor.datatype == "UINT8":
        return np.asarray(contents.uint_contents, dtype=np.int64)
    return list(contents.bytes_contents)


def parse(message: Any, model: ServedModel, settings: Settings) -> tuple[InferRequest, Pending]:
    """A ModelInferRequest -> the request and its model input; ServeError 400/413 if malformed."""
    if len(message.inputs) != 1:
        raise ServeError(400, f"'inputs' must be exactly one tensor, named {INPUT!r}")
    tensor = message.inputs[0]
    shape = list(tensor.shape)
    check_input(tensor.name, tensor.datatype, shape, settings.v2_max_images)
    raw = message.raw_input_contents
    if raw and (len(raw) != 1 or tensor.HasField("contents")):
        raise ServeError(400, "raw_input_contents must hold the one input, and the input no typed contents")
    data = raw[0] if raw else _typed_contents(tensor)
    names = output_names(model)
    outputs = [
        output_request(o.name, _parameter(o.parameters, "classification", 0), False, names, model.num_classes)
        for o in message.outputs
    ] or [OutputRequest(name) for name in names]
    timeout = timeout_s(_parameter(message.parameters, "timeout"))
    request = InferRequest(message.id or None, tensor.datatype, shape, data, bool(raw), outputs, timeout)
    return request, model_input(request, model, settings.max_image_pixels)


def encode(request: InferRequest, scored: Scored, model: ServedModel) -> Any:
    """The response: every output's data in raw_output_contents (what tritonclient.grpc reads)."""
    response = pb.ModelInferResponse(model_name=model.name, model_version=model.version, id=request.id or "")
    for tensor in output_tensors(request, scored, model):
        response.outputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        response.raw_output_contents.append(tensor.raw())
    return response


async def model_infer(plane: DataPlane, message: Any, key: bytes | None, time_remaining_s: float | None) -> Any:
    """REST's path (`app.protocols.v2.infer`) with the call's gRPC deadline in place of
    X-Request-Timeout and the message in place of the body: parse, one call into the core, encode."""

    async def parse_message(model: ServedModel) -> Parsed[InferRequest]:
        size = message.ByteSize()
        # Typed contents are parsed number by number: a large message of them goes to a thread.
        # Raw contents are taken as they are, at any size (no thread hand-off).
        if size - sum(map(len, message.raw_input_contents)) <= INLINE_DECODE_BYTES:
            request, pending = parse(message, model, plane.settings)
        else:
            request, pending = await asyncio.to_thread(parse, message, model, plane.settings)
        return Parsed(pending, request, size, request.timeout_s)

    call = Call(key, time_remaining_s, message.model_name, message.model_version or None)
    answer = await plane.run(call, parse_message)
    with tracing.stage("encode"):
        return encode(answer.request, answer.scored, answer.model)
