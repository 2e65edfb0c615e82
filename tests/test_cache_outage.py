"""Redis stopped, restarted, paused: the cache is bypassed (never failed), comes back by itself, and
never serves a result made stale by a write it could not record."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from proxy.cache import Bypass
from proxy.cache.testing import eventually, read_through, settle, started_cache, write_through
from proxy.devdb import TempRedis
from proxy.sql import analyze

DB = "cache_outage"
READ = "SELECT v FROM kv WHERE k = $1"
KEYS = 5


@pytest.fixture(scope="module")
def db(pg):
    pg.fresh_database(DB, "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); "
                      f"INSERT INTO kv SELECT g, 0 FROM generate_series(1, {KEYS}) g")
    return pg


@pytest.fixture
def redis():
    r = TempRedis().start()  # our own: these tests stop and pause it
    yield r
    r.resume()
    r.cleanup()


def run(coro):
    return asyncio.run(coro)


async def _setup(db, redis, n=1):
    caches = [await started_cache(redis.url, db.dsn(dbname=DB), retry_after=0.1, redis_timeout="100ms")
              for _ in range(n)]
    states = [c.session(DB, "postgres") for c in caches]
    for c, s in zip(caches, states, strict=True):
        await settle(c, analyze(READ), s)
    return caches, states, await asyncpg.connect(db.dsn(dbname=DB))


@pytest.mark.parametrize("outage", ["stop", "pause"])
def test_outage_bypasses_then_recovers_without_serving_stale(db, redis, outage):
    async def go():
        (a, b), (sa, sb), conn = await _setup(db, redis, 2)
        await read_through(a, sa, conn, READ, 1)
        before = await read_through(b, sb, conn, READ, 1)
        assert before[0] == "l2" and len(a.l1) == 1 and len(b.l1) == 1
        await asyncio.to_thread(redis.stop if outage == "stop" else redis.pause)
        await asyncio.sleep(a.window * 2)  # a hit checked within the last local_validity needs no Redis
        # reads bypass, writes still commit: nothing raises
        source, _ = await read_through(a, sa, conn, READ, 1)
        assert source == "bypass"
        await write_through(b, sb, conn, "UPDATE kv SET v = v + 1 WHERE k = 1")
        assert b.counters()["invalidation_failures"] == 1
        res = await a.lookup(a.key(sa, READ, [b"1"]), analyze(READ), sa)
        assert isinstance(res, Bypass) and res.reason == "redis unavailable"
        await asyncio.to_thread(redis.start if outage == "stop" else redis.resume)
        for cache in (a, b):
            assert await eventually(lambda c=cache: c.versions.available)
        expected = str(int(before[1][0]) + 1).encode()
        for cache, state in ((a, sa), (b, sb)):
            source, values = await read_through(cache, state, conn, READ, 1)
            assert values == [expected], (source, values)
        assert a.counters()["redis_outages"] >= 1 and a.counters()["epoch_changes"] >= 1
        await conn.close()
        for c in (a, b):
            await c.close()

    run(go())


def test_outages_under_load_fail_no_query_and_serve_nothing_stale(db, redis):
    """Two instances read while one writes; Redis is stopped, restarted, paused and resumed meanwhile."""
    async def go():
        caches, states, conn = await _setup(db, redis, 2)
        conns = [await asyncpg.connect(db.dsn(dbname=DB)) for _ in range(4)]
        acked = {k: await conn.fetchval(READ, k) for k in range(1, KEYS + 1)}
        stale, errors, sources, phase = [], [], {}, []
        stop = asyncio.Event()

        async def reader(i):
            cache, state = caches[i % 2], caches[i % 2].session(DB, "postgres")
            await settle(cache, analyze(READ), state)
            while not stop.is_set():
                k = random.randint(1, KEYS)
                floor = acked[k]  # acknowledged before this read began: must be visible
                try:
                    source, values = await read_through(cache, state, conns[i], READ, k)
                except Exception as e:  # pragma: no cover - the assertion below reports it
                    errors.append(repr(e))
                    continue
                sources[source] = sources.get(source, 0) + 1
                if int(values[0]) < floor:
                    stale.append((k, source, values, floor, list(phase)))

        async def writer():
            state = caches[0].session(DB, "postgres")
            n = 0
            while not stop.is_set():
                k = random.randint(1, KEYS)
                try:
                    await write_through(caches[n % 2], state, conn, "UPDATE kv SET v = v + 1 WHERE k = $1", k)
                except Exception as e:  # pragma: no cover
                    errors.append(repr(e))
                acked[k] = await conn.fetchval(READ, k)
                n += 1
                await asyncio.sleep(0.005)

        async def chaos():
            await asyncio.sleep(0.5)
            for flip in (redis.stop, redis.start, redis.pause, redis.resume, redis.stop, redis.start):
                phase.append(flip.__name__)
                await asyncio.to_thread(flip)
                await asyncio.sleep(0.6)
            for c in caches:
                await eventually(lambda c=c: c.versions.available)
            await asyncio.sleep(0.5)
            stop.set()

        await asyncio.gather(chaos(), writer(), *(reader(i) for i in range(4)))
        assert errors == [] and stale == [], (stale, phase)
        assert sources.get("bypass", 0) > 0 and sources.get("l1", 0) + sources.get("l2", 0) > 0, sources
        for c in conns + [conn]:
            await c.close()
        for c in caches:
            await c.close()

    run(go())
