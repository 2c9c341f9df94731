"""Parsing a v2 inference request: the JSON (or binary tensor) body -> what it asks for, and its
input as model input. Every malformed request is a ServeError 400 (413 past the image limit)."""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from app.decoding import ModelInput, image_to_input
from app.errors import ServeError
from app.served_model import Pending, ServedModel
from models.preprocessing import normalize

INPUT = "input"
PROBABILITIES = "probabilities"
OOD_SCORE = "ood_score"  # only for checkpoints with out-of-distribution statistics
HEADER_LENGTH = b"inference-header-content-length"
BYTES_LENGTH = struct.Struct("<I")


def output_names(service: ServedModel) -> tuple[str, ...]:
    return (PROBABILITIES, OOD_SCORE) if service.ood_threshold is not None else (PROBABILITIES,)


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
    timeout_s: float | None = None  # the request's `timeout` parameter (Triton's, in microseconds)


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
    length = _length_within(header_length, body)
    if length is None:
        raise _bad("Inference-Header-Content-Length must be the length of the JSON header within the body")
    return body[:length], body[length:]


def _length_within(header_length: bytes, body: bytes) -> int | None:
    """Inference-Header-Content-Length's value if it is a length within `body`, else None."""
    if header_length.isdigit() and len(header_length) <= 18 and int(header_length) <= len(body):
        return int(header_length)
    return None


def json_length(body: bytes, header_length: bytes | None) -> int:
    """How much of a body is JSON, what parsing costs: binary tensor data after it is only sliced."""
    length = None if header_length is None else _length_within(header_length, body)
    return len(body) if length is None else length


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
    datatype: Any = tensor.get("datatype")
    shape: Any = tensor.get("shape")
    check_input(tensor.get("name"), datatype, shape, max_images)
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
        timeout_s(parameters.get("timeout")),
    )


def check_input(name: object, datatype: object, shape: object, max_images: int) -> None:
    """The one input's name, datatype and shape, whatever the transport: 400 (413 past `max_images`)."""
    if name != INPUT:
        raise _bad(f"unknown input {name!r}: the model's only input is {INPUT!r}")
    if datatype not in ("FP32", "UINT8", "BYTES"):
        raise _bad(f"input datatype {datatype!r} is not accepted: send FP32, UINT8 or BYTES")
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d >= 0 for d in shape):
        raise _bad("'shape' must be a non-empty list of non-negative integers")
    if shape[0] > max_images:
        raise ServeError(413, f"{shape[0]} images in one request; the limit is {max_images}")
    if shape[0] == 0:
        raise _bad("a request needs at least one image")


def timeout_s(value: object) -> float | None:
    """The `timeout` parameter, microseconds as Triton has it, in seconds."""
    if value is None:
        return None
    if type(value) is not int or value <= 0:
        raise _bad("parameter 'timeout' must be a positive integer number of microseconds")
    return value / 1e6


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
        parameters = _object(output.get("parameters"), "output 'parameters'")
        binary = _flag(parameters, "binary_data") if "binary_data" in parameters else binary_default
        k = parameters.get("classification", 0)
        parsed.append(output_request(output.get("name"), k, binary, names, num_classes))
    return parsed


def output_request(name: object, k: object, binary: bool, names: Sequence[str], num_classes: int) -> OutputRequest:
    """A requested output, checked: one of `names`, and `classification` k only on the probabilities."""
    if not isinstance(name, str) or name not in names:
        raise _bad(f"unknown output {name!r}: the model's outputs are {list(names)}")
    if type(k) is not int or not 0 <= k <= num_classes or (k and name != PROBABILITIES):
        raise _bad(f"'classification' must be an integer from 1 to {num_classes}, on {PROBABILITIES!r}")
    return OutputRequest(name, k, binary)


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


def bytes_elements(request: InferRequest) -> list[bytes]:
    """BYTES elements: length-prefixed in binary, base64 strings in JSON, or already apart
    (a list of bytes: gRPC's typed `bytes_contents`)."""
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
    elif isinstance(request.data, list) and all(isinstance(s, bytes) for s in request.data):
        images = request.data
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


def tensor_input(request: InferRequest, service: ServedModel) -> ModelInput:
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


def image_input(images: Sequence[bytes], service: ServedModel, max_pixels: int) -> ModelInput:
    """Encoded image files, decoded exactly as /predict decodes them; any failure refuses the request."""
    arrays = []
    for position, data in enumerate(images):
        try:
            arrays.append(image_to_input(data, None, service.loaded.preprocess, max_pixels))
        except ServeError as exc:
            raise ServeError(exc.status, f"image {position}: {exc.message}") from None
    return ModelInput.of(np.stack(arrays))


def model_input(request: InferRequest, service: ServedModel, max_pixels: int) -> Pending:
    """The request's model input: tensors now; encoded images as a decoder the batcher runs."""
    if request.datatype != "BYTES":
        return tensor_input(request, service)
    return partial(image_input, bytes_elements(request), service, max_pixels)
