"""Read routing to a streaming replica, end to end: a real primary, a real hot standby made with
pg_basebackup -R (the `replicated` fixture), pgfront in transaction pooling in front of both, and
real clients (asyncpg, psycopg, psql).

`SELECT inet_server_port()` is a read that says which server answered it. The tests that pause replay,
kill or promote the replica run in that order at the end of the module (the fixture is per module).
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import asyncpg
import psycopg
import pytest

from tests.conftest import PASSWORD, Pgfront, psql

PORT_SQL = "SELECT inet_server_port()"


def _proxy(replicated, tmp_path, extra: str = "", replicas: list | None = None, rules: Path | None = None,
           mode: str = "transaction") -> Pgfront:
    users = tmp_path / "userlist.txt"
    users.write_text(f'"postgres" "{PASSWORD}"\n"app" "{PASSWORD}"\n')
    entries = "".join(f'[[replica]]\nurl = "postgresql://postgres@127.0.0.1:{r.port}/postgres"\n'
                      for r in (replicas or [replicated.replica]))
    config = (f"[auth]\nmode = 'userlist'\nfile = '{users}'\nmethod = 'trust'\n"
              f"[pool]\nmode = '{mode}'\ndefault_pool_size = 10\n"
              f"[rules]\nfiles = [{repr(str(rules)) if rules else ''}]\nwatch = false\n"
              "[routing]\nprobe_interval = '200ms'\nmax_wait = '300ms'\n" + extra + entries)
    return Pgfront(f"postgresql://127.0.0.1:{replicated.primary.port}", config).start()


def _replicas(p: Pgfront) -> dict[str, dict[str, str]]:
    out = psql(p.port, "SHOW REPLICAS", dbname="pgfront", extra_args=["-F", "\t"]).stdout.splitlines()
    rows = [line.split("\t") for line in out if "\t" in line]
    head = ["name", "host", "state", "in_recovery", "replay_lsn", "lag_bytes", "lag_seconds", "weight", "routed",
            "bans", "last_error"]
    return {r[0]: dict(zip(head, r, strict=False)) for r in rows}


def _warm(p: Pgfront, replica_port: int) -> None:
    """Until the catalog has said that inet_server_port() cannot write, a read calling it goes to the
    primary (and counts as a possible write): read on a throwaway connection until the replica answers."""
    deadline = time.monotonic() + 10
    with psycopg.connect(p.conninfo(), autocommit=True) as conn:
        while conn.execute(PORT_SQL).fetchone()[0] != replica_port and time.monotonic() < deadline:
            time.sleep(0.05)


def _wait_state(p: Pgfront, name: str, state: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _replicas(p).get(name, {}).get("state") == state:
            return
        time.sleep(0.1)
    raise AssertionError(f"{name} never became {state}: {_replicas(p)}")


@pytest.fixture(scope="module")
def table(replicated):
    replicated.primary.psql("CREATE TABLE IF NOT EXISTS ryw (id bigint PRIMARY KEY, who int); "
                            "CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, name text); "
                            "INSERT INTO items SELECT g, 'item' || g FROM generate_series(1, 100) g "
                            "ON CONFLICT DO NOTHING; CREATE SEQUENCE IF NOT EXISTS seq")
    replicated.replica.wait_caught_up(30)


@pytest.fixture(scope="module")
def proxy(replicated, table, tmp_path_factory):
    p = _proxy(replicated, tmp_path_factory.mktemp("replicas"))
    _wait_state(p, "replica1", "ok")
    yield p
    p.stop()


def test_reads_go_to_the_replica_writes_never(replicated, proxy):
    primary, replica = replicated.primary.port, replicated.replica.port

    async def scenario() -> tuple[list[int], list[int]]:
        await asyncio.to_thread(_warm, proxy, replica)
        conn = await asyncpg.connect(proxy.dsn())
        try:
            reads = [await conn.fetchval(PORT_SQL) for _ in range(100)]  # extended protocol
            simple = []
            for _ in range(20):
                simple.append(int((await conn.fetch("SELECT inet_server_port() AS p"))[0]["p"]))
            # writes, and everything in an explicit transaction, go to the primary
            await conn.execute("INSERT INTO items VALUES (1000, 'w') ON CONFLICT (id) DO UPDATE SET name = 'w'")
            async with conn.transaction():
                in_tx = await conn.fetchval(PORT_SQL)
            assert in_tx == primary
            assert await conn.fetchval("SELECT nextval('seq') > 0")  # a read that writes: the primary
            for sql in ("SELECT * FROM items WHERE id = 1 FOR UPDATE", "SELECT inet_server_port(), nextval('seq')"):
                row = await conn.fetchrow(sql)
                assert row is not None
            return reads, simple
        finally:
            await conn.close()

    reads, simple = asyncio.run(scenario())
    assert set(reads) == {replica}, reads  # a provable read, no write of this client's: the replica
    assert set(simple) == {replica}, simple
    log = replicated.replica.log.read_text()
    assert "read-only transaction" not in log, log[-3000:]  # no write ever reached the replica
    rows = _replicas(proxy)
    assert int(rows["replica1"]["routed"]) >= 120 and rows["replica1"]["state"] == "ok", rows


def test_read_your_writes_with_replay_paused_and_resumed(replicated, proxy):
    """Many clients write, then read their own write at once. With replay paused the replica never has
    it: their reads must go to the primary; once replay resumes they go back to the replica."""
    replica = replicated.replica
    violations: list[tuple[int, int]] = []
    ports: list[int] = []

    async def client(n: int, rounds: int) -> None:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            for i in range(rounds):
                key = n * 1_000_000 + i
                await conn.execute("INSERT INTO ryw VALUES ($1, $2)", key, n)
                seen, port = await conn.fetchrow("SELECT count(*), inet_server_port() FROM ryw WHERE id = $1", key)
                ports.append(port)
                if seen != 1:
                    violations.append((key, port))
        finally:
            await conn.close()

    async def scenario(rounds: int, base: int) -> None:
        await asyncio.gather(*(client(base + n, rounds) for n in range(16)))

    replica.pause_replay()
    try:
        asyncio.run(scenario(10, 0))
        paused_ports = set(ports)
    finally:
        replica.resume_replay()
    ports.clear()
    asyncio.run(scenario(20, 100))
    assert violations == [], violations[:10]
    assert paused_ports == {replicated.primary.port}, paused_ports
    assert replica.port in ports  # replay running: reads after writes do reach the replica


def test_set_route_primary_and_route_rule(replicated, proxy, tmp_path):
    with psycopg.connect(proxy.conninfo(), autocommit=True) as conn:
        assert conn.execute(PORT_SQL).fetchone()[0] == replicated.replica.port
        conn.execute("SET pgfront.route = primary")
        assert {conn.execute(PORT_SQL).fetchone()[0] for _ in range(5)} == {replicated.primary.port}
        with pytest.raises(psycopg.errors.InvalidParameterValue):
            conn.execute("SET pgfront.route = sideways")
        conn.execute("RESET pgfront.route")
        assert conn.execute(PORT_SQL).fetchone()[0] == replicated.replica.port
    rules = tmp_path / "route.toml"
    rules.write_text('[[rule]]\nname = "reports-on-primary"\nmatch = { pattern = "report_probe" }\n'
                     'route = "primary"\n')
    p = _proxy(replicated, tmp_path, rules=rules)
    try:
        _wait_state(p, "replica1", "ok")
        _warm(p, replicated.replica.port)
        with psycopg.connect(p.conninfo(), autocommit=True) as conn:
            assert conn.execute("SELECT inet_server_port() AS report_probe").fetchone()[0] == replicated.primary.port
            assert conn.execute(PORT_SQL).fetchone()[0] == replicated.replica.port
    finally:
        p.stop()


def test_rules_explain_shows_the_route(tmp_path):
    import contextlib
    import io

    from proxy.cli import main

    rules = tmp_path / "none.toml"
    rules.write_text('[[rule]]\nname = "log-ddl"\nmatch = { kind = "ddl" }\nlog = true\n')
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["rules", "explain", "--rules", str(rules), "SELECT * FROM items WHERE id = 1"])
    assert "route" in out.getvalue() and "replica" in out.getvalue(), out.getvalue()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["rules", "explain", "--rules", str(rules), "SELECT nextval('seq')"])
    assert "primary (function nextval)" in out.getvalue(), out.getvalue()


def test_cache_with_replica_serves_no_stale_read(replicated, table, redis_server, tmp_path):
    """The cache on, reads routed to a replica whose replay is paused: a read after a write through
    pgfront never returns the old value, from the cache or from the replica."""
    rules = tmp_path / "cache.toml"
    rules.write_text('[[rule]]\nname = "cache-items"\nmatch = { tables = ["items"] }\ncache = { ttl = "60s" }\n')
    cache = f"[cache]\nenabled = true\nredis_url = '{redis_server.url}'\n"
    p = _proxy(replicated, tmp_path, extra=cache, rules=rules)
    _wait_state(p, "replica1", "ok")
    _warm(p, replicated.replica.port)
    stale: list[tuple[int, str, str]] = []
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as writer, \
                psycopg.connect(p.conninfo(), autocommit=True) as other:
            for rnd in range(3):
                pause = rnd == 1
                if pause:
                    replicated.replica.pause_replay()
                try:
                    for i in range(1, 21):
                        value = f"v{rnd}-{i}"
                        writer.execute("UPDATE items SET name = %s WHERE id = %s", (value, i))
                        for conn in (writer, other):  # the writer (read-your-writes) and another client
                            got = conn.execute("SELECT name FROM items WHERE id = %s", (i,)).fetchone()[0]
                            if conn is writer and got != value:
                                stale.append((i, value, got))
                finally:
                    if pause:
                        replicated.replica.resume_replay()
    finally:
        p.stop()
    assert stale == [], stale[:5]


def test_session_pooling_routes_reads_and_keeps_session_state_on_the_primary(replicated, table, tmp_path):
    """Session pooling: each client keeps its primary connection for the session, and its provable reads
    outside a transaction borrow a replica's. Session state (a SET, a temporary table) keeps the session on
    the primary from then on, and its own writes are read back even with replay paused."""
    primary, replica = replicated.primary.port, replicated.replica.port
    p = _proxy(replicated, tmp_path, mode="session")
    try:
        _wait_state(p, "replica1", "ok")
        _warm(p, replica)

        async def scenario() -> None:
            conns = [await asyncpg.connect(p.dsn()) for _ in range(12)]  # more clients than default_pool_size
            try:
                ports = await asyncio.gather(*(c.fetchval(PORT_SQL) for c in conns))
                assert set(ports) == {replica}, ports
                conn = conns[0]
                await asyncpg_write_then_read(conn, replicated)
                await conn.execute("SET work_mem = '1234kB'")  # session state: the primary from now on
                assert await conn.fetchval("SHOW work_mem") == "1234kB"
                assert await conn.fetchval(PORT_SQL) == primary
                other = conns[1]
                await other.execute("CREATE TEMP TABLE scratch AS SELECT 1 AS x")
                assert await other.fetchval("SELECT count(*) FROM scratch") == 1
                assert await other.fetchval(PORT_SQL) == primary
                assert await conns[2].fetchval(PORT_SQL) == replica  # the others still read from the replica
            finally:
                for c in conns:
                    await c.close()

        asyncio.run(scenario())
        with psycopg.connect(p.conninfo(), autocommit=True) as conn:  # psycopg, simple and extended
            assert conn.execute(PORT_SQL).fetchone()[0] == replica
            assert conn.execute("SELECT name FROM items WHERE id = %s", (2,)).fetchone()[0]
        assert "read-only transaction" not in replicated.replica.log.read_text()
    finally:
        p.stop()


async def asyncpg_write_then_read(conn, replicated) -> None:
    """A write, then its read at once, with the replica's replay paused: the read goes to the primary."""
    await asyncio.to_thread(replicated.replica.pause_replay)
    try:
        await conn.execute("INSERT INTO ryw VALUES (424242, 1) ON CONFLICT (id) DO UPDATE SET who = ryw.who + 1")
        seen, port = await conn.fetchrow("SELECT count(*), inet_server_port() FROM ryw WHERE id = 424242")
        assert (seen, port) == (1, replicated.primary.port)
    finally:
        await asyncio.to_thread(replicated.replica.resume_replay)


