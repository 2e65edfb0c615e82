"""The cache on a 3-node Redis Cluster (started by the test): fills, hits and invalidation across two
instances, entries spread over the nodes, pub/sub through one node."""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import pytest

from proxy.cache.testing import (
    TempRedisCluster,
    eventually,
    read_through,
    settle,
    started_cache,
    write_through,
)
from proxy.sql import analyze

DB = "cache_cluster"
READ = "SELECT v FROM kv WHERE k = $1"


@pytest.fixture(scope="module")
def cluster():
    c = TempRedisCluster().start()
    yield c
    c.cleanup()


@pytest.fixture(scope="module")
def db(pg):
    pg.fresh_database(DB, "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); "
                      "INSERT INTO kv SELECT g, 0 FROM generate_series(1, 30) g")
    return pg


def _keys_on(port: int) -> int:
    out = subprocess.run(["redis-cli", "-p", str(port), "dbsize"], capture_output=True, text=True).stdout
    return int(out.strip() or 0)


def test_cluster_fill_hit_invalidate_across_instances(cluster, db):
    async def go():
        a = await started_cache(cluster.url, db.dsn(dbname=DB))
        b = await started_cache(cluster.url, db.dsn(dbname=DB))
        assert a.versions.cluster and a.versions.available
        sa, sb = a.session(DB, "postgres"), b.session(DB, "postgres")
        for c, s in ((a, sa), (b, sb)):
            await settle(c, analyze(READ), s)
        conn = await asyncpg.connect(db.dsn(dbname=DB))
        for k in range(1, 31):
            assert (await read_through(a, sa, conn, READ, k))[0] == "miss"
        for k in range(1, 31):
            assert await read_through(b, sb, conn, READ, k) == ("l2", [b"0"])
        # 30 entries land in different slots: every node holds some
        assert all(_keys_on(n.port) > 0 for n in cluster.nodes)
        await write_through(a, sa, conn, "UPDATE kv SET v = 1 WHERE k = 5")
        assert await read_through(b, sb, conn, READ, 5) == ("miss", [b"1"])
        assert await read_through(a, sa, conn, READ, 5) == ("l2", [b"1"])
        # pub/sub reaches the other instance through one node
        await write_through(b, sb, conn, "UPDATE kv SET v = 2 WHERE k = 6")

        async def dropped():
            return not any(e.fields and "t:cache_cluster.kv" in e.fields for e in a.l1._entries.values())

        assert await eventually(dropped)
        await a.purge_all()
        assert (await read_through(b, sb, conn, READ, 7))[0] == "miss"
        assert a.counters()["errors"] == 0 and b.counters()["errors"] == 0
        await conn.close()
        await a.close()
        await b.close()

    asyncio.run(go())
