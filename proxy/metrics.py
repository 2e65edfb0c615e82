"""Prometheus exposition of the merged worker statistics, and the /metrics + /healthz HTTP server.

A custom collector turns a MergedStats into metric families at scrape time, so whichever worker answers
the scrape reports the whole instance. Only the top-N fingerprints (by total time) get their own
labels; the rest are added into fingerprint="other", which keeps series cardinality bounded whatever
the number of distinct statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from proxy import __version__
from proxy import stats as st
from proxy.core import core

log = logging.getLogger(__name__)

QUERY_LABEL_MAX = 200  # characters of normalized text (whitespace collapsed) in the query label

# Prometheus `le` bounds of pgfront_query_duration_seconds (the fine histogram is regrouped into them).
DURATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# fine bucket -> index of the first `le` bound at or above the fine bucket's middle
_FINE_TO_LE = [
    next((i for i, le in enumerate(DURATION_BUCKETS) if middle <= le), len(DURATION_BUCKETS))
    for middle in (st.bucket_upper(k) / st.GROWTH ** 0.5 for k in range(st.TOP_BUCKET + 1))
]

_CACHE_FAMILIES = {"hit": "hits", "miss": "misses", "bypass": "bypasses", "invalidation": "invalidations"}
_ALWAYS_GAUGES = (st.CLIENT_CONNECTIONS, st.SERVER_CONNECTIONS)
_ALWAYS_COUNTERS = (st.BYTES_RECEIVED, st.BYTES_SENT, st.SLOW_QUERIES)
# statistics events of throttle rules (Stats.rule_event with these as the action); in observe mode,
# what the rule would have done
_THROTTLE_FAMILIES = {
    "queued": "Statements a throttle rule made wait before running, by rule and mode (enforce|observe)",
    "throttled": "Statements a throttle rule refused (SQLSTATE 53400), by rule and mode (enforce|observe)",
}
# family names the collector defines itself: a counter or gauge of the same name is not exported
_RESERVED = {"queries", "query_duration_seconds", "query_cache_hits", "query_cache_misses", "errors", "rule_hits",
             "rule_queued", "rule_throttled", "workers", "fingerprints", *(f"cache_{p}" for p in _CACHE_FAMILIES.values())}
_HELP = {
    st.CLIENT_CONNECTIONS: "Client connections open now",
    st.SERVER_CONNECTIONS: "Upstream server connections open now",
    st.BYTES_RECEIVED: "Bytes received from clients",
    st.BYTES_SENT: "Bytes sent to clients",
    st.SLOW_QUERIES: "Statements slower than slowlog.threshold_ms",
    "throttle_waiting": "Statements waiting now for a throttle rule to admit them",
    "routed_transactions": "Transactions (or single statements) routed, by upstream: primary or a replica",
    "replica_lag_bytes": "WAL bytes a replica's replay is behind the primary's insert position",
    "replica_lag_seconds": "Seconds a replica's replay is behind (0 when caught up)",
    "replica_usable": "1 when a replica gets reads (up, in recovery, within the lag limits), else 0",
    "replica_bans": "Times a replica stopped getting reads (down, lagging or promoted)",
    "replica_retries": "Reads sent elsewhere because their replica could not take them",
    "throttle_redis_errors": "Redis calls of the throttle that failed or were too slow",
    "throttle_local_fallbacks": "Throttle admissions decided by a worker alone while Redis could not answer",
}


# per mirror target ([mirror.NAME]): "queued" is a gauge, the others counters (*_total)
_MIRROR_FAMILIES = {
    "queued": "Mirrored statements waiting now for the shadow, by target",
    "sent": "Mirrored statements sent to the shadow, by target",
    "dropped": "Statements not mirrored because the target's queue was full (or pgfront stopping), by target",
    "compared": "Mirrored statements whose shadow result was compared with the primary's, by target",
    "mismatched": "Mirrored statements whose shadow result differed from the primary's, by target",
    "errors": "Mirrored statements the shadow failed (error, timeout, unreachable) where the primary did not, "
              "by target",
}
RUNNER_RESTARTS_HELP = ("Shadow runner processes (one per worker with [mirror.NAME] targets) that died and were "
                        "started again")
# the mirror's numbers merged over the workers: a shadow.mirror_report.MirrorReport, whose `targets` maps
# each target to {"queued": n, "sent": n, ...} and whose `restarts` counts the runner processes restarted
MirrorCounters = Callable[[], Any]


def _duration_buckets(q: st.QueryStats) -> list[tuple[str, float]]:
    counts = [0] * (len(DURATION_BUCKETS) + 1)
    for k, n in q.hist.items():
        counts[_FINE_TO_LE[k]] += n
    out: list[tuple[str, float]] = []
    running = 0
    for le, n in zip((*map(str, DURATION_BUCKETS), "+Inf"), counts, strict=True):
        running += n
        out.append((le, running))
    return out


class MergedStatsCollector(Collector):
    """Metric families computed from get_merged() on each scrape."""

    def __init__(self, get_merged: Callable[[], st.MergedStats], top_n: int = 50,
                 mirror: MirrorCounters | None = None) -> None:
        self.get_merged = get_merged
        self.top_n = top_n
        self.mirror = mirror

    def collect(self) -> Iterator[Metric]:
        merged = self.get_merged()
        top, rest = merged.split_top(self.top_n)
        yield from self._per_fingerprint([*top, rest])
        everything = st.QueryStats(st.OTHER)
        for q in (*top, rest):
            everything.absorb(q)
        yield from self._totals(merged, everything)
        if self.mirror is not None:
            yield from _mirror_families(self.mirror())

    def _per_fingerprint(self, entries: list[st.QueryStats]) -> Iterator[Metric]:
        calls = CounterMetricFamily("pgfront_queries", "Statements executed, per fingerprint (top N, rest as other)",
                                    labels=["fingerprint", "query"])
        duration = HistogramMetricFamily("pgfront_query_duration_seconds",
                                         "Statement latency seen by pgfront, per fingerprint", labels=["fingerprint"])
        hits = CounterMetricFamily("pgfront_query_cache_hits", "Cache hits per fingerprint", labels=["fingerprint"])
        misses = CounterMetricFamily("pgfront_query_cache_misses", "Cache misses per fingerprint",
                                     labels=["fingerprint"])
        for q in entries:
            calls.add_metric([q.fingerprint, " ".join(q.query.split())[:QUERY_LABEL_MAX]], q.calls)
            duration.add_metric([q.fingerprint], _duration_buckets(q), q.total)
            hits.add_metric([q.fingerprint], q.cache.get("hit", 0))
            misses.add_metric([q.fingerprint], q.cache.get("miss", 0))
        yield from (calls, duration, hits, misses)

    def _totals(self, merged: st.MergedStats, everything: st.QueryStats) -> Iterator[Metric]:
        errors = CounterMetricFamily("pgfront_errors", "Statements that failed, by SQLSTATE class", labels=["class"])
        for cls, n in sorted(everything.errors.items()):
            errors.add_metric([cls], n)
        yield errors
        for event, plural in _CACHE_FAMILIES.items():
            yield CounterMetricFamily(f"pgfront_cache_{plural}", f"Cache {event} events",
                                      value=everything.cache.get(event, 0))
        rules = CounterMetricFamily("pgfront_rule_hits", "Rule matches by rule, action and mode (enforce|observe)",
                                    labels=["rule", "action", "mode"])
        throttle = {event: CounterMetricFamily(f"pgfront_rule_{event}", help_, labels=["rule", "mode"])
                    for event, help_ in _THROTTLE_FAMILIES.items()}
        for (rule, action, mode), n in sorted(everything.rules.items()):
            if action in throttle:
                throttle[action].add_metric([rule, mode], n)
            else:
                rules.add_metric([rule, action, mode], n)
        yield rules
        yield from throttle.values()
        yield GaugeMetricFamily("pgfront_workers", "Worker processes reporting", value=merged.workers)
        info = GaugeMetricFamily("pgfront_build_info", "pgfront's version and which relay core runs (compiled or pure)",
                                 labels=["version", "core"])
        info.add_metric([__version__, core()], 1)
        yield info
        yield GaugeMetricFamily("pgfront_fingerprints", "Fingerprints tracked with their own statistics",
                                value=len(merged.queries))
        # A known counter reported through set_gauge (a running total kept elsewhere) is still a counter:
        # one family per name, or the exposition would carry two TYPE lines for it.
        counters = {*_ALWAYS_COUNTERS, *merged.counters} - _RESERVED
        labelled = {n for n in (*merged.counters, *merged.gauges) if "|" in n}
        for name in sorted({*_ALWAYS_GAUGES, *merged.gauges} - _RESERVED - counters - labelled):
            yield GaugeMetricFamily(_family(name), _HELP.get(name, name), value=merged.gauges.get(name, 0))
        for name in sorted(counters - labelled):
            yield CounterMetricFamily(_family(name), _HELP.get(name, name),
                                      value=merged.counters.get(name, 0) + merged.gauges.get(name, 0))
        yield from _labelled_families(merged, labelled)


def _labelled_families(merged: st.MergedStats, names: set[str]) -> Iterator[Metric]:
    """Counters and gauges named "family|label|value" (e.g. routed_queries|upstream|replica1): one family
    each, with one sample per label value."""
    families: dict[str, tuple[Metric, ...]] = {}
    for name in sorted(names):
        family, label, value = name.split("|", 2)
        metric = families.get(family)
        if metric is None:
            kind = CounterMetricFamily if name in merged.counters else GaugeMetricFamily
            metric = families[family] = (kind(_family(family), _HELP.get(family, family), labels=[label]),)
        metric[0].add_metric([value], merged.counters.get(name, 0) + merged.gauges.get(name, 0))
    for (metric,) in families.values():
        yield metric


def _mirror_families(report: Any) -> Iterator[Metric]:
    """pgfront_mirror_queued{target}, pgfront_mirror_<counter>_total{target} and
    pgfront_mirror_runner_restarts_total; nothing when no target is configured."""
    targets = report.targets
    if not targets:
        return
    restarts = CounterMetricFamily("pgfront_mirror_runner_restarts", RUNNER_RESTARTS_HELP)
    restarts.add_metric([], report.restarts)
    yield restarts
    for key, help_ in _MIRROR_FAMILIES.items():
        family = (GaugeMetricFamily if key == "queued" else CounterMetricFamily)(f"pgfront_mirror_{key}", help_,
                                                                                 labels=["target"])
        for name, counters in sorted(targets.items()):
            family.add_metric([name], counters.get(key, 0))
        yield family


def _family(name: str) -> str:
    """pgfront_<name>, with anything Prometheus does not allow in a name made an underscore."""
    return "pgfront_" + re.sub(r"[^a-zA-Z0-9_]", "_", name)


def render(get_merged: Callable[[], st.MergedStats], top_n: int = 50,
           mirror: MirrorCounters | None = None) -> bytes:
    """The /metrics body (text exposition format 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MergedStatsCollector(get_merged, top_n, mirror))
    return generate_latest(registry)


