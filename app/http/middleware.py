"""Request context as plain ASGI middleware: request id, access log line, request metrics."""

from __future__ import annotations

import logging
import math
import os
import re
import time
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import tracing
from app.logs import request_id_var
from app.observability import Metrics

logger = logging.getLogger("app.access")
# A client's id is echoed into headers and logs, so only a short, plain token is honoured.
VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")


REFUSAL_SUMMARY_S = 10.0  # at most one log line per this many seconds for 503 refusals


class RefusalLog:
    """503 refusals are counted in /metrics and summed in the log: one line per interval, not
    one per refusal, so that refusing under overload stays far cheaper than answering."""

    def __init__(self, interval_s: float = REFUSAL_SUMMARY_S) -> None:
        self.interval_s = interval_s
        self.count = 0
        self.logged_at = -math.inf

    def refused(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.logged_at >= self.interval_s:
            logger.warning(
                "refused %d requests with 503 since the last such line (503s are counted in /metrics)", self.count
            )
            self.count, self.logged_at = 0, now


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.refusals = RefusalLog()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = incoming if VALID_REQUEST_ID.fullmatch(incoming) else os.urandom(16).hex()
        token = request_id_var.set(request_id)
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append("X-Request-ID", request_id)
            await send(message)

        with tracing.server_span(scope) as span:
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                self._finish(scope, status, time.perf_counter() - start, span)
                request_id_var.reset(token)

    def _finish(self, scope: Scope, status: int, elapsed: float, span: Any) -> None:
        """Count the request, end its span, write its access line (or count it among the refusals)."""
        # The matched route's template labels the metrics (`/v2/models/{model}/infer`); anything else is "other".
        route = getattr(scope.get("route"), "path", "other")
        self.metrics.count_request(route, scope["method"], status, elapsed)
        trace = ""
        if span is not None:
            tracing.finish_server_span(span, scope["method"], route, status)
            trace = f" trace={tracing.trace_id(span)}"
        if status == 503:
            self.refusals.refused()
        else:
            logger.info("%s %s %d %.1fms%s", scope["method"], scope["path"], status, elapsed * 1000, trace)
