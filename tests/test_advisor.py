"""Advisor parts: predicate extraction, selectivity, index hygiene, caching model, metrics, charts, and
a report without HypoPG (a role that may not create the extension) rendered in every format."""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import threading
import tomllib
import xml.etree.ElementTree as ET

import pytest

from proxy.advisor import svg
from proxy.advisor.caching import cache_rule, expected_hit_rate, limit_rule
from proxy.advisor.candidates import normalize_key
from proxy.advisor.catalog import Catalog, ColumnStats, Index, Table, canonical
from proxy.advisor.cli import register, render
from proxy.advisor.collect import fingerprint_of
from proxy.advisor.maintenance import duplicate_indexes, prefix_redundant_indexes, unused_indexes
from proxy.advisor.predicates import statement_shape
from proxy.advisor.report import Options, build_report
from proxy.advisor.scorecard import parse_metrics, pgfront_cache_hit_ratio, pool_utilisation
from proxy.config import load
from proxy.slowlog import SlowLog


def _uses(sql: str) -> set[tuple]:
    return {(u.table, u.key, u.op) for u in statement_shape(sql).uses}


# -- predicates -----------------------------------------------------------------------------------
def test_operator_classes():
    uses = _uses("SELECT * FROM t WHERE a = $1 AND b > 3 AND c BETWEEN 1 AND 2 AND d IN (1, 2) "
                 "AND (e = 1 OR e = 2) AND f LIKE 'ab%' AND g LIKE '%ab' AND h IS NULL AND active")
    assert uses == {("t", "a", "eq"), ("t", "b", "range"), ("t", "c", "range"), ("t", "d", "in"), ("t", "e", "in"),
                    ("t", "f", "like"), ("t", "h", "null"), ("t", "active", "eq")}


def test_aliases_joins_and_expressions():
    shape = statement_shape("SELECT * FROM orders o JOIN customers c ON c.id = o.customer_id "
                            "WHERE lower(c.email) = $1 AND date_trunc('day', o.ts) = $2 ORDER BY o.ts DESC LIMIT 5")
    assert shape.tables == ("orders", "customers") and shape.has_limit
    assert {(u.table, u.key, u.op) for u in shape.uses} == {
        ("customers", "id", "join"), ("orders", "customer_id", "join"), ("customers", "(lower(email))", "eq"),
        ("orders", "(date_trunc('day', ts))", "eq"), ("orders", "ts", "sort")}
    assert next(u for u in shape.uses if u.op == "sort").descending


def test_constants_params_and_subqueries():
    shape = statement_shape("UPDATE orders SET x = 1 WHERE status = 'pending' AND id = $2")
    status = next(u for u in shape.uses if u.column == "status")
    assert shape.kind == "update" and status.constant == "pending" and status.predicate == "status = 'pending'"
    assert next(u for u in shape.uses if u.column == "id").param == 2
    assert ("b", "k", "eq") in _uses("SELECT * FROM a WHERE a.x IN (SELECT y FROM b WHERE b.k = 3)")
    assert _uses("SELECT * FROM a, b ORDER BY a.x, b.y") == set()  # no single index gives that order
    assert not statement_shape("SELEC nonsense").parsed
    assert statement_shape("SELECT relname FROM pg_class").catalog


def test_normalize_key():
    assert normalize_key("(lower(email))") == normalize_key("lower(email)") == "lower(email)"
    assert normalize_key('lower((email)::text)') == "lower((email))"
    assert normalize_key('"Name"') == "name"


# -- statistics -----------------------------------------------------------------------------------
def test_selectivity_from_pg_stats():
    flags = ColumnStats(0.0, 2, ["t", "f"], [0.95, 0.05], 0.5, "bool")
    assert flags.eq_selectivity("true", 1000) == 0.95 and flags.eq_selectivity("FALSE", 1000) == 0.05
    ids = ColumnStats(0.0, -1.0, [], [], 0.1, "int4")
    assert ids.eq_selectivity("7", 100000) == pytest.approx(1e-5)
    status = ColumnStats(0.0, 4, ["shipped", "cancelled", "pending"], [0.895, 0.1, 0.005], 0.0, "text")
    assert status.eq_selectivity("pending", 1e5) == 0.005
    assert status.eq_selectivity("lost", 1e5) == pytest.approx(0.0, abs=1e-9)
    assert canonical("0042", "int8") == "42" and canonical("yes", "bool") == "t"


