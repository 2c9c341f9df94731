"""OpenTelemetry traces, configured only by the standard `OTEL_*` variables, off unless asked for.

`OTEL_TRACES_EXPORTER` (`otlp`, `console`, or both comma-separated; unset or `none`: off) turns
tracing on in each worker after the fork (`start`). The SDK reads the rest itself:
`OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER[_ARG]`, `OTEL_BSP_*`,
and the OTLP exporter's `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT`, `_HEADERS`, `_TIMEOUT`, ...;
`OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` chooses `http/protobuf` (the default) or `grpc`. A
configuration that cannot work logs one WARNING and the service serves untraced.

What a traced inference request gives (probes, /metrics and static files are not traced): a
server span (HTTP, or gRPC's ModelInfer), child of the caller's W3C `traceparent`, whose
attributes time its stages (`fashion_serve.receive_ms`: the body; `queue_ms`: submitted until its
batch starts; `decode_ms`; `forward_ms`: its batch's forward passes; `encode_ms`) and name its
batch (`fashion_serve.batch.id`, `.requests`, `.images`). One span per request, no child spans,
because each span costs the Python SDK far more to make and to export than an attribute
(docs/performance.md); the stages' order is fixed, so durations say what child spans would.
The hooks that time them are `app.tracing.stages` (with tracing off, or a request not sampled,
each is one ContextVar lookup); the OTLP exporters encode with `app.tracing.otlp`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from app.paths import is_inference_path
from app.tracing import otlp
from app.tracing.stages import Traced, batch, current, describe, forward, queued, request_span, stage, timed

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

__all__ = [
    "Traced",
    "batch",
    "current",
    "describe",
    "finish_server_span",
    "forward",
    "install",
    "queued",
    "rpc_server_span",
    "server_span",
    "stage",
    "start",
    "stop",
    "timed",
    "trace_id",
]  # fmt: skip
logger = logging.getLogger("app")


class _API(NamedTuple):
    """The OpenTelemetry calls the hooks make, looked up once when tracing starts (not per request)."""

    attach: Any
    detach: Any
    set_span_in_context: Any
    extract: Any
    Status: Any
    ERROR: Any
    SERVER: Any


_tracer: Tracer | None = None
_provider: TracerProvider | None = None
_api: _API
_roots: Any = None  # the provider's `RootIds` (`_root_ids`) while its sampler decides a root span by its trace id alone


def start(environ: Mapping[str, str] = os.environ) -> Tracer | None:
    """Set tracing up from the environment (in a worker, after the fork); None when it is off."""
    names = [n.strip() for n in environ.get("OTEL_TRACES_EXPORTER", "none").split(",") if n.strip()]
    if not names or names == ["none"]:
        return None
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporters = [_exporter(name, environ) for name in names if name != "none"]
        service = environ.get("OTEL_SERVICE_NAME", "fashion-serve")
        resource = _hashed_once(Resource.create({"service.name": service, "process.pid": os.getpid()}))
        # The sampler comes from OTEL_TRACES_SAMPLER[_ARG].
        provider = TracerProvider(resource=resource, id_generator=_root_ids())
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))  # OTEL_BSP_* apply
    except Exception as exc:  # any configuration error: serve untraced, say so once
        logger.warning("tracing is off: the OTEL_* configuration cannot work: %s", exc)
        return None
    return install(provider)


def _hashed_once(resource: Resource) -> Resource:
    """`resource` with its hash computed once. The OTLP encoder groups every exported span by its
    resource, and the SDK's `Resource.__hash__` serializes all its attributes to JSON each time
    (opentelemetry-python#5577 calls that wasteful; docs/performance.md has the cost). Equal, and
    hashing alike, to the resource it copies."""
    from opentelemetry.sdk.resources import Resource

    class HashedResource(Resource):
        def __init__(self, attributes: Any, schema_url: str | None = None) -> None:
            super().__init__(attributes, schema_url)
            self._hash = super().__hash__()

        def __hash__(self) -> int:
            return self._hash

    return HashedResource(resource.attributes, resource.schema_url)


def _root_ids() -> Any:
    """An id generator that lets a request without a `traceparent` be sampled before its span is
    made: `sampled` draws the trace id and asks the sampler, and the span the SDK then starts gets
    that id, so the verdict is the one the SDK reaches. A request the sampler leaves out costs one
    id and one sampler call instead of the SDK's whole `start_span` (docs/performance.md)."""
    import threading

    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class RootIds(RandomIdGenerator):
        def __init__(self) -> None:
            self.sampler: Any = None
            self._drawn = threading.local()  # the id `sampled` drew, until the span takes it

        def sampled(self, name: str) -> bool:
            trace_id = super().generate_trace_id()
            if not self.sampler.should_sample(None, trace_id, name).decision.is_recording():
                return False
            self._drawn.trace_id = trace_id
            return True

        def generate_trace_id(self) -> int:
            trace_id = getattr(self._drawn, "trace_id", 0)
            if not trace_id:
                return super().generate_trace_id()
            self._drawn.trace_id = 0
            return trace_id

    return RootIds()


def install(provider: TracerProvider) -> Tracer:
    """Trace with `provider` from now on (tests pass one with an in-memory exporter)."""
    global _tracer, _provider, _api, _roots
    from opentelemetry import context, trace
    from opentelemetry.propagate import extract
    from opentelemetry.sdk.trace import sampling

    # The SDK's own samplers decide a root span by its trace id alone (a ratio, or always/never),
    # so asking one before the span gives the span's verdict; a custom sampler may read more, and
    # a plain `ParentBased` may have a custom root (the env-made parent-based ones are subclasses).
    ids, sampler = provider.id_generator, provider.sampler
    own = type(sampler).__module__ == sampling.__name__ and type(sampler) is not sampling.ParentBased
    _roots = ids if hasattr(ids, "sampled") and own else None
    if _roots is not None:
        _roots.sampler = sampler

    _api = _API(
        context.attach, context.detach, trace.set_span_in_context, extract,
        trace.Status, trace.StatusCode.ERROR, trace.SpanKind.SERVER,
    )  # fmt: skip
    _provider, _tracer = provider, provider.get_tracer("fashion-serve")
    return _tracer


def stop() -> None:
    """Export what is buffered and turn tracing off (a worker's shutdown)."""
    global _tracer, _provider, _roots
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = _roots = None


def _exporter(name: str, environ: Mapping[str, str]) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if name != "otlp":
        raise ValueError(f"OTEL_TRACES_EXPORTER {name!r}: this service exports with otlp or console")
    protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    return otlp.exporter(protocol or "http/protobuf")


_OFF: contextlib.nullcontext[None] = contextlib.nullcontext()  # what every hook returns while untraced


def server_span(scope: Mapping[str, Any]) -> contextlib.AbstractContextManager[Traced | None]:
    """The request's server span, child of its `traceparent`, current for the request (as the
    `Traced` request its stages write to); None when off, for other routes, or when the sampler
    leaves the request out."""
    if _tracer is None or not is_inference_path(scope["path"]):
        return _OFF
    name = f"{scope['method']} {scope['path']}"
    carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"] if k in _PROPAGATED}
    if not carrier and _roots is not None and not _roots.sampled(name):
        return _OFF
    attributes = {"http.request.method": scope["method"], "url.path": scope["path"], "url.scheme": "http"}
    return _server(_tracer, name, carrier, attributes)


def rpc_server_span(
    service: str, method: str, metadata: Iterable[tuple[str, Any]]
) -> contextlib.AbstractContextManager[Traced | None]:
    """A gRPC call's server span, child of the `traceparent` in its metadata; None as `server_span`."""
    if _tracer is None:
        return _OFF
    name = f"{service}/{method}"
    carrier = {key: value for key, value in metadata if key in ("traceparent", "tracestate") and isinstance(value, str)}
    if not carrier and _roots is not None and not _roots.sampled(name):
        return _OFF
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    return _server(_tracer, name, carrier, attributes)


_PROPAGATED = (b"traceparent", b"tracestate")


@contextlib.contextmanager
def _server(tracer_: Tracer, name: str, carrier: dict[str, str], attributes: dict[str, Any]) -> Iterator[Traced | None]:
    parent = _api.extract(carrier) if carrier else None
    span = tracer_.start_span(name, context=parent, kind=_api.SERVER, attributes=attributes)
    if not span.is_recording():  # sampled out: nothing below needs to know of it
        yield None
        return
    traced = Traced(span)
    token, request = _api.attach(_api.set_span_in_context(span)), request_span.set(traced)
    try:
        yield traced
    except BaseException as exc:
        span.record_exception(exc)
        span.set_status(_api.Status(_api.ERROR, type(exc).__name__))
        raise
    finally:
        request_span.reset(request)
        _api.detach(token)
        traced.end()


def finish_server_span(traced: Traced, method: str, route: str, status: int) -> None:
    """Name the server span by its route template and record the answer's status."""
    traced.span.update_name(f"{method} {route}")
    traced.attributes.update({"http.route": route, "http.response.status_code": status})
    if status >= 500:
        traced.attributes["error.type"] = str(status)
        traced.span.set_status(_api.Status(_api.ERROR))


def trace_id(traced: Traced | None) -> str | None:
    """The request's trace id as 32 hex digits (what the access log shows)."""
    return None if traced is None else f"{traced.span.get_span_context().trace_id:032x}"
