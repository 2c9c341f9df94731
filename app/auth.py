"""Optional API keys: `Authorization: Bearer <key>` on the model and inference endpoints.

Installed only when keys are configured (`FASHION_SERVE_API_KEYS`, `FASHION_SERVE_API_KEYS_FILE`).
Probes, metrics, the docs and the page stay open (README, "API keys" says why). Keys are
compared as SHA-256 digests with `hmac.compare_digest`, against every configured key, so the
time taken says nothing about a key; they are never logged or echoed.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from starlette.routing import get_route_path
from starlette.types import ASGIApp, Receive, Scope, Send

from app.asgi import dump_json, header, send_response
from app.settings import Settings


class ApiKeyError(ValueError):
    """The keys file cannot be read."""


def load_api_keys(settings: Settings) -> list[bytes]:
    """The configured keys as SHA-256 digests: the comma-separated list and the file's lines
    (blank lines and lines starting with # skipped)."""
    keys = [k.strip() for k in settings.api_keys.get_secret_value().split(",")]
    if settings.api_keys_file is not None:
        try:
            lines = Path(settings.api_keys_file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeyError(f"cannot read FASHION_SERVE_API_KEYS_FILE {settings.api_keys_file}: {exc}") from None
        keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    return [hashlib.sha256(k.encode()).digest() for k in keys if k]


def is_protected(path: str) -> bool:
    """The model and everything that runs it; not the probes (v2 model-ready included)."""
    if path in ("/predict", "/explain", "/model"):
        return True
    return path.startswith("/v2/models/") and not path.endswith("/ready")


class ApiKeyGuard:
    """Answer 401 to a protected request without a valid key; pass everything else on."""

    def __init__(self, app: ASGIApp, digests: list[bytes]) -> None:
        self.app = app
        self.digests = digests

    def authorized(self, scope: Scope) -> bool:
        scheme, _, key = (header(scope, b"authorization") or b"").partition(b" ")
        given = hashlib.sha256(key.strip()).digest()
        matched = False
        for digest in self.digests:  # no early exit
            matched |= hmac.compare_digest(given, digest)
        return scheme.lower() == b"bearer" and matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_protected(get_route_path(scope)) or self.authorized(scope):
            await self.app(scope, receive, send)
            return
        message = "missing or invalid API key: send Authorization: Bearer <key>"
        body = {"error": message} if get_route_path(scope).startswith("/v2/") else {"detail": message}
        challenge = {"WWW-Authenticate": 'Bearer realm="fashion-serve"'}
        await send_response(send, 401, dump_json(body), headers=challenge)
