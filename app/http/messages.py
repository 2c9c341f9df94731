"""HTTP messages as plain ASGI, for the protocols' hot-path endpoints: request headers, the
body under a byte limit and a deadline, and a reply (JSON or raw) sent in two messages."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import orjson
from starlette.types import Receive, Scope, Send

from app import tracing
from app.errors import ServeError

Headers = list[tuple[bytes, bytes]]
TIMEOUT_HEADER = b"x-request-timeout"  # seconds, fractions allowed: the client's deadline over HTTP


@dataclass
class Reply:
    """An HTTP answer: status, body, content type and extra headers."""

    status: int
    body: bytes
    content_type: bytes = b"application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


def header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of a request header (`name` in lower case), or None."""
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def timeout_header(scope: Scope) -> float | None:
    """The client's timeout in seconds (X-Request-Timeout): a positive finite number, else 400."""
    value = header(scope, TIMEOUT_HEADER)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise ServeError(400, "X-Request-Timeout must be a positive number of seconds")
    return seconds


def earliest(*timeouts_s: float | None) -> float | None:
    """The shortest of the timeouts given, or None."""
    given = [t for t in timeouts_s if t is not None]
    return min(given) if given else None


async def receive_body(receive: Receive, content_length: bytes | None, max_bytes: int, timeout_s: float) -> bytes:
    """`_receive_body`, timed as the request's `receive` stage where the request is traced."""
    with tracing.stage("receive"):
        return await _receive_body(receive, content_length, max_bytes, timeout_s)


async def _receive_body(receive: Receive, content_length: bytes | None, max_bytes: int, timeout_s: float) -> bytes:
    """The whole body from ASGI `receive`, refused (413) as soon as it is known to exceed `max_bytes`.

    A declared Content-Length over the limit is refused before a byte is read; a body that
    grows past it is refused mid-stream; a client that takes over `timeout_s` gets 408.
    """
    if content_length is not None:
        if not content_length.isdigit():
            raise ServeError(400, "invalid Content-Length header")
        # Python's int() refuses more than 4300 digits; 18 are plenty.
        declared = int(content_length) if len(content_length) <= 18 else None
        if declared is None or declared > max_bytes:
            size_text = content_length.decode() if declared is not None else "over 10^18"
            raise ServeError(413, f"request body of {size_text} bytes exceeds the limit of {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":  # nobody is left to answer; a 4xx stays out of error logs
                    raise ServeError(400, "client disconnected before sending the whole body")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > max_bytes:
                    raise ServeError(413, f"request body exceeds the limit of {max_bytes} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        raise ServeError(408, f"request body not received within {timeout_s:g} s") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def dump_json(content: object) -> bytes:
    """`content` as compact UTF-8 JSON, by orjson (several times faster than the standard
    library's encoder on an answer: docs/performance.md). What orjson refuses (a lone surrogate
    from a client's JSON, a non-string key) goes through the standard library, escaped: still
    valid JSON. orjson writes NaN and infinities as null; the model's scores are checked finite
    where they are made (`ServedModel.score`), so no answer carries one."""
    try:
        return orjson.dumps(content)
    except orjson.JSONEncodeError:
        return json.dumps(content, allow_nan=False, separators=(",", ":")).encode()


async def send_response(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = b"application/json",
    headers: Mapping[str, str] | Iterable[tuple[str, str]] = (),
) -> None:
    raw: Headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
    items = headers.items() if isinstance(headers, Mapping) else headers
    raw += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in items]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def send_reply(send: Send, reply: Reply) -> None:
    await send_response(send, reply.status, reply.body, reply.content_type, reply.headers)
