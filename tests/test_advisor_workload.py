"""Done-when test of the index advisor on a real workload.

A module-scoped cluster (pg_stat_statements preloaded, HypoPG available) gets three tables of
100k-300k rows, one redundant pair, one duplicate pair and one unused index. A workload with
missing indexes (equality, equality + range, sort, join key, lower(email), a rare status) and one
query reading most of a table runs against it; every execution goes through the real SlowLog
capture. The report must find every missing index, the redundant and unused ones, propose nothing
for the unselective query; after applying its CREATE INDEX CONCURRENTLY statements the plans
switch to index scans and the estimated costs drop.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path

import asyncpg
import pytest

from proxy.advisor.candidates import normalize_key
from proxy.advisor.collect import fingerprint_of
from proxy.advisor.report import Options, build_report
from proxy.cli import main as advisor_main
from proxy.config import load
from proxy.devdb import TempPostgres
from proxy.slowlog import SlowLog
from proxy.slowlog.explain import walk_plan

ROOT = Path(__file__).resolve().parent.parent

SCHEMA_SQL = """
CREATE EXTENSION pg_stat_statements;
CREATE TABLE customers (id int PRIMARY KEY, email text NOT NULL, country text NOT NULL,
                        active bool NOT NULL, created_at timestamptz NOT NULL);
INSERT INTO customers
SELECT g, 'User' || g || '@Example.com', (ARRAY['de', 'fr', 'us', 'uk', 'es'])[1 + g % 5], g % 20 <> 0,
       timestamptz '2024-01-01' + (g % 365) * interval '1 day'
FROM generate_series(1, 100000) g;
CREATE TABLE orders (id bigint PRIMARY KEY, customer_id int NOT NULL, region int NOT NULL, status text NOT NULL,
                     total numeric(10, 2) NOT NULL, created_at timestamptz NOT NULL);
INSERT INTO orders
SELECT g, 1 + (g::bigint * 7919) % 100000, (g * 13) % 50,
       CASE WHEN g % 200 = 0 THEN 'pending' WHEN g % 10 = 0 THEN 'cancelled' ELSE 'shipped' END,
       (g % 1000) / 10.0,
       timestamptz '2024-01-01' + ((g::bigint * 7907) % 300000) * interval '105 seconds'  -- not in heap order