# -- index hygiene --------------------------------------------------------------------------------
def _index(oid, name, keys, *, unique=False, primary=False, constraint=None, scans=0, pred=None) -> Index:
    return Index(oid, name, "public", 1, "public.t", keys, pred, unique, primary, constraint, "btree", True,
                 8192 * oid, scans, f"CREATE INDEX {name} ON public.t ({', '.join(keys)})")


def test_unused_duplicate_and_prefix_indexes():
    cat = Catalog()
    cat.tables[1] = Table(1, "public", "t", 1000, 10, ["a", "b", "c"])
    cat.indexes = [
        _index(10, "t_pkey", ["a"], unique=True, primary=True, constraint="t_pkey"),
        _index(11, "t_a_idx", ["a"], scans=5),  # duplicates the primary key's index
        _index(12, "t_b_idx", ["b"]),  # prefix of t_b_c_idx, unused
        _index(13, "t_b_c_idx", ["b", "c"], scans=9),
        _index(14, "t_b_part_idx", ["b"], pred="c > 0"),  # different predicate: neither
        _index(15, "t_c_key", ["c"], unique=True, constraint="t_c_key"),  # unused but backs a constraint
    ]
    assert {u["index"] for u in unused_indexes(cat)} == {"public.t_b_idx", "public.t_b_part_idx"}
    dups = duplicate_indexes(cat)
    assert [(d["index"], d["duplicate_of"]) for d in dups] == [("public.t_a_idx", "public.t_pkey")]
    prefix = prefix_redundant_indexes(cat)
    assert [(d["index"], d["duplicate_of"]) for d in prefix] == [("public.t_b_idx", "public.t_b_c_idx")]
    assert prefix[0]["drop_sql"] == "DROP INDEX CONCURRENTLY public.t_b_idx;"


# -- caching, metrics, charts ---------------------------------------------------------------------
def test_cache_model_and_rules():
    busy_static = expected_hit_rate(10.0, 1, 0.0, 60.0)
    assert busy_static > 0.99
    assert expected_hit_rate(10.0, 1, 5.0, 60.0) < busy_static  # writes invalidate
    assert expected_hit_rate(10.0, 10000, 0.0, 60.0) < 0.1  # every call a new key
    rule = tomllib.loads(cache_rule("0123456789abcdef"))["rule"][0]
    assert rule == {"name": "cache-0123456789abcdef", "match": {"fingerprint": "0123456789abcdef"},
                    "cache": {"ttl": "60s"}}
    assert tomllib.loads(limit_rule("0123456789abcdef"))["rule"][0]["limit"] == {"max_rows": 1000}


METRICS = """# HELP pgfront_cache_hits_total Cache hit events
# TYPE pgfront_cache_hits_total counter
pgfront_cache_hits_total 150
# HELP pgfront_cache_misses_total Cache miss events
# TYPE pgfront_cache_misses_total counter
pgfront_cache_misses_total 50
# HELP pgfront_query_cache_hits_total Cache hits per fingerprint
# TYPE pgfront_query_cache_hits_total counter
pgfront_query_cache_hits_total{fingerprint="a"} 90
pgfront_query_cache_hits_total{fingerprint="b"} 60
# HELP pgfront_query_cache_misses_total Cache misses per fingerprint
# TYPE pgfront_query_cache_misses_total counter
pgfront_query_cache_misses_total{fingerprint="a"} 50
# HELP pgfront_pool_utilisation Share of server connections in use.
# TYPE pgfront_pool_utilisation gauge
pgfront_pool_utilisation 0.42
"""


