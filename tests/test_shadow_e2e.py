"""Shadow traffic end to end: real clients (psycopg, asyncpg) through a real pgfront whose rules mirror
to a shadow database, and whose capture is replayed against it with `pgfront replay`. The shadow is a
second database on the test PostgreSQL, a copy of the primary's data with one row changed on purpose.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.conftest import ROOT, psql

PRIMARY, SHADOW, SLOW = "shadow_e2e_primary", "shadow_e2e_shadow", "shadow_e2e_slow"
DATA = """
CREATE TABLE accounts (id int PRIMARY KEY, owner text, balance numeric);
INSERT INTO accounts SELECT g, 'owner ' || g, g * 10 FROM generate_series(1, 100) g;
CREATE TABLE audit (id serial PRIMARY KEY, note text);
"""
# the same data, but one row differs; and a shadow whose reads of accounts each take 50 ms
SHADOW_ONLY = "UPDATE accounts SET balance = -1 WHERE id = 42;"
SLOW_ONLY = """
ALTER TABLE accounts RENAME TO accounts_data;
CREATE VIEW accounts AS SELECT a.* FROM accounts_data a, pg_sleep(0.05);
"""
RULES = """
[[rule]]
name = "mirror-accounts"
match = { tables = ["accounts", "audit"] }
mirror = { to = "shadow", share = 1.0 }
"""
LOOKUP = "SELECT owner, balance FROM accounts WHERE id = $1"
LOOKUP_PSYCOPG = LOOKUP.replace("$1", "%s")


@pytest.fixture(scope="module")
def dbs(pg):
    pg.fresh_database(PRIMARY, DATA)
    pg.fresh_database(SHADOW, DATA + SHADOW_ONLY)
    pg.fresh_database(SLOW, DATA + SLOW_ONLY)
    return {name: pg.dsn(dbname=name) for name in (PRIMARY, SHADOW, SLOW)}


def _pgfront(pgfront_factory, tmp_path: Path, shadow_url: str, capture: str = ""):
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    config = (f'[rules]\nfiles = ["{rules}"]\nwatch = false\n'
              f'[mirror.shadow]\nurl = "{shadow_url}"\nqueue_size = 1000\n')
    if capture:
        config += f'[capture]\npath = "{capture}"\n'
    return pgfront_factory(config=config)


def _mirror_rows(port: int) -> list[dict[str, str]]:
    out = psql(port, "SHOW MIRROR", dbname="pgfront", extra_args=["-F", "\t", "-P", "footer=off"]).stdout
    lines = [line.split("\t") for line in out.splitlines() if line]
    header = psql(port, "SHOW MIRROR", dbname="pgfront", extra_args=["-F", "\t", "-P", "tuples_only=off"]
                  ).stdout.splitlines()[0].split("\t")
    return [dict(zip(header, line, strict=False)) for line in lines]


def _wait_compared(port: int, query: str, calls: int, timeout: float = 20.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    row: dict[str, str] = {}
    while time.monotonic() < deadline:
        row = next((r for r in _mirror_rows(port) if r.get("query") == query), {})
        if row and int(row["compared"]) + int(row.get("errors", 0)) >= calls:
            return row
        time.sleep(0.3)
    raise AssertionError(f"the mirror compared too little of {query!r}: {row}")


def test_mirrored_statements_are_compared_with_their_parameters(pgfront_factory, dbs, tmp_path, pg):
    p = _pgfront(pgfront_factory, tmp_path, dbs[SHADOW])
    with psycopg.connect(p.conninfo(dbname=PRIMARY), autocommit=True) as conn:
        for i in range(1, 31):  # extended protocol, text parameters; id 42 is not among them
            assert conn.execute(LOOKUP_PSYCOPG, [i]).fetchone()[0] == f"owner {i}"
        conn.execute(LOOKUP_PSYCOPG, [42])  # the row that differs on the shadow

    async def binary() -> None:  # asyncpg: binary parameters and results
        c = await asyncpg.connect(p.dsn(dbname=PRIMARY))
        try:
            for i in range(50, 60):
                await c.fetch("SELECT owner, balance FROM accounts WHERE id = $1 AND balance > $2", i, 0)
            # fetchrow's Execute asks for one row: a suspended portal is part of a result, not mirrored
            await c.fetchrow("SELECT owner, balance FROM accounts WHERE id = $1 AND balance > $2", 42, 0)
        finally:
            await c.close()

    asyncio.run(binary())
    lookup = _wait_compared(p.port, LOOKUP, 31)
    assert int(lookup["compared"]) == 31 and int(lookup["mismatches"]) == 1, lookup
    # the example shows the parameter that found the difference (psycopg sends 42 as a binary int2)
    assert '"params": ["\\\\x002a"]' in lookup["example"], lookup["example"]
    asyncpg_row = _wait_compared(p.port, "SELECT owner, balance FROM accounts WHERE id = $1 AND balance > $2", 10)
    assert int(asyncpg_row["mismatches"]) == 0, asyncpg_row["example"]
    time.sleep(0.5)
    again = _wait_compared(p.port, "SELECT owner, balance FROM accounts WHERE id = $1 AND balance > $2", 10)
    assert int(again["compared"]) == 10, again
    for key in ("primary_p50_ms", "primary_p95_ms", "shadow_p50_ms", "shadow_p95_ms"):
        assert float(lookup[key]) > 0
    # writes are mirrored only when the rule says so: this one stays on the primary
    with psycopg.connect(p.conninfo(dbname=PRIMARY), autocommit=True) as conn:
        conn.execute("INSERT INTO audit (note) VALUES (%s)", ["primary only"])
    time.sleep(1.0)
    assert pg.psql("SELECT count(*) FROM audit", dbname=SHADOW).strip() == "0"
    counters = psql(p.port, "SHOW MIRRORS", dbname="pgfront", extra_args=["-F", "\t"]).stdout
    assert counters.startswith("shadow\t")


async def _latencies(dsn: str, n: int) -> list[float]:
    conn = await asyncpg.connect(dsn)
    try:
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            await conn.fetchrow(LOOKUP, i % 100 + 1)
            out.append(time.perf_counter() - t0)
        return out
    finally:
        await conn.close()


def _p95(values: list[float]) -> float:
    values = sorted(values)
    return values[int(0.95 * (len(values) - 1))]


@pytest.mark.parametrize("shadow", ["slow", "down", "failing"])
def test_a_bad_shadow_changes_nothing_for_clients(pgfront_factory, dbs, tmp_path, shadow):
    url = {"slow": dbs[SLOW], "down": "postgresql://postgres@127.0.0.1:1/nowhere",
           "failing": dbs[PRIMARY].rsplit("/", 1)[0] + "/shadow_e2e_no_such_db"}[shadow]
    mirrored = _pgfront(pgfront_factory, tmp_path, url)
    plain = pgfront_factory()
    # alternating rounds, so the machine's load falls on both alike
    with_mirror: list[float] = []
    without: list[float] = []
    for _ in range(3):
        with_mirror += asyncio.run(_latencies(mirrored.dsn(dbname=PRIMARY), 150))
        without += asyncio.run(_latencies(plain.dsn(dbname=PRIMARY), 150))
    # every statement answered (no error raised above); the latency is the primary's, not the shadow's:
    # a slow shadow takes 50 ms a read, a generous bound here still tells the two apart by 10x
    assert _p95(with_mirror) < 2 * _p95(without) + 0.005, (_p95(with_mirror), _p95(without))
    counters = psql(mirrored.port, "SHOW MIRRORS", dbname="pgfront", extra_args=["-F", "\t"]).stdout
    assert counters.startswith("shadow\t")


def test_capture_then_replay_reports_the_difference(pgfront_factory, dbs, tmp_path):
    capture = tmp_path / "capture"
    p = _pgfront(pgfront_factory, tmp_path, dbs[SHADOW], capture=str(capture))
    with psycopg.connect(p.conninfo(dbname=PRIMARY), autocommit=True) as conn:
        for i in (1, 2, 42, 3):
            conn.execute(LOOKUP_PSYCOPG, [i])
        conn.execute("SELECT count(*) FROM accounts")
    p.stop()  # the capture is flushed and closed at shutdown
    files = sorted(tmp_path.glob("capture.*"))
    assert files, "the worker wrote no capture file"
    out = tmp_path / "replay.json"
    res = subprocess.run([sys.executable, "-m", "proxy", "replay", str(capture), "--target", dbs[SHADOW],
                          "--speed", "0", "--json", str(out)], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(out.read_text())
    by_query = {f["normalized"]: f for f in report["fingerprints"]}
    lookup = by_query[LOOKUP]
    assert lookup["calls"] == 4 and lookup["differences"] == 1, lookup
    assert by_query["SELECT count(*) FROM accounts"]["differences"] == 0