def test_read_cancelled_by_recovery_conflict_is_answered_by_the_primary(replicated, table, tmp_path):
    """A standby cancels a read that conflicts with its replay (40001: here an ACCESS EXCLUSIVE lock taken
    on the primary while the read runs, with max_standby_streaming_delay = 0). None of its reply had
    reached the client: the primary answers the read instead, and the client never sees the error."""
    primary, replica = replicated.primary, replicated.replica
    primary.psql("CREATE TABLE IF NOT EXISTS conflict_t (x int); INSERT INTO conflict_t VALUES (1)")
    replica.wait_caught_up(30)
    replica.psql("ALTER SYSTEM SET max_standby_streaming_delay = 0")
    replica.psql("SELECT pg_reload_conf()")
    p = _proxy(replicated, tmp_path, extra='read_only_functions = ["pg_sleep"]\n')
    try:
        _wait_state(p, "replica1", "ok")
        _warm(p, replica.port)
        sql = "SELECT count(*), inet_server_port() FROM conflict_t, pg_sleep(%s)"
        with psycopg.connect(p.conninfo(), autocommit=True) as conn, ThreadPoolExecutor(1) as pool:
            deadline = time.monotonic() + 10  # until the catalog has described count(): then a replica reads
            while conn.execute(sql, (0,)).fetchone()[1] != replica.port and time.monotonic() < deadline:
                time.sleep(0.05)
            read = pool.submit(lambda: conn.execute(sql, (1.5,)).fetchone())
            time.sleep(0.5)  # the read is running on the replica
            primary.psql("BEGIN; LOCK TABLE conflict_t IN ACCESS EXCLUSIVE MODE; COMMIT")
            assert read.result(20) == (1, primary.port)
            assert conn.execute(PORT_SQL).fetchone()[0] in (primary.port, replica.port)  # the session goes on
        assert "conflict with recovery" in replica.log.read_text()
        assert "conflict with recovery" in p.log()
    finally:
        p.stop()
        replica.psql("ALTER SYSTEM RESET max_standby_streaming_delay")
        replica.psql("SELECT pg_reload_conf()")


