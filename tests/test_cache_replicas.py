"""Fills from replicas: a result read on a streaming replica may fill the cache only once that replica
had replayed past the WAL position recorded with the last bump of every version guarding it
(docs/cache.md, "Fills from replicas").

The first tests drive ResultCache against the real Redis and Postgres with a stand-in for the primary's
WAL position; the last ones run pgfront with a real hot standby (the `replicated` fixture): a read fills
once the replica has replayed the write, does not while replay is paused, and a freshness checker with
concurrent writers and readers across two pgfront instances, replay paused and resumed, finds no stale
read.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest
import redis

from proxy.cache import Bypass, Fill, Hit
from proxy.cache.testing import eventually, read_through, select_reply, settle, started_cache, write_through
from proxy.cache.versions import EPOCH, VERSIONS_KEY, lsn_field, table_field
from proxy.replicas.health import Replica, ReplicaTarget
from proxy.sql import analyze
from tests.conftest import PASSWORD, Pgfront, psql

DB = "cache_replica_fills"
READ = "SELECT v FROM kv WHERE k = $1"
OTHER = "SELECT w FROM other WHERE k = $1"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def db(pg):
    pg.fresh_database(DB, "CREATE TABLE kv (k int PRIMARY KEY, v int NOT NULL); "
                      "INSERT INTO kv SELECT g, 0 FROM generate_series(1, 10) g; "
                      "CREATE TABLE other (k int PRIMARY KEY, w int NOT NULL); INSERT INTO other VALUES (1, 0)")
    return pg


class FakePrimary:
    """Stands in for ReplicaSet.primary_lsn_after: the WAL position is whatever the test says, and a hook
    can run (a write, say) between the cover's read of the versions and its position query."""

    def __init__(self, position: int) -> None:
        self.position = position
        self.asked: list[float] = []
        self.before: object = None

    async def __call__(self, after: float) -> int:
        self.asked.append(after)
        hook, self.before = self.before, None
        if hook is not None:
            await hook()
        return self.position


async def _setup(db, redis_server, position: int = 1000):
    cache = await started_cache(redis_server.url, db.dsn(dbname=DB))
    primary = cache.lsn_source = FakePrimary(position)
    conn = await asyncpg.connect(db.dsn(dbname=DB))
    state = cache.session(DB, "postgres")
    for sql in (READ, OTHER):
        await settle(cache, analyze(sql), state)
    return cache, primary, state, conn


async def _recorded(cache, field: str) -> bytes | None:
    return await cache.versions.client.hget(VERSIONS_KEY, lsn_field(field))


async def _positions_settled(cache) -> None:
    """Wait until the background recording of WAL positions has nothing left to do."""
    async def idle():
        return not cache._cover_pending and (cache._covering is None or cache._covering.done())
    assert await eventually(idle)


def test_a_replica_read_fills_only_past_every_bumps_position(db, redis_server):
    async def go():
        cache, primary, state, conn = await _setup(db, redis_server, position=1000)
        info = analyze(READ)
        key = cache.key(state, READ, [b"1"])
        await cache.purge_all()  # a new epoch: its position (1000) is recorded after the bump
        await _positions_settled(cache)
        epoch = await cache.versions.client.hget(VERSIONS_KEY, EPOCH)
        assert await _recorded(cache, EPOCH) == b"1000 " + epoch
        # kv was never bumped under this hash, or was (earlier tests): write it so its value is known
        await write_through(cache, state, conn, "UPDATE kv SET v = 0 WHERE k = 1")
        await _positions_settled(cache)
        kv = table_field(DB, "kv")
        version = await cache.versions.client.hget(VERSIONS_KEY, kv)
        assert await _recorded(cache, kv) == b"1000 " + version
        # the replica had replayed nothing known, or less than the positions: no fill
        for replayed in (0, 999):
            res = await cache.lookup(key, info, state, replayed=replayed)
            assert isinstance(res, Bypass) and res.reason == "replica: not replayed past the last write", res
        # past them: a miss that fills
        res = await cache.lookup(key, info, state, replayed=1000)
        assert isinstance(res, Fill) and res.replica
        res.feed(select_reply([b"0"]))
        assert await cache.fill(res, 30)
        # hits are served to replica reads whatever they replayed
        cache.l1.clear()
        hit = await cache.lookup(key, info, state, replayed=0)
        assert isinstance(hit, Hit) and hit.reply == select_reply([b"0"])
        # a write: its bump is recorded with a newer position; an older replica may not fill any more
        primary.position = 2000
        await write_through(cache, state, conn, "UPDATE kv SET v = 1 WHERE k = 1")
        await _positions_settled(cache)
        assert (await _recorded(cache, kv)).startswith(b"2000 ")
        res = await cache.lookup(key, info, state, replayed=1999)
        assert isinstance(res, Bypass), res
        res = await cache.lookup(key, info, state, replayed=2000)
        assert isinstance(res, Fill)
        cache.abandon(res)
        c = cache.counters()
        assert c["replica_fills"] == 1 and c["replica_fills_refused"] == 3, c
        await conn.close()
        await cache.close()

    run(go())


