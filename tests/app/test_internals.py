"""The framework internals the service relies on, checked against the installed versions.

constraints.txt pins uvicorn, uvicorn-worker, starlette, fastapi, gunicorn and prometheus-client;
pyproject.toml bounds them; when a pin moves, these
fail with a message naming the internal that moved and the module of ours that uses it.
The OTLP exporters' two seams that app/tracing/otlp.py encodes through (the HTTP exporter's
module-level `encode_spans`, the gRPC exporter's `_translate_data`) are checked, by a real
export, in tests/app/test_otlp.py.
"""

from __future__ import annotations

import inspect

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from gunicorn import glogging
from gunicorn.arbiter import Arbiter
from starlette.routing import Route
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from app.main import create_app
from app.settings import Settings
from tests.helpers import png

# What app/http/limits.py and app/http/backpressure.py (composed in app/http/protocol.py) read or
# override on uvicorn's httptools protocol.
UVICORN_ATTRIBUTES = ("client", "cycle", "flow", "headers", "loop", "pipeline", "server_state", "transport", "url")
UVICORN_METHODS = (
    "connection_made",
    "connection_lost",
    "data_received",
    "on_message_begin",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "on_response_complete",
)


@pytest.mark.parametrize("name", UVICORN_ATTRIBUTES)
def test_uvicorn_httptools_protocol_still_sets_what_limits_reads(name: str) -> None:
    source = inspect.getsource(HttpToolsProtocol)
    assert f"self.{name} =" in source or f"self.{name}:" in source, (
        f"uvicorn's HttpToolsProtocol no longer sets self.{name}: app/http/limits.py or backpressure.py reads it; "
        "review the subclass before moving the uvicorn pin in constraints.txt"
    )


@pytest.mark.parametrize("name", UVICORN_METHODS)
def test_uvicorn_httptools_protocol_still_has_the_overridden_hooks(name: str) -> None:
    assert callable(getattr(HttpToolsProtocol, name, None)), (
        f"uvicorn's HttpToolsProtocol.{name} is gone: app/http/limits.py or backpressure.py overrides it"
    )


def test_starlette_routes_still_compile_a_path_regex() -> None:
    route = Route("/v2/models/{model}/infer", lambda request: None)
    match = route.path_regex.match("/v2/models/tiny/infer")
    assert match is not None and match.groupdict() == {"model": "tiny"}, (
        "starlette's Route.path_regex changed: app/http/routing.py FastRoutes matches with it"
    )


@pytest.mark.parametrize("name", ["handle_hup", "handle_int", "handle_quit", "handle_term", "manage_workers"])
def test_gunicorn_arbiter_still_has_the_overridden_hooks(name: str) -> None:
    assert callable(getattr(Arbiter, name, None)), f"gunicorn's Arbiter.{name} is gone: app/server.py overrides it"


def test_gunicorn_logger_still_has_setup_and_error_log() -> None:
    assert callable(getattr(glogging.Logger, "setup", None))
    assert "self.error_log" in inspect.getsource(glogging.Logger), "app/server.py filters gunicorn's error_log"


def test_uvicorn_worker_reads_its_config_when_it_serves() -> None:
    """app/server.py's worker class sets `self.config.http` in `run`, before uvicorn reads it."""
    from uvicorn_worker import UvicornWorker

    source = inspect.getsource(UvicornWorker)
    assert "self.config = Config(" in source and "Server(config=self.config)" in source, (
        "uvicorn-worker no longer builds its Config in __init__ and serves it later: app/server.py's "
        "Worker.run sets the protocol class on it in between"
    )


def test_fastapis_own_telemetry_stays_off_even_with_a_global_provider(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FastAPI (>= 0.142) traces every request itself once a global OpenTelemetry provider is set;
    the service traces its own (app.tracing), so its app turns FastAPI's off (app.http.routing)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: provider)
    with TestClient(create_app(settings)) as client:
        assert client.get("/model").status_code == 200
        assert client.post("/predict", files={"file": ("a.png", png())}).status_code == 200
    assert exporter.get_finished_spans() == (), "FastAPI traced requests itself"
    plain = FastAPI()
    plain.get("/ping")(lambda: {})
    with TestClient(plain) as client:
        client.get("/ping")
    assert exporter.get_finished_spans(), "the check itself: a plain FastAPI app does trace with this provider"


# What app/observability.py's `observe_many` writes directly on prometheus_client's Histogram
# (test_metrics.py checks the result against `observe` itself).
PROMETHEUS_HISTOGRAM_ATTRIBUTES = ("_upper_bounds", "_sum", "_buckets")


@pytest.mark.parametrize("name", PROMETHEUS_HISTOGRAM_ATTRIBUTES)
def test_prometheus_histograms_still_keep_what_observe_many_writes(name: str) -> None:
    from prometheus_client import CollectorRegistry, Histogram

    histogram = Histogram("h", "h", registry=CollectorRegistry())
    assert hasattr(histogram, name), (
        f"prometheus_client's Histogram no longer has {name}: app/observability.py observe_many writes it"
    )
