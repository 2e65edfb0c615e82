"""OTLP trace export requests, encoded straight to protobuf bytes.

The OpenTelemetry SDK's encoder builds a protobuf object per span, per attribute and per value in
Python: about 26 us a span for pgfront's ten attributes, more than everything else tracing costs. A
statement's span is always the same shape, and most attribute values repeat (database, user, query
text, fingerprint), so this encoder writes the wire format itself and keeps each repeated key/value
pair's encoding: about 4 us a span. proxy.tracing goes further: it keeps the parts of a Span (span_ids,
span_head, ...) that a statement's spans share, and joins them. The output is an ordinary
ExportTraceServiceRequest; the tests decode it with the opentelemetry-proto package. Field numbers are opentelemetry-proto's
(trace/v1/trace.proto, common/v1/common.proto, resource/v1/resource.proto).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from typing import Any

_DOUBLE = struct.Struct("<d")
_FIXED32 = struct.Struct("<I")
TIMES = struct.Struct("<BQBQ")  # 7: start_time_unix_nano, 8: end_time_unix_nano (fixed64 each, with their tags)
_KINDS = {"INTERNAL": 1, "SERVER": 2, "CLIENT": 3, "PRODUCER": 4, "CONSUMER": 5}
SERVER = 2
_CACHE_LIMIT = 50_000  # encoded key/value pairs kept (a few MB at most)
_cache: dict[tuple[int, str, str], bytes] = {}


_ONE_BYTE = [bytes((i,)) for i in range(128)]


def _varint(n: int) -> bytes:
    if n < 128:
        return _ONE_BYTE[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _any_value(v: Any) -> bytes:
    if isinstance(v, str):
        return _field(1, v.encode("utf-8", "surrogatepass"))
    if isinstance(v, bool):
        return bytes((2 << 3, 1 if v else 0))
    if isinstance(v, int):
        return _varint(3 << 3) + _varint(v & 0xFFFFFFFFFFFFFFFF)  # int64: two's complement, 10 bytes if < 0
    if isinstance(v, float):
        return bytes((4 << 3 | 1,)) + _DOUBLE.pack(v)
    if isinstance(v, list | tuple):  # ArrayValue { repeated AnyValue values = 1 }
        return _field(5, b"".join(_field(1, _any_value(x)) for x in v))
    return _field(1, str(v).encode("utf-8", "surrogatepass"))


def _key_value(number: int, key: str, value: Any) -> bytes:
    return _field(number, _field(1, key.encode()) + _field(2, _any_value(value)))


def attributes(attrs: Mapping[str, Any], number: int) -> bytes:
    """Each attribute as field `number` (a repeated KeyValue). Pairs with a string value recur from span
    to span (database, user, query text, fingerprint): their encoding is kept; numbers rarely do."""
    parts = []
    cache = _cache
    for key, value in attrs.items():
        if type(value) is str:
            k = (number, key, value)
            encoded = cache.get(k)
            if encoded is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                encoded = cache[k] = _key_value(number, key, value)
            parts.append(encoded)
        else:
            parts.append(_key_value(number, key, value))
    return b"".join(parts)


def span(trace_id: int, span_id: int, parent_id: int | None, remote_parent: bool, trace_state: str, name: str,
         kind: int, start_ns: int, end_ns: int, attrs: Mapping[str, Any], error: str | None) -> bytes:
    """One encoded Span (kind: the proto's SpanKind number; error: the status message of a failed one)."""
    return b"".join((span_ids(trace_id, span_id, parent_id, trace_state), span_head(name, kind),
                     TIMES.pack(0x39, start_ns, 0x41, end_ns), attributes(attrs, 9), span_end(error, remote_parent)))


# The parts of a Span, in field order, for an encoder that keeps some of them (proxy.tracing keeps the
# head and most attributes of each statement): span_ids, span_head, TIMES, attributes (field 9), span_end.


def span_ids(trace_id: int, span_id: int, parent_id: int | None, trace_state: str) -> bytes:
    """Fields 1-4: trace_id, span_id, trace_state, parent_span_id."""
    ids = b"\x0a\x10" + trace_id.to_bytes(16, "big") + b"\x12\x08" + span_id.to_bytes(8, "big")
    if trace_state:
        ids += _field(3, trace_state.encode())
    if parent_id is not None:
        ids += b"\x22\x08" + parent_id.to_bytes(8, "big")
    return ids


def span_head(name: str, kind: int) -> bytes:
    """Fields 5 and 6: name and kind."""
    return _field(5, name.encode("utf-8", "surrogatepass")) + b"\x30" + _varint(kind)


def span_end(error: str | None, remote_parent: bool) -> bytes:
    """Fields 15 and 16: the status (with error, its message: the span failed) and the flags."""
    if error is not None:  # Status { string message = 2; StatusCode code = 3 (ERROR = 2) }
        status = _field(15, (_field(2, error.encode()) if error else b"") + b"\x18\x02")
    else:
        status = b"\x7a\x00"  # an empty Status, as the SDK writes it
    # 16: flags (fixed32): the context-has-is-remote bit, and is-remote for a remote parent
    return status + b"\x85\x01" + _FIXED32.pack(0x300 if remote_parent else 0x100)


def scope_span(encoded: bytes) -> bytes:
    """An encoded Span as ScopeSpans' field 2, ready for request_wrapped()."""
    n = len(encoded)
    if n < 16384:  # a statement's span, but for a huge query text
        return bytes((0x12, n & 0x7F | 0x80, n >> 7) if n >= 128 else (0x12, n)) + encoded
    return _field(2, encoded)


def _readable(s: Any) -> bytes:
    """An SDK ReadableSpan, encoded (only ERROR and UNSET statuses: pgfront sets no other)."""
    ctx, parent, status = s.context, s.parent, s.status
    error = (status.description or "") if status.status_code.value == 2 else None
    return span(ctx.trace_id, ctx.span_id, parent.span_id if parent is not None else None,
                parent is not None and parent.is_remote, ctx.trace_state.to_header() if ctx.trace_state else "",
                s.name, _KINDS.get(s.kind.name, 0), s.start_time, s.end_time, s.attributes, error)


def export_request(spans: Sequence[Any], resource: bytes, scope: bytes) -> bytes:
    """ExportTraceServiceRequest bytes for SDK ReadableSpans of one resource and instrumentation scope."""
    return request([_readable(s) for s in spans], resource, scope)


def request(encoded: Sequence[bytes], resource: bytes, scope: bytes) -> bytes:
    """ExportTraceServiceRequest bytes for spans already encoded by span(), of one resource (its encoded
    attributes) and one instrumentation scope (scope_fields())."""
    return request_wrapped([_field(2, e) for e in encoded], resource, scope)


def request_wrapped(scope_spans: Sequence[bytes], resource: bytes, scope: bytes) -> bytes:
    """request() for spans already wrapped by scope_span()."""
    return _field(1, _field(1, resource) + _field(2, _field(1, scope) + b"".join(scope_spans)))


def scope_fields(name: str, version: str) -> bytes:
    return _field(1, name.encode()) + _field(2, version.encode())
