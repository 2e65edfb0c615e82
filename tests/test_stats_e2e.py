"""Fingerprints, statistics, /metrics and the admin console with real traffic through pgfront."""

from __future__ import annotations

import os
import subprocess
import urllib.request

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.devdb import free_port
from proxy.wire import protocol as pq
from tests.conftest import psql


@pytest.fixture(scope="module")
def observed(pg, tmp_path_factory):
    from tests.conftest import Pgfront

    metrics_port = free_port()
    p = Pgfront(f"postgresql://127.0.0.1:{pg.port}",
                f"[metrics]\nlisten = '127.0.0.1:{metrics_port}'\ntop_n = 5\n[stats]\nflush_interval = '200ms'\n")
    p.metrics_port = metrics_port
    p.start()
    yield p
    p.stop()


def admin(p, sql: str) -> list[list[str]]:
    out = psql(p.port, sql, dbname="pgfront", extra_args=["-F", "\t"]).stdout
    return [line.split("\t") for line in out.splitlines() if line]


def queries(p) -> dict[str, dict[str, str]]:
    res = psql(p.port, "SHOW QUERIES 1000", dbname="pgfront", extra_args=["-F", "\t", "-P", "footer=off"])
    lines = [x for x in res.stdout.splitlines() if x]
    header = ["fingerprint", "calls", "total_ms", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms", "rows",
              "errors", "cache_hits", "cache_misses", "rewrites", "blocks", "throttled", "database", "user",
              "first_seen", "last_seen", "tags", "query"]
    rows = [dict(zip(header, x.split("\t"), strict=False)) for x in lines]
    return {r["query"].rstrip(";"): r for r in rows}


def test_counters_match_executions_and_protocols_share_a_fingerprint(observed, pg):
    pg.psql("CREATE TABLE IF NOT EXISTS fp_t (id int primary key, v text)")
    with psycopg.connect(observed.conninfo(), autocommit=True) as conn:
        for i in range(30):
            conn.execute(f"SELECT v FROM fp_t WHERE id = {i}")  # simple protocol, literal inlined
        for i in range(20):
            conn.execute("SELECT v FROM fp_t WHERE id = %s", [i])  # extended protocol, $1
        for i in range(7):
            conn.execute(f"SELECT v FROM fp_t WHERE id IN ({i}, {i + 1}, {i + 2})", prepare=False)
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table WHERE a = 1")
        for i in range(4):
            conn.execute(f"SELECT v FROM fp_t WHERE id IN ({i}, {i + 1})", prepare=False)
    q = queries(observed)
    # libpg_query's fingerprint folds IN lists of any length into the equality shape, so all of
    # these land on one fingerprint, labelled with the first text seen
    row = q["SELECT v FROM fp_t WHERE id = $1"]
    assert int(row["calls"]) == 30 + 20 + 7 + 4
    err = [r for k, r in q.items() if "no_such_table" in k][0]
    assert int(err["errors"]) == 1


def test_pgbench_counts_in_both_modes(observed):
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGUSER": "postgres"}
    subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-p", str(observed.port), "postgres"], env=env, check=True,
                   capture_output=True)
    admin(observed, "RESET STATS")
    for mode in ("simple", "extended"):
        subprocess.run(["pgbench", "-S", "-M", mode, "-c", "2", "-t", "150", "-p", str(observed.port), "postgres"],
                       env=env, check=True, capture_output=True)
    q = queries(observed)
    row = q["SELECT abalance FROM pgbench_accounts WHERE aid = $1"]
    assert int(row["calls"]) == 600


def test_percentiles_against_a_known_latency_mix(observed):
    admin(observed, "RESET STATS")
    with psycopg.connect(observed.conninfo(), autocommit=True) as conn:
        for _ in range(18):
            conn.execute("SELECT pg_sleep(0.01)")
        for _ in range(2):
            conn.execute("SELECT pg_sleep(0.2)")
    row = queries(observed)["SELECT pg_sleep($1)"]
    assert int(row["calls"]) == 20
    assert 9 <= float(row["p50_ms"]) <= 16
    assert 190 <= float(row["p95_ms"]) <= 230
    assert 190 <= float(row["max_ms"]) <= 260


def test_metrics_endpoint_parses(observed):
    with psycopg.connect(observed.conninfo(), autocommit=True) as conn:
        for i in range(5):
            conn.execute("SELECT %s::int", [i])
    body = urllib.request.urlopen(f"http://127.0.0.1:{observed.metrics_port}/metrics", timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(body)}
    assert "pgfront_queries" in families or "pgfront_queries_total" in families
    fams = families.get("pgfront_queries") or families["pgfront_queries_total"]
    fingerprints = {s.labels.get("fingerprint") for s in fams.samples}
    assert len(fingerprints) <= 6  # top_n = 5, plus "other"
    assert "pgfront_client_connections" in families
    health = urllib.request.urlopen(f"http://127.0.0.1:{observed.metrics_port}/healthz", timeout=5)
    assert health.status == 200


def test_admin_console_commands(observed):
    for cmd in ("SHOW CLIENTS", "SHOW SERVERS", "SHOW STATS", "SHOW RULES", "SHOW CACHE", "SHOW CONFIG",
                "SHOW POOLS", "SHOW HELP", "RELOAD", "RESET STATS"):
        res = psql(observed.port, cmd, dbname="pgfront", check=False)
        assert res.returncode == 0, (cmd, res.stderr)
    stats = dict(tuple(r[:2]) for r in admin(observed, "SHOW STATS"))
    assert int(stats["client_connections_opened"]) > 0
    res = psql(observed.port, "SHOW NONSENSE", dbname="pgfront", check=False)
    assert "unknown admin command" in res.stderr


def test_admin_console_refuses_other_users(observed):
    res = psql(observed.port, "SHOW QUERIES", user="trustuser", dbname="pgfront", check=False)
    assert res.returncode != 0 and "42501" not in res.stdout and "may not use the pgfront admin console" in res.stderr
    # SQLSTATE 42501, as the issue asks: read it off the wire, drivers fold startup errors together
    from tests.wire_client import RawConn, error_code

    c = RawConn(observed.port)
    c.sock.sendall(pq.startup_message({"user": "trustuser", "database": "pgfront"}))
    t, body = c.read_msg()
    assert t == b"E" and error_code(body) == "42501"


def test_admin_console_checks_passwords_against_the_upstream(pgfront_factory):
    p = pgfront_factory(config="[admin]\nusers = ['scramuser']\n")
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(p.conninfo(user="scramuser", dbname="pgfront", password="wrong"))
    with psycopg.connect(p.conninfo(user="scramuser", dbname="pgfront", password="s3cret-pw"),
                         autocommit=True) as conn:
        conn.execute("SHOW STATS", prepare=False)


def test_top_once(observed):
    import sys

    from tests.conftest import ROOT

    res = subprocess.run([sys.executable, "-m", "proxy", "top", "--once", "--port", str(observed.port),
                          "--host", "127.0.0.1"], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    assert "pgfront top" in res.stdout


def test_cardinality_bounded(pgfront_factory):
    p = pgfront_factory(config="[stats]\nmax_fingerprints = 50\nflush_interval = '200ms'\n")
    with psycopg.connect(p.conninfo(), autocommit=True) as conn:
        for i in range(400):
            conn.execute(f"SELECT 1 AS col_{i}")
    q = queries(p)
    assert len(q) <= 56
    stats = dict(tuple(r[:2]) for r in admin(p, "SHOW STATS"))
    assert int(stats["queries"]) >= 400
