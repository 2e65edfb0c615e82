"""The `throttle` rule action end to end: real clients through real pgfront processes (2 workers, 2
instances sharing a real Redis), against the test session's PostgreSQL.

Statements are told apart by a column alias, matched by the rules' `pattern` (which reads the
normalized text: a marker in a string literal would not be seen).
"""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import asyncpg
import psycopg
import pytest

from proxy.devdb import TempRedis
from tests.conftest import psql

RATE = 40  # statements per second of the rate-limited rule


def _rules(tmp: Path, body: str) -> str:
    path = tmp / "throttle.toml"
    path.write_text(body)
    return f'[rules]\nfiles = ["{path}"]\nwatch = false\n'


RATE_RULE = f"""
[[rule]]
name = "rate"
match = {{ pattern = "rate_probe" }}
throttle = {{ qps = {RATE}, queue = "5s" }}
"""

SLOTS_RULE = """
[[rule]]
name = "slots"
match = { pattern = "slot_probe" }
throttle = { concurrency = 2, queue = "400ms", message = "reports are limited to 2 at once" }
"""


async def _hammer(dsns: list[str], clients: int, seconds: float, sql: str) -> tuple[list[float], list[Exception]]:
    """clients connections (spread over dsns) run sql back to back for `seconds`: completion times, errors."""
    done: list[float] = []
    errors: list[Exception] = []
    conns = [await asyncpg.connect(dsns[i % len(dsns)]) for i in range(clients)]
    end = time.monotonic() + seconds

    async def loop(conn: asyncpg.Connection) -> None:
        while time.monotonic() < end:
            try:
                await conn.fetchval(sql)
                done.append(time.monotonic())
            except Exception as e:  # noqa: BLE001 - collected and asserted on
                errors.append(e)

    try:
        await asyncio.gather(*(loop(c) for c in conns))
    finally:
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)
    return done, errors


def _steady_rate(done: list[float], skip: float = 1.0) -> float:
    """Completions per second after the first `skip` seconds (the burst allowance is spent by then)."""
    done = sorted(done)
    start = done[0] + skip
    tail = [t for t in done if t >= start]
    return (len(tail) - 1) / (tail[-1] - tail[0])


def test_rate_holds_across_workers_and_instances(pgfront_factory, redis_server, tmp_path):
    config = _rules(tmp_path, RATE_RULE) + f'[throttle]\nredis_url = "{redis_server.url}"\n'
    a = pgfront_factory(config=config, args=["--workers", "2"])
    b = pgfront_factory(config=config, args=["--workers", "2"])
    done, errors = asyncio.run(_hammer([a.dsn(), b.dsn()], 16, 5.0, "SELECT 1 AS rate_probe"))
    assert errors == []
    rate = _steady_rate(done)
    assert abs(rate - RATE) <= 0.1 * RATE, f"observed {rate:.1f}/s against a limit of {RATE}/s"
    # other statements are not held back
    t0 = time.monotonic()
    with psycopg.connect(a.conninfo(), autocommit=True) as conn:
        for _ in range(200):
            conn.execute("SELECT 2")
    assert time.monotonic() - t0 < 3.0


def test_redis_down_each_worker_keeps_the_limit(pgfront_factory, tmp_path):
    redis = TempRedis().start()
    try:
        config = (_rules(tmp_path, RATE_RULE)
                  + f'[throttle]\nredis_url = "{redis.url}"\nredis_timeout = "50ms"\n')
        p = pgfront_factory(config=config, args=["--workers", "2"])
        done, errors = asyncio.run(_hammer([p.dsn()], 8, 2.0, "SELECT 1 AS rate_probe"))
        assert errors == []
        redis.stop()
        done, errors = asyncio.run(_hammer([p.dsn()], 8, 4.0, "SELECT 2 AS rate_probe"))
        assert errors == [], "a Redis outage must not fail statements"
        rate = _steady_rate(done)
        # each of the 2 workers keeps the limit on its own
        assert rate <= 2 * RATE * 1.1, f"observed {rate:.1f}/s with 2 workers and a limit of {RATE}/s each"
        assert rate >= 0.5 * RATE
    finally:
        redis.cleanup()


async def _running(dsn: str, marker: str) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query LIKE $1 AND pid <> "
                                   "pg_backend_pid()", f"%{marker}%")
    finally:
        await conn.close()


