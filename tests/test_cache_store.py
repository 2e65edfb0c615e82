"""ResultCache against a real Redis and a real PostgreSQL: hits, invalidation across instances, the
reader/writer race, single flight, size limit, purges and counters."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from proxy.cache import Bypass, Fill, Hit
from proxy.cache.testing import (
    eventually,
    read_through,
    select_reply,
    settle,
    started_cache,
    write_through,
)
from proxy.sql import analyze

DB = "cache_store"
READ = "SELECT v FROM kv WHERE k = $1"


@pytest.fixture(scope="module")
def db(pg):
    pg.fresh_database(DB, "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); "
                      "INSERT INTO kv SELECT g, 0 FROM generate_series(1, 10) g")
    return pg


def run(coro):
    return asyncio.run(coro)


async def _setup(db, redis_server, n=1, **cache):
    caches = [await started_cache(redis_server.url, db.dsn(dbname=DB), **cache) for _ in range(n)]
    conn = await asyncpg.connect(db.dsn(dbname=DB))
    states = [c.session(DB, "postgres") for c in caches]
    for c, s in zip(caches, states, strict=True):
        await settle(c, analyze(READ), s)
    return caches, states, conn


async def _teardown(caches, conn):
    await conn.close()
    for c in caches:
        await c.close()


def test_miss_fill_then_hits_are_byte_for_byte(db, redis_server):
    async def go():
        (cache,), (state,), conn = await _setup(db, redis_server)
        await cache.purge_all()
        info = analyze(READ)
        key = cache.key(state, READ, [b"1"])
        res = await cache.lookup(key, info, state)
        assert isinstance(res, Fill) and res.event == "miss"
        reply = select_reply([b"0"])
        assert res.feed(reply)
        assert await cache.fill(res, 30)
        hit = await cache.lookup(key, info, state)
        assert isinstance(hit, Hit) and hit.reply == reply and hit.level == "l1"
        cache.l1.clear()
        hit = await cache.lookup(key, info, state)
        assert hit.level == "l2" and hit.reply == reply
        assert (await cache.lookup(key, info, state)).level == "l1"
        other_params = await cache.lookup(cache.key(state, READ, [b"2"]), info, state)
        assert isinstance(other_params, Fill)
        cache.abandon(other_params)
        c = cache.counters()
        assert c["hits"] == 3 and c["hits_l1"] == 2 and c["hits_l2"] == 1 and c["misses"] == 2 and c["fills"] == 1
        await _teardown([cache], conn)

    run(go())


def test_a_write_through_one_instance_invalidates_every_instance(db, redis_server):
    async def go():
        (a, b), (sa, sb), conn = await _setup(db, redis_server, 2)
        await a.purge_all()
        assert (await read_through(a, sa, conn, READ, 2))[0] == "miss"
        assert await read_through(b, sb, conn, READ, 2) == ("l2", [b"0"])  # B reads A's fill
        assert (await read_through(a, sa, conn, READ, 2))[0] == "l1"
        await write_through(b, sb, conn, "UPDATE kv SET v = v + 1 WHERE k = 2")
        # A's L1 copy is unreachable at once (versions are checked per hit), then refilled
        assert await read_through(a, sa, conn, READ, 2) == ("miss", [b"1"])
        assert await read_through(b, sb, conn, READ, 2) == ("l2", [b"1"])
        # pub/sub frees the L1 entries of other processes
        await write_through(a, sa, conn, "UPDATE kv SET v = v + 1 WHERE k = 2")
        assert await eventually(lambda: len(b.l1) == 0)
        assert b.counters()["invalidations"] >= 1 and a.counters()["invalidations"] >= 1
        await _teardown([a, b], conn)

    run(go())


def test_reader_writer_race_never_stores_a_reachable_stale_result(db, redis_server):
    """R misses and reads old rows; W commits and invalidates; R then fills: the entry must be dead."""
    async def go():
        (r_cache, w_cache), (r, w), conn = await _setup(db, redis_server, 2)
        await r_cache.purge_all()
        info = analyze(READ)
        key = r_cache.key(r, READ, [b"3"])
        ticket = await r_cache.lookup(key, info, r)  # versions read here, before the query
        assert isinstance(ticket, Fill)
        old = await conn.fetchval(READ, 3)
        await write_through(w_cache, w, conn, "UPDATE kv SET v = v + 1 WHERE k = 3")  # acknowledged
        ticket.feed(select_reply([str(old).encode()]))
        await r_cache.fill(ticket, 60)  # stale rows, stored under the old versions
        for cache, state in ((r_cache, r), (w_cache, w)):
            source, values = await read_through(cache, state, conn, READ, 3)
            assert values == [str(old + 1).encode()], source
        await _teardown([r_cache, w_cache], conn)

    run(go())


def test_single_flight_runs_one_query_for_concurrent_misses(db, redis_server):
    async def go():
        # each task plays a session: the one that gets the Fill runs the "query" and fills
        (cache,), (state,), conn = await _setup(db, redis_server)
        await cache.purge_all()
        info = analyze(READ)
        key = cache.key(state, READ, [b"4"])

        async def session():
            res = await cache.lookup(key, info, state)
            if isinstance(res, Fill):
                await asyncio.sleep(0.05)  # the query runs upstream
                res.feed(select_reply([b"0"]))
                await cache.fill(res, 30)
            return res

        results = await asyncio.gather(*(session() for _ in range(10)))
        assert sum(isinstance(r, Fill) for r in results) == 1
        hits = [r for r in results if isinstance(r, Hit)]
        assert len(hits) == 9 and {h.level for h in hits} == {"flight"}
        assert all(h.reply == select_reply([b"0"]) for h in hits)
        key2 = cache.key(state, READ, [b"5"])
        leader = await cache.lookup(key2, info, state)
        waiters = [asyncio.create_task(cache.lookup(key2, info, state)) for _ in range(3)]
        await asyncio.sleep(0.05)
        cache.abandon(leader)
        assert all(isinstance(r, Fill) for r in [await t for t in waiters])
        await _teardown([cache], conn)

    run(go())


def test_results_over_the_size_limit_are_not_cached(db, redis_server):
    async def go():
        (cache,), (state,), conn = await _setup(db, redis_server, max_result_size="1kB")
        await cache.purge_all()
        info = analyze(READ)
        key = cache.key(state, READ, [b"6"])
        res = await cache.lookup(key, info, state)
        assert not res.feed(select_reply([b"x" * 2000]))
        assert not await cache.fill(res, 30)
        assert isinstance(await cache.lookup(key, info, state), Fill)
        assert cache.counters()["too_large"] == 1
        await _teardown([cache], conn)

    run(go())


def test_l1_is_bounded_by_bytes(db, redis_server):
    async def go():
        (cache,), (state,), conn = await _setup(db, redis_server, l1_size="1kB")
        await cache.purge_all()
        for k in range(1, 9):
            await read_through(cache, state, conn, READ, k)
        assert cache.l1.bytes <= 1024 and 0 < len(cache.l1) < 8
        await _teardown([cache], conn)

    run(go())


def test_purges(db, redis_server):
    async def go():
        (a, b), (sa, sb), conn = await _setup(db, redis_server, 2)
        await a.purge_all()
        await read_through(a, sa, conn, READ, 7)
        assert (await read_through(b, sb, conn, READ, 7))[0] == "l2"
        await b.purge_table("public.kv")
        assert (await read_through(a, sa, conn, READ, 7))[0] == "miss"
        await b.purge_table("kv", DB)
        assert (await read_through(a, sa, conn, READ, 7))[0] == "miss"
        await b.purge_fingerprint(analyze(READ).fingerprint)
        assert (await read_through(a, sa, conn, READ, 7))[0] == "miss"
        await b.purge_all()
        assert (await read_through(a, sa, conn, READ, 7))[0] == "miss"
        assert (await read_through(a, sa, conn, READ, 7))[0] == "l1"
        await _teardown([a, b], conn)

    run(go())


def test_transactions_bypass_after_writes_and_under_snapshot_isolation(db, redis_server):
    async def go():
        (cache,), (state,), conn = await _setup(db, redis_server)
        await cache.purge_all()
        await read_through(cache, state, conn, READ, 8)
        await write_through(cache, state, conn, "BEGIN")
        assert (await read_through(cache, state, conn, READ, 8))[0] == "l1"  # read committed, no writes yet
        await write_through(cache, state, conn, "UPDATE kv SET v = v + 1 WHERE k = 8")
        source, values = await read_through(cache, state, conn, READ, 8)
        assert source == "bypass" and values == [b"1"]  # sees its own uncommitted write
        assert cache.counters()["bypass_reasons"]["transaction has written"] == 1
        await write_through(cache, state, conn, "ROLLBACK")
        assert (await read_through(cache, state, conn, READ, 8)) == ("l1", [b"0"])
        await write_through(cache, state, conn, "BEGIN ISOLATION LEVEL REPEATABLE READ")
        assert (await read_through(cache, state, conn, READ, 8))[0] == "bypass"
        await write_through(cache, state, conn, "COMMIT")
        disabled = await started_cache(redis_server.url, db.dsn(dbname=DB), enabled=False)
        res = await disabled.lookup(b"k" * 20, analyze(READ), state)
        assert isinstance(res, Bypass) and res.reason == "cache disabled"
        await _teardown([cache, disabled], conn)

    run(go())