def test_read_your_writes_across_sessions_and_instances(replicated, table, redis_server, tmp_path):
    """read_your_writes_scope = user: a session reads what any session of its role wrote, through another
    pgfront instance too (marks in Redis). Without it (scope session, the control) the same read on the
    replica misses the write while replay is paused: the test can tell."""
    replica = replicated.replica
    # the replica must stay usable while replay is paused, however long the scenario takes on a loaded
    # machine: a replica banned for lag would send the control's reads to the primary
    patient = "max_lag_seconds = '10min'\n"
    scope = f"read_your_writes_scope = 'user'\nredis_url = '{redis_server.url}'\n{patient}"
    dirs = [tmp_path / n for n in ("a", "b", "c")]
    for d in dirs:
        d.mkdir()
    a, b = _proxy(replicated, dirs[0], extra=scope), _proxy(replicated, dirs[1], extra=scope)
    control = _proxy(replicated, dirs[2], extra=patient)
    violations: list[tuple[int, int]] = []
    ports: list[int] = []
    try:
        for p in (a, b, control):
            _wait_state(p, "replica1", "ok")
            _warm(p, replica.port)

        async def pair(n: int, rounds: int, reader_proxy: Pgfront) -> list[tuple[int, int]]:
            writer, reader = await asyncpg.connect(a.dsn()), await asyncpg.connect(reader_proxy.dsn())
            missed = []
            try:
                if n % 3 == 0:
                    await writer.execute("SET work_mem = '2MB'")  # pinned to its primary connection: marked throughout
                for i in range(rounds):
                    key = 5_000_000 + n * 10_000 + i
                    await writer.execute("INSERT INTO ryw VALUES ($1, $2) ON CONFLICT (id) DO NOTHING", key, n)
                    seen, port = await reader.fetchrow("SELECT count(*), inet_server_port() FROM ryw WHERE id = $1",
                                                       key)
                    ports.append(port)
                    if seen != 1:
                        missed.append((key, port))
            finally:
                await writer.close()
                await reader.close()
            return missed

        async def scenario(base: int, rounds: int, reader_proxy: Pgfront) -> list[tuple[int, int]]:
            results = await asyncio.gather(*(pair(base + n, rounds, reader_proxy) for n in range(6)))
            return [m for r in results for m in r]

        replica.pause_replay()
        try:
            violations += asyncio.run(scenario(0, 8, b))
            stale_control = asyncio.run(scenario(10, 3, control))
        finally:
            replica.resume_replay()
        ports.clear()
        violations += asyncio.run(scenario(20, 10, b))
    finally:
        for p in (a, b, control):
            p.stop()
    assert violations == [], violations[:10]
    assert stale_control, "the control (scope session) should have read stale rows on the paused replica"
    assert replica.port in ports  # replay running: reads after others' writes still reach the replica


