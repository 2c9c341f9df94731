"""Optional API keys: `Authorization: Bearer <key>` on the model and inference endpoints.

Configured by `FASHION_SERVE_API_KEYS` and `FASHION_SERVE_API_KEYS_FILE`, and loaded here as
SHA-256 digests; `DataPlane.authorize` checks them, so every protocol asks the same question
and renders the 401 in its own shape. Probes, metrics, the docs and the page stay open
(README, "API keys" says why). Keys are never logged or echoed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from app.settings import Settings


def bearer_key(authorization: bytes | None) -> bytes | None:
    """The key of an `Authorization: Bearer <key>` value (HTTP header or gRPC metadata); None
    for anything else, which no configured key matches."""
    scheme, _, key = (authorization or b"").partition(b" ")
    return key.strip() if scheme.lower() == b"bearer" else None


class ApiKeyError(ValueError):
    """The keys file cannot be read."""


def load_api_keys(settings: Settings) -> list[bytes]:
    """The configured inference keys as SHA-256 digests: the comma-separated list and the file's
    lines (blank lines and lines starting with # skipped)."""
    return _digests(settings.api_keys.get_secret_value(), settings.api_keys_file, "FASHION_SERVE_API_KEYS_FILE")


def load_admin_keys(settings: Settings) -> list[bytes]:
    """The configured admin keys (the repository API's), as `load_api_keys` reads its keys."""
    return _digests(settings.admin_keys.get_secret_value(), settings.admin_keys_file, "FASHION_SERVE_ADMIN_KEYS_FILE")


def _digests(listed: str, file: Path | None, variable: str) -> list[bytes]:
    keys = [k.strip() for k in listed.split(",")]
    if file is not None:
        try:
            lines = Path(file).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeyError(f"cannot read {variable} {file}: {exc}") from None
        keys += [line.strip() for line in lines if not line.lstrip().startswith("#")]
    return [hashlib.sha256(k.encode()).digest() for k in keys if k]
