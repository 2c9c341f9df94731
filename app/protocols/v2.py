"""The Open Inference Protocol v2 (KServe's V2, Triton's HTTP/REST): what tensor clients speak.

Inference (`POST .../infer`) is a plain ASGI endpoint like /predict: it parses the JSON or
binary-tensor body under the limits, hands `Runtime.infer` the model input (images in the
`BYTES` form are decoded exactly as /predict decodes them), and encodes the probabilities
as tensors or with the classification extension. The metadata and health endpoints are
FastAPI routes. Every error, from either kind, leaves as `{"error": message}` (`V2Route`,
`V2InferEndpoint.__call__`).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
import struct
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from app.asgi import dump_json, header, receive_body, send_response
from app.decoding import ModelInput, image_to_input
from app.errors import ServeError, unavailable
from app.runtime import INLINE_DECODE_BYTES, Runtime
from app.service import ClassifierService, Pending, Scored
from models.preprocessing import normalize

logger = logging.getLogger("app")

INPUT = "input"
PROBABILITIES = "probabilities"
OOD_SCORE = "ood_score"  # only for checkpoints with out-of-distribution statistics
EXTENSIONS = ["binary_tensor_data", "classification", "model_configuration", "health", "metadata"]
HEADER_LENGTH = b"inference-header-content-length"
BYTES_LENGTH = struct.Struct("<I")


def error_response(exc: ServeError) -> tuple[int, bytes, dict[str, str]]:
    return exc.status, dump_json({"error": exc.message}), exc.headers


class V2Route(APIRoute):
    """A FastAPI route whose ServeErrors leave in v2's `{"error": ...}` shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ServeError as exc:
                status, body, headers = error_response(exc)
                return Response(body, status, headers, media_type="application/json")

        return route


def check_model(runtime: Runtime, model: str, version: str | None) -> ClassifierService:
    """The served model if `model` (and `version`) name it: 404 if not, 503 while not ready."""
    settings = runtime.settings
    if model != settings.served_name:
        raise ServeError(404, f"unknown model {model!r}: this server serves {settings.served_name!r}")
    if version is not None and version != settings.model_version:
        raise ServeError(404, f"unknown version {version!r} of model {model!r}: it has {settings.model_version!r}")
    if not runtime.health.is_ready:
        raise unavailable(runtime.health.reason)
    return runtime.require_model()


# --- parsing an inference request -------------------------------------------------------------


@dataclass
class OutputRequest:
    name: str
    classification: int = 0  # k > 0: the top k as "probability:index:label" strings
    binary: bool = False


@dataclass
class InferRequest:
    id: str | None
    datatype: str
    shape: list[int]
    data: Any  # JSON data, or the input's raw binary bytes
    binary: bool
    outputs: list[OutputRequest] = field(default_factory=list)


def _bad(message: str) -> ServeError:
    return ServeError(400, message)


