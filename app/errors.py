"""The one error type of the service: a refusal with its HTTP status.

Everything below the protocols (body reading, multipart, image decoding, the model, admission)
raises `ServeError`; each protocol turns it into its own body in one place: `{"detail": ...}`
for /predict and FastAPI's routes (`app.main`), `{"error": ...}` for v2 (`app.protocols.v2`).
"""

from __future__ import annotations

RETRY_AFTER = {"Retry-After": "1"}


class ServeError(Exception):
    """A request (or one image of it) we do not answer with 200: status, detail, extra headers.

    `detail` is a message, or for 422 FastAPI's list of validation errors.
    """

    def __init__(self, status: int, detail: object, headers: dict[str, str] | None = None, hold_s: float = 0.0) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers or {}
        # Seconds to wait before answering (admission refusals under overload): a client that
        # sends again as soon as it is refused then comes back later, and refusing costs less.
        self.hold_s = hold_s

    @property
    def message(self) -> str:
        return self.detail if isinstance(self.detail, str) else str(self.detail)


def unavailable(reason: str) -> ServeError:
    """503 with Retry-After: not ready, draining, busy, or out of accelerator memory."""
    return ServeError(503, reason, dict(RETRY_AFTER))
