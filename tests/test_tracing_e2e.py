"""Tracing and sqlcommenter tags end to end: real clients (asyncpg's simple and extended protocol,
psycopg) through a real pgfront process that exports OpenTelemetry spans over OTLP/HTTP to a real
receiver in the test (decoded with opentelemetry-proto), with the cache on a real Redis.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.conftest import psql
from tests.otlp_receiver import otlp_receiver_fixture  # noqa: F401  (the `otlp_receiver` fixture)

FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "100"}  # the SDK exports every 100 ms instead of 5 s

RULES = """
[[rule]]
name = "cache-counts"
match = { kind = "select", tables = ["tr_t"] }
cache = { ttl = "60s" }

[[rule]]
name = "orders-api-only"
match = { tags = { route = "/api/orders*" }, kind = "delete" }
block = { message = "the orders API may not delete" }

[[rule]]
name = "slow-reports"
match = { pattern = "tr_slow" }
throttle = { concurrency = 1, queue = "5s" }
"""


def _traceparent(sampled: bool = True) -> tuple[str, str, str]:
    trace, span = secrets.token_hex(16), secrets.token_hex(8)
    return trace, span, f"00-{trace}-{span}-{'01' if sampled else '00'}"


def _comment(**tags: str) -> str:
    return "/*" + ",".join(f"{k}='{v}'" for k, v in tags.items()) + "*/"


@pytest.fixture
def traced(pgfront_factory, pg, redis_server, otlp_receiver, tmp_path: Path):
    pg.psql("CREATE TABLE IF NOT EXISTS tr_t (id int primary key, v text)")
    pg.psql("INSERT INTO tr_t SELECT g, 'v' || g FROM generate_series(1, 10) g ON CONFLICT DO NOTHING")
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    config = (f'[tracing]\nendpoint = "{otlp_receiver.url}"\nsample_ratio = 0.0\n'
              f'[cache]\nenabled = true\nredis_url = "{redis_server.url}"\n'
              f'[rules]\nfiles = ["{rules}"]\nwatch = false\n')
    return pgfront_factory(config=config, env=FAST_EXPORT)


def _by_parent(spans: list[dict], span_id: str) -> dict:
    return next(s for s in spans if s["parent_span_id"] == span_id)


def test_spans_continue_the_clients_trace_and_carry_the_statement(traced, otlp_receiver):
    simple = _traceparent()
    extended = _traceparent()
    error = _traceparent()
    unsampled = _traceparent(sampled=False)

    async def run() -> None:
        conn = await asyncpg.connect(traced.dsn())
        try:
            # simple protocol (no arguments), then the same read again: a cache miss, then a hit
            await conn.execute(f"SELECT count(*) FROM tr_t {_comment(controller='orders', traceparent=simple[2])}")
            await conn.fetch(f"SELECT v FROM tr_t WHERE id = $1 {_comment(route='/api/x', traceparent=extended[2])}",
                             3)
            with pytest.raises(asyncpg.UndefinedTableError):
                await conn.execute(f"SELECT * FROM tr_missing {_comment(traceparent=error[2])}")
            await conn.execute(f"SELECT 1 {_comment(traceparent=unsampled[2])}")
        finally:
            await conn.close()

    asyncio.run(run())
    spans = otlp_receiver.wait_for(lambda s: len(s) >= 3, timeout=15)
    time.sleep(0.5)  # anything else (there must be nothing) would have arrived by now
    spans = otlp_receiver.spans()
    assert len(spans) == 3, [s["name"] for s in spans]

    s = _by_parent(spans, simple[1])
    assert s["trace_id"] == simple[0] and s["kind"] == "SERVER"
    a = s["attributes"]
    assert a["db.system.name"] == "postgresql" and a["db.namespace"] == "postgres"
    assert a["db.query.text"] == "SELECT count(*) FROM tr_t" and a["db.operation.name"] == "SELECT"
    assert a["db.response.returned_rows"] == 1 and "db.response.status_code" not in a
    assert a["pgfront.cache"] == "miss" and a["pgfront.tag.controller"] == "orders"
    assert "cache-counts:cache" in a["pgfront.rules"]
    assert len(a["pgfront.fingerprint"]) == 16
    assert s["end_ns"] > s["start_ns"]

    e = _by_parent(spans, extended[1])
    assert e["trace_id"] == extended[0]
    assert e["attributes"]["db.query.text"] == "SELECT v FROM tr_t WHERE id = $1"
    assert e["attributes"]["pgfront.tag.route"] == "/api/x"

    f = _by_parent(spans, error[1])
    assert f["attributes"]["db.response.status_code"] == "42P01" and f["status_code"] == "ERROR"


def test_cache_hits_are_traced_as_hits(traced, otlp_receiver):
    async def run() -> None:
        conn = await asyncpg.connect(traced.dsn())
        try:
            for _ in range(3):
                await conn.execute(f"SELECT max(v) FROM tr_t {_comment(traceparent=_traceparent()[2])}")
        finally:
            await conn.close()

    asyncio.run(run())
    spans = otlp_receiver.wait_for(lambda s: len(s) >= 3, timeout=15)
    assert [s["attributes"]["pgfront.cache"] for s in sorted(spans, key=lambda s: s["start_ns"])] == \
        ["miss", "hit", "hit"]


def test_sample_ratio_one_traces_everything_as_roots(pgfront_factory, otlp_receiver):
    p = pgfront_factory(config=f'[tracing]\nendpoint = "{otlp_receiver.url}"\nsample_ratio = 1.0\n', env=FAST_EXPORT)
    with psycopg.connect(p.conninfo(), autocommit=True) as conn:
        for i in range(5):
            conn.execute("SELECT %s::int", [i])
    spans = otlp_receiver.wait_for(lambda s: len(s) >= 5, timeout=15)
    assert all(s["parent_span_id"] == "" for s in spans)
    assert {s["resource"]["service.name"] for s in spans} == {"pgfront"}


def test_no_span_without_tracing(pgfront_factory, otlp_receiver):
    p = pgfront_factory(env=FAST_EXPORT)  # no [tracing]: a sampled traceparent changes nothing
    with psycopg.connect(p.conninfo(), autocommit=True) as conn:
        for _ in range(5):
            conn.execute(f"SELECT 1 {_comment(traceparent=_traceparent()[2])}")
    time.sleep(1.0)
    assert otlp_receiver.spans() == [] and otlp_receiver.requests == 0


def test_queue_time_is_on_the_span(traced, otlp_receiver):
    first, second = _traceparent(), _traceparent()

    async def run() -> None:
        a, b = await asyncpg.connect(traced.dsn()), await asyncpg.connect(traced.dsn())
        try:
            await asyncio.gather(
                a.execute(f"SELECT pg_sleep(0.4) AS tr_slow {_comment(traceparent=first[2])}"),
                b.execute(f"SELECT pg_sleep(0.4) AS tr_slow {_comment(traceparent=second[2])}"))
        finally:
            await a.close()
            await b.close()

    asyncio.run(run())
    spans = otlp_receiver.wait_for(lambda s: len(s) >= 2, timeout=15)
    waited = sorted(s["attributes"].get("pgfront.queue_seconds", 0.0) for s in spans)
    assert waited[0] < 0.05 and waited[1] > 0.25, waited  # the first only asked Redis
    assert all("slow-reports:throttle" in s["attributes"]["pgfront.rules"] for s in spans)


def test_tags_are_matched_by_rules_counted_per_fingerprint_and_do_not_make_new_shapes(traced, pg):
    pg.psql("CREATE TABLE IF NOT EXISTS tr_del (id int)")
    with psycopg.connect(traced.conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="the orders API may not delete"):
            conn.execute(f"DELETE FROM tr_del {_comment(route='/api/orders/7', traceparent=_traceparent()[2])}")
        conn.execute(f"DELETE FROM tr_del {_comment(route='/api/users')}")  # another route: allowed
        conn.execute("DELETE FROM tr_del")  # no tags: allowed
        for i in range(40):  # a new traceparent every time, as traced apps send
            tags = _comment(controller="orders", route="/api/orders", traceparent=_traceparent()[2])
            conn.execute(f"SELECT v FROM tr_t WHERE id = {i} {tags}", prepare=False)
    out = psql(traced.port, "SHOW QUERIES 100", dbname="pgfront", extra_args=["-F", "\t"]).stdout
    header = ["fingerprint", "calls", "total_ms", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms", "rows",
              "errors", "cache_hits", "cache_misses", "rewrites", "blocks", "throttled", "database", "user",
              "first_seen", "last_seen", "tags", "query"]
    rows = [dict(zip(header, line.split("\t"), strict=True)) for line in out.splitlines() if line]
    reads = [r for r in rows if r["query"] == "SELECT v FROM tr_t WHERE id = $1"]
    assert len(reads) == 1 and int(reads[0]["calls"]) == 40
    assert reads[0]["tags"] == "controller=orders route=/api/orders (40)"
    deletes = next(r for r in rows if r["query"] == "DELETE FROM tr_del")
    assert int(deletes["calls"]) == 3 and int(deletes["blocks"]) == 1
    # the trace context never reaches the statistics' text
    assert "traceparent" not in out