@pytest.mark.timeout(150)
def test_replica_stopped_killed_and_restarted_under_load_fails_no_read(replicated, proxy):
    """Eight clients read without a pause while the replica shuts down (immediate: its backends send a
    FATAL), comes back, is killed (no FATAL: the sockets just close) and comes back again. A read whose
    replica goes away before the client saw a byte is retried elsewhere: not one read fails."""
    replica = replicated.replica
    errors: list[str] = []
    ports: dict[int, int] = {}
    done = asyncio.Event()

    async def reader() -> None:
        conn = await asyncpg.connect(proxy.dsn())
        try:
            while not done.is_set():
                try:
                    port = await conn.fetchval(PORT_SQL)
                except (asyncpg.PostgresError, OSError, asyncpg.InterfaceError) as e:
                    errors.append(repr(e))
                    if conn.is_closed():
                        return
                    continue
                ports[port] = ports.get(port, 0) + 1
        finally:
            await conn.close()

    async def scenario() -> None:
        await asyncio.to_thread(_warm, proxy, replica.port)
        readers = [asyncio.create_task(reader()) for _ in range(8)]
        try:
            await asyncio.sleep(0.5)
            for mode in ("immediate", "kill"):
                await asyncio.to_thread(replica.stop, mode)
                await asyncio.sleep(1.0)
                await asyncio.to_thread(replica.start)
                await asyncio.to_thread(_wait_state, proxy, "replica1", "ok", 30.0)
                await asyncio.sleep(0.5)
        finally:
            done.set()
            await asyncio.gather(*readers)

    asyncio.run(scenario())
    assert errors == [], errors[:5]
    assert ports.get(replicated.primary.port) and ports.get(replica.port), ports  # both answered
    assert int(_replicas(proxy)["replica1"]["bans"]) >= 2


def test_promoted_replica_is_noticed(replicated, proxy):
    """Last: promoting breaks replication. pgfront notices, and sends no more reads there."""
    replicated.replica.promote()
    _wait_state(proxy, "replica1", "promoted")
    with psycopg.connect(proxy.conninfo(), autocommit=True) as conn:
        assert {conn.execute(PORT_SQL).fetchone()[0] for _ in range(10)} == {replicated.primary.port}
    metrics_rows = psql(proxy.port, "SHOW POOLS", dbname="pgfront").stdout
    assert "replica1" in metrics_rows