def _object(value: object, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{what} must be a JSON object")
    return value


def _flag(parameters: dict[str, Any], name: str) -> bool:
    value = parameters.get(name, False)
    if not isinstance(value, bool):
        raise _bad(f"parameter {name!r} must be true or false")
    return value


def _is_utf8(text: str) -> bool:
    """False for text JSON can carry but UTF-8 cannot (lone surrogates such as "\\ud800")."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _split_binary(body: bytes, header_length: bytes | None) -> tuple[bytes, bytes]:
    """The JSON header and the binary section after it (binary tensor data extension)."""
    if header_length is None:
        return body, b""
    if not header_length.isdigit() or len(header_length) > 18 or int(header_length) > len(body):
        raise _bad("Inference-Header-Content-Length must be the length of the JSON header within the body")
    length = int(header_length)
    return body[:length], body[length:]


def output_names(service: ClassifierService) -> tuple[str, ...]:
    return (PROBABILITIES, OOD_SCORE) if service.ood_threshold is not None else (PROBABILITIES,)


def parse_infer_request(
    body: bytes, header_length: bytes | None, outputs: Sequence[str], num_classes: int, max_images: int
) -> InferRequest:
    """A v2 inference request body -> what it asks for; ServeError 400/413 for anything malformed."""
    text, binary = _split_binary(body, header_length)
    try:
        request = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _bad(f"malformed JSON: {exc}") from None
    request = _object(request, "the request")
    request_id = request.get("id")
    if request_id is not None and not (isinstance(request_id, str) and _is_utf8(request_id)):
        raise _bad("'id' must be a string of Unicode text")
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise _bad(f"'inputs' must be a list of exactly one tensor, named {INPUT!r}")
    tensor = _object(inputs[0], "an input")
    if tensor.get("name") != INPUT:
        raise _bad(f"unknown input {tensor.get('name')!r}: the model's only input is {INPUT!r}")
    datatype = tensor.get("datatype")
    if datatype not in ("FP32", "UINT8", "BYTES"):
        raise _bad(f"input datatype {datatype!r} is not accepted: send FP32, UINT8 or BYTES")
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad("'shape' must be a non-empty list of non-negative integers")
    if shape[0] > max_images:
        raise ServeError(413, f"{shape[0]} images in one request; the limit is {max_images}")
    if shape[0] == 0:
        raise _bad("a request needs at least one image")
    size = _object(tensor.get("parameters"), "input 'parameters'").get("binary_data_size")
    if size is not None:
        if type(size) is not int or size != len(binary):
            raise _bad(f"binary_data_size {size!r} does not match the {len(binary)} bytes after the JSON header")
        data: Any = binary
    elif binary:
        raise _bad("the body has binary data after the JSON header but no input declares binary_data_size")
    elif "data" not in tensor:
        raise _bad("the input has neither 'data' nor 'binary_data_size'")
    else:
        data = tensor["data"]
    parameters = _object(request.get("parameters"), "request 'parameters'")
    binary_default = _flag(parameters, "binary_data_output")
    return InferRequest(
        request_id,
        datatype,
        shape,
        data,
        size is not None,
        _parse_outputs(request.get("outputs"), binary_default, outputs, num_classes),
    )


def _parse_outputs(
    outputs: object, binary_default: bool, names: Sequence[str], num_classes: int
) -> list[OutputRequest]:
    if outputs is None:
        return [OutputRequest(name, binary=binary_default) for name in names]
    if not isinstance(outputs, list) or not outputs:
        raise _bad("'outputs' must be a non-empty list")
    parsed = []
    for output in outputs:
        output = _object(output, "an output")
        name = output.get("name")
        if not isinstance(name, str) or name not in names:
            raise _bad(f"unknown output {name!r}: the model's outputs are {list(names)}")
        parameters = _object(output.get("parameters"), "output 'parameters'")
        k = parameters.get("classification", 0)
        if type(k) is not int or not 0 <= k <= num_classes or (k and name != PROBABILITIES):
            raise _bad(f"'classification' must be an integer from 1 to {num_classes}, on {PROBABILITIES!r}")
        binary = _flag(parameters, "binary_data") if "binary_data" in parameters else binary_default
        parsed.append(OutputRequest(name, k, binary))
    return parsed


def _array(request: InferRequest, dtype: type[np.generic]) -> np.ndarray:
    """The input's numbers as a flat array of `dtype`, holding exactly as many as its shape says."""
    count = math.prod(request.shape)
    if request.binary:
        itemsize = np.dtype(dtype).itemsize
        if len(request.data) != count * itemsize:
            raise _bad(f"{len(request.data)} bytes of binary data for shape {request.shape} of {request.datatype}")
        return np.frombuffer(request.data, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    try:
        array = np.asarray(request.data, dtype=np.float64).ravel()
    except (ValueError, TypeError, OverflowError):
        raise _bad(f"'data' must be numbers for {request.datatype}") from None
    if array.size != count:
        raise _bad(f"'data' has {array.size} values; shape {request.shape} needs {count}")
    if dtype is np.uint8 and not (np.all(array >= 0) & np.all(array <= 255) & np.all(array == np.floor(array))):
        raise _bad("UINT8 data must be integers from 0 to 255")
    return array.astype(dtype)


def _images(request: InferRequest) -> list[bytes]:
    """BYTES elements: length-prefixed in binary, base64 strings in JSON."""
    if request.shape not in ([request.shape[0]], [request.shape[0], 1]):
        raise _bad(f"BYTES input must have shape [N] or [N, 1], not {request.shape}")
    count = request.shape[0]
    if request.binary:
        data: bytes = request.data
        images: list[bytes] = []
        offset = 0
        while offset < len(data):
            if offset + 4 > len(data):
                raise _bad("BYTES binary data ends inside an element's length")
            (length,) = BYTES_LENGTH.unpack_from(data, offset)
            offset += 4
            if offset + length > len(data):
                raise _bad("BYTES binary data ends inside an element")
            if len(images) == count:  # before collecting millions of empty elements
                raise _bad(f"more BYTES elements than shape {request.shape} holds")
            images.append(data[offset : offset + length])
            offset += length
    else:
        if not isinstance(request.data, list) or not all(isinstance(s, str) for s in request.data):
            raise _bad("BYTES data in JSON must be a flat list of base64 strings (or use binary data)")
        try:
            images = [base64.b64decode(s, validate=True) for s in request.data]
        except (binascii.Error, ValueError):
            raise _bad("BYTES data in JSON must be base64-encoded image files") from None
    if len(images) != count:
        raise _bad(f"{len(images)} BYTES elements for shape {request.shape}")
    return images


def tensor_input(request: InferRequest, service: ClassifierService) -> ModelInput:
    """FP32 or UINT8 input -> (N, 1, S, S) normalized float32, as training feeds the model."""
    side = service.input_size
    shapes = [[side, side], [1, side, side]]
    if request.datatype == "FP32":
        shapes.append([side * side])
    if request.shape[1:] not in shapes:
        accepted = " or ".join(str([-1, *s]) for s in shapes)
        raise _bad(f"{request.datatype} input must have shape {accepted}, not {request.shape}")
    n = request.shape[0]
    if request.datatype == "FP32":
        array = _array(request, np.float32)
        if not np.isfinite(array).all():
            raise _bad("FP32 data must be finite (no NaN or infinity)")
        return ModelInput.of(array.reshape(n, 1, side, side))
    pixels = _array(request, np.uint8).reshape(n, 1, side, side)
    return ModelInput.of(normalize(pixels, service.loaded.preprocess))


def image_input(images: Sequence[bytes], service: ClassifierService, max_pixels: int) -> ModelInput:
    """Encoded image files, decoded exactly as /predict decodes them; any failure refuses the request."""
    arrays = []
    for position, data in enumerate(images):
        try:
            arrays.append(image_to_input(data, None, service.loaded.preprocess, max_pixels))
        except ServeError as exc:
            raise ServeError(exc.status, f"image {position}: {exc.message}") from None
    return ModelInput.of(np.stack(arrays))


# --- encoding the answer ------------------------------------------------------------------------


def _tensor(
    name: str, datatype: str, shape: list[int], values: Any, binary: bool, blobs: list[bytes]
) -> dict[str, Any]:
    """One output: its data inline in JSON, or appended to `blobs` (binary tensor data)."""
    if not binary:
        return {"name": name, "datatype": datatype, "shape": shape, "data": values}
    if datatype == "BYTES":
        blob = b"".join(BYTES_LENGTH.pack(len(v)) + v for v in (s.encode() for s in values))
    else:
        blob = np.ascontiguousarray(values, dtype="<f4").tobytes()
    blobs.append(blob)
    return {"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(blob)}}


def classification(probabilities: np.ndarray, k: int, class_names: Sequence[str]) -> list[str]:
    """Triton's classification extension: per image the top k as "probability:index:label", flat."""
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [f"{row[i]:.6f}:{i}:{class_names[i]}" for row, top in zip(probabilities, order, strict=True) for i in top]


def encode(request: InferRequest, scored: Scored, service: ClassifierService) -> tuple[bytes, bytes | None]:
    """The response body, and the JSON header's length when outputs are binary."""
    probabilities = scored.probabilities
    n, classes = probabilities.shape
    blobs: list[bytes] = []
    outputs = []
    for output in request.outputs:
        if output.name == OOD_SCORE:
            scores = scored.ood_scores
            assert scores is not None  # only offered when the checkpoint has the statistics
            values = scores if output.binary else scores.tolist()
            outputs.append(_tensor(output.name, "FP32", [n, 1], values, output.binary, blobs))
        elif output.classification:
            values = classification(probabilities, output.classification, service.class_names)
            outputs.append(_tensor(output.name, "BYTES", [n, output.classification], values, output.binary, blobs))
        elif output.binary:
            outputs.append(_tensor(output.name, "FP32", [n, classes], probabilities, True, blobs))
        else:
            outputs.append(_tensor(output.name, "FP32", [n, classes], probabilities.ravel().tolist(), False, blobs))
    response: dict[str, Any] = {"model_name": service.name, "model_version": service.settings.model_version}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = outputs
    text = dump_json(response)
    if not blobs:
        return text, None
    return b"".join([text, *blobs]), str(len(text)).encode()


class V2InferEndpoint:
    """POST /v2/models/{model}[/versions/{version}]/infer."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if scope["method"] != "POST":
                raise ServeError(405, "Method Not Allowed", {"Allow": "POST"})
            body, header_length = await self._answer(scope, receive)
        except ServeError as exc:
            status, body, headers = error_response(exc)
            await send_response(send, status, body, headers=headers)
            return
        except Exception:  # a bug: logged with its traceback
            logger.exception("unhandled error in v2 inference")
            await send_response(send, 500, dump_json({"error": "internal server error"}))
            return
        if header_length is None:
            await send_response(send, 200, body)
        else:
            extra = {"Inference-Header-Content-Length": header_length.decode()}
            await send_response(send, 200, body, b"application/octet-stream", extra)

    async def _answer(self, scope: Scope, receive: Receive) -> tuple[bytes, bytes | None]:
        runtime = self.runtime
        settings = runtime.settings
        params = scope.get("path_params", {})
        service = check_model(runtime, params.get("model", ""), params.get("version"))
        with runtime.admit():
            body = await receive_body(
                receive, header(scope, b"content-length"), settings.max_upload_bytes, settings.body_timeout_s
            )

            def parse() -> tuple[InferRequest, Pending]:
                length = header(scope, HEADER_LENGTH)
                outputs = output_names(service)
                request = parse_infer_request(body, length, outputs, service.num_classes, settings.v2_max_images)
                if request.datatype != "BYTES":
                    return request, tensor_input(request, service)
                images = _images(request)
                return request, partial(image_input, images, service, settings.max_image_pixels)

            # Parsing a large body (JSON numbers, many BYTES elements) takes the event loop for
            # too long: like decoding, it moves to the threadpool.
            request, pending = parse() if len(body) <= INLINE_DECODE_BYTES else await run_in_threadpool(parse)
            scored = await runtime.infer(service, pending, len(body))
        return encode(request, scored, service)


# --- metadata, health, configuration ------------------------------------------------------------

router = APIRouter(prefix="/v2", tags=["v2 (Open Inference Protocol)"], route_class=V2Route)


def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


@router.get("")
async def server_metadata(request: Request) -> dict[str, Any]:
    """Server name, version and the protocol extensions it supports."""
    return {"name": "fashion-serve", "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/health/live")
async def server_live() -> dict[str, bool]:
    """200 while the process can answer (the same truth as /health/live)."""
    return {"live": True}


@router.get("/health/ready", responses={503: {"description": "not ready: loading or draining"}})
async def server_ready(request: Request) -> dict[str, bool]:
    """200 once the model is loaded and warmed up; 503 before that and while draining (as /health/ready)."""
    health = _runtime(request).health
    if not health.is_ready:
        raise unavailable(health.reason)
    return {"ready": True}


def _metadata(service: ClassifierService) -> dict[str, Any]:
    side = service.input_size
    return {
        "name": service.name,
        "versions": [service.settings.model_version],
        "platform": "pytorch",
        "inputs": [{"name": INPUT, "datatype": "FP32", "shape": [-1, 1, side, side]}],
        "outputs": [{"name": PROBABILITIES, "datatype": "FP32", "shape": [-1, service.num_classes]}]
        + ([{"name": OOD_SCORE, "datatype": "FP32", "shape": [-1, 1]}] if service.ood_threshold is not None else []),
    }


def _config(service: ClassifierService) -> dict[str, Any]:
    """Triton's model configuration (the model_configuration extension): dims leave out the batch."""
    side = service.input_size
    return {
        "name": service.name,
        "platform": "pytorch_libtorch",
        "backend": "pytorch",
        "max_batch_size": service.settings.v2_max_images,
        "input": [{"name": INPUT, "data_type": "TYPE_FP32", "format": "FORMAT_NCHW", "dims": [1, side, side]}],
        "output": [{"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [service.num_classes]}]
        + ([{"name": OOD_SCORE, "data_type": "TYPE_FP32", "dims": [1]}] if service.ood_threshold is not None else []),
        "version_policy": {"specific": {"versions": [service.settings.model_version]}},
    }


def _model_ready(request: Request, model: str, version: str | None) -> JSONResponse:
    check_model(_runtime(request), model, version)
    return JSONResponse({"name": model, "ready": True})


@router.get("/models/{model}")
async def model_metadata(request: Request, model: str) -> dict[str, Any]:
    """The model's name, versions, platform and its input and output tensors."""
    return _metadata(check_model(_runtime(request), model, None))


@router.get("/models/{model}/versions/{version}")
async def model_version_metadata(request: Request, model: str, version: str) -> dict[str, Any]:
    return _metadata(check_model(_runtime(request), model, version))


@router.get("/models/{model}/ready", responses={503: {"description": "not ready"}, 404: {"description": "unknown"}})
async def model_ready(request: Request, model: str) -> JSONResponse:
    """200 when this model can infer now (the KServe readiness probe path)."""
    return _model_ready(request, model, None)


@router.get("/models/{model}/versions/{version}/ready")
async def model_version_ready(request: Request, model: str, version: str) -> JSONResponse:
    return _model_ready(request, model, version)


@router.get("/models/{model}/config")
async def model_config(request: Request, model: str) -> dict[str, Any]:
    """Triton's model configuration JSON (what tritonclient's get_model_config reads)."""
    return _config(check_model(_runtime(request), model, None))


@router.get("/models/{model}/versions/{version}/config")
async def model_version_config(request: Request, model: str, version: str) -> dict[str, Any]:
    return _config(check_model(_runtime(request), model, version))


def openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the inference operations (plain ASGI, so FastAPI does not see them) to the schema."""
    for path, version in (("/v2/models/{model}/infer", False), ("/v2/models/{model}/versions/{version}/infer", True)):
        parameters = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
        if version:
            parameters.append({"name": "version", "in": "path", "required": True, "schema": {"type": "string"}})
        operation_id = "v2_infer_version" if version else "v2_infer"
        schema["paths"][path] = {"post": {**INFER_OPERATION, "parameters": parameters, "operationId": operation_id}}
    return schema


def _error(description: str) -> dict[str, Any]:
    error_schema = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
    return {"description": description, "content": {"application/json": {"schema": error_schema}}}


_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}},
        "datatype": {"type": "string"},
        "parameters": {"type": "object"},
        "data": {"type": "array", "items": {}},
    },
}

INFER_OPERATION: dict[str, Any] = {
    "tags": ["v2 (Open Inference Protocol)"],
    "summary": "Infer (v2)",
    "description": (
        "One input, `input`: FP32 `[N, 1, 28, 28]`, `[N, 28, 28]` or `[N, 784]` normalized as the checkpoint's "
        "preprocessing says; UINT8 `[N, 28, 28]` or `[N, 1, 28, 28]` raw grayscale pixels; or BYTES `[N]` "
        "encoded image files (base64 strings in JSON), decoded as /predict decodes them. Output `probabilities` "
        "FP32 `[N, classes]`, or with `parameters.classification: k` BYTES `[N, k]` of "
        '`"probability:index:label"`. The binary tensor data extension is accepted '
        "(`Inference-Header-Content-Length`, `binary_data_size`, `binary_data`, `binary_data_output`)."
    ),
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["inputs"],
                    "properties": {
                        "id": {"type": "string"},
                        "parameters": {"type": "object"},
                        "inputs": {"type": "array", "items": _TENSOR},
                        "outputs": {"type": "array", "items": {"type": "object"}},
                    },
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "responses": {
        "200": {
            "description": "the outputs (JSON; with binary outputs, the JSON header then the tensors' bytes)",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "400": _error("malformed JSON, wrong shape or datatype, data not matching its shape, undecodable image"),
        "404": _error("unknown model or version"),
        "405": _error("method not allowed"),
        "408": _error("the body did not arrive in time"),
        "413": _error("over the body limit or FASHION_SERVE_V2_MAX_IMAGES images"),
        "503": _error("not ready, draining, busy or out of accelerator memory; see Retry-After"),
    },
}
