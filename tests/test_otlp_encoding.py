"""proxy.otlp writes OTLP export requests by hand: they must decode (opentelemetry-proto) to exactly
what the OpenTelemetry SDK's own encoder makes of the same spans."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from proxy import otlp

RESOURCE = Resource.create({"service.name": "pgfront", "process.pid": 4242, "host.name": "h\u00e9"})
SCOPE = InstrumentationScope("pgfront", "0.1.0")

values = st.one_of(
    st.text(max_size=300), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False), st.lists(st.text(max_size=20), max_size=4),
)


def _span(name: str, attrs: dict, remote_parent: bool, error: str | None, state: bool, start: int) -> ReadableSpan:
    parent = SpanContext(0xABC, 0x123, is_remote=remote_parent, trace_flags=TraceFlags(1)) if remote_parent else None
    ctx = SpanContext(0xABC if parent else 0xDEADBEEF << 64 | 7, 0x9F, is_remote=False, trace_flags=TraceFlags(1),
                      trace_state=TraceState([("vendor", "x1")]) if state else None)
    return ReadableSpan(name=name, context=ctx, parent=parent, resource=RESOURCE, attributes=attrs,
                        kind=SpanKind.SERVER, status=Status(StatusCode.ERROR, error) if error else Status(StatusCode.UNSET),
                        start_time=start, end_time=start + 1234, instrumentation_scope=SCOPE)


def _decoded(data: bytes) -> ExportTraceServiceRequest:
    req = ExportTraceServiceRequest()
    req.ParseFromString(data)
    return req


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=200), st.dictionaries(st.text(min_size=1, max_size=30), values,
                                                                             max_size=12),
                          st.booleans(), st.one_of(st.none(), st.text(min_size=1, max_size=40)), st.booleans(),
                          st.integers(min_value=0, max_value=2**63)), min_size=1, max_size=5))
def test_requests_decode_as_the_sdks_do(specs):
    spans = [_span(*spec) for spec in specs]
    ours = _decoded(otlp.export_request(spans, otlp.attributes(RESOURCE.attributes, 1),
                                        otlp.scope_fields(SCOPE.name, SCOPE.version)))
    theirs = _decoded(encode_spans(spans).SerializePartialToString())
    assert ours == theirs


def test_repeated_values_are_encoded_once_and_stay_right():
    span = _span("SELECT t", {"db.namespace": "app", "db.response.returned_rows": 3}, False, None, False, 10)
    request = otlp.export_request([span, span], b"", otlp.scope_fields("pgfront", "1"))
    spans = _decoded(request).resource_spans[0].scope_spans[0].spans
    assert [s.attributes[0].value.string_value for s in spans] == ["app", "app"]
    assert [s.attributes[1].value.int_value for s in spans] == [3, 3]
