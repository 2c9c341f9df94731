"""OpenTelemetry tracing: the spans of a traced request, nothing when off, and the real OTLP export."""

from __future__ import annotations

import http.server
import logging
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from app import tracing
from app.logs import flush_logs
from app.main import create_app
from app.settings import Settings
from bench.server import free_port
from tests.helpers import png

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
TRACEPARENT = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
V2_TENSOR = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 784], "data": [0.0] * 784}]}


@pytest.fixture
def traced(settings: Settings) -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with TestClient(create_app(settings)) as client:
        tracing.install(provider)
        try:
            yield client, exporter
        finally:
            tracing.stop()


def _by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, ReadableSpan]:
    return {span.name: span for span in spans}


def _assert_stages_timed(server: ReadableSpan, stages: tuple[str, ...]) -> None:
    """Each stage's duration is an attribute of the server span, in milliseconds: none negative,
    together no longer than the span itself."""
    assert server.attributes is not None and server.start_time is not None and server.end_time is not None
    durations = [server.attributes[f"fashion_serve.{stage}_ms"] for stage in stages]
    assert all(isinstance(d, float) and d >= 0 for d in durations), durations
    assert sum(durations) <= (server.end_time - server.start_time) / 1e6, durations  # type: ignore[arg-type]


def test_a_traced_request_is_one_span_with_its_stages_and_its_batch(
    traced: tuple[TestClient, InMemorySpanExporter], caplog: pytest.LogCaptureFixture
) -> None:
    client, exporter = traced
    with caplog.at_level(logging.INFO, logger="app.access"):
        assert client.post("/predict", files={"file": ("a.png", png())}, headers=TRACEPARENT).status_code == 200
    spans = _by_name(exporter.get_finished_spans())
    server = spans["POST /predict"]
    context = server.get_span_context()
    assert server.kind == SpanKind.SERVER and f"{context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_ID
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/predict" and server.attributes["http.response.status_code"] == 200
    assert server.attributes["fashion_serve.model.served_form"] == "torch-fp32"
    assert server.attributes["fashion_serve.images"] == 1
    _assert_stages_timed(server, ("receive", "queue", "decode", "forward", "encode"))
    assert set(spans) == {"POST /predict"}  # the stages and the batch are attributes, not spans
    assert server.attributes["fashion_serve.batch.requests"] == 1
    assert server.attributes["fashion_serve.batch.images"] == 1
    assert isinstance(server.attributes["fashion_serve.batch.id"], int)
    assert any(f"trace={TRACE_ID}" in r.getMessage() for r in caplog.records if r.name == "app.access")


def test_v2_is_traced_and_probes_metrics_and_files_are_not(traced: tuple[TestClient, InMemorySpanExporter]) -> None:
    client, exporter = traced
    for path in ("/health/live", "/health/ready", "/metrics", "/", "/v2/health/ready"):
        client.get(path)
    assert exporter.get_finished_spans() == ()
    assert client.post("/v2/models/tiny/infer", json=V2_TENSOR).status_code == 200
    names = {span.name for span in exporter.get_finished_spans()}
    assert names == {"POST /v2/models/{model}/infer"}
    server = _by_name(exporter.get_finished_spans())["POST /v2/models/{model}/infer"]
    _assert_stages_timed(server, ("receive", "queue", "forward", "encode"))


