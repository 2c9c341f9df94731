"""Finished spans as OTLP protobuf bytes, written straight into the wire format, for the OTLP
exporters `app.tracing` makes.

Why not the library's encoder: opentelemetry-exporter-otlp-proto-common builds a protobuf
message object in Python for every attribute, value, span and envelope, which for this
service's spans (about 18 attributes each) costs more on the exporter thread than the traced
request itself costs the event loop (docs/performance.md has both figures). This module writes
the same `ExportTraceServiceRequest` (opentelemetry/proto/collector/trace/v1) field by field;
tests/app/test_otlp.py parses what it writes with the official message classes and compares it
with the library's encoding of the same spans. A value of a type it does not write raises
`TypeError`, and `encode_or_fallback` then encodes that batch with the library instead.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_U64 = (1 << 64) - 1
_INT64 = range(-(1 << 63), 1 << 63)  # what an AnyValue's int_value holds
_double = struct.Struct("<d").pack
_fixed64 = struct.Struct("<Q").pack
_fixed32 = struct.Struct("<I").pack
_SMALL = [bytes((n,)) for n in range(128)]
# OTLP's SpanKind numbers: the SDK's SpanKind.value + 1 (INTERNAL 0 -> SPAN_KIND_INTERNAL 1, ...)
_FLAGS_HAS_IS_REMOTE, _FLAGS_IS_REMOTE = 0x100, 0x200  # SpanFlags


def _varint(n: int) -> bytes:
    if n < 0x80:
        return _SMALL[n]
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _len(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 0x80 else _varint(n)) + payload


def _value(value: Any) -> bytes:
    """An AnyValue's fields (each oneof member written even when it is its type's zero)."""
    kind = type(value)
    if kind is str:
        return _len(b"\x0a", value.encode())
    if kind is float:
        return b"\x21" + _double(value)
    if kind is int:
        return b"\x18" + _varint(_int64(value) & _U64)
    if kind is bool:
        return b"\x10\x01" if value else b"\x10\x00"
    return _other_value(value)


def _other_value(value: Any) -> bytes:
    """`_value` for the rarer types, in the order the library tests them."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _len(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(_int64(int(value)) & _U64)
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, bytes):
        return _len(b"\x3a", value)
    if isinstance(value, Sequence):
        return _len(b"\x2a", b"".join(_len(b"\x0a", _value(item)) for item in value))
    if isinstance(value, Mapping):
        return _len(b"\x32", b"".join(_len(b"\x0a", _key_value(str(k), v)) for k, v in value.items()))
    raise TypeError(f"no OTLP encoding for a {type(value).__name__} attribute value")


def _int64(value: int) -> int:
    if value not in _INT64:  # the library drops such an attribute: so does the fallback
        raise TypeError(f"no OTLP encoding for the integer {value}: outside int64")
    return value


_keys: dict[str, bytes] = {}  # a key's encoded field, made once per distinct key


def _key(key: str) -> bytes:
    encoded = _len(b"\x0a", key.encode())
    if len(_keys) < 4096:  # a service's attribute keys are few; the bound is for any that are not
        _keys[key] = encoded
    return encoded


def _key_value(key: str, value: Any) -> bytes:
    return (_keys.get(key) or _key(key)) + _len(b"\x12", _value(value))


# Whole attribute fields of text and small integer values seen before (not counters, nor floats).
_fields: dict[tuple[bytes, str, Any], bytes] = {}


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    """Each attribute as a KeyValue field `tag`. Most of the encoder's time is this loop, so a
    text or integer attribute seen before (a method, a route, a model's name, a status) is one
    lookup, and the other common types are written inline."""
    if not attributes:
        return b""
    parts = []
    for key, value in attributes.items():
        kind = type(value)
        # Never a float (0 == 0.0 as a key), nor long text (a path a client chose).
        cached = (kind is str and len(value) <= 64) or (kind is int and 0 <= value < 1024)
        if cached and (field := _fields.get((tag, key, value))) is not None:
            parts.append(field)
            continue
        encoded = b"\x21" + _double(value) if kind is float else _value(value)
        n = len(encoded)
        pair = (_keys.get(key) or _key(key)) + (b"\x12" + _SMALL[n] + encoded if n < 0x80 else _len(b"\x12", encoded))
        n = len(pair)
        field = tag + _SMALL[n] + pair if n < 0x80 else _len(tag, pair)
        if cached:
            if len(_fields) >= 4096:  # values may come from clients: start again rather than grow
                _fields.clear()
            _fields[(tag, key, value)] = field
        parts.append(field)
    return b"".join(parts)


def _flags(parent: Any) -> bytes:
    """The span's or link's `flags` (fixed32), whose remote bits say what is known of its parent."""
    remote = parent is not None and parent.is_remote
    return _fixed32(_FLAGS_HAS_IS_REMOTE | _FLAGS_IS_REMOTE if remote else _FLAGS_HAS_IS_REMOTE)