# -- HTTP -------------------------------------------------------------------------------------------
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 500: "Internal Server Error",
            503: "Service Unavailable"}
_MAX_HEADER = 16 * 1024
_READ_TIMEOUT = 10.0


def _response(status: int, body: bytes, content_type: str, head: bool = False) -> bytes:
    header = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
              f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return header.encode() + (b"" if head else body)


def _json_response(status: int, payload: dict[str, Any], head: bool = False) -> bytes:
    return _response(status, json.dumps(payload, default=str).encode(), "application/json", head)


def _route(method: str, path: str, get_merged: Callable[[], st.MergedStats], health: Callable[[], dict],
           top_n: int, mirror: MirrorCounters | None = None) -> bytes:
    head = method == "HEAD"
    if method not in ("GET", "HEAD") or path not in ("/metrics", "/healthz"):
        return _response(404, b"not found\n", "text/plain; charset=utf-8", head)
    if path == "/metrics":
        return _response(200, render(get_merged, top_n, mirror), CONTENT_TYPE_PLAIN_0_0_4, head)
    try:
        report = health()
    except Exception as e:  # a failing check is an unhealthy answer, not a crash
        return _json_response(503, {"healthy": False, "error": str(e)}, head)
    return _json_response(200 if _is_healthy(report) else 503, report, head)


