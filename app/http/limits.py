"""uvicorn's httptools protocol with a bounded request head: a size limit and a deadline.

httptools (like uvicorn on top of it) reads a request head of any size: a 32 MB header is
buffered whole before the application sees it, and a head sent a byte at a time has no
deadline. This subclass counts the bytes of a head as they arrive and refuses it past
`max_head_bytes` (431, or 414 while the request line is still arriving) before more is
buffered, and closes a connection whose head is not complete within `head_timeout_s` of its
first byte (a new connection that sends nothing is closed after that long too). Bodies are not
counted: they have their own limit (`FASHION_SERVE_MAX_UPLOAD_BYTES`). A head is counted from
the first read that holds only head bytes, so at most one read (64 KiB) more than the limit
is buffered, and the end of a pipelined request's body is never counted as the next head.
"""

from __future__ import annotations

import asyncio
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

logger = logging.getLogger("app")

LINGER_S = 2.0  # after a refusal, how long the rest of the head is read and dropped
LINGER_BYTES = 4 * 1024 * 1024  # ... and at most how much of it
_REASONS = {414: b"URI Too Long", 431: b"Request Header Fields Too Large", 408: b"Request Timeout"}


class BoundedHeadProtocol(HttpToolsProtocol):
    """HttpToolsProtocol whose request heads are bounded in bytes and in time."""

    max_head_bytes = 16 * 1024
    head_timeout_s = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.url = b""  # uvicorn sets it at the first byte of a request; the timer may fire before
        self._head_bytes = 0
        self._in_head = True
        self._began_in_read = self._head_started = False
        self._discarding = False
        self._discarded = 0
        self._pending_refusal: tuple[int, str] | None = None
        self._refusing = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._start_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:  # after a refusal: read and drop, so the client can read the answer
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.transport.close()
            return
        self._began_in_read = False
        super().data_received(data)
        if self._in_head and not self._began_in_read and not self.transport.is_closing():  # all of it is head
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes and self._pending_refusal is None:
                status = 414 if not self.headers and len(self.url) > self.max_head_bytes // 2 else 431
                self._refuse(status, f"request head exceeds {self.max_head_bytes} bytes")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = self._began_in_read = self._head_started = True
        self._head_bytes = 0
        self._start_head_timer()  # the deadline runs from the head's first byte

    @property
    def refusing(self) -> bool:
        """A head was refused: what still arrives on this connection is read and dropped."""
        return self._refusing

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._pending_refusal is not None:  # a pipelined head overflowed while this answer was due
            self._refuse(*self._pending_refusal)

    def _start_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timeout)

    def on_headers_complete(self) -> None:
        self._in_head = self._head_started = False
        self._head_bytes = 0
        self._cancel_head_timer()
        # A head that arrived within one read was never counted above: measure the parsed one.
        size = len(self.url) + 16 + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_head_bytes:
            self._refuse(431, f"request head exceeds {self.max_head_bytes} bytes")
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refusing:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refusing:
            super().on_message_complete()

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            if self._head_started:
                self._refuse(408, f"request head not complete within {self.head_timeout_s:g} s")
            else:  # an idle connection: nothing to answer
                self.transport.close()

    def _refuse(self, status: int, message: str) -> None:
        self._refusing = True  # whatever else this read holds is not for the app
        if self.cycle is not None and not self.cycle.response_complete:
            # An earlier request on this connection is still being answered: stop reading, and
            # refuse once its answer has gone (on_response_complete).
            self._pending_refusal = (status, message)
            self.flow.pause_reading()
            return
        self._pending_refusal = None
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
