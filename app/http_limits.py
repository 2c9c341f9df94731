"""uvicorn's httptools protocol with a bounded request head: a size limit and a deadline.

httptools (like uvicorn on top of it) reads a request head of any size: a 32 MB header is
buffered whole before the application sees it, and a head sent a byte at a time has no
deadline. This subclass counts the bytes of a head as they arrive and refuses it past
`max_head_bytes` (431, or 414 while the request line is still arriving) before more is
buffered, and closes a connection whose head is not complete within `head_timeout_s`
(counted from the connection's start or from the first byte of a request). Bodies are not
counted: they have their own limit (`FASHION_SERVE_MAX_UPLOAD_BYTES`).
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("app")

LINGER_S = 2.0  # after a refusal, how long the rest of the head is read and dropped
LINGER_BYTES = 4 * 1024 * 1024  # ... and at most how much of it
_REASONS = {414: b"URI Too Long", 431: b"Request Header Fields Too Large", 408: b"Request Timeout"}


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose request heads are bounded in bytes and in time."""

    max_head_bytes = 16 * 1024
    head_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.url = b""  # uvicorn sets it at the first byte of a request; the timer may fire before
        self._head_bytes = 0
        self._in_head = True
        self._discarding = False
        self._discarded = 0
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:  # after a refusal: read and drop, so the client can read the answer
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.transport.close()
            return
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # Still inside a head after this chunk: all of it (but for the end of a pipelined
            # previous request, in the same chunk) is head.
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                status = 414 if not self.headers and len(self.url) > self.max_head_bytes // 2 else 431
                self._refuse(status, f"request head exceeds {self.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:  # the next request on a kept-alive connection: a new deadline
            self._in_head = True
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        super().on_headers_complete()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            if self._head_bytes or self.url:
                self._refuse(408, f"request head not complete within {self.head_timeout_s:g} s")
            else:  # an idle connection: nothing to answer
                self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        logger.info("refused a request head from %s: %d %s", self.client and self.client[0], status, message)
        self._cancel_head_timer()
        self._in_head = False
        body = message.encode()
        head = [b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])]
        head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
        head.append(b"content-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n" % len(body))
        head.append(b"connection: close\r\n\r\n")
        self.transport.write(b"".join(head) + body)
        # Closing now, with the client still sending, would reset the connection before it
        # reads the answer: half-close, drop what still comes for a moment, then close.
        self._discarding = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def limited_protocol(max_head_bytes: int, head_timeout_s: float) -> type[LimitedHttpToolsProtocol]:
    """The protocol class with these limits, for uvicorn's `http` setting."""
    return type(
        "LimitedHttpToolsProtocol",
        (LimitedHttpToolsProtocol,),
        {"max_head_bytes": max_head_bytes, "head_timeout_s": head_timeout_s},
    )