FROM generate_series(1, 300000) g;
CREATE TABLE order_items (id bigint PRIMARY KEY, order_id bigint NOT NULL, product_id int NOT NULL, qty int NOT NULL);
INSERT INTO order_items SELECT g, 1 + (g::bigint * 104729) % 300000, g % 5000, 1 + g % 7 FROM generate_series(1, 200000) g;
-- a duplicate pair, a prefix-redundant pair and an index nothing uses
CREATE INDEX customers_country_idx ON customers (country);
CREATE INDEX customers_country_again_idx ON customers (country);
CREATE INDEX orders_total_idx ON orders (total);
CREATE INDEX orders_total_status_idx ON orders (total, status);
CREATE INDEX customers_created_at_idx ON customers (created_at);
ANALYZE;
"""
# after the load's session ended (its statistics are flushed at exit): the bulk load is not the
# workload's write rate
RESET_SQL = "SELECT pg_stat_reset()"
MAINTENANCE_SQL = """
-- maintenance material: a table full of dead tuples and one never analyzed
CREATE TABLE events (id int, payload text) WITH (autovacuum_enabled = false);
INSERT INTO events SELECT g, md5(g::text) FROM generate_series(1, 20000) g;
DELETE FROM events WHERE id % 5 <> 0;
CREATE TABLE audit_log (id int, note text) WITH (autovacuum_enabled = false);
INSERT INTO audit_log SELECT g, 'x' FROM generate_series(1, 5000) g;
"""

# name -> (sql, list of parameter sets)
WORKLOAD: dict[str, tuple[str, list[list[str] | None]]] = {
    "equality": ("SELECT id, total, status FROM orders WHERE customer_id = $1", [["4242"], ["77"], ["91234"]]),
    "eq_range": ("SELECT id, total FROM orders WHERE region = $1 AND created_at >= $2 AND created_at < $3",
                 [["7", "2024-05-01", "2024-06-01"], ["21", "2024-09-01", "2024-10-01"]]),
    "sort": ("SELECT id, customer_id, total FROM orders ORDER BY created_at DESC LIMIT 20", [[]]),
    "join": ("SELECT o.id, o.total, i.product_id, i.qty FROM orders o JOIN order_items i ON i.order_id = o.id "
             "WHERE o.customer_id = $1", [["4242"], ["1234"]]),
    "expression": ("SELECT id, email FROM customers WHERE lower(email) = $1",
                   [["user4242@example.com"], ["user99@example.com"]]),
    "partial": ("SELECT id, total FROM orders WHERE status = 'pending'", [None]),
    "unselective": ("SELECT id, email FROM customers WHERE active = $1", [["true"]]),
    "pk": ("SELECT * FROM customers WHERE id = $1", [["5"], ["6"]]),
    "dashboard": ("SELECT country, count(*) FROM customers GROUP BY country", [None] * 8),  # a cache candidate
}
ROUNDS = 3

EXPECTED = {  # (table, normalized keys, predicate or None)
    ("public.orders", ("customer_id",), None),
    ("public.orders", ("region", "created_at"), None),
    ("public.orders", ("created_at",), None),
    ("public.order_items", ("order_id",), None),
    ("public.customers", ("lower(email)",), None),
}


@pytest.fixture(scope="module")
def cluster():
    pg = TempPostgres(settings={"shared_preload_libraries": "'pg_stat_statements'"}).start()
    pg.psql("CREATE DATABASE shop")
    for sql in (SCHEMA_SQL, RESET_SQL, MAINTENANCE_SQL):
        pg.psql(sql, dbname="shop")
    yield pg
    pg.cleanup()


def _args(params: list[str] | None) -> list:
    """asyncpg wants typed values: the workload passes the same text the proxy would see, typed."""
    out = []
    for p in params or []:
        if p.isdigit():
            out.append(int(p))
        elif p in ("true", "false"):
            out.append(p == "true")
        elif p[:4].isdigit() and p[4] == "-":
            from datetime import datetime
            out.append(datetime.fromisoformat(p).replace(tzinfo=UTC))
        else:
            out.append(p)
    return out


async def _run_workload(dsn: str, slowlog: SlowLog | None) -> dict[str, float]:
    """Run every query ROUNDS times; report each execution to the slow log (threshold 0).
    Returns seconds spent per workload entry."""
    conn = await asyncpg.connect(dsn)
    spent = dict.fromkeys(WORKLOAD, 0.0)
    try:
        for _ in range(ROUNDS):
            for name, (sql, param_sets) in WORKLOAD.items():
                for params in param_sets:
                    t0 = time.perf_counter()
                    await conn.fetch(sql, *_args(params))
                    took = time.perf_counter() - t0
                    spent[name] += took
                    if slowlog is not None:
                        slowlog.maybe_capture(fingerprint=fingerprint_of(sql), normalized=sql, sql=sql,
                                              params=params, seconds=took, database="shop", user="postgres",
                                              kind="select", writes=False)
        if slowlog is not None:
            await slowlog.drain()
    finally:
        await conn.close()
    return spent


async def _plans(dsn: str) -> dict[str, dict]:
    conn = await asyncpg.connect(dsn)
    try:
        out = {}
        for name, (sql, param_sets) in WORKLOAD.items():
            raw = await conn.fetchval(f"EXPLAIN (FORMAT JSON) {sql}", *_args(param_sets[0]))
            out[name] = json.loads(raw)[0]["Plan"]
        return out
    finally:
        await conn.close()


def _seq_scans(plan: dict) -> set[str]:
    return {n["Relation Name"] for n in walk_plan(plan) if n["Node Type"] == "Seq Scan"}


def _signature(rec: dict) -> tuple:
    return (rec["table"], tuple(normalize_key(c) for c in rec["columns"]), rec["predicate"])


@pytest.fixture(scope="module")
def captured(cluster, tmp_path_factory):
    """The workload, captured through SlowLog; returns (cfg, slow log path, workload seconds before advice)."""
    path = tmp_path_factory.mktemp("slowlog") / "slow.jsonl"
    cfg = load(None, {"slowlog": {"path": str(path), "threshold_ms": 0, "per_fingerprint_interval": "0s"}})

    async def go() -> float:
        slowlog = SlowLog(cfg, f"postgresql://127.0.0.1:{cluster.port}/postgres")
        try:
            await _run_workload(cluster.dsn(dbname="shop"), slowlog)
            assert slowlog.stats()["captured"] == sum(len(p) for _, p in WORKLOAD.values()) * ROUNDS
            assert slowlog.stats()["failed"] == 0
        finally:
            await slowlog.close()
        return await _run_workload(cluster.dsn(dbname="shop"), None)  # timed without captures running

    return cfg, path, asyncio.run(go())


@pytest.fixture(scope="module")
def report(cluster, captured):
    cfg, path, _ = captured
    opts = Options(upstream=cluster.dsn(dbname="shop"), cfg=cfg, slowlogs=[path], min_improvement=0.2)
    return asyncio.run(build_report(opts))


def test_slowlog_records_are_complete(captured):
    _, path, _ = captured
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == sum(len(p) for _, p in WORKLOAD.values()) * ROUNDS
    rec = next(r for r in records if r["sql"] == WORKLOAD["equality"][0])
    assert rec["params"] in (["4242"], ["77"], ["91234"])
    assert rec["plan"]["Plan"]["Node Type"] in ("Seq Scan", "Gather")
    assert rec["tables"]["orders"]["reltuples"] == pytest.approx(300000, rel=0.05)


def test_finds_every_missing_index(report):
    assert report["hypopg"]["validated"] is True
    found = {_signature(r) for r in report["recommendations"]}
    assert EXPECTED <= found, json.dumps(report["recommendations"], indent=1)
    partial = [r for r in report["recommendations"] if r["predicate"]]
    assert [(_signature(r)[0], r["predicate"]) for r in partial] == [("public.orders", "status = 'pending'")]
    for r in report["recommendations"]:
        assert r["create_sql"].startswith(f"CREATE INDEX CONCURRENTLY {r['index_name']} ON ")
        assert r["est_cost_after"] < r["est_cost_before"] * 0.8
        assert r["fingerprints"]


def test_proposes_nothing_harmful(report):
    fp_unselective = fingerprint_of(WORKLOAD["unselective"][0])
    for r in report["recommendations"]:
        assert fp_unselective not in r["fingerprints"]
        assert "active" not in " ".join(r["columns"])
    # nothing beyond the expected set and the partial index
    assert len(report["recommendations"]) == len(EXPECTED) + 1, [r["create_sql"] for r in report["recommendations"]]
    rejected = report["not_proposed"]["low_selectivity"]
    assert any(r["fingerprint"] == fp_unselective and r["column"] == "active" for r in rejected)


def test_finds_redundant_and_unused_indexes(report):
    dups = {(d["index"], d["duplicate_of"], d["kind"]) for d in report["duplicate_indexes"]}
    assert ("public.customers_country_again_idx", "public.customers_country_idx", "duplicate") in dups
    assert ("public.orders_total_idx", "public.orders_total_status_idx", "prefix") in dups
    unused = {u["index"] for u in report["unused_indexes"]}
    assert "public.customers_created_at_idx" in unused
    assert not any(u["index"].endswith("_pkey") for u in report["unused_indexes"])
    assert all(u["size_bytes"] > 0 for u in report["unused_indexes"])


def test_scorecard_and_advice_sections(report):
    names = [f["name"] for f in report["scorecard"]]
    assert names[:2] == ["p95 latency per fingerprint", "calls served by index scans"]
    share = next(f for f in report["scorecard"] if f["name"] == "calls served by index scans")
    assert share["ok"] is False and 0 < share["value"] < 0.9
    pgfront_cache = next(f for f in report["scorecard"] if f["name"] == "pgfront cache hit ratio")
    assert pgfront_cache["display"] == "n/a" and pgfront_cache["ok"] is None
    assert report["sources"]["pg_stat_statements"]["available"] is True
    cache = {c["fingerprint"]: c for c in report["cache_candidates"]}
    assert cache[fingerprint_of(WORKLOAD["dashboard"][0])]["expected_hit_rate"] > 0.5
    advice = {(m["table"], m["action"]) for m in report["maintenance"]}
    assert {("public.events", "vacuum"), ("public.audit_log", "analyze")} <= advice
    assert not {t for t, _ in advice} & {"public.orders", "public.customers", "public.order_items"}
    limit = {c["fingerprint"] for c in report["limit_candidates"]}
    assert fingerprint_of(WORKLOAD["unselective"][0]) in limit  # 95k rows, no LIMIT
    for c in report["limit_candidates"] + report["cache_candidates"]:
        assert f'match = {{ fingerprint = "{c["fingerprint"]}" }}' in c["rule"]


def test_cli_formats_and_html_renders_in_chromium(cluster, captured, tmp_path):
    cfg, path, _ = captured
    outputs = {}
    for fmt in ("json", "md", "text", "html"):
        out = tmp_path / f"report.{fmt}"
        rc = advisor_main(["advisor", "report", "--slowlog", str(path), "--upstream", cluster.dsn(dbname="shop"),
                           "--format", fmt, "--output", str(out), "--quiet"])
        assert rc == 0
        outputs[fmt] = out.read_text()
    assert json.loads(outputs["json"])["recommendations"]
    assert "## Recommended indexes" in outputs["md"] and "CREATE INDEX CONCURRENTLY" in outputs["md"]
    assert "Scorecard" in outputs["text"]
    html = outputs["html"]
    assert "<svg" in html and "http://" not in html.replace("http://www.w3.org/2000/svg", "")

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is needed to check the HTML report"
    profile = tempfile.mkdtemp(prefix="pgfront-chromium-")
    shot = tmp_path / "report.png"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    page = f"file://{tmp_path / 'report.html'}"
    try:
        subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1280,2000", page],
                       capture_output=True, timeout=90, check=True)
        dom = subprocess.run([*flags, "--dump-dom", page], capture_output=True, text=True, timeout=90, check=True)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one
    for heading in ("Scorecard", "Top slow fingerprints", "Recommended indexes", "Unused indexes",
                    "Duplicate and redundant indexes", "Maintenance", "Caching advice"):
        assert heading in dom.stdout
    keep = os.environ.get("PGFRONT_KEEP_REPORT")
    if keep:  # for a human look at the rendering
        shutil.copy(shot, keep)
        shutil.copy(tmp_path / "report.html", Path(keep).with_suffix(".html"))


def test_applying_the_advice_switches_plans_to_indexes(cluster, captured, report):
    _, _, seconds_before = captured
    dsn = cluster.dsn(dbname="shop")
    before = asyncio.run(_plans(dsn))

    async def apply() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            for r in report["recommendations"]:
                await conn.execute(r["create_sql"])  # CONCURRENTLY: outside any transaction
            await conn.execute("ANALYZE")
        finally:
            await conn.close()

    asyncio.run(apply())
    after = asyncio.run(_plans(dsn))
    seconds_after = asyncio.run(_run_workload(dsn, None))
    for name in ("equality", "eq_range", "sort", "join", "expression", "partial"):
        assert after[name]["Total Cost"] < before[name]["Total Cost"] * 0.5, name
        assert not _seq_scans(after[name]) & {"orders", "order_items"}, name
    assert _seq_scans(after["expression"]) == set()
    assert _seq_scans(after["unselective"]) == {"customers"}  # still the right plan for 95% of the table
    lines = [f"{name:12s} {seconds_before[name] * 1000:9.1f} ms -> {seconds_after[name] * 1000:8.1f} ms  "
             f"x{seconds_before[name] / seconds_after[name]:.1f}" for name in WORKLOAD]
    advised = [n for n in WORKLOAD if n not in ("unselective", "pk", "dashboard")]
    b, a = sum(seconds_before[n] for n in advised), sum(seconds_after[n] for n in advised)
    total_b, total_a = sum(seconds_before.values()), sum(seconds_after.values())
    print("\n" + "\n".join(lines) + f"\nadvised queries x{b / a:.1f}, whole workload x{total_b / total_a:.1f}",
          file=sys.stderr)
