"""multipart/form-data bodies split into their parts: a fast path for the plain form every common
client sends, python-multipart's parser for anything else (both give the same answer)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header

from app.errors import ServeError

MAX_BOUNDARY = 70  # RFC 2046
EXTRA_PARTS = 16  # other form fields tolerated beside the files


@dataclass
class Part:
    name: str | None
    filename: str | None
    content_type: str | None
    data: bytes | bytearray = b""


# The header values every common client sends, read with one regular expression; anything
# else goes through python-multipart's parse_options_header, which gives the same result on
# these (tests/app/test_upload.py checks it on generated values).
_PLAIN_DISPOSITION = re.compile(rb'form-data; name="([^"\\]*)"(?:; filename="([^"\\]*)")?')
_PLAIN_MULTIPART_TYPE = re.compile(r"multipart/form-data; ?boundary=([0-9A-Za-z'()+_,\-./:=?]+)")


def _disposition(value: bytes) -> tuple[str | None, str | None]:
    plain = _PLAIN_DISPOSITION.fullmatch(value)
    if plain:
        name, filename = plain.groups()
    else:
        kind, params = parse_options_header(value)
        if kind != b"form-data":
            return None, None
        name = params.get(b"name")
        filename = params.get(b"filename")
    return (
        name.decode("utf-8", "replace") if name is not None else None,
        filename.decode("utf-8", "replace") if filename is not None else None,
    )


class _Collector:
    """The parts named `field`, counted against the limits as they begin (shared by both parsers)."""

    def __init__(self, field_name: str, max_files: int) -> None:
        self.field_name = field_name
        self.max_files = max_files
        self.seen = 0
        self.parts: list[Part] = []

    def begin(self) -> None:
        self.seen += 1
        if self.seen > self.max_files + EXTRA_PARTS:
            raise ServeError(413, f"too many parts: the limit is {self.max_files + EXTRA_PARTS} per request")

    def headers_done(self, headers: dict[bytes, bytes]) -> Part | None:
        """The part to collect data into, or None for a field we ignore."""
        name, filename = _disposition(headers.get(b"content-disposition", b""))
        if name != self.field_name:
            return None
        if len(self.parts) >= self.max_files:
            raise ServeError(413, f"too many files: the limit is {self.max_files} per request")
        raw_type = headers.get(b"content-type")
        part = Part(name, filename, raw_type.decode("latin-1") if raw_type else None)
        self.parts.append(part)
        return part


def _boundary(content_type: str) -> bytes | None:
    plain = _PLAIN_MULTIPART_TYPE.fullmatch(content_type)
    if plain:
        return plain.group(1).encode("latin-1")
    return parse_options_header(content_type)[1].get(b"boundary")


def parse_multipart(body: bytes, content_type: str, field_name: str, max_files: int) -> list[Part]:
    """The parts named `field_name`, in order; other fields are ignored.

    Raises ServeError: 400 for malformed multipart, 413 past `max_files` such parts or
    past `max_files + EXTRA_PARTS` parts in all (a flood of tiny fields).
    """
    boundary = _boundary(content_type)
    if not boundary or len(boundary) > MAX_BOUNDARY:
        raise ServeError(400, "multipart/form-data body without a valid boundary parameter")
    parts = _parse_plain(body, boundary, _Collector(field_name, max_files))
    if parts is None:
        parts = _parse_any(body, boundary, _Collector(field_name, max_files))
    return parts


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PLAIN_MAX_HEADERS = 8  # python-multipart's own limits: 8 headers, 4224-byte lines
_PLAIN_MAX_HEADER_LINE = 4096
_PLAIN_MAX_HEADER_BLOCK = _PLAIN_MAX_HEADERS * (_PLAIN_MAX_HEADER_LINE + 2) + 2


def _parse_plain(body: bytes, boundary: bytes, collect: _Collector) -> list[Part] | None:
    """The fast path for the bodies clients actually send, or None to leave the body to `_parse_any`.

    It takes only the plain form (no preamble, no transport padding, headers of
    `token: value` lines within python-multipart's limits, every delimiter followed by CRLF
    or the closing `--`) and reads it with `bytes.find`: a few microseconds where the
    general parser's per-byte callbacks took 25 per image. Anything else is not an error
    here: the general parser then reads the body and decides, so both give the same
    answer (tests/app/test_upload.py compares them on generated bodies).
    """
    delimiter = b"--" + boundary
    separator = b"\r\n" + delimiter
    if not body.startswith(delimiter + b"\r\n"):
        return None
    position = len(delimiter) + 2
    while True:
        collect.begin()
        if body.startswith(b"\r\n", position):  # a part without headers
            headers_end, lines = position - 2, []
        else:
            # Only as far as the largest header block python-multipart accepts: a body that is
            # all header lines must not be copied and split here (its memory would grow many
            # times the body's: docs/performance.md).
            headers_end = body.find(b"\r\n\r\n", position, position + _PLAIN_MAX_HEADER_BLOCK)
            if headers_end < 0:
                return None
            lines = body[position:headers_end].split(b"\r\n")
        if len(lines) > _PLAIN_MAX_HEADERS:
            return None
        headers: dict[bytes, bytes] = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            if (
                not colon
                or len(line) > _PLAIN_MAX_HEADER_LINE
                or not _TOKEN.fullmatch(name)
                or b"\r" in value
                or b"\n" in value
            ):
                return None
            headers[name.lower()] = value.lstrip(b" ")
        part = collect.headers_done(headers)
        data_start = headers_end + 4
        data_end = body.find(separator, data_start)
        if data_end < 0:
            return None
        if part is not None:
            part.data = body[data_start:data_end]
        position = data_end + len(separator)
        follows = body[position : position + 2]
        if follows == b"--":
            return collect.parts
        if follows != b"\r\n":
            return None
        position += 2


def _parse_any(body: bytes, boundary: bytes, collect: _Collector) -> list[Part]:
    """Any multipart body, through python-multipart's streaming parser."""
    current: Part | None = None
    header_field = bytearray()
    header_value = bytearray()
    headers: dict[bytes, bytes] = {}

    def on_part_begin() -> None:
        collect.begin()
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
        current = collect.headers_done(headers)
        if current is not None:
            current.data = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if current is not None:
            current.data += data[start:end]

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
        raise ServeError(400, f"malformed multipart body: {exc}") from None
    if parser.state != MultipartState.END:
        raise ServeError(400, "malformed or truncated multipart body: no closing boundary")
    return collect.parts
