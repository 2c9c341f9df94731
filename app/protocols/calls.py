"""An HTTP request as the core sees it: one `Call`."""

from __future__ import annotations

from starlette.types import Scope

from app.auth import bearer_key
from app.http.messages import header
from app.inference import Call


def call_of(scope: Scope) -> Call:
    """The core's view of an HTTP inference request: its API key and the model and version its
    path names (`/models/{model}[/versions/{version}]/...`, `/v2/models/...`); the client's
    timeout header is read with the body, by the protocol's parser."""
    params = scope.get("path_params") or {}
    return Call(bearer_key(header(scope, b"authorization")), None, params.get("model"), params.get("version"))
