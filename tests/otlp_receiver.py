"""A real OTLP/HTTP trace receiver for tests: what a collector would get, decoded with opentelemetry-proto.

    from tests.otlp_receiver import otlp_receiver_fixture  # noqa: F401  (the `otlp_receiver` fixture)

    def test_x(otlp_receiver):
        ...export to otlp_receiver.url...
        [span] = otlp_receiver.wait_for(lambda spans: len(spans) == 1)

Each span is kept as a plain dict: name, trace_id / span_id / parent_span_id (lower-case hex, "" for a
root), kind ("SERVER", "CLIENT", ...), attributes ({key: python value}, arrays as lists), status_code
("UNSET", "OK", "ERROR"), status_message, start_ns, end_ns, resource ({key: value}) and scope (name).
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

Spans = list[dict[str, Any]]


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, which)


def _span(span: Span, resource: dict[str, Any], scope: str) -> dict[str, Any]:
    return {
        "name": span.name,
        "trace_id": span.trace_id.hex(),
        "span_id": span.span_id.hex(),
        "parent_span_id": span.parent_span_id.hex(),
        "kind": Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
        "attributes": {kv.key: _value(kv.value) for kv in span.attributes},
        "status_code": Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
        "status_message": span.status.message,
        "start_ns": span.start_time_unix_nano,
        "end_ns": span.end_time_unix_nano,
        "resource": resource,
        "scope": scope,
    }


class OtlpReceiver:
    """POST /v1/traces (application/x-protobuf, optionally gzip or deflate) on a free loopback port."""

    def __init__(self) -> None:
        self._spans: Spans = []
        self.requests = 0  # export requests accepted
        self.headers: list[dict[str, str]] = []  # each accepted request's HTTP headers, names lower-cased
        self._cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> OtlpReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server naming
                if self.path.split("?")[0] != "/v1/traces":
                    self.send_error(404)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                encoding = (self.headers.get("Content-Encoding") or "").lower()
                if encoding == "gzip":
                    body = gzip.decompress(body)
                elif encoding == "deflate":
                    body = zlib.decompress(body)
                if self.headers.get_content_type() != "application/x-protobuf":
                    self.send_error(415, "only application/x-protobuf")
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver._add(request, {k.lower(): v for k, v in self.headers.items()})
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet test output
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="otlp-receiver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the receiver first"
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1/traces"

    def _add(self, request: ExportTraceServiceRequest, headers: dict[str, str]) -> None:
        got = []
        for rs in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                got.extend(_span(s, resource, ss.scope.name) for s in ss.spans)
        with self._cond:
            self.requests += 1
            self.headers.append(headers)
            self._spans.extend(got)
            self._cond.notify_all()

    def spans(self) -> Spans:
        """A snapshot of every span received so far, in arrival order."""
        with self._cond:
            return list(self._spans)

    def clear(self) -> None:
        with self._cond:
            self._spans.clear()

    def wait_for(self, predicate: Callable[[Spans], bool], timeout: float = 10.0) -> Spans:
        """The spans once predicate(spans) holds; AssertionError with what arrived after timeout seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"OTLP receiver: condition not met in {timeout}s; "
                                         f"got {len(self._spans)} spans: {[s['name'] for s in self._spans]}")
                self._cond.wait(left)
            return list(self._spans)


# named apart from the fixture, so a test module importing it does not shadow it with its parameters (F811)
@pytest.fixture(name="otlp_receiver")
def otlp_receiver_fixture() -> Iterator[OtlpReceiver]:
    """A started OtlpReceiver, stopped after the test."""
    receiver = OtlpReceiver().start()
    try:
        yield receiver
    finally:
        receiver.stop()
