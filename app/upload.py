"""Reading an upload: the body under a byte limit and a deadline, then its multipart parts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import ClientDisconnect, Request

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


async def read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body, refusing it (413) as soon as it is known to exceed `max_bytes`.

    A declared Content-Length over the limit is refused before a byte is read; a body that
    grows past it is refused mid-stream; a client that takes over `timeout_s` gets 408.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise UploadError(400, "invalid Content-Length header")
        if int(declared) > max_bytes:
            raise UploadError(413, f"request body of {declared} bytes exceeds the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > max_bytes:
                    raise UploadError(413, f"request body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise UploadError(408, f"request body not received within {timeout_s:g} s") from None
    except ClientDisconnect:  # nobody is left to answer; a 4xx keeps it out of the error logs
        raise UploadError(400, "client disconnected before sending the whole body") from None
    return b"".join(chunks)


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