def test_a_bump_between_reading_versions_and_the_position_is_not_covered(db, redis_server):
    """The position of a cover is read after the versions; a bump in between may have committed after
    it, so that field keeps no position, and a replica read under the new version does not fill until a
    later cover (which the refused read asks for) records one."""
    async def go():
        cache, primary, state, conn = await _setup(db, redis_server, position=5000)
        writer = await started_cache(redis_server.url, db.dsn(dbname=DB))  # another instance, no replicas
        wstate = writer.session(DB, "postgres")
        await settle(writer, analyze(READ), wstate)
        info = analyze(READ)
        key = cache.key(state, READ, [b"2"])
        await write_through(cache, state, conn, "UPDATE kv SET v = 10 WHERE k = 2")
        await _positions_settled(cache)
        kv = table_field(DB, "kv")

        async def write_meanwhile():  # after the cover read the versions, before its position query
            await write_through(writer, wstate, conn, "UPDATE kv SET v = 11 WHERE k = 2")

        primary.before = write_meanwhile
        primary.position = 6000
        await write_through(cache, state, conn, "UPDATE kv SET v = 12 WHERE k = 2")
        await _positions_settled(cache)
        version = await cache.versions.client.hget(VERSIONS_KEY, kv)
        record = await _recorded(cache, kv)
        assert not record.endswith(b" " + version), (record, version)  # the later bump is not covered
        res = await cache.lookup(key, info, state, replayed=10 ** 12)
        assert isinstance(res, Bypass) and res.reason == "replica: write position not known yet", res
        await _positions_settled(cache)  # the refused read asked for a position: now it has one
        assert await _recorded(cache, kv) == b"6000 " + version
        res = await cache.lookup(key, info, state, replayed=6000)
        assert isinstance(res, Fill)
        cache.abandon(res)
        # a writer instance without replicas records nothing; a replica read elsewhere asks for it
        await write_through(writer, wstate, conn, "UPDATE kv SET v = 13 WHERE k = 2")
        res = await cache.lookup(key, info, state, replayed=10 ** 12)
        assert isinstance(res, Bypass) and res.reason == "replica: write position not known yet", res
        await _positions_settled(cache)
        res = await cache.lookup(key, info, state, replayed=6000)
        assert isinstance(res, Fill)
        cache.abandon(res)
        await conn.close()
        await writer.close()
        await cache.close()

    run(go())


def test_a_refused_replica_read_may_join_a_flight_led_elsewhere(db, redis_server):
    async def go():
        cache, primary, state, conn = await _setup(db, redis_server, position=7000)
        info = analyze(OTHER)
        await write_through(cache, state, conn, "UPDATE other SET w = 1 WHERE k = 1")
        await _positions_settled(cache)
        key = cache.key(state, OTHER, [b"1"])
        leader = await cache.lookup(key, info, state)  # a read on the primary leads
        assert isinstance(leader, Fill) and not leader.replica
        follower = asyncio.create_task(cache.lookup(key, info, state, replayed=1))
        await asyncio.sleep(0.05)
        leader.feed(select_reply([b"1"]))
        await cache.fill(leader, 30)
        hit = await follower
        assert isinstance(hit, Hit) and hit.level == "flight"
        # without a flight, a replica that has not replayed the write gets nothing from the cache machinery
        await write_through(cache, state, conn, "UPDATE other SET w = 2 WHERE k = 1")
        res = await cache.lookup(key, info, state, replayed=1)
        assert isinstance(res, Bypass)
        # and its rows, read anyway, are never stored: the primary's read after it misses
        assert (await read_through(cache, state, conn, OTHER, 1)) == ("miss", [b"2"])
        await conn.close()
        await cache.close()

    run(go())