def test_off_unless_configured_and_a_bad_configuration_is_one_warning(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    with TestClient(create_app(settings)) as client:  # the service's own log handler writes to stderr
        assert client.post("/predict", files={"file": ("a.png", png())}, headers=TRACEPARENT).status_code == 200
        flush_logs()  # the access line, held until now
        capsys.readouterr()
        assert tracing.start({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "smoke-signals"}) is None
        assert tracing.start({"OTEL_TRACES_EXPORTER": "zipkin-v0"}) is None
        lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all("WARNING app [-] tracing is off" in line for line in lines), lines
    assert "smoke-signals" in lines[0] and "zipkin-v0" in lines[1]


class _Receiver(http.server.BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver: decodes each export as the collector would."""

    received: list[trace_service_pb2.ExportTraceServiceRequest]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
        self.received.append(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
        answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


class _GRPCReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.received: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 (the generated name)
        self.received.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def _exported(received: list[trace_service_pb2.ExportTraceServiceRequest]) -> list[Any]:
    return [span for r in received for resource in r.resource_spans for s in resource.scope_spans for span in s.spans]


def _one_traced_request(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:  # the lifespan sets tracing up, and flushes it at the end
        assert client.post("/predict", files={"file": ("a.png", png())}, headers=TRACEPARENT).status_code == 200


@pytest.fixture
def otlp_http() -> Iterator[tuple[str, list[trace_service_pb2.ExportTraceServiceRequest]]]:
    """An OTLP/HTTP receiver on a free port: its endpoint, and the exports it decoded."""
    received: list[trace_service_pb2.ExportTraceServiceRequest] = []
    handler = type("Handler", (_Receiver,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()


def test_otlp_http_export_reaches_a_receiver(
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    otlp_http: tuple[str, list[trace_service_pb2.ExportTraceServiceRequest]],
) -> None:
    endpoint, received = otlp_http
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "fashion-test")
    _one_traced_request(settings)
    spans = _exported(received)
    names = {span.name for span in spans}
    assert names == {"POST /predict"}
    server_span = next(span for span in spans if span.name == "POST /predict")
    stages = {a.key: a.value.double_value for a in server_span.attributes if a.key.endswith("_ms")}
    assert set(stages) == {f"fashion_serve.{s}_ms" for s in ("receive", "queue", "decode", "forward", "encode")}, stages
    assert server_span.trace_id.hex() == TRACE_ID and server_span.parent_span_id.hex() == PARENT_ID
    service = {a.value.string_value for r in received for res in r.resource_spans for a in res.resource.attributes}
    assert "fashion-test" in service


def test_otlp_grpc_export_reaches_a_receiver(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    import grpc

    receiver = _GRPCReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_INSECURE", "true")
    try:
        _one_traced_request(settings)
    finally:
        server.stop(0)
    names = {span.name for span in _exported(receiver.received)}
    assert names == {"POST /predict"}


@pytest.mark.slow
def test_every_worker_traces_after_the_fork(
    tiny_checkpoint: Path, otlp_http: tuple[str, list[trace_service_pb2.ExportTraceServiceRequest]]
) -> None:
    """`python -m app` with two workers: each sets tracing up after the fork and exports its spans."""
    import http.client

    from bench.server import serving

    endpoint, received = otlp_http
    env = {
        "FASHION_SERVE_CHECKPOINT": str(tiny_checkpoint),
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }
    body = png()
    with serving(env, workers=2) as (_process, port):
        for _ in range(40):  # new connections: the kernel spreads them over both workers' sockets
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            connection.request("POST", "/predict", body, {"Content-Type": "image/png", **TRACEPARENT})
            assert connection.getresponse().status == 200
            connection.close()
    pids = {
        a.value.int_value
        for r in received
        for res in r.resource_spans
        for a in res.resource.attributes
        if a.key == "process.pid" and any(s.spans for s in res.scope_spans)
    }
    assert len(pids) == 2, pids
    servers = [s for s in _exported(received) if s.name == "POST /predict"]
    assert len(servers) == 40 and all(s.trace_id.hex() == TRACE_ID for s in servers)


def test_grpc_model_infer_is_traced_like_http(settings: Settings) -> None:
    import grpc

    from app.protocols.grpc.proto import grpc_predict_v2_pb2 as pb
    from tests.app.test_grpc import _inputs, _request, _stub

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with_grpc = settings.model_copy(update={"grpc_port": free_port()})
    with TestClient(create_app(with_grpc)), grpc.insecure_channel(f"127.0.0.1:{with_grpc.grpc_port}") as channel:
        tracing.install(provider)
        try:
            _stub(channel).ModelInfer(_request(_inputs(1), [1, 784]), metadata=tuple(TRACEPARENT.items()))
            _stub(channel).ServerLive(pb.ServerLiveRequest())
        finally:
            tracing.stop()
    spans = _by_name(exporter.get_finished_spans())
    server = spans["inference.GRPCInferenceService/ModelInfer"]
    assert server.kind == SpanKind.SERVER and f"{server.get_span_context().trace_id:032x}" == TRACE_ID
    assert server.attributes is not None and server.attributes["rpc.system"] == "grpc"
    _assert_stages_timed(server, ("queue", "forward", "encode"))
    assert server.attributes["fashion_serve.batch.images"] == 1
    assert not any("ServerLive" in name for name in spans)  # only inference is traced


def test_only_the_sampled_request_is_traced_and_timed(settings: Settings) -> None:
    """Under a parent-based sampler, a request without a sampled `traceparent` leaves no span and
    sets no stage on anyone's; the sampled one still gets all of its stages, its batch's among them."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(ALWAYS_OFF))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with TestClient(create_app(settings)) as client:
        tracing.install(provider)
        try:
            assert client.post("/predict", files={"file": ("a.png", png())}).status_code == 200
            assert exporter.get_finished_spans() == ()
            assert client.post("/predict", files={"file": ("a.png", png())}, headers=TRACEPARENT).status_code == 200
            assert client.post("/predict", files={"file": ("a.png", png())}).status_code == 200
        finally:
            tracing.stop()
    spans = _by_name(exporter.get_finished_spans())
    assert set(spans) == {"POST /predict"}
    server = spans["POST /predict"]
    assert f"{server.get_span_context().trace_id:032x}" == TRACE_ID
    _assert_stages_timed(server, ("receive", "queue", "decode", "forward", "encode"))


def test_a_cancelled_request_s_stages_are_not_set_on_its_ended_span(caplog: pytest.LogCaptureFixture) -> None:
    """A request cancelled while its batch runs has its span ended first: the inference thread's
    decode and queue timings are dropped without the SDK's warning for each (a log flood under load)."""
    import asyncio

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    scope = {"path": "/predict", "method": "POST", "headers": []}
    carried: list[Any] = []

    async def request() -> None:
        with tracing.server_span(scope):
            carried.append(tracing.current())
            await asyncio.sleep(10)  # cancelled here, as a client's deadline or disconnect does

    async def cancelled() -> None:
        task = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(cancelled())
        (traced,) = carried
        assert traced is not None and not traced.span.is_recording()  # ended by the cancellation
        with caplog.at_level(logging.WARNING):
            assert tracing.timed(lambda: 7, traced)() == 7  # what the inference thread runs later
            tracing.queued([(traced, 0)])
            with tracing.batch([traced]), tracing.forward(1):
                pass
    finally:
        tracing.stop()
    assert not [r for r in caplog.records if "ended span" in r.getMessage()]
    (server,) = exporter.get_finished_spans()
    assert server.attributes is not None and "fashion_serve.decode_ms" not in server.attributes
    assert "fashion_serve.batch.id" not in server.attributes


def test_the_exported_resource_is_hashed_once_and_equals_the_sdk_s() -> None:
    """The resource `start` gives the provider hashes and compares as the SDK's own, so the OTLP
    encoder groups spans as before; its hash is not recomputed from its attributes."""
    from opentelemetry.sdk.resources import Resource

    provider_tracer = tracing.start({"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "fashion-test"})
    try:
        assert provider_tracer is not None and tracing._provider is not None
        resource = tracing._provider.resource
    finally:
        tracing.stop()
    plain = Resource(resource.attributes, resource.schema_url)
    assert resource.attributes["service.name"] == "fashion-test"
    assert resource == plain and hash(resource) == hash(plain) and {plain: 1}[resource] == 1
    resource._attributes = {"service.name": "changed"}  # type: ignore[attr-defined]
    assert hash(resource) == hash(plain)  # computed once, when made


def test_a_batch_s_figures_go_to_each_traced_request_it_serves() -> None:
    """Every traced request of one batch gets the same batch number, the batch's request and
    image counts and its forward passes' time; the next batch has another number."""
    import time

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = tracing.install(provider)
    try:
        first, second, third = (tracing.Traced(tracer.start_span(name)) for name in ("first", "second", "third"))
        with tracing.forward(9):  # outside a batch: nothing to add to
            pass
        with tracing.batch([None, first, None, second]):
            for images in (3, 2):
                with tracing.forward(images):
                    time.sleep(0.005)
        with tracing.batch([third, None]), tracing.forward(1):
            pass
        for traced in (first, second, third):
            traced.end()
    finally:
        tracing.stop()
    spans = _by_name(exporter.get_finished_spans())
    assert set(spans) == {"first", "second", "third"}  # no batch or forward spans
    one, two, three = (spans[name].attributes for name in ("first", "second", "third"))
    assert one is not None and two is not None and three is not None
    assert one == two and one["fashion_serve.batch.requests"] == 4 and one["fashion_serve.batch.images"] == 5
    assert isinstance(one["fashion_serve.forward_ms"], float) and one["fashion_serve.forward_ms"] >= 10
    assert three["fashion_serve.batch.requests"] == 2 and three["fashion_serve.batch.images"] == 1
    assert three["fashion_serve.batch.id"] != one["fashion_serve.batch.id"]


def test_a_root_request_is_sampled_before_its_span_by_the_sdk_s_own_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a ratio sampler, a request without a `traceparent` is decided before any span is made:
    one left out never reaches `start_span`, one kept gets a span with the very trace id the
    sampler kept (so ids still pass the ratio rule downstream), and the share kept is the ratio."""
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio, TraceIdRatioBased

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(0.25), id_generator=tracing._root_ids())
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = tracing.install(provider)
    started: list[str] = []
    start_span = tracer.start_span
    monkeypatch.setattr(tracer, "start_span", lambda name, **kw: started.append(name) or start_span(name, **kw))
    scope = {"path": "/predict", "method": "POST", "headers": [(b"content-type", b"image/png")]}
    try:
        kept = 0
        for _ in range(400):
            with tracing.server_span(scope) as span:
                kept += span is not None
        with tracing.server_span({**scope, "headers": [(b"traceparent", TRACEPARENT["traceparent"].encode())]}) as span:
            assert span is not None  # a sampled parent is followed, whatever the ratio
    finally:
        tracing.stop()
    assert 60 <= kept <= 140, kept  # 400 x 0.25 = 100, sd 8.7
    assert len(started) == kept + 1  # the requests left out made no span at all
    spans = exporter.get_finished_spans()
    bound = TraceIdRatioBased.get_bound_for_rate(0.25)
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == kept and len({s.context.trace_id for s in roots}) == kept
    assert all(s.context.trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < bound for s in roots)
    assert [f"{s.context.trace_id:032x}" for s in spans if s.parent is not None] == [TRACE_ID]


def test_a_custom_sampler_decides_every_request_itself() -> None:
    """A sampler from outside the SDK may read more than the trace id, so no request is decided
    before its span: every one reaches it, with the span's own attributes."""
    from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult

    seen: list[Any] = []

    class ByPath(Sampler):
        def should_sample(self, parent_context: Any, trace_id: int, name: str, *args: Any, **kw: Any) -> SamplingResult:
            seen.append(kw.get("attributes") or args[1])
            return SamplingResult(Decision.RECORD_AND_SAMPLE)

        def get_description(self) -> str:
            return "by path"

    from opentelemetry.sdk.trace.sampling import ParentBased

    tracing.install(TracerProvider(sampler=ParentBased(ByPath()), id_generator=tracing._root_ids()))
    assert tracing._roots is None, "a plain ParentBased may have a custom root: it decides itself"
    tracing.stop()
    tracing.install(TracerProvider(sampler=ByPath(), id_generator=tracing._root_ids()))
    try:
        assert tracing._roots is None
        with tracing.server_span({"path": "/predict", "method": "POST", "headers": []}) as span:
            assert span is not None
    finally:
        tracing.stop()
    assert [a["url.path"] for a in seen] == ["/predict"]


def test_start_decides_root_requests_early_under_the_environment_s_ratio_sampler(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")  # the SDK reads these itself
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.1")
    assert tracing.start({"OTEL_TRACES_EXPORTER": "console"}) is not None
    try:
        assert tracing._roots is not None and tracing._provider is not None
        assert isinstance(tracing._roots.sampler, ParentBasedTraceIdRatio)
        assert tracing._roots.sampler is tracing._provider.sampler
    finally:
        tracing.stop()


def test_a_request_s_attributes_reach_its_span_in_one_call_when_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages, batch figures, `describe` and the route gather on the request and are set on its
    span once, as it ends; what arrives later (a cancelled request's batch) is dropped."""
    from opentelemetry.sdk.trace import Span as SDKSpan

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    calls: list[dict[str, Any]] = []
    set_attributes = SDKSpan.set_attributes
    monkeypatch.setattr(SDKSpan, "set_attributes", lambda self, a: calls.append(dict(a)) or set_attributes(self, a))
    try:
        with tracing.server_span({"path": "/predict", "method": "POST", "headers": []}) as traced:
            assert traced is not None and tracing.current() is traced
            with tracing.stage("receive"):
                pass
            tracing.queued([(traced, 0)])
            with tracing.batch([traced]), tracing.forward(2):
                pass
            tracing.describe({"fashion_serve.model": "fashion"})
            tracing.finish_server_span(traced, "POST", "/predict", 200)
            assert calls == []  # nothing reached the span yet
        with tracing.stage("encode"):  # after the end: nowhere to go
            pass
        traced.attributes["late"] = 1
    finally:
        tracing.stop()
    assert len(calls) == 1
    (span,) = exporter.get_finished_spans()
    assert span.attributes is not None and "late" not in span.attributes
    assert span.attributes["fashion_serve.model"] == "fashion" and span.attributes["http.response.status_code"] == 200
    assert span.attributes["fashion_serve.batch.images"] == 2 and "fashion_serve.receive_ms" in span.attributes
