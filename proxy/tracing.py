"""OpenTelemetry spans for statements, exported over OTLP/HTTP (the [tracing] section of config.toml).

One span per statement, made after the fact: the relay already knows the statement's start and end, so
Tracing.statement() builds a finished span with explicit timestamps instead of keeping a live span open
across awaits. The decision is split from the work: sample() runs for every statement and costs an
attribute load and one random() call when it says no; statement() runs only for the sampled ones.

With `endpoint` empty, from_config() returns None and the relay makes no call at all: tracing off costs
one `is None` test. A statement whose sqlcommenter comment carries a W3C `traceparent` follows that
parent's sampled flag (parent-based sampling) and its span becomes a child of the client's span.

The SDK provider is private to this object (the global provider is left alone), export runs on the
BatchSpanProcessor's thread, and export failures are logged by the SDK and never reach the caller.
Build a Tracing in each worker process, after the fork.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import struct
import sys
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    SpanContext,
    TraceFlags,
    TraceState,
)

from proxy import otlp
from proxy.config import Section
from proxy.sql.sqlcommenter import traceparent

_TRACE_KEYS = frozenset({"traceparent", "tracestate"})
_BATCH_SPANS = 128  # spans encoded together (or after _BATCH_SECONDS, whichever comes first)
_BATCH_SECONDS = 0.5
_OK_CLASSES = ("00", "01", "02")  # success, warning, no data: not errors
_MAX_ATTRIBUTE_LENGTH = 8192  # a normalized statement can be huge (generated SQL); keep spans bounded
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)


_SHAPE_BYTES = 8 << 20  # statement shapes' encoded parts kept per process (see Tracing._shape), about
_DOUBLE = struct.Struct("<d")
# pgfront.upstream_seconds with its value left off: a double, the last 8 bytes of its encoding
_UPSTREAM_KEY = otlp.attributes({"pgfront.upstream_seconds": 0.0}, 9)[:-8]
_ROWS = [otlp.attributes({"db.response.returned_rows": n}, 9) for n in range(128)]
_ROOT_END, _CHILD_END = otlp.span_end(None, False), otlp.span_end(None, True)


def _optional(sqlstate: str | None, rules: Sequence[tuple[str, str, bool]], cache: str | None,
              queue_seconds: float, tags: dict[str, str] | None) -> dict[str, Any]:
    """The attributes a span has only sometimes, in the order they follow the others."""
    attributes: dict[str, Any] = {}
    if sqlstate:
        attributes["db.response.status_code"] = sqlstate
    if rules:
        attributes["pgfront.rules"] = [f"{name}:{action}:observe" if observed else f"{name}:{action}"
                                       for name, action, observed in rules]
    if cache:
        attributes["pgfront.cache"] = cache
    if queue_seconds > 0:
        attributes["pgfront.queue_seconds"] = queue_seconds
    if tags:
        for key, value in tags.items():
            if key not in _TRACE_KEYS:
                attributes["pgfront.tag." + key] = value
    return attributes


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL for a configured endpoint: a bare http(s)://host:port gets /v1/traces.

    Raises ValueError with a readable message for anything that is not an http(s) URL with a host.
    """
    try:
        parts = urlsplit(endpoint.strip())
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError as e:
        raise ValueError(f"[tracing] endpoint {endpoint!r} is not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"[tracing] endpoint {endpoint!r}: expected http(s)://HOST:PORT[/v1/traces]")
    path = parts.path if parts.path not in ("", "/") else "/v1/traces"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


class _Encoded(bytes):
    """An encoded span for an SDK whose batch processor has no `emit` to take plain bytes: its on_end()
    reads `context.trace_flags.sampled` before queueing the span."""

    __slots__ = ()
    context = SpanContext(1, 1, is_remote=False, trace_flags=TraceFlags(TraceFlags.SAMPLED))


def _sender(exporter: OTLPSpanExporter) -> Any:
    """The exporter's own way to POST an encoded request (its HTTP session, retries and timeouts):
    `_client.export(data)` in current SDKs, `_export(data)` in earlier ones. Both are the SDK's
    internals, so a version with neither is refused at start with a clear message."""
    client = getattr(exporter, "_client", None)
    if client is not None and hasattr(client, "export"):
        return lambda data: bool(getattr(client.export(data), "success", False))
    legacy = getattr(exporter, "_export", None)
    if legacy is not None:
        return lambda data: bool(getattr(legacy(data), "ok", False))
    raise ValueError("[tracing] this opentelemetry-exporter-otlp-proto-http has no known way to send an "
                     "encoded request; install a version from 1.30 on")


class _CountingExporter(SpanExporter):
    """Sends batches of encoded spans through the SDK's OTLP/HTTP exporter, counting what it delivered
    and what it failed to (it runs on the SDK's export thread, where it only joins bytes)."""

    def __init__(self, inner: OTLPSpanExporter, resource: Resource, scope: InstrumentationScope) -> None:
        self.inner = inner
        self.exported = 0
        self.failed = 0
        self._send = _sender(inner)
        self._resource = otlp.attributes(resource.attributes, 1)
        self._scope = otlp.scope_fields(scope.name, scope.version or "")

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        try:
            ok = self._send(otlp.request_wrapped(spans, self._resource, self._scope))
            result = SpanExportResult.SUCCESS if ok else SpanExportResult.FAILURE
        except Exception:  # noqa: BLE001 - an exporter bug must not kill the export thread
            logging.getLogger(__name__).exception("span export failed")
            result = SpanExportResult.FAILURE
        if result is SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)