def test_replica_positions_hold_for_connections_older_than_the_probe():
    r = Replica(ReplicaTarget("r1", "postgresql://x@127.0.0.1:1/postgres"), link=None)
    assert r.replayed_for(0.0) == 0  # never probed
    r.in_recovery, r.replay_lsn, r.replay_asked = True, 500, 10.0
    assert r.replayed_for(9.0) == 500  # logged in before the probe was sent: same server run
    assert r.replayed_for(10.0) == 0 and r.replayed_for(11.0) == 0  # maybe a newer run (restarted since)
    assert r.replayed_for(float("inf")) == 0
    r.in_recovery = False  # promoted: no longer a standby following the primary
    assert r.replayed_for(9.0) == 0


# -- pgfront with a real replica ---------------------------------------------------------------------------

RULES = ('[[rule]]\nname = "cache-rc"\nmatch = { tables = ["rc_items", "rc_counter"] }\n'
         'cache = { ttl = "60s" }\n')
READ_ITEM = "SELECT name FROM rc_items WHERE id = 1"


@pytest.fixture(scope="module")
def rc_tables(replicated):
    replicated.primary.psql("CREATE TABLE rc_items (id int PRIMARY KEY, name text); "
                            "INSERT INTO rc_items SELECT g, 'item' || g FROM generate_series(1, 10) g; "
                            "CREATE TABLE rc_counter (id int PRIMARY KEY, n int NOT NULL); "
                            "INSERT INTO rc_counter VALUES (1, 0), (2, 0)")
    replicated.replica.wait_caught_up(30)


def _pgfront(replicated, redis_url: str, d: Path, replicas: bool = True) -> Pgfront:
    users = d / "userlist.txt"
    users.write_text(f'"postgres" "{PASSWORD}"\n')
    (d / "rules.toml").write_text(RULES)
    config = (f"[auth]\nmode = 'userlist'\nfile = '{users}'\nmethod = 'trust'\n"
              "[pool]\nmode = 'transaction'\ndefault_pool_size = 10\n"
              f"[rules]\nfiles = ['{d}/rules.toml']\nwatch = false\n"
              f"[cache]\nenabled = true\nredis_url = '{redis_url}'\nredis_timeout = '1s'\n")
    if replicas:
        config += ("[routing]\nprobe_interval = '200ms'\nmax_wait = '300ms'\n"
                   f'[[replica]]\nurl = "postgresql://postgres@127.0.0.1:{replicated.replica.port}/postgres"\n')
    return Pgfront(f"postgresql://127.0.0.1:{replicated.primary.port}", config).start()


def _show(p: Pgfront, what: str) -> list[list[str]]:
    out = psql(p.port, f"SHOW {what}", dbname="pgfront", extra_args=["-F", "\t"]).stdout.splitlines()
    return [line.split("\t") for line in out if "\t" in line]


def _cache(p: Pgfront) -> dict[str, str]:
    return {r[0]: r[1] for r in _show(p, "CACHE")}


def _hits(p: Pgfront) -> int:
    return int(_cache(p)["hits"])


def _routed_to_replica(p: Pgfront) -> int:
    return sum(int(r[8]) for r in _show(p, "REPLICAS") if r[0] != "primary")


