"""proxy.replicas.health against a real primary and a real streaming replica (the `replicated` fixture).

The tests share one replica and run in file order: each leaves it replaying and running, except the
last, which promotes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from proxy.devdb import free_port
from proxy.replicas.health import REPROBE_GAP, ReplicaSet, ReplicaTarget, format_lsn, parse_lsn

MB = 1024 * 1024
COLUMNS = ["name", "host", "state", "in_recovery", "replay_lsn", "lag_bytes", "lag_seconds", "weight", "routed",
           "bans", "last_error"]


def make_set(rep, targets: list[ReplicaTarget] | None = None, primary_url: str | None = None,
             **kw: float) -> ReplicaSet:
    targets = targets or [ReplicaTarget("replica1", rep.replica.dsn())]
    opts = {"max_lag_bytes": 64 * MB, "max_lag_seconds": 60.0, "probe_interval": 0.2, "connect_timeout": 1.0, **kw}
    rs = ReplicaSet(targets, primary_url or rep.primary.dsn(), **opts)
    rs.changes = []  # type: ignore[attr-defined]
    rs.on_change = lambda r, old, new: rs.changes.append((r.target.name, old, new))  # type: ignore[attr-defined]
    return rs


def run(test, rep, **kw: float) -> None:
    """asyncio.run(test(rs)) with a started ReplicaSet (closed afterwards), bounded in time."""
    async def go() -> None:
        rs = make_set(rep, **kw)
        await rs.start()
        rs.changes.clear()  # starting -> ok
        try:
            await asyncio.wait_for(test(rs), 30)
        finally:
            await rs.close()

    asyncio.run(go())


async def wait_state(replica, state: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while replica.state != state:
        assert time.monotonic() < deadline, f"{replica} never became {state} (last error {replica.last_error!r})"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def replay_paused(rep) -> AsyncIterator[None]:
    await asyncio.to_thread(rep.replica.pause_replay)
    try:
        yield
    finally:
        await asyncio.to_thread(rep.replica.resume_replay)


async def commit(rep, sql: str = "INSERT INTO ticks DEFAULT VALUES") -> int:
    """Run `sql` on the primary (autocommit) and return the WAL insert position right after it."""
    conn = await asyncpg.connect(rep.primary.dsn())
    try:
        await conn.execute(sql)
        return parse_lsn(await conn.fetchval("SELECT pg_current_wal_insert_lsn()::text"))
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def rep(replicated):
    replicated.primary.psql("CREATE TABLE ticks (id serial PRIMARY KEY, at timestamptz DEFAULT now());"
                            "CREATE TABLE filler (id int, pad text)")
    replicated.replica.wait_caught_up(10)
    return replicated


def test_lsn_text_round_trips():
    assert parse_lsn("16/B374D848") == 0x16B374D848
    assert format_lsn(0x16B374D848) == "16/B374D848"
    assert format_lsn(0) == "0/0" and parse_lsn("0/0") == 0
    with pytest.raises(ValueError):
        parse_lsn("16B374D848")


def test_a_caught_up_replica_is_ok_and_an_idle_primary_is_no_lag(rep):
    async def test(rs: ReplicaSet) -> None:
        r = rs.replicas[0]
        assert r.state == "ok" and r.usable and r.in_recovery  # start() ran the first round
        assert r.replay_lsn > 0 and r.probed_at > 0 and rs.primary_lsn >= r.replay_lsn
        row = rs.describe()[0]
        assert list(row) == COLUMNS
        assert row["host"] == f"127.0.0.1:{rep.replica.port}" and row["name"] == "replica1"
        assert parse_lsn(row["replay_lsn"]) == r.replay_lsn
        # the last replayed commit gets older than max_lag_seconds, but nothing is left to replay
        await commit(rep)
        await asyncio.sleep(1.2)
        assert r.state == "ok" and r.lag_seconds == 0.0 and r.lag_bytes < 64 * 1024
        assert rs.changes == []

    run(test, rep, max_lag_seconds=0.3)


def test_paused_replay_and_megabytes_of_wal_make_it_lagging_until_resumed(rep):
    async def test(rs: ReplicaSet) -> None:
        r = rs.replicas[0]
        await wait_state(r, "ok")
        async with replay_paused(rep):
            await commit(rep, "INSERT INTO filler SELECT g, repeat('x', 500) FROM generate_series(1, 8000) g")
            await wait_state(r, "lagging")
            assert r.lag_bytes > 1 * MB and not r.usable and r.bans == 1
            assert rs.choose("postgres") is None
        await wait_state(r, "ok")
        assert r.lag_bytes <= 1 * MB and r.bans == 1
        assert rs.changes == [("replica1", "ok", "lagging"), ("replica1", "lagging", "ok")]

    run(test, rep, max_lag_bytes=1 * MB, max_lag_seconds=3600.0)


def test_paused_replay_ages_past_max_lag_seconds(rep):
    async def test(rs: ReplicaSet) -> None:
        r = rs.replicas[0]
        await wait_state(r, "ok")
        async with replay_paused(rep):
            await commit(rep)
            await wait_state(r, "lagging")
            assert r.lag_seconds > 0.5 and r.lag_bytes < 1 * MB
        await wait_state(r, "ok")
        assert r.lag_seconds == 0.0

    run(test, rep, max_lag_seconds=0.5)


def test_a_stopped_replica_is_down_and_ok_again_once_started(rep):
    async def test(rs: ReplicaSet) -> None:
        r = rs.replicas[0]
        await wait_state(r, "ok")
        await asyncio.to_thread(rep.replica.stop, "immediate")
        try:
            await wait_state(r, "down")
            assert r.last_error and r.bans == 1 and rs.choose("postgres") is None
            assert rs.describe()[0]["last_error"] == r.last_error
        finally:
            await asyncio.to_thread(rep.replica.start)
        await wait_state(r, "ok", timeout=20)
        assert r.bans == 1 and rs.choose("postgres") is r

    run(test, rep)


def test_unreachable_servers_are_down_without_raising(rep):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"

    async def test() -> None:
        rs = make_set(rep, [ReplicaTarget("gone", dead), ReplicaTarget("replica1", rep.replica.dsn())],
                      primary_url=dead)
        began = time.monotonic()
        await rs.start()
        try:
            assert time.monotonic() - began < 2.0
            gone, live = rs.replicas
            assert gone.state == "down" and "Connection" in gone.last_error and gone.bans == 0  # never usable
            assert live.state == "ok"  # the primary's position is unknown, its replay is not
            assert rs.primary_error
            with pytest.raises(OSError):
                await rs.primary_lsn_after(time.monotonic())
            await asyncio.sleep(0.5)  # more rounds: still down, nothing escaped the loop
            assert gone.state == "down" and not rs._loop.done()
        finally:
            await rs.close()

    asyncio.run(test())


def test_choose_respects_databases_weights_and_min_lsn(rep):
    url = rep.replica.dsn()
    targets = [ReplicaTarget("heavy", url, 3.0, frozenset({"app"})), ReplicaTarget("light", url, 1.0),
               ReplicaTarget("gone", f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", 100.0)]

    async def test() -> None:
        rs = make_set(rep, targets)
        await rs.start()
        await rs.close()  # freeze the probed state: choose() only reads it
        heavy, light, gone = rs.replicas
        assert (heavy.state, light.state, gone.state) == ("ok", "ok", "down")
        assert {rs.choose("postgres").target.name for _ in range(200)} == {"light"}
        picks = [rs.choose("app").target.name for _ in range(4000)]
        assert 0.68 < picks.count("heavy") / len(picks) < 0.82
        top = max(heavy.replay_lsn, light.replay_lsn)
        assert rs.choose("app", top + 1) is None
        assert rs.choose("app", top).replay_lsn == top
        heavy.replay_lsn = light.replay_lsn = 100
        assert rs.choose("app", 100) is not None and rs.choose("app", 101) is None

    asyncio.run(test())


def test_primary_lsn_after_coalesces_callers_and_covers_earlier_commits(rep):
    async def test(rs: ReplicaSet) -> None:
        committed = await commit(rep)
        t = time.monotonic()
        before = rs.primary_lsn_queries
        got = await asyncio.gather(*(rs.primary_lsn_after(t) for _ in range(100)))
        assert min(got) >= committed
        # one query that may have been sent before t (so not trusted) and one shared by all 100 callers
        assert rs.primary_lsn_queries - before <= 3
        # a query started after t has answered already: no new one for t
        before = rs.primary_lsn_queries
        assert await rs.primary_lsn_after(t) >= committed
        assert rs.primary_lsn_queries == before

    run(test, rep, probe_interval=0.05)


def test_wait_replayed_returns_at_once_times_out_while_paused_and_follows_resume(rep):
    # probe rounds 5 s apart: whatever happens sooner is wait_replayed's own re-probing
    async def test(rs: ReplicaSet) -> None:
        r = rs.replicas[0]
        probes = rs.replica_probes
        assert await rs.wait_replayed("postgres", r.replay_lsn, 5) is r  # already there: no probe
        assert rs.replica_probes == probes

        lsn = await commit(rep)
        await asyncio.to_thread(rep.replica.wait_caught_up, 10)
        began = time.monotonic()
        assert await rs.wait_replayed("postgres", lsn, 5) is r
        assert time.monotonic() - began < 1.0

        async with replay_paused(rep):
            lsn = await commit(rep)
            began, probes = time.monotonic(), rs.replica_probes
            got = await asyncio.gather(*(rs.wait_replayed("postgres", lsn, 0.5) for _ in range(20)))
            assert got == [None] * 20
            assert 0.5 <= time.monotonic() - began < 1.5
            # re-probed all along, yet one probe at a time for all 20 waiters, REPROBE_GAP apart
            assert 5 < rs.replica_probes - probes <= 0.5 / REPROBE_GAP + 5
            waiter = asyncio.create_task(rs.wait_replayed("postgres", lsn, 10))
            await asyncio.sleep(0.3)
            assert not waiter.done()
        resumed = time.monotonic()
        assert await waiter is r and r.replay_lsn >= lsn
        assert time.monotonic() - resumed < 1.0

    run(test, rep, probe_interval=5.0)


def test_a_promoted_replica_gets_no_reads(rep, caplog):  # last: the replica stops following the primary
    async def test(rs: ReplicaSet) -> None:
        r = rs.replicas[0]
        await wait_state(r, "ok")
        with caplog.at_level(logging.WARNING, logger="pgfront"):
            await asyncio.to_thread(rep.replica.promote)
            await wait_state(r, "promoted")
            await asyncio.sleep(0.5)  # more rounds: no more changes, no more warnings
        assert not r.in_recovery and not r.usable and r.bans == 1
        assert rs.choose("postgres") is None and await rs.wait_replayed("postgres", 0, 0.2) is None
        assert rs.changes == [("replica1", "ok", "promoted")]
        assert [m for m in caplog.messages if "out of recovery" in m] == [caplog.messages[-1]]

    run(test, rep)


def test_read_your_writes_scope_config() -> None:
    from proxy import config
    from proxy.config import ConfigError

    assert config.load(None).routing.read_your_writes_scope == "session"
    with pytest.raises(ConfigError, match=r"read_your_writes_scope: expected session, user or application"):
        config.load(None, overrides={"routing": {"read_your_writes_scope": "everyone"}})
    with pytest.raises(ConfigError, match=r"shares writes through Redis: set \[routing\] redis_url"):
        config.load(None, overrides={"routing": {"read_your_writes_scope": "user"}})
    cfg = config.load(None, overrides={"routing": {"read_your_writes_scope": "application",
                                                   "redis_url": "redis://127.0.0.1:6379/0"}})
    assert cfg.routing.read_your_writes_ttl == 600.0