def test_concurrency_limit_queues_then_refuses_with_53400(pgfront_factory, pg, tmp_path):
    p = pgfront_factory(config=_rules(tmp_path, SLOTS_RULE))

    async def scenario() -> tuple[list, int]:
        conns = [await asyncpg.connect(p.dsn()) for _ in range(5)]
        tasks = [asyncio.ensure_future(c.fetchval("SELECT pg_sleep(1) AS slot_probe")) for c in conns]
        await asyncio.sleep(0.3)
        running = await _running(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", "slot_probe")
        results = await asyncio.gather(*tasks, return_exceptions=True)
        # the refused connections are still fine to use
        assert [await c.fetchval("SELECT 7") for c in conns] == [7] * 5
        await asyncio.gather(*(c.close() for c in conns))
        return results, running

    results, running = asyncio.run(scenario())
    assert running == 2
    refused = [r for r in results if isinstance(r, Exception)]
    assert len(refused) == 3
    for e in refused:
        assert isinstance(e, asyncpg.exceptions.ConfigurationLimitExceededError), repr(e)
        assert e.sqlstate == "53400"
        assert "reports are limited to 2 at once" in str(e) and 'pgfront rule "slots"' in str(e)
    rows = psql(p.port, "SHOW RULES", dbname="pgfront").stdout.splitlines()
    row = next(r for r in rows if r.startswith("slots|")).split("|")
    assert (int(row[-2]), int(row[-1])) == (3, 3), row  # queued 3, throttled 3


def test_concurrency_holds_across_workers_and_instances(pgfront_factory, pg, redis_server, tmp_path):
    rules = SLOTS_RULE.replace("concurrency = 2", "concurrency = 3").replace('"400ms"', '"20s"')
    config = _rules(tmp_path, rules) + f'[throttle]\nredis_url = "{redis_server.url}"\n'
    a = pgfront_factory(config=config, args=["--workers", "2"])
    b = pgfront_factory(config=config, args=["--workers", "2"])
    direct = f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"

    async def scenario() -> tuple[int, list]:
        conns = [await asyncpg.connect((a if i % 2 else b).dsn()) for i in range(10)]
        peak = 0
        stop = asyncio.Event()

        async def watch() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, await _running(direct, "slot_probe"))
                await asyncio.sleep(0.02)

        async def client(c: asyncpg.Connection) -> None:
            for _ in range(3):
                await c.fetchval("SELECT pg_sleep(0.15) AS slot_probe")

        watcher = asyncio.ensure_future(watch())
        results = await asyncio.gather(*(client(c) for c in conns), return_exceptions=True)
        stop.set()
        await watcher
        await asyncio.gather(*(c.close() for c in conns))
        return peak, results

    peak, results = asyncio.run(scenario())
    assert [r for r in results if r is not None] == []  # nothing failed
    assert peak == 3, f"{peak} statements ran at once under a limit of 3 shared by 4 workers"


def test_queued_statement_runs_when_a_slot_frees(pgfront_factory, tmp_path):
    rules = SLOTS_RULE.replace('queue = "400ms"', 'queue = "5s"')
    p = pgfront_factory(config=_rules(tmp_path, rules))

    async def scenario() -> list[float]:
        conns = [await asyncpg.connect(p.dsn()) for _ in range(4)]
        t0 = time.monotonic()

        async def one(c: asyncpg.Connection) -> float:
            await c.execute("SELECT pg_sleep(0.5) AS slot_probe")  # simple protocol
            return time.monotonic() - t0

        took = await asyncio.gather(*(one(c) for c in conns))
        await asyncio.gather(*(c.close() for c in conns))
        return sorted(took)

    took = asyncio.run(scenario())
    assert took[1] < 0.9 and took[2] > 0.9 and took[3] < 1.6, took  # two at a time, none refused


