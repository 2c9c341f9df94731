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
