"""Writes that bypass pgfront (psql straight to the server) invalidate through the logical replication
listener; only one instance consumes the slot."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from proxy.cache.replication import slot_name, tables_in_changes
from proxy.cache.testing import eventually, read_through, settle, started_cache
from proxy.sql import analyze

DB = "cache_repl"
READ = "SELECT v FROM kv WHERE k = $1"


@pytest.fixture(scope="module")
def db(pg):
    pg.fresh_database(DB, 'CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); INSERT INTO kv VALUES (1, 0);'
                      'CREATE TABLE "Other" (a int)')
    yield pg
    pg.psql(f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{DB}'")


def test_parse_test_decoding_lines():
    lines = [
        "BEGIN",
        "table public.kv: UPDATE: k[integer]:1 v[integer]:2",
        'table public."Other": INSERT: a[integer]:1',
        "table public.a, s.b: TRUNCATE: (no-flags)",
        "COMMIT",
    ]
    assert tables_in_changes(lines) == {"kv", "other", "a", "b"}
    assert slot_name("pgfront_invalidation", "my-db") == "pgfront_invalidation_my_db"


def test_a_write_straight_to_postgres_invalidates_within_a_second(db, redis_server):
    async def go(redis_url):
        a = await started_cache(redis_url, db.dsn(dbname=DB), replication_listener=True)
        b = await started_cache(redis_url, db.dsn(dbname=DB), replication_listener=True)
        sa = a.session(DB, "postgres")
        b.session(DB, "postgres")  # both instances follow the database: one wins the slot
        assert await eventually(lambda: bool(a.replication.active or b.replication.active))
        await asyncio.sleep(0.3)  # give the other instance its chance to (fail to) take the slot
        assert len(a.replication.active | b.replication.active) == 1
        assert not (a.replication.active and b.replication.active)
        await settle(a, analyze(READ), sa)
        conn = await asyncpg.connect(db.dsn(dbname=DB))
        await read_through(a, sa, conn, READ, 1)
        assert (await read_through(a, sa, conn, READ, 1)) == ("l1", [b"0"])
        db.psql("UPDATE kv SET v = 42 WHERE k = 1", dbname=DB)  # not through pgfront

        async def fresh():
            return (await read_through(a, sa, conn, READ, 1))[1] == [b"42"]

        assert await eventually(fresh, timeout=5)
        assert a.counters()["replicated_invalidations"] + b.counters()["replicated_invalidations"] >= 1
        slots = db.psql(f"SELECT slot_name, plugin FROM pg_replication_slots WHERE database = '{DB}'")
        assert slots.strip() == f"{slot_name('pgfront_invalidation', DB)}|test_decoding"
        await conn.close()
        await a.close()
        await b.close()

    asyncio.run(go(redis_server.url))