def _wait_usable(p: Pgfront, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(r[0] == "replica1" and r[2] == "ok" for r in _show(p, "REPLICAS")):
        assert time.monotonic() < deadline, _show(p, "REPLICAS")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def instances(replicated, rc_tables, redis_server, tmp_path_factory):
    """pgfront A, routing reads to the replica, and pgfront B, another instance on the same Redis that
    sends everything to the primary (its readers would see any stale entry A's replica reads stored)."""
    a = _pgfront(replicated, redis_server.url, tmp_path_factory.mktemp("rc-a"))
    b = _pgfront(replicated, redis_server.url, tmp_path_factory.mktemp("rc-b"), replicas=False)
    try:
        _wait_usable(a)
        yield a, b
    finally:
        a.stop()
        b.stop()


def test_a_replica_read_fills_once_the_replica_replayed_the_last_bump(replicated, instances, redis_server):
    a, _b = instances
    before = replicated.primary.lsn()
    with psycopg.connect(a.conninfo(), autocommit=True) as writer:
        writer.execute("UPDATE rc_items SET name = 'a1' WHERE id = 1")
    r = redis.Redis.from_url(redis_server.url)
    try:
        def recorded():
            hash_ = r.hgetall(VERSIONS_KEY)
            field = next((f for f in hash_ if f.startswith(b"t:") and f.endswith(b"rc_items")), None)
            rec = hash_.get(b"l:" + field) if field else None
            return rec if rec is not None and rec.split(b" ")[1] == hash_[field] else None
        rec = asyncio.run(eventually(recorded))
        assert rec is not None and int(rec.split(b" ")[0]) > before  # recorded after the write's commit
    finally:
        r.close()
    routed, fills = _routed_to_replica(a), int(_cache(a)["replica_fills"])
    # never writes, so its reads go to the replica; simple Queries all along (psycopg would prepare the
    # sixth: another key, an Execute's)
    with psycopg.connect(a.conninfo(), autocommit=True, prepare_threshold=None) as reader:
        deadline = time.monotonic() + 15
        while int(_cache(a)["replica_fills"]) == fills:
            assert time.monotonic() < deadline, _cache(a)
            assert reader.execute(READ_ITEM).fetchone()[0] in ("a1", "item1")
            time.sleep(0.05)
        hits = _hits(a)
        assert [reader.execute(READ_ITEM).fetchone()[0] for _ in range(3)] == ["a1"] * 3
    assert _hits(a) >= hits + 3
    assert _routed_to_replica(a) > routed


def test_with_replay_paused_a_replica_read_does_not_fill(replicated, instances):
    a, b = instances
    replica = replicated.replica
    with psycopg.connect(a.conninfo(), autocommit=True, prepare_threshold=None) as reader:
        assert reader.execute(READ_ITEM).fetchone()[0] == "a1"  # cached (the test before)
        replica.pause_replay()
        try:
            with psycopg.connect(a.conninfo(), autocommit=True) as writer:
                writer.execute("UPDATE rc_items SET name = 'b1' WHERE id = 1")
                fills, refused = int(_cache(a)["fills"]), int(_cache(a)["replica_fills_refused"])
                routed = _routed_to_replica(a)
                hits = _hits(a)
                # the replica still has a1: its reads say so (the cache holds nothing under the new
                # versions, and the primary has b1), and none of them is stored
                for _ in range(5):
                    assert reader.execute(READ_ITEM).fetchone()[0] == "a1"
                    time.sleep(0.25)  # several probes: the replica's position is known, and behind
                assert _routed_to_replica(a) >= routed + 4  # (the first may go where the hit before went)
                c = _cache(a)
                assert int(c["fills"]) == fills and int(c["hits"]) == hits, c
                assert int(c["replica_fills_refused"]) >= refused + 5, c
                # the writer reads its own write (read-your-writes: the primary, replay being paused)
                assert writer.execute(READ_ITEM).fetchone()[0] == "b1"
            # another instance, reading on the primary, finds no stale entry: it gets b1
            with psycopg.connect(b.conninfo(), autocommit=True) as other:
                assert [other.execute(READ_ITEM).fetchone()[0] for _ in range(3)] == ["b1"] * 3
            # that entry, filled from the primary, now answers the replica's readers too
            assert reader.execute(READ_ITEM).fetchone()[0] == "b1"
        finally:
            replica.resume_replay()
    replica.wait_caught_up(30)


def test_freshness_checker_with_a_replica_finds_no_stale_reads(replicated, instances):
    """Writers through both instances, readers on the replica (A) and on the primary (B), replay paused
    and resumed twice. A read that starts after a write was acknowledged must see it when it reads the
    primary or the cache: B's readers read only those, so any stale entry stored from a replica shows
    there; each writer must read its own writes (A's by read-your-writes); and A's readers never see a
    value older than both the last acknowledged one and the one the replica visibly had before the read.

    The writers write in spells. In the quiet between two, the replica catches up and A's readers fill
    from it; B's readers pause from just before the end of a spell to half-way into the quiet (else they
    would fill every entry first, from the primary), and then check what A stored."""
    a, b = instances
    replica = replicated.replica
    acknowledged = {1: 0, 2: 0}
    stale: list[tuple] = []
    errors: list[str] = []
    stop = threading.Event()
    writing = threading.Event()
    b_reads = threading.Event()
    ab = {1: a, 2: b}
    start = _cache(a)
    start_hits_b = _hits(b)

    def guard(fn):
        def run_(*args):
            try:
                fn(*args)
            except Exception as e:  # noqa: BLE001 - reported by the assertion below
                errors.append(f"{fn.__name__}: {e!r}")
                stop.set()
        run_.__name__ = fn.__name__
        return run_

    def writer(row: int):
        rnd = random.Random(row)
        with psycopg.connect(ab[row].conninfo(), autocommit=True) as conn:
            n = 0
            while not stop.is_set():
                if not writing.wait(0.05):
                    continue
                n += 1
                conn.execute("UPDATE rc_counter SET n = %s WHERE id = %s", (n, row))
                acknowledged[row] = n
                got = conn.execute("SELECT n FROM rc_counter WHERE id = %s", (row,)).fetchone()[0]
                if got != n:  # its own write, read at once (A: read-your-writes; B: the primary)
                    stale.append(("own write", row, n, got))
                time.sleep(rnd.uniform(0, 0.05))

    def read(conn, row: int, extended: bool) -> int:
        if extended:
            return conn.execute("SELECT n FROM rc_counter WHERE id = %s", (row,)).fetchone()[0]
        return conn.execute(f"SELECT n FROM rc_counter WHERE id = {row}").fetchone()[0]

    def reader_b(extended: bool):
        with psycopg.connect(b.conninfo(), autocommit=True) as conn:
            while not stop.is_set():
                if not b_reads.wait(0.05):
                    continue
                for row in (1, 2):
                    floor = acknowledged[row]
                    n = read(conn, row, extended)
                    if n < floor:
                        stale.append(("primary/cache", row, floor, n))

    def reader_a(extended: bool):
        with psycopg.connect(a.conninfo(), autocommit=True) as conn, \
                psycopg.connect(replica.dsn(), autocommit=True) as direct:
            while not stop.is_set():
                for row in (1, 2):
                    floor = acknowledged[row]
                    seen = direct.execute("SELECT n FROM rc_counter WHERE id = %s", (row,)).fetchone()[0]
                    n = read(conn, row, extended)
                    if n < min(floor, seen):
                        stale.append(("replica/cache", row, floor, seen, n))
                time.sleep(0.005)

    threads = [threading.Thread(target=guard(writer), args=(row,)) for row in (1, 2)]
    threads += [threading.Thread(target=guard(reader_b), args=(i % 2 == 0,)) for i in range(2)]
    threads += [threading.Thread(target=guard(reader_a), args=(i % 2 == 0,)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        # spells of writing and of quiet, 0.8 s each; replay paused over the 2nd-4th and the 7th-9th
        for spell in range(12):
            if stop.is_set():
                break
            if spell in (1, 6):
                replica.pause_replay()
            if spell in (4, 9):
                replica.resume_replay()
            if spell % 2 == 0:
                writing.set()
                b_reads.set()
                time.sleep(0.65)
                b_reads.clear()  # B's last reads before the last writes: A's readers miss first
                time.sleep(0.15)
            else:
                writing.clear()
                time.sleep(0.5)
                b_reads.set()
                time.sleep(0.5)
    finally:
        writing.clear()
        b_reads.set()
        stop.set()
        for t in threads:
            t.join(60)
        replica.resume_replay()
    assert errors == [], errors
    assert stale == [], stale[:10]
    c = _cache(a)
    assert int(c["replica_fills"]) > int(start["replica_fills"]), c  # replicas did fill...
    assert int(c["replica_fills_refused"]) > int(start["replica_fills_refused"]), c  # ...and not while behind
    assert _hits(b) > start_hits_b
    assert acknowledged[1] > 10 and acknowledged[2] > 10, acknowledged
