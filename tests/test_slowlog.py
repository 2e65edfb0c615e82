"""Slow-plan capture against the session cluster: EXPLAIN with parameters, safety, rate limits, the store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

import asyncpg
import pytest

from proxy.config import load
from proxy.slowlog import PlanStore, SlowLog, explain_plan, read_records, rotated_paths
from proxy.slowlog.capture import dsn_user

DB = "slowlog_test"


@pytest.fixture(scope="module")
def db(pg):
    pg.fresh_database(DB, """
        CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, made timestamptz NOT NULL, price numeric);
        INSERT INTO items SELECT g, 'item' || g, timestamptz '2024-01-01' + g * interval '1 hour', g / 10.0
        FROM generate_series(1, 5000) g;
        CREATE TABLE secrets (id int);
        CREATE SCHEMA trustuser AUTHORIZATION trustuser;
        CREATE TABLE trustuser.items (id int PRIMARY KEY, name text);
        ALTER TABLE trustuser.items OWNER TO trustuser;
        INSERT INTO trustuser.items SELECT g, 'mine' FROM generate_series(1, 10) g;
        GRANT SELECT ON items TO PUBLIC;
        ANALYZE;
    """)
    return pg


def _cfg(path: Path, **slowlog) -> SimpleNamespace:
    """A config as proxy.config.load builds it, plus keys the SCHEMA may not have yet (dsn, queue_size)."""
    base = load(None, {"slowlog": {"path": str(path), "threshold_ms": 0, "per_fingerprint_interval": "0s"}})
    values = {**base.slowlog.as_dict(), **slowlog}
    return SimpleNamespace(slowlog=SimpleNamespace(**values))


def _capture(slowlog: SlowLog, sql: str, params, fp: str = "f0", user: str = "postgres", kind: str = "select",
             writes: bool = False, seconds: float = 0.5) -> None:
    slowlog.maybe_capture(fingerprint=fp, normalized=sql, sql=sql, params=params, seconds=seconds, database=DB,
                          user=user, kind=kind, writes=writes)


def _records(path: Path) -> list[dict]:
    return list(read_records(rotated_paths(path)))


async def _with_slowlog(cfg, upstream: str, body) -> SlowLog:
    slowlog = SlowLog(cfg, upstream)
    try:
        await body(slowlog)
        await slowlog.drain()
    finally:
        await slowlog.close()
    return slowlog


def test_captures_plans_with_typed_parameters(db, tmp_path):
    path = tmp_path / "slow.jsonl"

    async def body(s: SlowLog) -> None:
        _capture(s, "SELECT * FROM items WHERE id = $1", ["42"], "a")
        _capture(s, "SELECT * FROM items WHERE name = $1 AND made > $2", ["it'em 7", "2024-02-01 00:00+00"], "b")
        _capture(s, "SELECT * FROM items WHERE price > 490", None, "c")  # simple protocol: a literal
        _capture(s, "SELECT * FROM items WHERE id = $1", [None], "d")  # value unknown: generic plan
        _capture(s, "SELECT $1", ["x"], "e")  # untyped parameter

    s = asyncio.run(_with_slowlog(_cfg(path), f"postgresql://127.0.0.1:{db.port}/postgres", body))
    assert s.stats()["captured"] == 5 and s.stats()["failed"] == 0
    recs = {r["fingerprint"]: r for r in _records(path)}
    assert recs["a"]["plan"]["Plan"]["Node Type"] == "Index Scan"
    assert recs["a"]["params"] == ["42"] and recs["a"]["duration_ms"] == 500.0
    assert recs["b"]["plan"]["Plan"]["Node Type"] == "Seq Scan"
    assert "it''em 7" in recs["b"]["plan"]["Plan"]["Filter"]  # the value reached the planner
    assert recs["c"]["plan"]["Plan"]["Plan Rows"] < 200
    assert "$1" in recs["d"]["plan"]["Plan"]["Index Cond"]  # generic
    items = recs["a"]["tables"]["items"]
    assert items["reltuples"] == 5000 and items["relpages"] > 0 and "n_dead_tup" in items
    for key in ("time", "normalized", "sql", "database", "user", "calls", "total_ms", "durations_ms"):
        assert key in recs["a"]


def test_parameters_are_not_stored_when_disabled(db, tmp_path):
    path = tmp_path / "slow.jsonl"

    async def body(s: SlowLog) -> None:
        _capture(s, "SELECT * FROM items WHERE id = $1", ["42"])

    asyncio.run(_with_slowlog(_cfg(path, store_parameters=False), f"postgresql://127.0.0.1:{db.port}", body))
    (rec,) = _records(path)
    assert "params" not in rec and rec["plan"]["Plan"]["Node Type"] == "Index Scan"


def test_writes_are_never_analyzed_reads_are_when_enabled(db, tmp_path):
    path = tmp_path / "slow.jsonl"
    before = db.psql("SELECT sum(price) FROM items", dbname=DB)

    async def body(s: SlowLog) -> None:
        _capture(s, "UPDATE items SET price = price + 1 WHERE id < $1", ["100"], "w", kind="update", writes=True)
        _capture(s, "SELECT count(*) FROM items WHERE id < $1", ["100"], "r")

    asyncio.run(_with_slowlog(_cfg(path, explain_analyze=True), f"postgresql://127.0.0.1:{db.port}", body))
    recs = {r["fingerprint"]: r for r in _records(path)}
    assert "Actual Rows" not in json.dumps(recs["w"]["plan"]) and recs["w"]["analyzed"] is False
    assert "Actual Rows" in json.dumps(recs["r"]["plan"]) and recs["r"]["analyzed"] is True
    assert db.psql("SELECT sum(price) FROM items", dbname=DB) == before


def test_smuggled_second_statement_is_refused(db, tmp_path):
    path = tmp_path / "slow.jsonl"

    async def body(s: SlowLog) -> None:
        _capture(s, "SELECT 1; DROP TABLE secrets", None)

    s = asyncio.run(_with_slowlog(_cfg(path), f"postgresql://127.0.0.1:{db.port}", body))
    assert s.stats()["failed"] == 1 and not path.exists()
    assert db.psql("SELECT count(*) FROM secrets", dbname=DB).strip() == "0"


def test_rate_limit_counts_executions_between_records(db, tmp_path):
    path = tmp_path / "slow.jsonl"

    async def body(s: SlowLog) -> None:
        for i in range(5):
            _capture(s, "SELECT * FROM items WHERE id = $1", [str(i + 1)], "rl", seconds=0.1 * (i + 1))

    s = asyncio.run(_with_slowlog(_cfg(path, per_fingerprint_interval=3600.0), f"postgresql://127.0.0.1:{db.port}",
                                  body))
    assert s.stats()["captured"] == 1 and s.stats()["rate_limited"] == 4
    (rec,) = _records(path)
    assert rec["calls"] == 1 and rec["params"] == ["1"]


def test_pending_counts_ride_on_the_next_record(db, tmp_path):
    path = tmp_path / "slow.jsonl"

    async def body(s: SlowLog) -> None:
        _capture(s, "SELECT * FROM items WHERE id = $1", ["1"], "p", seconds=0.1)
        await s.drain()
        s.interval = 3600.0
        _capture(s, "SELECT * FROM items WHERE id = $1", ["2"], "p", seconds=0.2)
        _capture(s, "SELECT * FROM items WHERE id = $1", ["3"], "p", seconds=0.3)
        s.interval = 0.0
        _capture(s, "SELECT * FROM items WHERE id = $1", ["4"], "p", seconds=0.4)

    asyncio.run(_with_slowlog(_cfg(path), f"postgresql://127.0.0.1:{db.port}", body))
    first, second = _records(path)
    assert (first["calls"], second["calls"]) == (1, 3)
    assert second["durations_ms"] == [200.0, 300.0, 400.0] and second["total_ms"] == pytest.approx(900.0)


def test_full_queue_drops_and_counts_without_blocking(db, tmp_path):
    path = tmp_path / "slow.jsonl"

    async def body(s: SlowLog) -> None:
        for i in range(10):  # no await in between: the worker cannot drain
            _capture(s, "SELECT * FROM items WHERE id = $1", ["1"], f"q{i}")

    s = asyncio.run(_with_slowlog(_cfg(path, queue_size=2), f"postgresql://127.0.0.1:{db.port}", body))
    assert s.stats()["dropped"] == 8 and s.stats()["captured"] == 2


def test_without_a_running_loop_nothing_happens(tmp_path):
    s = SlowLog(_cfg(tmp_path / "slow.jsonl"), "postgresql://127.0.0.1:1")
    _capture(s, "SELECT 1", None)
    assert s.stats()["dropped"] == 1 and not (tmp_path / "slow.jsonl").exists()


def test_non_explainable_statements_are_skipped(db, tmp_path):
    path = tmp_path / "slow.jsonl"

    async def body(s: SlowLog) -> None:
        _capture(s, "VACUUM items", None, kind="utility")
        _capture(s, "COMMIT", None, "t", kind="transaction")

    s = asyncio.run(_with_slowlog(_cfg(path), f"postgresql://127.0.0.1:{db.port}", body))
    assert s.stats()["skipped"] == 2 and not path.exists()


def test_monitoring_dsn_sets_role_to_the_statement_user(db, tmp_path):
    path = tmp_path / "slow.jsonl"
    monitor = f"postgresql://postgres@127.0.0.1:{db.port}/postgres"

    async def body(s: SlowLog) -> None:
        # search_path "$user", public: as trustuser, "items" is trustuser.items (10 rows)
        _capture(s, "SELECT * FROM items", None, "as-user", user="trustuser")
        _capture(s, "SELECT * FROM items", None, "as-postgres", user="postgres")
        # a role the monitoring login cannot become would fail; a missing one is skipped silently
        _capture(s, "SELECT * FROM items", None, "ghost", user="no_such_role")

    s = asyncio.run(_with_slowlog(_cfg(path, dsn=monitor), "postgresql://127.0.0.1:1", body))
    assert s.stats()["failed"] == 0
    recs = {r["fingerprint"]: r for r in _records(path)}
    assert recs["as-user"]["plan"]["Plan"]["Plan Rows"] == 10
    assert recs["as-postgres"]["plan"]["Plan"]["Plan Rows"] == 5000
    assert recs["ghost"]["plan"]["Plan"]["Plan Rows"] == 5000


def test_explain_plan_directly_rolls_back_and_cleans_up(db):
    async def go() -> None:
        conn = await asyncpg.connect(db.dsn(dbname=DB), statement_cache_size=0)
        try:
            plan = await explain_plan(conn, "SELECT * FROM items WHERE id = ANY($1::int[])", ["{1,2,3}"])
            assert plan["Plan"]["Plan Rows"] == 3
            with pytest.raises(ValueError):
                await explain_plan(conn, "SELECT * FROM items WHERE id = $1", ["1", "2"])
            assert await conn.fetchval("SELECT count(*) FROM pg_prepared_statements") == 0
            assert await conn.fetchval("SELECT current_setting('transaction_read_only')") == "off"
        finally:
            await conn.close()

    asyncio.run(go())


def test_store_rotates_by_size_and_keeps_a_few(tmp_path):
    path = tmp_path / "slow.jsonl"
    store = PlanStore(path, max_size=1000, keep=3)
    for i in range(60):
        store.append({"n": i, "pad": "x" * 80})
    files = rotated_paths(path)
    assert [p.name for p in files] == ["slow.jsonl.3", "slow.jsonl.2", "slow.jsonl.1", "slow.jsonl"]
    assert all(p.stat().st_size <= 1000 for p in files)
    numbers = [r["n"] for r in read_records(files)]
    assert numbers == sorted(numbers) and numbers[-1] == 59 and len(numbers) < 60
    path.write_text(path.read_text() + '{"torn": ')  # a half-written last line is skipped
    assert list(read_records([path]))[-1]["n"] == 59


def test_dsn_user():
    assert dsn_user("postgresql://mon:pw@db:5432/x") == "mon"
    assert dsn_user("postgresql://db:5432/x") is None
    assert dsn_user("host=db user=mon dbname=x") == "mon"
    assert dsn_user("") is None
