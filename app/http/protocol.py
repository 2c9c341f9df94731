"""The HTTP protocol the workers run: uvicorn's httptools protocol with two separate pieces on
top, bounded request heads (`app.http.limits`) and the hold at the socket after an answer while
the worker is busy (`app.http.backpressure`). The uvicorn internals both rely on are listed, and
checked against the installed uvicorn, in tests/app/test_internals.py."""

from __future__ import annotations

from app.http.backpressure import Backpressure, HeldAfterAnswerProtocol
from app.http.limits import BoundedHeadProtocol


class ServiceProtocol(HeldAfterAnswerProtocol, BoundedHeadProtocol):
    """A head refusal is settled first (`BoundedHeadProtocol.on_response_complete`); only then may
    the connection be held."""


def service_protocol(
    max_head_bytes: int, head_timeout_s: float, backpressure: Backpressure | None = None
) -> type[ServiceProtocol]:
    """The protocol class with these head limits and this worker's hold (None: no hold), for
    uvicorn's `http` setting."""
    attributes = {"max_head_bytes": max_head_bytes, "head_timeout_s": head_timeout_s, "backpressure": backpressure}
    return type("ServiceProtocol", (ServiceProtocol,), attributes)
