"""proxy.metrics: /metrics exposition from merged worker snapshots, /healthz, bounded cardinality."""

from __future__ import annotations

import asyncio
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from proxy import stats as st
from proxy.metrics import DURATION_BUCKETS, start_metrics_server
from proxy.stats import MergedStats, Stats, StatsPublisher, load_merged


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fetch(url: str, method: str = "GET") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def serve_and_fetch(get_merged: Callable[[], MergedStats], paths: list[tuple[str, str]],
                    health: Callable[[], dict] = lambda: {"healthy": True}, top_n: int = 50,
                    servers: int = 1) -> list[tuple[int, str, str]]:
    """Start the metrics server (several on one port to prove SO_REUSEPORT), fetch each (method, path)."""

    async def main() -> list[tuple[int, str, str]]:
        port = free_port()
        started = [await start_metrics_server("127.0.0.1", port, get_merged, health, top_n=top_n)
                   for _ in range(servers)]
        try:
            return [await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}{path}", method)
                    for method, path in paths]
        finally:
            for server in started:
                server.close()
                await server.wait_closed()

    return asyncio.run(main())


def samples(text: str) -> dict[str, list[Sample]]:
    out: dict[str, list[Sample]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(found: dict[str, list[Sample]], name: str, **labels: Any) -> float:
    matches = [s.value for s in found[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matches) == 1, (name, labels, found.get(name))
    return matches[0]


@pytest.fixture
def two_workers(tmp_path: Path) -> Path:
    a, b = Stats(), Stats()
    for _ in range(30):
        a.record("aaaa", "SELECT * FROM orders WHERE id = $1", "app", "alice", 0.002, 1)
    for _ in range(10):
        b.record("aaaa", "SELECT * FROM orders WHERE id = $1", "app", "alice", 0.2, 1)
    b.record("bbbb", "INSERT INTO orders VALUES ($1)", "app", "alice", 0.004, 1, "23505")
    b.record("bbbb", "INSERT INTO orders VALUES ($1)", "app", "alice", 0.004, 0, "40001")
    a.cache_event("aaaa", "hit")
    a.cache_event("aaaa", "hit")
    b.cache_event("aaaa", "miss")
    b.cache_event("bbbb", "invalidation")
    a.rule_event("aaaa", "cache_orders", "cache")
    b.rule_event("bbbb", "no_bulk_insert", "block", observed=True)
    a.set_gauge(st.CLIENT_CONNECTIONS, 3)
    b.set_gauge(st.CLIENT_CONNECTIONS, 2)
    a.set_gauge(st.SERVER_CONNECTIONS, 1)
    a.inc(st.BYTES_RECEIVED, 1000)
    b.inc(st.BYTES_RECEIVED, 24)
    b.inc(st.BYTES_SENT, 4096)
    b.inc(st.SLOW_QUERIES, 10)
    StatsPublisher(a, tmp_path, 1).flush()
    StatsPublisher(b, tmp_path, 2).flush()
    return tmp_path


def test_metrics_from_merged_workers(two_workers: Path) -> None:
    [(status, content_type, body)] = serve_and_fetch(lambda: load_merged(two_workers), [("GET", "/metrics")])
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    found = samples(body)
    assert value(found, "pgfront_queries_total", fingerprint="aaaa",
                 query="SELECT * FROM orders WHERE id = $1") == 40
    assert value(found, "pgfront_queries_total", fingerprint="bbbb") == 2
    assert value(found, "pgfront_queries_total", fingerprint="other") == 0

    assert value(found, "pgfront_query_duration_seconds_count", fingerprint="aaaa") == 40
    assert value(found, "pgfront_query_duration_seconds_sum", fingerprint="aaaa") == pytest.approx(30 * 0.002 + 2.0)
    buckets = {s.labels["le"]: s.value for s in found["pgfront_query_duration_seconds_bucket"]
               if s.labels["fingerprint"] == "aaaa"}
    assert len(buckets) == len(DURATION_BUCKETS) + 1
    assert buckets["0.001"] == 0 and buckets["0.0025"] == 30 and buckets["0.1"] == 30
    assert buckets["0.25"] == 40 and buckets["+Inf"] == 40

    assert value(found, "pgfront_errors_total", **{"class": "23"}) == 1
    assert value(found, "pgfront_errors_total", **{"class": "40"}) == 1
    assert value(found, "pgfront_cache_hits_total") == 2
    assert value(found, "pgfront_cache_misses_total") == 1
    assert value(found, "pgfront_cache_invalidations_total") == 1
    assert value(found, "pgfront_query_cache_hits_total", fingerprint="aaaa") == 2
    assert value(found, "pgfront_query_cache_misses_total", fingerprint="aaaa") == 1
    assert value(found, "pgfront_rule_hits_total", rule="cache_orders", action="cache", mode="enforce") == 1
    assert value(found, "pgfront_rule_hits_total", rule="no_bulk_insert", action="block", mode="observe") == 1
    assert value(found, "pgfront_client_connections") == 5
    assert value(found, "pgfront_server_connections") == 1
    assert value(found, "pgfront_bytes_received_total") == 1024
    assert value(found, "pgfront_bytes_sent_total") == 4096
    assert value(found, "pgfront_slow_queries_total") == 10
    assert value(found, "pgfront_workers") == 2


def test_running_totals_reported_as_gauges_stay_counters(tmp_path: Path) -> None:
    live = Stats()
    live.set_gauge(st.BYTES_RECEIVED, 500)  # a worker keeping its own running total
    live.set_counter(st.BYTES_SENT, 700)
    live.set_gauge("pool_waiting", 2)
    live.inc("clients_refused")
    live.inc("odd-name.x", 3)
    [(_, _, body)] = serve_and_fetch(lambda: load_merged(tmp_path, live), [("GET", "/metrics")])
    assert body.count("# TYPE pgfront_bytes_received") == 1
    found = samples(body)
    assert value(found, "pgfront_bytes_received_total") == 500
    assert value(found, "pgfront_bytes_sent_total") == 700
    assert value(found, "pgfront_pool_waiting") == 2
    assert value(found, "pgfront_clients_refused_total") == 1
    assert value(found, "pgfront_odd_name_x_total") == 3
    assert "pgfront_bytes_received" not in found


def test_metrics_exist_before_any_traffic(tmp_path: Path) -> None:
    [(status, _, body)] = serve_and_fetch(lambda: load_merged(tmp_path), [("GET", "/metrics")])
    found = samples(body)
    assert status == 200
    for name in ("pgfront_client_connections", "pgfront_server_connections", "pgfront_bytes_received_total",
                 "pgfront_bytes_sent_total", "pgfront_slow_queries_total", "pgfront_cache_hits_total",
                 "pgfront_cache_misses_total"):
        assert value(found, name) == 0


def test_healthz_and_unknown_paths(tmp_path: Path) -> None:
    state = {"healthy": True, "upstream": "ok"}

    def health() -> dict:
        if state.get("explode"):
            raise RuntimeError("check failed")
        return dict(state)

    results = serve_and_fetch(lambda: load_merged(tmp_path), [
        ("GET", "/healthz"), ("HEAD", "/healthz"), ("GET", "/nope"), ("POST", "/metrics"), ("GET", "/metrics?x=1"),
    ], health=health)
    assert results[0][0] == 200 and results[0][1] == "application/json" and '"upstream": "ok"' in results[0][2]
    assert results[1][0] == 200 and results[1][2] == ""
    assert [r[0] for r in results[2:]] == [404, 404, 200]

    state.update({"healthy": False, "upstream": "down"})
    [(status, _, body)] = serve_and_fetch(lambda: load_merged(tmp_path), [("GET", "/healthz")], health=health)
    assert status == 503 and '"down"' in body
    state["explode"] = True
    [(status, _, body)] = serve_and_fetch(lambda: load_merged(tmp_path), [("GET", "/healthz")], health=health)
    assert status == 503 and "check failed" in body

    # the {"status": ...} form of report
    for report, expected in (({"status": "ok", "worker": 1}, 200), ({"status": "stopping"}, 503)):
        [(status, _, _)] = serve_and_fetch(lambda: load_merged(tmp_path), [("GET", "/healthz")],
                                           health=lambda r=report: r)
        assert status == expected


def test_workers_share_the_port(tmp_path: Path) -> None:
    results = serve_and_fetch(lambda: load_merged(tmp_path), [("GET", "/healthz")] * 4, servers=2)
    assert [r[0] for r in results] == [200] * 4


def test_bad_request_line(tmp_path: Path) -> None:
    async def main() -> bytes:
        port = free_port()
        server = await start_metrics_server("127.0.0.1", port, lambda: load_merged(tmp_path), dict)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"garbage\r\n\r\n")
            reply = await reader.read()
            writer.close()
            return reply
        finally:
            server.close()
            await server.wait_closed()

    assert asyncio.run(main()).startswith(b"HTTP/1.1 400 ")


def test_cardinality_bounded_with_100k_fingerprints(tmp_path: Path) -> None:
    stats = Stats(max_fingerprints=5000)
    for i in range(100_000):
        stats.record(f"{i:016x}", f"SELECT * FROM t{i}", "app", "alice", 0.0001 * (1 + i % 50), 1)
    StatsPublisher(stats, tmp_path, 1).flush()

    [(status, _, body)] = serve_and_fetch(lambda: load_merged(tmp_path), [("GET", "/metrics")], top_n=50)
    found = samples(body)
    fingerprints = {s.labels["fingerprint"] for s in found["pgfront_queries_total"]}
    assert len(fingerprints) == 51 and "other" in fingerprints
    assert sum(s.value for s in found["pgfront_queries_total"]) == 100_000
    assert value(found, "pgfront_query_duration_seconds_count", fingerprint="other") == 100_000 - 50
    assert len(found["pgfront_query_duration_seconds_bucket"]) == 51 * (len(DURATION_BUCKETS) + 1)
    assert len(body) < 200_000
