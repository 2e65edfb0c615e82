"""What may be cached, decided from the statement and the real catalogs (pg_proc volatility, relation
persistence and kind, row-level security, views, partitions, cascading foreign keys, triggers)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from proxy.cache.testing import read_through, settle, started_cache, write_through
from proxy.sql import analyze

DB = "cache_policy"

SCHEMA = """
CREATE TABLE items (id int PRIMARY KEY, owner text, ts timestamptz DEFAULT now());
INSERT INTO items VALUES (1, 'alice'), (2, 'bob');
CREATE UNLOGGED TABLE scratch (a int);
CREATE TABLE secret (id int, owner text);
ALTER TABLE secret ENABLE ROW LEVEL SECURITY;
CREATE POLICY mine ON secret USING (owner = current_user);
CREATE FUNCTION f_vol() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';
CREATE FUNCTION f_stable() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1';
CREATE FUNCTION f_imm(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 + 1';
CREATE VIEW v_items AS SELECT id, owner FROM items;
CREATE VIEW v_recent AS SELECT * FROM items WHERE ts > now() - interval '1 hour';
CREATE VIEW v_today AS SELECT * FROM items WHERE ts > current_date;
CREATE VIEW v_calls AS SELECT f_stable() AS x FROM items;
CREATE TABLE events (id int, day int) PARTITION BY RANGE (day);
CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (0) TO (10);
CREATE TABLE events_2 PARTITION OF events FOR VALUES FROM (10) TO (20);
CREATE TABLE parent (id int PRIMARY KEY);
CREATE TABLE child (id int, pid int REFERENCES parent ON DELETE CASCADE);
CREATE TABLE audited (a int);
CREATE TABLE audit_log (a int);
CREATE FUNCTION log_it() RETURNS trigger LANGUAGE plpgsql AS
  'BEGIN INSERT INTO audit_log VALUES (NEW.a); RETURN NEW; END';
CREATE TRIGGER audit AFTER INSERT ON audited FOR EACH ROW EXECUTE FUNCTION log_it();
CREATE FUNCTION f_write() RETURNS int LANGUAGE sql VOLATILE AS 'INSERT INTO audit_log VALUES (0) RETURNING 1';
CREATE TABLE shadow (a int);
CREATE SEQUENCE seq;
"""


@pytest.fixture(scope="module")
def db(pg):
    pg.fresh_database(DB, SCHEMA)
    return pg


def run(coro):
    return asyncio.run(coro)


async def _cache(db, redis_server):
    cache = await started_cache(redis_server.url, db.dsn(dbname=DB))
    return cache, cache.session(DB, "postgres"), await asyncpg.connect(db.dsn(dbname=DB))


async def _decide(cache, state, sql, **rule):
    return await settle(cache, analyze(sql), state, **rule)


def test_statement_and_catalog_refusals(db, redis_server):
    expected = {
        "SELECT * FROM items": "",
        "SELECT f_imm(id) FROM items": "",
        "VALUES (1), (2)": "",
        "WITH x AS (SELECT id FROM items) SELECT * FROM x": "",
        "SELECT f_vol()": "non-immutable function f_vol",
        "SELECT f_stable() FROM items": "non-immutable function f_stable",
        "SELECT now()": "volatile function",
        "SELECT * FROM items FOR UPDATE": "locking clause",
        "SELECT * FROM scratch": "unlogged table scratch",
        "SELECT * FROM secret": "row-level security",
        "SELECT * FROM pg_class": "system catalog",
        "SELECT * FROM v_recent": "view calls a volatile function v_recent",
        "SELECT * FROM v_today": "view calls a volatile function v_today",
        "SELECT * FROM v_calls": "non-immutable function f_stable",
        "SELECT * FROM seq": "sequence seq",
        "INSERT INTO items VALUES (3)": "not a read",
        "WITH d AS (DELETE FROM items RETURNING *) SELECT * FROM d": "writes (data-modifying WITH)",
        "SELECT 1; SELECT 2": "multiple statements",
    }

    async def go():
        cache, state, conn = await _cache(db, redis_server)
        got = {sql: (await _decide(cache, state, sql)).reason for sql in expected}
        assert got == expected
        assert (await _decide(cache, state, "SELECT * FROM secret", allow_rls=True)).ok
        assert (await _decide(cache, state, "SELECT relname FROM pg_class", allow_catalog=True)).ok
        await conn.close()
        await cache.close()

    run(go())


def test_a_temporary_table_of_any_session_shadows_the_name(db, redis_server):
    async def go():
        cache, state, conn = await _cache(db, redis_server)
        assert (await _decide(cache, state, "SELECT * FROM shadow")).ok
        other = await asyncpg.connect(db.dsn(dbname=DB))
        await other.execute("CREATE TEMP TABLE shadow (a int)")
        cache.catalog.forget(DB)  # what DDL through pgfront does (and the facts TTL without it)
        assert (await _decide(cache, state, "SELECT * FROM shadow")).reason == "temporary table shadow"
        await other.close()
        # the session's own temporary tables stop caching for it
        await write_through(cache, state, conn, "CREATE TEMP TABLE mine (a int)")
        assert (await _decide(cache, state, "SELECT * FROM items")).reason == "session has temporary tables"
        await conn.close()
        await cache.close()

    run(go())


def test_dependencies_guard_reads_of_views_partitions_and_cascades(db, redis_server):
    async def go():
        cache, state, conn = await _cache(db, redis_server)
        tags = {sql: set((await _decide(cache, state, sql)).tags) for sql in (
            "SELECT * FROM v_items", "SELECT * FROM events", "SELECT * FROM events_1", "SELECT * FROM child")}
        assert tags["SELECT * FROM v_items"] == {"v_items", "items"}
        assert {"events", "events_1", "events_2"} <= tags["SELECT * FROM events"]
        assert {"events", "events_1"} <= tags["SELECT * FROM events_1"]
        assert tags["SELECT * FROM child"] == {"child", "parent"}
        # a write through the partition invalidates reads of the parent, and the reverse
        await read_through(cache, state, conn, "SELECT count(*) FROM events")
        await write_through(cache, state, conn, "INSERT INTO events_2 VALUES (1, 15)")
        assert await read_through(cache, state, conn, "SELECT count(*) FROM events") == ("miss", [b"1"])
        # a write through an updatable view invalidates reads of its table
        await read_through(cache, state, conn, "SELECT count(*) FROM items")
        await write_through(cache, state, conn, "INSERT INTO v_items VALUES (3, 'carol')")
        assert await read_through(cache, state, conn, "SELECT count(*) FROM items") == ("miss", [b"3"])
        # a cascading delete invalidates reads of the referencing table
        await write_through(cache, state, conn, "INSERT INTO parent VALUES (1)")
        await write_through(cache, state, conn, "INSERT INTO child VALUES (1, 1)")
        await read_through(cache, state, conn, "SELECT count(*) FROM child")
        await write_through(cache, state, conn, "DELETE FROM parent")
        assert await read_through(cache, state, conn, "SELECT count(*) FROM child") == ("miss", [b"0"])
        # a table with a trigger may write anywhere: its writes flush the database
        await read_through(cache, state, conn, "SELECT count(*) FROM audit_log")
        await write_through(cache, state, conn, "INSERT INTO audited VALUES (7)")
        assert await read_through(cache, state, conn, "SELECT count(*) FROM audit_log") == ("miss", [b"1"])
        # so may a volatile user function called by a SELECT
        assert (await read_through(cache, state, conn, "SELECT count(*) FROM audit_log"))[0] == "l1"
        await write_through(cache, state, conn, "SELECT f_write()")
        assert await read_through(cache, state, conn, "SELECT count(*) FROM audit_log") == ("miss", [b"2"])
        await conn.close()
        await cache.close()

    run(go())


def test_ddl_through_pgfront_refreshes_catalog_facts(db, redis_server):
    async def go():
        cache, state, conn = await _cache(db, redis_server)
        assert (await read_through(cache, state, conn, "SELECT f_imm(1)"))[0] == "bypass"  # facts pending
        await settle(cache, analyze("SELECT f_imm(1)"), state)
        assert await read_through(cache, state, conn, "SELECT f_imm(1)") == ("miss", [b"2"])
        await write_through(cache, state, conn,
                            "CREATE OR REPLACE FUNCTION f_imm(int) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT $1'")
        assert (await _decide(cache, state, "SELECT f_imm(1)")).reason == "non-immutable function f_imm"
        await write_through(cache, state, conn, "ALTER TABLE items SET UNLOGGED")
        assert (await _decide(cache, state, "SELECT * FROM items")).reason == "unlogged table items"
        await write_through(cache, state, conn, "ALTER TABLE items SET LOGGED")
        await write_through(cache, state, conn,
                            "CREATE OR REPLACE FUNCTION f_imm(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 + 1'")
        await conn.close()
        await cache.close()

    run(go())


def test_session_state_refusals(db, redis_server):
    async def go():
        cache, state, conn = await _cache(db, redis_server)
        await _decide(cache, state, "SELECT * FROM items")
        await write_through(cache, state, conn, "SET ROLE app")
        assert (await _decide(cache, state, "SELECT * FROM items")).reason.startswith("role changed")
        await write_through(cache, state, conn, "RESET ROLE")
        await conn.close()
        await cache.close()

    run(go())
