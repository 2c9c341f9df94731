"""Schemathesis over the OpenAPI schema: generated requests never get a server error."""

from __future__ import annotations

from pathlib import Path

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from app.main import create_app
from app.settings import Settings
from tests.helpers import write_tiny_checkpoint


def test_no_server_errors_for_any_operation(tmp_path: Path) -> None:
    app = create_app(Settings(checkpoint=write_tiny_checkpoint(tmp_path / "tiny.pt"), device="cpu"))
    with TestClient(app):  # runs the lifespan: the model is loaded for every generated call
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
            "POST /predict",
            "POST /explain",
            "GET /model",
        }
        for operation in operations:

            @given(case=operation.as_strategy())
            @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
            def check(case: schemathesis.Case) -> None:
                response = case.call()
                case.validate_response(response, checks=[not_a_server_error])
                assert response.status_code < 500

            check()
