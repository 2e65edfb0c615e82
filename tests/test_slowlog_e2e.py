"""Slow statements through pgfront get their plans captured, and the advisor reads them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psycopg

from tests.conftest import ROOT


def test_slow_statements_are_captured_and_advised(pgfront_factory, pg, tmp_path):
    pg.psql("DROP TABLE IF EXISTS slow_t; CREATE TABLE slow_t (id int, k int, pad text); "
            "INSERT INTO slow_t SELECT g, g % 5000, repeat('p', 100) FROM generate_series(1, 200000) g; ANALYZE slow_t")
    slowlog = tmp_path / "slow.jsonl"
    p = pgfront_factory(args=["--slow-ms", "5", "--slowlog", str(slowlog)],
                        config="[slowlog]\nper_fingerprint_interval = '0s'\n")
    with psycopg.connect(p.conninfo(), autocommit=True) as conn:
        for i in range(3):
            conn.execute("SELECT * FROM slow_t WHERE k = %s", [i])  # extended, with a parameter
        conn.execute("SELECT count(*) FROM slow_t WHERE k = 42")  # simple, literal
        conn.execute("SELECT 1")  # fast: not captured
    deadline = time.monotonic() + 20
    records = []
    while time.monotonic() < deadline:
        if slowlog.exists():
            records = [json.loads(line) for line in slowlog.read_text().splitlines() if line.strip()]
            if len({r["fingerprint"] for r in records}) >= 2:
                break
        time.sleep(0.2)
    assert len({r["fingerprint"] for r in records}) >= 2, p.log()
    rec = [r for r in records if "$1" in r["sql"]][0]
    assert rec["params"] == ["0"] or rec["params"][0] in ("0", "1", "2")
    assert "Seq Scan" in json.dumps(rec["plan"])
    assert all("SELECT 1" != r["sql"] for r in records)
    out = tmp_path / "report.json"
    res = subprocess.run([sys.executable, "-m", "proxy", "advisor", "report", "--slowlog", str(slowlog),
                          "--upstream", pg.dsn(), "--format", "json", "--output", str(out), "--quiet"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    assert any(r["table"].endswith("slow_t") and r["columns"][:1] == ["k"] for r in report["recommendations"])