def test_refusal_inside_a_transaction_fails_it_as_postgres_would(pgfront_factory, tmp_path):
    rules = SLOTS_RULE.replace("concurrency = 2", "concurrency = 1")
    p = pgfront_factory(config=_rules(tmp_path, rules))
    holder = psycopg.connect(p.conninfo(), autocommit=True)
    t = __import__("threading").Thread(target=lambda: holder.execute("SELECT pg_sleep(1.5) AS slot_probe"))
    t.start()
    time.sleep(0.3)
    with psycopg.connect(p.conninfo()) as conn:
        conn.execute("CREATE TEMP TABLE t_probe (x int)")
        with pytest.raises(psycopg.errors.ConfigurationLimitExceeded):
            conn.execute("SELECT 1 AS slot_probe")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(psycopg.errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        conn.rollback()
        assert conn.execute("SELECT 3").fetchone()[0] == 3
    t.join()
    holder.close()


def test_a_client_that_leaves_while_queued_or_running_gives_its_slot_back(pgfront_factory, tmp_path):
    rules = SLOTS_RULE.replace("concurrency = 2", "concurrency = 1").replace('"400ms"', '"10s"')
    p = pgfront_factory(config=_rules(tmp_path, rules))
    query = b"SELECT pg_sleep(0.6) AS slot_probe"

    def raw_client() -> socket.socket:
        # a real client that vanishes mid-query: psql's startup, then the socket is dropped
        s = socket.create_connection(("127.0.0.1", p.port))
        body = b"\x00\x03\x00\x00user\x00postgres\x00database\x00postgres\x00\x00"
        s.sendall((len(body) + 4).to_bytes(4, "big") + body)
        buf = b""
        while b"Z\x00\x00\x00\x05I" not in buf:
            buf += s.recv(65536)
        s.sendall(b"Q" + (len(query) + 5).to_bytes(4, "big") + query + b"\x00")
        return s

    running = raw_client()  # holds the one slot
    time.sleep(0.2)
    queued = raw_client()  # waits for it
    time.sleep(0.2)
    queued.close()
    running.close()
    time.sleep(0.3)
    # both are gone: the slot is free (without the give-back this would wait out the 10s queue)
    t0 = time.monotonic()
    with psycopg.connect(p.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT 1 AS slot_probe")
    assert time.monotonic() - t0 < 2.0


def test_observe_mode_counts_and_holds_nothing_back(pgfront_factory, tmp_path):
    rules = SLOTS_RULE.replace('name = "slots"', 'name = "slots"\nmode = "observe"').replace("concurrency = 2",
                                                                                              "concurrency = 1")
    p = pgfront_factory(config=_rules(tmp_path, rules))

    async def scenario() -> float:
        conns = [await asyncpg.connect(p.dsn()) for _ in range(4)]
        t0 = time.monotonic()
        await asyncio.gather(*(c.fetchval("SELECT pg_sleep(0.5) AS slot_probe") for c in conns))
        took = time.monotonic() - t0
        await asyncio.gather(*(c.close() for c in conns))
        return took

    assert asyncio.run(scenario()) < 1.0  # all four ran at once
    rows = psql(p.port, "SHOW RULES", dbname="pgfront").stdout.splitlines()
    row = next(r for r in rows if r.startswith("slots|")).split("|")
    assert row[2] == "observe" and int(row[-2]) == 3 and int(row[-1]) == 0, row  # would have queued 3


def test_throttle_rule_errors_are_reported_with_file_and_line(tmp_path):
    from proxy.rules.model import RuleError, parse_rule_files

    path = tmp_path / "bad.toml"
    path.write_text('[[rule]]\nname = "t"\nmatch = {}\nthrottle = { qps = 0, scope = "everyone" }\n')
    with pytest.raises(RuleError) as e:
        parse_rule_files([str(path)])
    assert "throttle.qps must be a number of at least 0.001" in str(e.value)
    assert "throttle.scope must be one of rule, user, fingerprint, application_name" in str(e.value)
    assert f"{path}:4" in str(e.value)


def test_throttle_under_transaction_pooling_outnumbered_pool(pgfront_factory, pg, tmp_path):
    """Transaction pooling, 12 clients over 3 servers, one slot: throttled statements in autocommit
    (simple and extended protocol) and inside transactions, one client that drops its socket while
    queued, and plain statements meanwhile. A statement that waits for its slot outside a transaction
    holds no server, so plain statements go on; the limit holds; what runs out of queue time gets
    53400; nothing else fails; every connection works afterwards."""
    from tests.conftest import PASSWORD
    from tests.test_pooling import pooled

    path = tmp_path / "userlist.txt"
    path.write_text(f'"postgres" "{PASSWORD}"\n')
    rules = SLOTS_RULE.replace("concurrency = 2", "concurrency = 1").replace('"400ms"', '"500ms"')
    p = pooled(pgfront_factory, path, size=3, extra=_rules(tmp_path, rules))
    probe = "SELECT clock_timestamp() AS slot_probe, pg_sleep(0.2), clock_timestamp() AS done"

    async def scenario() -> tuple[list, list, float, float]:
        conns = [await asyncpg.connect(p.dsn(password=PASSWORD)) for _ in range(12)]
        plain = await asyncpg.connect(p.dsn(password=PASSWORD))
        spans: list = []
        last_throttled = 0.0

        async def client(i: int, c: asyncpg.Connection) -> str:
            nonlocal last_throttled
            try:
                if i % 3 == 0:
                    async with c.transaction():
                        await c.execute("SELECT 1")  # the transaction holds its server from here
                        row = await c.fetchrow(probe)
                elif i % 3 == 1:
                    await c.execute(probe)  # simple protocol
                    row = None
                else:
                    row = await c.fetchrow(probe)  # extended protocol
                if row is not None:
                    spans.append((row[0], row[2]))
                return "ran"
            except asyncpg.exceptions.ConfigurationLimitExceededError as e:
                assert e.sqlstate == "53400"
                return "throttled"
            finally:
                last_throttled = max(last_throttled, time.monotonic())

        async def plain_client() -> float:
            await asyncio.sleep(0.2)  # the slot is taken and others queue for it by now
            for _ in range(20):
                assert await plain.fetchval("SELECT 1") == 1
            return time.monotonic()

        results = await asyncio.wait_for(asyncio.gather(
            *(client(i, c) for i, c in enumerate(conns)), plain_client()), timeout=60)
        plain_done = results[len(conns)]
        assert [await c.fetchval("SELECT 5") for c in conns] == [5] * len(conns)
        await asyncio.gather(*(c.close() for c in conns), plain.close())
        return results[:len(conns)], spans, plain_done, last_throttled

    results, spans, plain_done, last_throttled = asyncio.run(scenario())
    assert set(results) <= {"ran", "throttled"}, results
    assert "ran" in results and "throttled" in results, (" ".join(results), [(a.time(), b.time()) for a, b in spans])
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end, f"two slot_probe statements ran at once under a limit of 1: {spans}"
    # 20 plain statements took no longer than the throttled statements queued: waiting held no server
    assert plain_done < last_throttled


def _tx_pool(tmp: Path, size: int) -> str:
    """Transaction pooling with `size` servers; clients log in without a password (auth method trust)."""
    from tests.conftest import PASSWORD

    path = tmp / "userlist.txt"
    path.write_text(f'"postgres" "{PASSWORD}"\n')
    return (f"[auth]\nmode = 'userlist'\nfile = '{path}'\nmethod = 'trust'\n"
            f"[pool]\nmode = 'transaction'\ndefault_pool_size = {size}\n")


def _raw_login(port: int) -> socket.socket:
    """A client of raw bytes (trust authentication): the startup, read up to its first ReadyForQuery."""
    s = socket.create_connection(("127.0.0.1", port))
    body = b"\x00\x03\x00\x00user\x00postgres\x00database\x00postgres\x00\x00"
    s.sendall((len(body) + 4).to_bytes(4, "big") + body)
    buf = b""
    while b"Z\x00\x00\x00\x05I" not in buf:
        buf += s.recv(65536)
    return s


def _query(sql: bytes) -> bytes:
    return b"Q" + (len(sql) + 5).to_bytes(4, "big") + sql + b"\x00"


def test_throttle_wait_drops_and_pipelines_under_transaction_pooling(pgfront_factory, tmp_path):
    """Transaction pooling, two servers, one slot held by a long statement. A client pipelines plain
    Queries around a throttled one in one write, and another queues for the slot and drops its socket.
    Neither holds a server while it waits (a plain client is served meanwhile); the pipelined replies
    come in order, the last ones from whichever server is lent after the wait; no slot is lost."""
    rules = SLOTS_RULE.replace("concurrency = 2", "concurrency = 1").replace('"400ms"', '"10s"')
    p = pgfront_factory(config=_rules(tmp_path, rules) + _tx_pool(tmp_path, 2))
    holder = _raw_login(p.port)
    holder.sendall(_query(b"SELECT pg_sleep(1.5) AS slot_probe"))
    time.sleep(0.2)
    piped = _raw_login(p.port)
    piped.sendall(_query(b"SELECT 'a'") + _query(b"SELECT 'b' AS slot_probe") + _query(b"SELECT 'c'"))
    gone = _raw_login(p.port)
    gone.sendall(_query(b"SELECT 1 AS slot_probe"))
    time.sleep(0.2)
    gone.close()
    with psycopg.connect(p.conninfo(), autocommit=True) as conn:  # the second server is free meanwhile
        assert conn.execute("SELECT 42").fetchone()[0] == 42
    holder.setblocking(False)
    with pytest.raises(BlockingIOError):
        holder.recv(65536)  # the slot's holder is still running: the plain client did not wait for it
    holder.setblocking(True)
    buf = b""
    piped.settimeout(10)
    while buf.count(b"Z\x00\x00\x00\x05I") < 3:
        chunk = piped.recv(65536)
        assert chunk, buf
        buf += chunk
    assert b"E\x00" not in buf, buf
    assert buf.index(b"\x01a") < buf.index(b"\x01b") < buf.index(b"\x01c"), buf  # DataRow values, in order
    piped.close()
    holder.close()
    with psycopg.connect(p.conninfo(), autocommit=True) as conn:
        assert conn.execute("SELECT 2 AS slot_probe").fetchone()[0] == 2  # the slot is free