def _is_healthy(report: dict) -> bool:
    """{"healthy": bool}, else {"status": "ok"}; a report with neither is healthy."""
    if "healthy" in report:
        return bool(report["healthy"])
    return report.get("status", "ok") in ("ok", "healthy")


async def start_metrics_server(host: str, port: int, get_merged: Callable[[], st.MergedStats],
                               health: Callable[[], dict], top_n: int = 50,
                               mirror: MirrorCounters | None = None) -> asyncio.Server:
    """Serve GET /metrics and GET /healthz; SO_REUSEPORT lets every worker bind the same port.

    mirror() returns the mirror's report merged over the workers (`shadow.mirror.merged_for`).

    health() returns a JSON-able dict; /healthz answers 503 when it says "healthy": false or a "status"
    other than "ok" (or raises), 200 otherwise.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
            request_line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(request_line) != 3:
                writer.write(_response(400, b"bad request\n", "text/plain; charset=utf-8"))
            else:
                method, target, _ = request_line
                path = target.split("?", 1)[0]
                writer.write(_route(method, path, get_merged, health, top_n, mirror))
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            pass
        except Exception:
            log.exception("metrics request failed")
            with contextlib.suppress(ConnectionError):
                writer.write(_response(500, b"internal error\n", "text/plain; charset=utf-8"))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    return await asyncio.start_server(handle, host, port, reuse_port=True, limit=_MAX_HEADER)