class _QueueFullFilter(logging.Filter):
    """The SDK logs one warning per span dropped on a full queue; Tracing counts them instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Queue full")


_queue_full_filter = _QueueFullFilter()


class Tracing:
    """Statement spans for one process. Counters: spans (made), sampled_out, dropped (export queue full,
    approximate); describe() adds the exporter's exported and export_failures."""

    def __init__(self, section: Section, *, service_instance: str | None = None) -> None:
        from proxy import __version__

        self.endpoint = traces_url(section.endpoint)
        self.sample_ratio = float(section.sample_ratio)
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"[tracing] sample_ratio must be between 0 and 1, got {self.sample_ratio}")
        max_queue = int(section.max_queue_size)
        if max_queue < 1:
            raise ValueError(f"[tracing] max_queue_size must be at least 1, got {max_queue}")
        self.spans = 0
        self.sampled_out = 0
        self.dropped = 0
        self._random = random.random  # a bound method: one attribute load on the hot path

        host = socket.gethostname()
        resource = Resource.create({
            "service.name": section.service_name or "pgfront",
            "service.version": __version__,
            "service.instance.id": service_instance or f"{host}:{os.getpid()}",
            "host.name": host,
            "process.pid": os.getpid(),
        })
        try:
            exporter = OTLPSpanExporter(endpoint=self.endpoint, headers=dict(section.headers),
                                        timeout=float(section.export_timeout))
        except Exception as e:  # noqa: BLE001 - whatever the SDK rejects, say which setting it was
            raise ValueError(f"[tracing] cannot export to {self.endpoint}: {e}") from e
        self._scope = InstrumentationScope("pgfront", __version__)
        self._exporter = _CountingExporter(exporter, resource, self._scope)
        self._processor = BatchSpanProcessor(
            self._exporter, max_queue_size=max_queue, max_export_batch_size=min(512, max_queue),
            export_timeout_millis=float(section.export_timeout) * 1000.0)
        # the processor drops spans silently (bar a log line) when its queue is full: read its length to
        # count them (approximately: the export thread may pop between our look and the append); a
        # private attribute, so without it (another SDK version) drops go uncounted
        batcher = getattr(self._processor, "_batch_processor", None)
        self._queue: Any = getattr(batcher, "_queue", None)
        # Queue the encoded span as plain bytes, which the garbage collector never tracks: thousands wait
        # for each export, and as tracked objects they made collections costlier for the whole worker
        # (measured: ~30 us a span). on_end() itself only checks the sampled flag before this.
        self._emit = getattr(batcher, "emit", None) or (lambda data: self._processor.on_end(_Encoded(data)))
        self._max_queue = max_queue
        logging.getLogger("opentelemetry.sdk._shared_internal").addFilter(_queue_full_filter)

        # our own sample() decides; the SDK sampler must record whatever it is handed
        self._provider = TracerProvider(sampler=ALWAYS_ON, resource=resource,
                                        span_limits=SpanLimits(max_attribute_length=_MAX_ATTRIBUTE_LENGTH))
        self._provider.add_span_processor(self._processor)
        self._resource = resource
        self._random_bits = random.getrandbits
        self._batch: list[tuple] = []  # spans made and not encoded yet (see _encode_batch)
        self._shapes: dict[tuple, tuple[bytes, bytes, bytes, bytes]] = {}  # see _shape
        self._shapes_size = 0
        # perf_counter() -> epoch nanoseconds, measured once: spans get wall-clock times without a
        # time_ns() call per statement
        self._epoch_offset_ns = time.time_ns() - int(time.perf_counter() * 1e9)

    @classmethod
    def from_config(cls, section: Section, *, service_instance: str | None = None) -> Tracing | None:
        """A Tracing when [tracing] endpoint is set, else None (tracing off: the relay makes no call)."""
        if not section.endpoint:
            return None
        return cls(section, service_instance=service_instance)

    # ---- hot path ----

    def sample(self, tags: dict[str, str] | None) -> SpanContext | bool | None:
        """Whether this statement gets a span: the client's parent SpanContext, True, or None for no.

        A valid sqlcommenter traceparent decides by its sampled flag; otherwise sample_ratio does.
        """
        if tags and "traceparent" in tags:
            parent = traceparent(tags)
            if parent is not None:
                trace_id, span_id, sampled = parent
                if not sampled:
                    self.sampled_out += 1
                    return None
                state = tags.get("tracestate")
                return SpanContext(trace_id, span_id, is_remote=True, trace_flags=_SAMPLED,
                                   trace_state=TraceState.from_header([state]) if state else None)
        if self._random() < self.sample_ratio:
            return True
        self.sampled_out += 1
        return None

    def gap(self) -> int:
        """Statements until the next one sample_ratio picks, counting that one: a geometric draw, the same
        odds as a draw per statement, with one random() per sampled statement instead of per statement
        (the relay counts down in C: an unsampled statement costs a decrement)."""
        ratio = self.sample_ratio
        if ratio >= 1.0:
            return 1
        if ratio <= 0.0:
            return sys.maxsize
        n = int(math.log(1.0 - self._random()) / math.log(1.0 - ratio)) + 1
        self.sampled_out += n - 1
        return n

    def statement(self, sampled: SpanContext | bool | None, *, start: float, end: float, fingerprint: str,
                  normalized: str, kind: str, tables: Sequence[str] | frozenset[str], database: str,
                  user: str, application_name: str, rules: Sequence[tuple[str, str, bool]],
                  cache: str | None, queue_seconds: float, rows: int, sqlstate: str | None,
                  tags: dict[str, str] | None) -> None:
        """Export one finished span for a statement that sample() chose (a falsy `sampled` is ignored).

        start/end are time.perf_counter() values; queue_seconds is the part of them spent waiting for a
        server connection; rules are (name, action, observed-only) for every rule that matched.
        """
        if not sampled:
            return
        batch = self._batch
        batch.append((sampled, start, end, fingerprint, normalized, kind, tables, database, user, application_name,
                      rules, cache, queue_seconds, rows, sqlstate, tags))
        self.spans += 1
        if len(batch) == 1:
            loop = asyncio._get_running_loop()  # None rather than get_running_loop()'s costly exception
            if loop is not None:
                loop.call_later(_BATCH_SECONDS, self._encode_batch)
            else:  # no event loop (a tool, a test): no batching
                self._encode_batch()
        elif len(batch) >= _BATCH_SPANS:
            self._encode_batch()

    def _encode_batch(self) -> None:
        """Encode the spans made since the last batch. Spans are encoded in batches, not one by one as
        statements finish: the encoder then runs warm, in one tight loop, instead of pushing the relay's
        own code and data out of the CPU caches once every sampled statement (measured in a worker at
        10% sampling: ~28 us of the relay's user time per span encoded one by one)."""
        batch, self._batch = self._batch, []
        for args in batch:
            self._encode(*args)

    def _encode(self, sampled: SpanContext | bool, start: float, end: float, fingerprint: str, normalized: str,
                kind: str, tables: Sequence[str] | frozenset[str], database: str, user: str,
                application_name: str, rules: Sequence[tuple[str, str, bool]], cache: str | None,
                queue_seconds: float, rows: int, sqlstate: str | None, tags: dict[str, str] | None) -> None:
        # The finished span is encoded on the event loop, so the export thread only joins bytes: it takes
        # the GIL from the relay for a few microseconds per batch instead of ~10 per span. The SDK's batch
        # processor queues it and its OTLP/HTTP exporter sends it. What a statement's spans share (name,
        # and all attributes but rows, upstream time and the optional ones) is encoded once per shape and
        # session: a span is then a join of bytes.
        key = (fingerprint, normalized, kind, tables, database, user, application_name)
        try:
            shape = self._shapes.get(key)
        except TypeError:  # tables in a list
            key = (fingerprint, normalized, kind, tuple(tables), database, user, application_name)
            shape = self._shapes.get(key)
        if shape is None:
            shape = self._shape(key)
        head, attrs, user_attrs, more_attrs = shape
        if sampled is True:
            ids = otlp.span_ids(self._random_bits(128) or 1, self._random_bits(64) or 1, None, "")
            span_end = _ROOT_END
        else:
            ids = otlp.span_ids(sampled.trace_id, self._random_bits(64) or 1, sampled.span_id,
                                sampled.trace_state.to_header() if sampled.trace_state else "")
            span_end = _CHILD_END
        if sqlstate is not None and not sqlstate.startswith(_OK_CLASSES):
            span_end = otlp.span_end(f"SQLSTATE {sqlstate}", sampled is not True)
        optional = b""
        if sqlstate or rules or cache or queue_seconds > 0 or tags:
            optional = otlp.attributes(_optional(sqlstate, rules, cache, queue_seconds, tags), 9)
        offset = self._epoch_offset_ns
        span = otlp.scope_span(b"".join((
            ids, head, otlp.TIMES.pack(0x39, int(start * 1e9) + offset, 0x41, int(end * 1e9) + offset),
            attrs, _ROWS[rows] if 0 <= rows < 128 else otlp.attributes({"db.response.returned_rows": rows}, 9),
            user_attrs, _DOUBLE.pack(max(0.0, end - start - queue_seconds)), more_attrs, optional, span_end)))
        queue = self._queue
        if queue is not None and len(queue) >= self._max_queue:
            self.dropped += 1
        self._emit(span)

    def _shape(self, key: tuple) -> tuple[bytes, bytes, bytes, bytes]:
        """The encoded parts of the spans of one statement shape in one session (see _encode)."""
        fingerprint, normalized, kind, tables, database, user, application_name = key
        operation = kind.upper()
        first = min(tables) if tables else None
        more: dict[str, Any] = {}
        if application_name:
            more["pgfront.application_name"] = application_name
        if first is not None:
            more["db.collection.name"] = first
        shape = (otlp.span_head(f"{operation} {first}" if first else operation, otlp.SERVER),
                 otlp.attributes({"db.system.name": "postgresql", "db.namespace": database,
                                  "db.operation.name": operation,
                                  "db.query.text": normalized[:_MAX_ATTRIBUTE_LENGTH]}, 9),
                 otlp.attributes({"db.user": user, "pgfront.fingerprint": fingerprint}, 9) + _UPSTREAM_KEY,
                 otlp.attributes(more, 9))
        size = sum(map(len, shape)) + 200  # and the key's and the entry's own, about
        if self._shapes_size + size > _SHAPE_BYTES:  # by bytes: a query text can be 8 kB
            self._shapes.clear()
            self._shapes_size = 0
        self._shapes[key] = shape
        self._shapes_size += size
        return shape

    # ---- admin ----

    def describe(self) -> dict[str, Any]:
        """Settings and counters, for SHOW TRACING / metrics."""
        queue = self._queue
        return {
            "endpoint": self.endpoint,
            "sample_ratio": self.sample_ratio,
            "spans": self.spans,
            "sampled_out": self.sampled_out,
            "dropped": self.dropped,
            "exported": self._exporter.exported,
            "export_failures": self._exporter.failed,
            "queued": len(queue) if queue is not None else None,
        }

    def force_flush(self, timeout: float = 30.0) -> bool:
        """Export every span made so far; False when that did not finish within timeout seconds."""
        self._encode_batch()
        return self._provider.force_flush(int(timeout * 1000))

    def shutdown(self) -> None:
        """Flush and stop the export thread; later spans are dropped by the SDK."""
        self._encode_batch()
        self._provider.shutdown()