def test_prometheus_figures():
    m = parse_metrics(METRICS)
    assert pgfront_cache_hit_ratio(m) == pytest.approx(0.75)
    assert pool_utilisation(m) == pytest.approx(0.42)
    assert pool_utilisation(parse_metrics("pgfront_pool_active 3\npgfront_pool_size 4\n")) == pytest.approx(0.75)
    per_fingerprint_only = parse_metrics(METRICS.split("# HELP pgfront_query")[0].replace("pgfront_", "x_"))
    assert pgfront_cache_hit_ratio(per_fingerprint_only) == pytest.approx(0.75)
    assert pgfront_cache_hit_ratio({}) is None


def test_charts_are_well_formed_svg():
    for chart in (svg.hbar_chart([("a", 3.0), ("b<&>", 1.0)], " ms"), svg.histogram([0, 1, 2, 3], [1, 5, 2], marker=1.5),
                  svg.before_after(1000.0, 10.0), svg.before_after(1000.0, None)):
        root = ET.fromstring(chart)
        assert root.tag.endswith("svg") and len(root) > 0


# -- a report without HypoPG ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def unprivileged_db(pg):
    """A database owned by a role that may not CREATE EXTENSION hypopg (it is not a trusted extension)."""
    pg.fresh_database("advisor_nohypo", """
        CREATE TABLE tickets (id int PRIMARY KEY, owner_id int NOT NULL, state text NOT NULL);
        INSERT INTO tickets SELECT g, g % 5000, CASE WHEN g % 3 = 0 THEN 'open' ELSE 'closed' END
        FROM generate_series(1, 50000) g;
        ANALYZE tickets;
    """, owner="trustuser")
    return pg


class _Metrics(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server naming)
        body = METRICS.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_report_without_hypopg_says_not_validated(unprivileged_db, tmp_path):
    pg = unprivileged_db
    path = tmp_path / "slow.jsonl"
    cfg = load(None, {"slowlog": {"path": str(path), "threshold_ms": 0, "per_fingerprint_interval": "0s"}})
    sql = "SELECT id, state FROM tickets WHERE owner_id = $1"

    async def capture() -> None:
        s = SlowLog(cfg, f"postgresql://127.0.0.1:{pg.port}")
        for owner in ("17", "42"):
            s.maybe_capture(fingerprint=fingerprint_of(sql), normalized=sql, sql=sql, params=[owner], seconds=0.08,
                            database="advisor_nohypo", user="trustuser", kind="select", writes=False)
        await s.drain()
        await s.close()

    asyncio.run(capture())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        opts = Options(upstream=pg.dsn("trustuser", "advisor_nohypo"), cfg=cfg, slowlogs=[path],
                       stats_url=f"http://127.0.0.1:{server.server_address[1]}/metrics")
        report = asyncio.run(build_report(opts))
    finally:
        server.shutdown()
    assert report["hypopg"]["validated"] is False and "NOT validated" in report["hypopg"]["note"]
    (rec,) = report["recommendations"]
    assert rec["validated"] is False and rec["est_cost_after"] is None and rec["est_cost_before"] > 0
    assert rec["create_sql"] == "CREATE INDEX CONCURRENTLY tickets_owner_id_idx ON public.tickets (owner_id);"
    assert report["sources"]["pg_stat_statements"]["available"] is False
    figures = {f["name"]: f for f in report["scorecard"]}
    assert figures["pgfront cache hit ratio"]["ok"] is False and figures["pgfront cache hit ratio"]["value"] == 0.75
    assert figures["pool utilisation"]["ok"] is True
    for fmt in ("text", "md", "html"):
        assert "NOT VALIDATED" in render(report, fmt, cfg)
    assert json.loads(render(report, "json", cfg))["hypopg"]["validated"] is False


def test_cli_registers_the_advisor_report_subcommand():
    parser = argparse.ArgumentParser(prog="pgfront")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["advisor", "report", "--slowlog", "a.jsonl", "--slowlog", "b.jsonl", "--upstream",
                              "postgresql://x/db", "--format", "html", "--min-improvement", "0.3"])
    assert args.slowlog == ["a.jsonl", "b.jsonl"] and args.format == "html" and args.min_improvement == 0.3
    assert callable(args.func)