def _span(span: Any) -> bytes:
    context, parent = span.get_span_context(), span.parent
    parts = [b"\x0a\x10", context.trace_id.to_bytes(16, "big"), b"\x12\x08", context.span_id.to_bytes(8, "big")]
    if context.trace_state:
        parts.append(_len(b"\x1a", ",".join(f"{k}={v}" for k, v in context.trace_state.items()).encode()))
    if parent is not None:
        parts += (b"\x22\x08", parent.span_id.to_bytes(8, "big"))
    parts += (
        _len(b"\x2a", span.name.encode()),
        b"\x30",
        _SMALL[span.kind.value + 1],
        b"\x39",
        _fixed64(span.start_time),
        b"\x41",
        _fixed64(span.end_time),
        _attributes(b"\x4a", span.attributes),
    )
    for tag, count in ((b"\x50", span.dropped_attributes), (b"\x60", span.dropped_events)):
        if count:
            parts += (tag, _varint(count))
    parts.extend(_len(b"\x5a", _event(event)) for event in span.events)
    parts.extend(_len(b"\x6a", _link(link)) for link in span.links)
    if span.dropped_links:
        parts += (b"\x70", _varint(span.dropped_links))
    status = span.status
    message = _len(b"\x12", status.description.encode()) if status.description else b""
    code = b"\x18" + _SMALL[status.status_code.value] if status.status_code.value else b""
    parts += (_len(b"\x7a", message + code), b"\x85\x01", _flags(parent))
    return b"".join(parts)


def _event(event: Any) -> bytes:
    dropped = b"\x20" + _varint(event.dropped_attributes) if event.dropped_attributes else b""
    return (
        b"\x09" + _fixed64(event.timestamp) + _len(b"\x12", event.name.encode())
        + _attributes(b"\x1a", event.attributes) + dropped
    )  # fmt: skip


def _link(link: Any) -> bytes:
    dropped = b"\x28" + _varint(link.dropped_attributes) if link.dropped_attributes else b""
    return (
        b"\x0a\x10" + link.context.trace_id.to_bytes(16, "big")
        + b"\x12\x08" + link.context.span_id.to_bytes(8, "big")
        + _attributes(b"\x22", link.attributes) + dropped + b"\x35" + _flags(link.context)
    )  # fmt: skip


def _scope(scope: Any) -> bytes:
    if scope is None:
        return b""
    version = _len(b"\x12", scope.version.encode()) if scope.version else b""
    return _len(b"\x0a", scope.name.encode()) + version + _attributes(b"\x1a", scope.attributes)


def encode(spans: Iterable[Any]) -> bytes:
    """The `ExportTraceServiceRequest` carrying `spans`, grouped by resource, then by scope."""
    grouped: dict[Any, dict[Any, list[bytes]]] = {}
    for span in spans:
        scope = span.instrumentation_scope or None
        grouped.setdefault(span.resource, {}).setdefault(scope, []).append(_len(b"\x12", _span(span)))
    out = []
    for resource, scopes in grouped.items():
        scope_spans = b"".join(
            _len(
                b"\x12",
                _len(b"\x0a", _scope(scope))
                + b"".join(encoded)
                + (_len(b"\x1a", scope.schema_url.encode()) if scope is not None and scope.schema_url else b""),
            )
            for scope, encoded in scopes.items()
        )
        schema = _len(b"\x1a", resource.schema_url.encode()) if resource.schema_url else b""
        out.append(_len(b"\x0a", _len(b"\x0a", _attributes(b"\x0a", resource.attributes)) + scope_spans + schema))
    return b"".join(out)


def encode_or_fallback(spans: Sequence[Any]) -> bytes:
    """`encode`, or the library's encoding where `encode` meets a value it does not write (the
    library then drops that one attribute and keeps the batch)."""
    try:
        return encode(spans)
    except (TypeError, ValueError):  # ValueError: text that is not UTF-8 (a lone surrogate)
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

        return encode_spans(spans).SerializePartialToString()


class _Encoded:
    """What the OTLP/HTTP exporter's `encode_spans` returns here: these bytes, behind the one
    message method the exporter calls on it."""

    __slots__ = ("spans",)

    def __init__(self, spans: Sequence[Any]) -> None:
        self.spans = spans

    def SerializePartialToString(self) -> bytes:  # noqa: N802 (the protobuf method's name)
        return encode_or_fallback(self.spans)


def exporter(protocol: str) -> Any:
    """The OTLP span exporter for `protocol` (`http/protobuf` or `grpc`), encoding with `encode`.
        Each reads its endpoint, headers, timeout and compression from the OTEL_* variables itself.
        The seams (the HTTP exporter's module-level `encode_spans`, the gRPC exporter's
        `_translate_data`) are checked against the installed exporters in tests/app/test_otlp.py. The
    HTTP exporter's module is patched for the whole process: any OTLP/HTTP span exporter in it
    encodes so."""
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http import trace_exporter

        trace_exporter.encode_spans = _Encoded  # type: ignore[assignment]
        return trace_exporter.OTLPSpanExporter()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        class Exporter(OTLPSpanExporter):
            def _translate_data(self, data: Sequence[Any]) -> ExportTraceServiceRequest:
                return ExportTraceServiceRequest.FromString(encode_or_fallback(data))

        return Exporter()
    raise ValueError(f"OTLP protocol {protocol!r}: use http/protobuf or grpc")
