"""Cost of the cache's hot path: `python -m proxy.cache.bench` (starts a throwaway Postgres and Redis).

Prints microseconds per call for the policy check, the key, an L1 hit inside its freshness window (no
Redis) and outside it (one Redis round trip for the version check), an L2 hit, a bare Redis HMGET for comparison, and a miss + fill.
"""

from __future__ import annotations

import asyncio
import time

import uvloop

from proxy.cache import Bypass
from proxy.cache.testing import select_reply, settle, started_cache
from proxy.devdb import TempPostgres, TempRedis
from proxy.sql import analyze

SQL = "SELECT v FROM kv WHERE k = $1"


async def _timed(label: str, n: int, fn) -> None:
    t0 = time.perf_counter()
    for i in range(n):
        r = fn(i)
        if asyncio.iscoroutine(r):
            await r
    print(f"{label:<46} {(time.perf_counter() - t0) / n * 1e6:8.1f} us")


async def run(redis_url: str, dsn: str, n: int = 5000) -> None:
    cache = await started_cache(redis_url, dsn, local_validity="1h")  # windows outlast the run
    state = cache.session("postgres", "postgres")
    info = analyze(SQL)
    await settle(cache, info, state)
    reply = select_reply([b"42"] * 10)
    params = [[str(i).encode()] for i in range(n)]
    keys = [cache.key(state, SQL, p) for p in params]

    for k in keys:  # fill
        ticket = await cache.lookup(k, info, state)
        assert not isinstance(ticket, Bypass), ticket
        ticket.feed(reply)
        await cache.fill(ticket, 300)
    await _timed("policy.check", n, lambda i: cache.policy.check(info, state))
    await _timed("key (1 parameter)", n, lambda i: cache.key(state, SQL, params[i]))
    await _timed("lookup, L1 hit inside its window (no Redis)", n, lambda i: cache.lookup(keys[i], info, state))
    await _timed("hit_now, L1 hit inside its window (no Redis)", n, lambda i: cache.hit_now(keys[i], info, state))
    assert all(cache.hit_now(k, info, state) is not None for k in keys[:10])
    cache.window = 0.0  # every hit checks the versions again
    for e in cache.l1._entries.values():
        e.fresh_until = 0.0
    await _timed("lookup, L1 hit, window closed (1 Redis round trip)", n, lambda i: cache.lookup(keys[i], info, state))
    cache.l1.clear()
    await _timed("lookup, L2 hit (1 Redis round trip)", n, lambda i: cache.lookup(keys[i], info, state))
    fields = ["e", "d:postgres", "f:x", "t:postgres.kv"]
    await _timed("bare HMGET of 4 fields", n, lambda i: cache.versions.client.hmget("pgfront:versions", fields))
    await cache.purge_all()

    async def miss_fill(i: int) -> None:
        t = await cache.lookup(keys[i], info, state)
        t.feed(reply)
        await cache.fill(t, 300)

    await _timed("lookup miss + fill (2 round trips)", n, miss_fill)
    await cache.close()


def main() -> int:
    with TempPostgres() as pg, TempRedis() as r:
        pg.psql("CREATE TABLE kv (k int PRIMARY KEY, v int)")
        uvloop.run(run(r.url, pg.dsn()))  # as in the server
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
