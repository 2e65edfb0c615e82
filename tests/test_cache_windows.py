"""Freshness windows (cache.local_validity): hot hits skip Redis, and a commit that invalidates a result
served inside a window waits that window out, so no read that starts after the acknowledgement is
answered from before the write. Two ResultCaches play two pgfront processes sharing one Redis."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from proxy.cache.testing import read_through, settle, started_cache, write_through
from proxy.sql import analyze

DB = "cache_windows"
READ = "SELECT v FROM kv WHERE k = $1"
WINDOW = 0.3  # long enough to measure on a busy machine


@pytest.fixture(scope="module")
def db(pg):
    pg.fresh_database(DB, "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); "
                      "INSERT INTO kv SELECT g, 0 FROM generate_series(1, 5) g;"
                      "CREATE TABLE other (k int PRIMARY KEY, v int NOT NULL); INSERT INTO other VALUES (1, 0)")
    return pg


def run(coro):
    return asyncio.run(coro)


async def _pair(db, redis_server, window=WINDOW):
    import redis.asyncio as aioredis

    async with aioredis.Redis.from_url(redis_server.url) as r:
        await r.flushall()  # windows other tests opened on these tables would delay this test's writes
    caches = [await started_cache(redis_server.url, db.dsn(dbname=DB), local_validity=f"{int(window * 1000)}ms")
              for _ in range(2)]
    states = [c.session(DB, "postgres") for c in caches]
    for c, s in zip(caches, states, strict=True):
        await settle(c, analyze(READ), s)
    return caches, states, await asyncpg.connect(db.dsn(dbname=DB))


async def _eval_calls(cache) -> int:
    info = await cache.versions.client.info("commandstats")
    return int(info.get("cmdstat_eval", {}).get("calls", 0))


def test_hits_inside_the_window_need_no_redis(db, redis_server):
    async def go():
        (a, _b), (sa, _sb), conn = await _pair(db, redis_server, window=5.0)
        assert (await read_through(a, sa, conn, READ, 2))[0] == "miss"
        before = await _eval_calls(a)
        key = a.key(sa, READ, [b"2"])
        replies = [a.hit_now(key, analyze(READ), sa) for _ in range(200)]
        assert all(r is not None for r in replies)
        assert (await read_through(a, sa, conn, READ, 2))[0] == "l1"
        assert await _eval_calls(a) == before  # 201 hits, not one version check
        await conn.close()
        for c in (a, _b):
            await c.close()

    run(go())


def test_a_commit_waits_out_the_window_of_a_result_it_invalidates(db, redis_server):
    async def go():
        (a, b), (sa, sb), conn = await _pair(db, redis_server)
        await write_through(b, sb, conn, "UPDATE kv SET v = 0 WHERE k = 1")
        assert b.counters()["commit_waits"] == 0  # nobody read kv in a window yet: no wait
        source, values = await read_through(a, sa, conn, READ, 1)
        assert source == "miss" and values == [b"0"]
        read_at = time.monotonic()
        t0 = time.monotonic()
        await write_through(b, sb, conn, "UPDATE kv SET v = v + 1 WHERE k = 1")
        acked = time.monotonic()
        assert b.counters()["commit_waits"] == 1
        # the acknowledgement came only after the window a's read opened had closed
        assert acked >= read_at + WINDOW * 0.9, (acked - t0)
        key = a.key(sa, READ, [b"1"])
        assert a.hit_now(key, analyze(READ), sa) is None
        source, values = await read_through(a, sa, conn, READ, 1)
        assert values == [b"1"], source
        # a write to a table no window covers is acknowledged at once
        t0 = time.monotonic()
        await write_through(b, sb, conn, "UPDATE other SET v = v + 1")
        assert time.monotonic() - t0 < WINDOW * 0.5
        assert b.counters()["commit_waits"] == 1
        await conn.close()
        for c in (a, b):
            await c.close()

    run(go())


def test_no_stale_read_after_acknowledged_commits_even_when_pubsub_is_late(db, redis_server):
    """The invalidation message that drops L1 entries elsewhere is only memory hygiene: with it switched
    off, readers in another process still never see a value older than the last acknowledged write."""
    async def go():
        (a, b), (sa, sb), conn = await _pair(db, redis_server, window=0.05)
        a.versions.on_invalidate = None  # a never hears of b's writes except through versions
        conns = [await asyncpg.connect(db.dsn(dbname=DB)) for _ in range(3)]
        acked = {"v": await conn.fetchval(READ, 3)}
        stale, reads = [], []
        stop = asyncio.Event()

        async def reader(c):
            state = a.session(DB, "postgres")
            await settle(a, analyze(READ), state)
            while not stop.is_set():
                floor = acked["v"]
                source, values = await read_through(a, state, c, READ, 3)
                reads.append(source)
                if int(values[0]) < floor:
                    stale.append((source, values, floor))
                await asyncio.sleep(0)

        async def writer():
            for _ in range(15):
                await write_through(b, sb, conns[2], "UPDATE kv SET v = v + 1 WHERE k = 3")
                acked["v"] = await conns[2].fetchval(READ, 3)
                await asyncio.sleep(0.02)
            stop.set()

        await asyncio.gather(reader(conns[0]), reader(conns[1]), writer())
        assert not stale, stale[:5]
        assert reads.count("l1") > 20, {s: reads.count(s) for s in set(reads)}
        assert b.counters()["commit_waits"] > 0
        for c in [*conns, conn]:
            await c.close()
        for c in (a, b):
            await c.close()

    run(go())
