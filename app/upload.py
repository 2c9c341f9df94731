"""Reading an upload: the body under a byte limit and a deadline, its multipart parts, and the
images in it decoded one by one (each image's failure kept apart from the others)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.types import Receive

from app.decoding import ImageRejected, image_to_input
from app.settings import Settings
from models.preprocessing import Invert, PreprocessConfig

MAX_BOUNDARY = 70  # RFC 2046
EXTRA_PARTS = 16  # other form fields tolerated beside the files


class UploadError(Exception):
    """A request body we refuse, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Part:
    name: str | None
    filename: str | None
    content_type: str | None
    data: bytearray = field(default_factory=bytearray)


async def receive_body(receive: Receive, content_length: bytes | None, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body from ASGI `receive`, refusing it (413) as soon as it is known to exceed
    `max_bytes`.

    A declared Content-Length over the limit is refused before a byte is read; a body that
    grows past it is refused mid-stream; a client that takes over `timeout_s` gets 408.
    """
    if content_length is not None:
        if not content_length.isdigit():
            raise UploadError(400, "invalid Content-Length header")
        if int(content_length) > max_bytes:
            raise UploadError(
                413, f"request body of {content_length.decode()} bytes exceeds the limit of {max_bytes} bytes"
            )
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":  # nobody is left to answer; a 4xx stays out of error logs
                    raise UploadError(400, "client disconnected before sending the whole body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > max_bytes:
                    raise UploadError(413, f"request body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise UploadError(408, f"request body not received within {timeout_s:g} s") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _disposition(value: bytes) -> tuple[str | None, str | None]:
    kind, params = parse_options_header(value)
    if kind != b"form-data":
        return None, None
    name = params.get(b"name")
    filename = params.get(b"filename")
    return (
        name.decode("utf-8", "replace") if name is not None else None,
        filename.decode("utf-8", "replace") if filename is not None else None,
    )


def parse_multipart(body: bytes, content_type: str, field_name: str, max_files: int) -> list[Part]:
    """The parts named `field_name`, in order; other fields are ignored.

    Raises UploadError: 400 for malformed multipart, 413 past `max_files` such parts or
    past `max_files + EXTRA_PARTS` parts in all (a flood of tiny fields).
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise UploadError(400, "multipart/form-data body without a valid boundary parameter")

    parts: list[Part] = []
    current: Part | None = None
    header_field = bytearray()
    header_value = bytearray()
    headers: dict[bytes, bytes] = {}

    seen = 0

    def on_part_begin() -> None:
        nonlocal seen
        seen += 1
        if seen > max_files + EXTRA_PARTS:
            raise UploadError(413, f"too many parts: the limit is {max_files + EXTRA_PARTS} per request")
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(header_field).lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        nonlocal current
        name, filename = _disposition(headers.get(b"content-disposition", b""))
        if name != field_name:
            current = None
            return
        if len(parts) >= max_files:
            raise UploadError(413, f"too many files: the limit is {max_files} per request")
        raw_type = headers.get(b"content-type")
        current = Part(name, filename, raw_type.decode("latin-1") if raw_type else None)
        parts.append(current)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if current is not None:
            current.data.extend(data[start:end])

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
    )
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadError(400, f"malformed multipart body: {exc}") from None
    if parser.state != MultipartState.END:
        raise UploadError(400, "malformed or truncated multipart body: no closing boundary")
    return parts


FIELD = "file"  # the multipart part name that carries images
# Bodies up to this size are decoded on the inference thread, batched with the forward pass
# (one thread hand-off per request); larger ones (photos) are decoded in the threadpool
# first, so a big image never holds up the small ones queued behind it.
INLINE_DECODE_BYTES = 64 * 1024


class Upload(NamedTuple):
    """A /predict body, not decoded yet."""

    body: bytes
    content_type: str
    invert: Invert | None


@dataclass
class DecodedRequest:
    """The images of one request: model inputs for those that decoded, errors for the rest."""

    filenames: list[str | None]
    inputs: np.ndarray | None  # (valid images, 1, 28, 28) float32, in request order
    errors: dict[int, ImageRejected]  # request position -> why that image was refused

    def merge(self, rows: list[list[float]]) -> list[list[float] | ImageRejected]:
        """Put the model's rows back among the errors, in request order."""
        it = iter(rows)
        return [self.errors[i] if i in self.errors else next(it) for i in range(len(self.filenames))]


def missing_file() -> UploadError:
    return UploadError(422, f"no '{FIELD}' part: send images as multipart/form-data parts named '{FIELD}'")


def decode_request(upload: Upload, preprocess: PreprocessConfig, settings: Settings) -> DecodedRequest:
    """Split a /predict body into images and decode them; UploadError for a body we refuse."""
    media_type = upload.content_type.split(";", 1)[0].strip().lower()
    if media_type == "multipart/form-data":
        parts = parse_multipart(upload.body, upload.content_type, FIELD, settings.max_files)
        if not parts:
            raise missing_file()
        uploads = [(p.filename, bytes(p.data), p.content_type) for p in parts]
    elif media_type.startswith("image/"):
        uploads = [(None, upload.body, media_type)]
    elif not media_type and not upload.body:
        raise missing_file()
    else:
        raise UploadError(
            415,
            f"unsupported content type {media_type or '(none)'!r}: send multipart/form-data "
            f"with '{FIELD}' parts, or one image as the body with an image/* content type",
        )
    return decode_uploads(uploads, preprocess, settings.max_image_pixels, upload.invert)


def decode_uploads(
    uploads: Sequence[tuple[str | None, bytes, str | None]],
    preprocess: PreprocessConfig,
    max_pixels: int,
    invert: Invert | None,
) -> DecodedRequest:
    """Decode (filename, bytes, content type) uploads, isolating each image's failure."""
    arrays: list[np.ndarray] = []
    errors: dict[int, ImageRejected] = {}
    for position, (_, data, content_type) in enumerate(uploads):
        try:
            arrays.append(image_to_input(data, content_type, preprocess, max_pixels, invert))
        except ImageRejected as exc:
            errors[position] = exc
    inputs = np.stack(arrays) if arrays else None
    return DecodedRequest([u[0] for u in uploads], inputs, errors)
