"""Regression tests for pooled-mode bugs (B1-B7) and review findings, black-box.

Every test drives a real `pgfront serve` subprocess with real clients (psql, asyncpg, psycopg, or the
raw wire client for byte-level cases) and checks the outcome on PostgreSQL itself. Every wait is
bounded, so a pgfront that hangs fails the test instead of blocking the run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import asyncpg
import psycopg
import pytest

from proxy.wire import protocol as pq
from tests.wire_client import RawConn, bind, error_code, execute, types

pytestmark = pytest.mark.timeout(90)  # a backstop: each test bounds its own waits far below this

T = TypeVar("T")

# both pooling modes, each configured so that a leaving client's server connection goes straight to
# the next client: session mode only does so without a reset query
HANDOVER_MODES = [
    pytest.param("transaction", "", id="transaction"),
    pytest.param("session", "server_reset_query = ''\n", id="session-no-reset"),
]
MODES = ["session", "transaction"]


@pytest.fixture(scope="module")
def userlist(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("pool-regressions") / "userlist.txt"
    path.write_text('"postgres" ""\n')
    return str(path)


def pooled(factory, userlist: str, mode: str = "transaction", size: int = 1, pool_extra: str = "",
           extra: str = ""):
    """A pooled pgfront: pgfront checks logins itself (trust for listed roles) and lends `size`
    server connections per pool. `pool_extra` goes into [pool], `extra` adds other sections."""
    return factory(config=f"[auth]\nmode = 'userlist'\nmethod = 'trust'\nfile = '{userlist}'\n"
                          f"[pool]\nmode = '{mode}'\ndefault_pool_size = {size}\n{pool_extra}{extra}")


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    """Run a client scenario under one overall deadline: a hang fails instead of blocking."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def aconnect(p, **kw: Any) -> psycopg.AsyncConnection:
    return await asyncio.wait_for(
        psycopg.AsyncConnection.connect(p.conninfo(), autocommit=True, connect_timeout=5, **kw), 10)


async def apg(p, **kw: Any) -> asyncpg.Connection:
    return await asyncpg.connect(host="127.0.0.1", port=p.port, user="postgres", database="postgres",
                                 ssl=False, timeout=10, **kw)


def psql_through(p, sql: str) -> subprocess.CompletedProcess:
    """The real psql client through pgfront: runs `sql` as one Query, then quits (Terminate)."""
    res = subprocess.run(["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(p.port),
                          "-U", "postgres", "-d", "postgres", "-c", sql],
                         capture_output=True, text=True, timeout=20,
                         env={**os.environ, "PGCONNECT_TIMEOUT": "5"})
    assert res.returncode == 0, res.stderr
    return res


def wait_for(check, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def raw(p, **params: str) -> RawConn:
    c = RawConn(p.port)
    c.sock.settimeout(10)
    c.startup(**params)
    return c


def simple(c: RawConn, sql: str, timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
    c.send(pq.query(sql))
    return c.read_until(b"Z", timeout)


def errors(msgs: list[tuple[bytes, bytes]]) -> list[str]:
    return [error_code(body) for t, body in msgs if t == b"E"]


def drop(c: RawConn) -> None:
    """The client vanishes: the socket closes with no Terminate message."""
    c.sock.close()


def idle_in_tx(pg, table: str) -> int:
    """Backends idle in a transaction that touched `table`, per PostgreSQL itself."""
    return int(pg.psql("SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in transaction%' "
                       f"AND query ILIKE '%{table}%'").strip())


# -- B1: a client that leaves inside a transaction hands the transaction on ----------------------------------


@pytest.mark.parametrize(("mode", "pool_extra"), HANDOVER_MODES)
def test_b1_client_quitting_inside_a_transaction_does_not_hand_it_on(pgfront_factory, userlist, pg, mode,
                                                                     pool_extra):
    pg.psql("DROP TABLE IF EXISTS b1_leak; CREATE TABLE b1_leak (v int)")
    p = pooled(pgfront_factory, userlist, mode, pool_extra=pool_extra)
    psql_through(p, "BEGIN; INSERT INTO b1_leak VALUES (1);")  # psql quits without COMMIT

    async def second_client() -> tuple:
        conn = await aconnect(p)
        try:
            cur = await conn.execute("SELECT txid_current_if_assigned(), (SELECT count(*) FROM b1_leak)")
            seen = await cur.fetchone()
            await conn.execute("INSERT INTO b1_leak VALUES (2)")  # autocommit: must be durable
            return seen
        finally:
            await conn.close()

    seen = run(second_client())
    time.sleep(0.2)  # pgfront acts on the second client's goodbye before PostgreSQL is asked
    rows = pg.psql("SELECT coalesce(string_agg(v::text, ',' ORDER BY v), '') FROM b1_leak").strip()
    stuck = idle_in_tx(pg, "b1_leak")
    assert (seen, rows, stuck) == ((None, 0), "2", 0), (
        f"second client saw (txid, rows)={seen} (expected no transaction and 0 rows); PostgreSQL has rows "
        f"[{rows}] (expected [2]) and {stuck} backend(s) idle in transaction")


@pytest.mark.parametrize(("mode", "pool_extra"), HANDOVER_MODES)
def test_b1_client_dropping_its_socket_mid_query_leaves_nothing_behind(pgfront_factory, userlist, pg, mode,
                                                                       pool_extra):
    pg.psql("DROP TABLE IF EXISTS b1_mid; CREATE TABLE b1_mid (v int)")
    p = pooled(pgfront_factory, userlist, mode, pool_extra=pool_extra)
    a = raw(p)
    assert errors(simple(a, "BEGIN")) == []
    assert errors(simple(a, "INSERT INTO b1_mid VALUES (1)")) == []
    a.send(pq.query("SELECT pg_sleep(20)"))
    wait_for(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)' "
                             "AND state = 'active'").strip() == "1", what="pg_sleep to start")
    drop(a)

    async def next_client() -> tuple:
        conn = await aconnect(p)
        try:
            cur = await conn.execute("SELECT txid_current_if_assigned(), (SELECT count(*) FROM b1_mid)")
            seen = await cur.fetchone()
            await conn.execute("INSERT INTO b1_mid VALUES (2)")
            return seen
        finally:
            await conn.close()

    assert run(next_client(), 10) == (None, 0)
    # the abandoned statement is cancelled or its backend closed, not left running for 20 s
    wait_for(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(20)' "
                             "AND state = 'active'").strip() == "0", what="the abandoned pg_sleep to stop")
    assert pg.psql("SELECT coalesce(string_agg(v::text, ','), '') FROM b1_mid").strip() == "2"
    assert idle_in_tx(pg, "b1_mid") == 0


@pytest.mark.parametrize(("mode", "pool_extra"), HANDOVER_MODES)
def test_b1_client_dropping_its_socket_mid_pipeline_leaves_nothing_behind(pgfront_factory, userlist, pg, mode,
                                                                          pool_extra):
    pg.psql("DROP TABLE IF EXISTS b1_pipe; CREATE TABLE b1_pipe (v int)")
    p = pooled(pgfront_factory, userlist, mode, pool_extra=pool_extra)
    a = raw(p)

    def step(sql: str) -> list[bytes]:
        return [pq.parse_message("", sql), bind(), execute()]

    # a pipeline: BEGIN and an INSERT up to a Sync, then another INSERT flushed but never synced
    a.send(*step("BEGIN"), *step("INSERT INTO b1_pipe VALUES (1)"), pq.SYNC,
           *step("INSERT INTO b1_pipe VALUES (2)"), pq.FLUSH)
    got = a.read_until(b"Z")
    assert types(got) == "12C12CZ" and got[-1][1] == b"T"
    assert types(a.read_until(b"C")) == "12C"
    drop(a)

    async def next_client() -> tuple:
        conn = await aconnect(p)
        try:
            cur = await conn.execute("SELECT txid_current_if_assigned(), (SELECT count(*) FROM b1_pipe)")
            seen = await cur.fetchone()
            await conn.execute("INSERT INTO b1_pipe VALUES (3)")
            return seen
        finally:
            await conn.close()

    assert run(next_client(), 10) == (None, 0)
    time.sleep(0.2)  # pgfront acts on the next client's goodbye before PostgreSQL is asked
    assert pg.psql("SELECT coalesce(string_agg(v::text, ','), '') FROM b1_pipe").strip() == "3"
    assert idle_in_tx(pg, "b1_pipe") == 0


# -- B2: one client's startup settings stay on a lent connection ---------------------------------------------


@pytest.mark.parametrize(("mode", "pool_extra"), HANDOVER_MODES)
def test_b2_startup_settings_do_not_stay_for_the_next_client(pgfront_factory, userlist, pg, mode, pool_extra):
    pg.psql("CREATE SCHEMA IF NOT EXISTS b2_other; DROP TABLE IF EXISTS public.b2_t, b2_other.b2_t; "
            "CREATE TABLE public.b2_t (who text); CREATE TABLE b2_other.b2_t (who text)")
    default_tz = pg.psql("SHOW TimeZone").strip()
    default_path = pg.psql("SHOW search_path").strip()
    p = pooled(pgfront_factory, userlist, mode, pool_extra=pool_extra)

    async def clients() -> tuple:
        a = await aconnect(p, options="-c search_path=b2_other -c TimeZone=Asia/Tokyo")
        try:
            cur = await a.execute("SELECT current_setting('search_path'), current_setting('TimeZone')")
            assert await cur.fetchone() == ("b2_other", "Asia/Tokyo")  # the client's own settings apply
            await a.execute("INSERT INTO b2_t VALUES ('a')")
        finally:
            await a.close()
        b = await aconnect(p)  # no options: the server's defaults
        try:
            cur = await b.execute("SELECT current_setting('search_path'), current_setting('TimeZone')")
            settings = await cur.fetchone()
            await b.execute("INSERT INTO b2_t VALUES ('b')")
            return settings, b.info.parameter_status("TimeZone")
        finally:
            await b.close()

    settings, reported_tz = run(clients())
    public = pg.psql("SELECT coalesce(string_agg(who, ','), '') FROM public.b2_t").strip()
    other = pg.psql("SELECT coalesce(string_agg(who, ','), '') FROM b2_other.b2_t").strip()
    assert (settings, public, other) == ((default_path, default_tz), "b", "a"), (
        f"second client ran with (search_path, TimeZone)={settings}; its unqualified INSERT landed in "
        f"public=[{public}] b2_other=[{other}]")
    assert reported_tz == default_tz


# -- B3: DEALLOCATE ALL / DISCARD ALL leave pgfront's registry of prepared statements stale ------------------


@pytest.mark.parametrize("statement", ["DEALLOCATE ALL", "DISCARD ALL"])
def test_b3_statements_dropped_by_the_client_are_prepared_again(pgfront_factory, userlist, statement):
    p = pooled(pgfront_factory, userlist, "transaction")
    sql = "SELECT %s::int + 1"

    async def clients() -> list:
        a = await aconnect(p)
        try:
            assert await (await a.execute(sql, [1], prepare=True)).fetchone() == (2,)
            await a.execute(statement, prepare=False)
            # psycopg forgets its own statements after DEALLOCATE/DISCARD ALL and prepares anew
            got = [await (await a.execute(sql, [2], prepare=True)).fetchone()]
        finally:
            await a.close()
        b = await aconnect(p)  # another client, the same (only) server connection, the same SQL
        try:
            got.append(await (await b.execute(sql, [3], prepare=True)).fetchone())
        finally:
            await b.close()
        return got

    assert run(clients()) == [(3,), (4,)]


def test_b3_psycopg_deallocate_all_after_rollback(pgfront_factory, userlist):
    """psycopg sends DEALLOCATE ALL by itself after a ROLLBACK once it holds prepared statements."""
    p = pooled(pgfront_factory, userlist, "transaction")
    sql = "SELECT %s::int * 10"

    async def clients() -> list:
        a = await asyncio.wait_for(psycopg.AsyncConnection.connect(p.conninfo(), connect_timeout=5), 10)
        try:
            assert await (await a.execute(sql, [1], prepare=True)).fetchone() == (10,)
            await a.rollback()  # ROLLBACK, then DEALLOCATE ALL
            got = [await (await a.execute(sql, [2], prepare=True)).fetchone()]
            await a.commit()
        finally:
            await a.close()
        b = await aconnect(p)
        try:
            got.append(await (await b.execute(sql, [3], prepare=True)).fetchone())
        finally:
            await b.close()
        return got

    assert run(clients()) == [(20,), (30,)]


# -- B4: a named Parse the server skipped stays recorded as prepared -----------------------------------------


def test_b4_named_parse_skipped_after_an_error_is_not_recorded(pgfront_factory, userlist):
    p = pooled(pgfront_factory, userlist, "transaction")
    a = raw(p)
    # the failing statement makes the server skip everything up to Sync, the named Parse included
    a.send(pq.parse_message("", "SELECT 1/0"), bind(), execute(), pq.parse_message("b4_s", "SELECT 42"),
           pq.SYNC)
    assert errors(a.read_until(b"Z")) == ["22012"]
    # so the client prepares it again (a client that trusts the server's answer must)
    a.send(pq.parse_message("b4_s", "SELECT 42"), bind("", "b4_s"), execute(), pq.SYNC)
    got = a.read_until(b"Z")
    assert errors(got) == [] and types(got) == "12DCZ", got
    a.close()
    b = raw(p)  # another client on the same server connection, the same statement
    b.send(pq.parse_message("b4_other", "SELECT 42"), bind("", "b4_other"), execute(), pq.SYNC)
    got = b.read_until(b"Z")
    assert errors(got) == [] and types(got) == "12DCZ", got
    b.close()


# -- B5: clients queued for a connection are not woken when a lent connection is closed ----------------------


@pytest.mark.parametrize("leave", ["mid-query", "idle-in-transaction"])
@pytest.mark.parametrize("mode", MODES)
def test_b5_waiting_client_is_served_when_the_holder_vanishes(pgfront_factory, userlist, pg, mode, leave):
    """The holder of the only server connection drops its socket inside a transaction: pgfront closes
    that connection (or cleans it), and the client queued for one must be served at once, outside the
    holder's transaction. query_wait_timeout is long, so a waiter nobody wakes shows as a timeout."""
    p = pooled(pgfront_factory, userlist, mode, pool_extra="query_wait_timeout = '30s'\n")
    a = raw(p)
    assert errors(simple(a, "BEGIN")) == []
    assert errors(simple(a, "SELECT txid_current()")) == []  # the transaction has an id: visible if handed on
    if leave == "mid-query":
        a.send(pq.query("SELECT pg_sleep(25)"))
        wait_for(lambda: pg.psql("SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(25)' "
                                 "AND state = 'active'").strip() == "1", what="pg_sleep to start")

    async def waiter() -> tuple[float, Any]:
        if mode == "session":
            pending = asyncio.ensure_future(apg(p))  # session mode: queued at connect
            await asyncio.sleep(0.5)
            assert not pending.done(), "the second client got a server connection while the only one was held"
            t0 = time.monotonic()
            drop(a)
            conn = await asyncio.wait_for(pending, 5)
        else:
            conn = await apg(p)  # transaction mode: connects at once, queued at its first query
            pending = asyncio.ensure_future(conn.fetchval("SELECT 1"))
            await asyncio.sleep(0.5)
            assert not pending.done(), "the second client got a server connection while the only one was held"
            t0 = time.monotonic()
            drop(a)
            assert await asyncio.wait_for(pending, 5) == 1
        try:
            return time.monotonic() - t0, await conn.fetchval("SELECT txid_current_if_assigned()")
        finally:
            await conn.close(timeout=5)

    try:
        waited, txid = run(waiter(), 15)
    except TimeoutError:
        pytest.fail("the queued client was not served within 5 s of the holder vanishing "
                    "(it waits out query_wait_timeout / the startup timeout)")
    assert txid is None, "the queued client was served inside the vanished holder's transaction"
    assert waited < 2.5


# -- B6: a re-Parse to recover from a changed result type is answered locally --------------------------------


def test_b6_asyncpg_recovers_after_alter_table(pgfront_factory, userlist, pg):
    pg.psql("DROP TABLE IF EXISTS b6_t; CREATE TABLE b6_t (id int, v int); INSERT INTO b6_t VALUES (1, 10)")
    p = pooled(pgfront_factory, userlist, "transaction")

    async def client() -> list:
        conn = await apg(p)
        try:
            assert [tuple(r) for r in await conn.fetch("SELECT * FROM b6_t")] == [(1, 10)]
            await asyncio.to_thread(pg.psql, "ALTER TABLE b6_t ALTER COLUMN v TYPE text")
            # "cached plan must not change result type": asyncpg re-prepares once by itself
            return [tuple(r) for r in await conn.fetch("SELECT * FROM b6_t")]
        finally:
            await conn.close(timeout=5)

    assert run(client()) == [(1, "10")]


def test_b6_closing_and_preparing_again_gets_a_fresh_plan(pgfront_factory, userlist, pg):
    """The generic recovery (any driver): Close the statement, Parse it again."""
    pg.psql("DROP TABLE IF EXISTS b6_raw; CREATE TABLE b6_raw (id int, v int); "
            "INSERT INTO b6_raw VALUES (1, 10)")
    p = pooled(pgfront_factory, userlist, "transaction")
    a = raw(p)
    use = [bind("", "b6_s"), execute(), pq.SYNC]
    a.send(pq.parse_message("b6_s", "SELECT * FROM b6_raw"), *use)
    assert types(a.read_until(b"Z")) == "12DCZ"
    pg.psql("ALTER TABLE b6_raw ALTER COLUMN v TYPE text")
    a.send(*use)
    assert errors(a.read_until(b"Z")) == ["0A000"]  # cached plan must not change result type
    a.send(pq.msg(b"C", b"S" + pq.cstr("b6_s")), pq.parse_message("b6_s", "SELECT * FROM b6_raw"), *use)
    got = a.read_until(b"Z")
    assert errors(got) == [] and types(got) == "312DCZ", got
    a.close()


# -- B7: an upstream login error loses its SQLSTATE ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_b7_unknown_database_keeps_its_sqlstate(pgfront_factory, userlist, mode):
    p = pooled(pgfront_factory, userlist, mode)

    async def connect() -> str:
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=p.port, user="postgres",
                                         database="b7_no_such_db", ssl=False, timeout=10)
        except asyncpg.PostgresError as e:
            return e.sqlstate
        await conn.close()
        return "connected"

    assert run(connect()) == "3D000"
    # on the wire too (psycopg folds startup errors into one OperationalError with no sqlstate)
    c = RawConn(p.port)
    c.sock.sendall(pq.startup_message({"user": "postgres", "database": "b7_no_such_db"}))
    got = c.read_until(b"E")
    assert error_code(got[-1][1]) == "3D000"
    c.sock.close()


# -- review items --------------------------------------------------------------------------------------------


def rules_file(tmp_path, table: str, action: str) -> str:
    """Config for a rule file holding one rule: `action` on SELECTs of `table`."""
    path = tmp_path / "rules.toml"
    path.write_text(f'[[rule]]\nname = "{table}-rule"\nmatch = {{ kind = "select", tables = ["{table}"] }}\n'
                    f"{action}\n")
    return f"[rules]\nfiles = ['{path}']\nwatch = false\n"


def cache_config(redis_server, extra: str = "") -> str:
    return (f"[cache]\nenabled = true\nredis_url = '{redis_server.url}'\nredis_timeout = '1s'\n"
            f"{extra}")


def admin_rows(p, command: str) -> list[dict[str, str]]:
    """An admin console command through the real psql, as dicts (bounded: a hung console fails)."""
    res = subprocess.run(["psql", "-X", "-A", "-F", "\t", "-P", "footer=off", "-h", "127.0.0.1",
                          "-p", str(p.port), "-U", "postgres", "-d", "pgfront", "-c", command],
                         capture_output=True, text=True, timeout=15,
                         env={**os.environ, "PGCONNECT_TIMEOUT": "5"})
    assert res.returncode == 0, res.stderr
    lines = [x for x in res.stdout.splitlines() if x]
    header = lines[0].split("\t")
    return [dict(zip(header, x.split("\t"), strict=False)) for x in lines[1:]]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_offset_check_on_a_renamed_named_statement(pgfront_factory, userlist, pg, tmp_path):
    """The max_offset check replaces the Bind of a statement that transaction pooling renamed."""
    pg.psql("DROP TABLE IF EXISTS r3_t; CREATE TABLE r3_t (v int); "
            "INSERT INTO r3_t SELECT generate_series(1, 100)")
    rules = rules_file(tmp_path, "r3_t", "limit = { max_offset = 10 }")
    p = pooled(pgfront_factory, userlist, "transaction", extra=rules)
    a = raw(p)
    a.send(pq.parse_message("r3_s", "SELECT v FROM r3_t ORDER BY v LIMIT 3 OFFSET $1"), pq.SYNC)
    assert types(a.read_until(b"Z", 5)) == "1Z"

    def page(offset: int) -> list[tuple[bytes, bytes]]:
        a.send(bind("", "r3_s", [str(offset).encode()]), execute(), pq.SYNC)
        return a.read_until(b"Z", 5)

    got = page(2)
    assert [body[6:] for t, body in got if t == b"D"] == [b"3", b"4", b"5"], got
    assert errors(page(50)) == ["54000"]  # beyond max_offset: refused with the rule's error
    got = page(7)  # the connection is still in step
    assert [body[6:] for t, body in got if t == b"D"] == [b"8", b"9", b"10"], got
    a.close()


def test_timeout_rule_on_a_renamed_named_parse(pgfront_factory, userlist, pg, tmp_path):
    """A timeout rule's statement_timeout prefix must survive transaction pooling's rename of a named
    Parse (its swallowed reply is expected either way)."""
    pg.psql("DROP TABLE IF EXISTS r4_t; CREATE TABLE r4_t (v int); INSERT INTO r4_t VALUES (1), (2), (3)")
    rules = rules_file(tmp_path, "r4_t", 'timeout = "300ms"')
    p = pooled(pgfront_factory, userlist, "transaction", extra=rules)
    a = raw(p)
    a.send(pq.parse_message("r4_s", "SELECT v FROM r4_t WHERE v > $1 ORDER BY v"), bind("", "r4_s", [b"1"]),
           execute(), pq.SYNC)
    got = a.read_until(b"Z", 5)
    assert types(got) == "12DDCZ", got
    # the rule's timeout applies to the named statement: a slow execution is cancelled
    a.send(pq.parse_message("r4_slow", "SELECT v, pg_sleep(2) FROM r4_t WHERE v > $1"),
           bind("", "r4_slow", [b"2"]), execute(), pq.SYNC)
    assert errors(a.read_until(b"Z", 5)) == ["57014"]
    # and the client's own statement_timeout is back afterwards
    got = simple(a, "SHOW statement_timeout", 5)
    assert [body[6:] for t, body in got if t == b"D"] == [b"0"], got
    a.close()



def test_named_statement_rewritten_by_a_rule(pgfront_factory, userlist, pg, tmp_path):
    """Found while writing these (not in the issue): a named statement whose text a rule rewrites (here
    a LIMIT added) kept the client's name on the server, then was prepared again under it at Bind:
    "prepared statement already exists" (42P05), for this client and the next one on that connection."""
    pg.psql("DROP TABLE IF EXISTS rw_t; CREATE TABLE rw_t (v int); "
            "INSERT INTO rw_t SELECT generate_series(1, 10)")
    rules = rules_file(tmp_path, "rw_t", "limit = { max_rows = 2 }")
    p = pooled(pgfront_factory, userlist, "transaction", extra=rules)
    for _ in range(2):  # two clients in turn, on the one server connection
        c = raw(p)
        c.send(pq.parse_message("rw_s", "SELECT v FROM rw_t ORDER BY v"), bind("", "rw_s"), execute(),
               pq.SYNC)
        got = c.read_until(b"Z", 5)
        assert errors(got) == [] and [body[6:] for t, body in got if t == b"D"] == [b"1", b"2"], got
        c.close()

def test_malformed_message_after_a_cache_lookup_is_refused(pgfront_factory, userlist, pg, redis_server,
                                                           tmp_path):
    """Garbage behind a Query that suspends the client for a cache look-up gets 08P01, like anywhere else."""
    pg.psql("DROP TABLE IF EXISTS r5_t; CREATE TABLE r5_t (v int); INSERT INTO r5_t VALUES (1)")
    rules = rules_file(tmp_path, "r5_t", 'cache = { ttl = "60s" }')
    p = pooled(pgfront_factory, userlist, "transaction", extra=rules + cache_config(redis_server))
    a = raw(p)
    # one chunk: a cached read, then a Parse whose body has no terminators
    a.send(pq.query("SELECT v FROM r5_t"), pq.msg(b"P", b"garbage"))
    got: list[tuple[bytes, bytes]] = []
    try:
        while not any(t == b"E" for t, _ in got):
            got.append(a.read_msg(5))
    except ConnectionError:
        pass  # closed: the error must have come first
    except TimeoutError:
        pytest.fail(f"no answer to the malformed message within 5 s (got {types(got)!r})")
    assert errors(got) == ["08P01"], got
    b = raw(p)  # pgfront still serves others
    assert [body[6:] for t, body in simple(b, "SELECT v FROM r5_t", 5) if t == b"D"] == [b"1"]
    b.close()


def test_client_bytes_before_the_server_connection_are_bounded(pgfront_factory, userlist):
    """A client waiting for a pooled server connection cannot make pgfront buffer everything it sends."""
    p = pooled(pgfront_factory, userlist, "session", pool_extra="query_wait_timeout = '30s'\n")
    holder = raw(p)  # session mode: holds the only server connection
    before = rss_kib(p.proc.pid)
    c = socket.create_connection(("127.0.0.1", p.port), timeout=5)
    c.sendall(pq.startup_message({"user": "postgres", "database": "postgres"}))
    assert c.recv(9)[:1] == b"R"  # AuthenticationOk (trust): now it waits for a server connection
    c.settimeout(2)  # pgfront may stop reading it rather than close it: a blocked send counts as refused
    chunk = b"\0" * (1 << 20)
    sent = 0
    stopped = False
    deadline = time.monotonic() + 8
    try:
        while sent < (64 << 20) and time.monotonic() < deadline:
            c.sendall(chunk)
            sent += len(chunk)
    except (ConnectionError, TimeoutError):
        stopped = True  # closed, or no longer read: what a bounded buffer looks like from here
    grown = rss_kib(p.proc.pid) - before
    c.close()
    holder.close()
    assert stopped or sent < (64 << 20), "pgfront took 64 MiB of a client it cannot serve yet"
    assert grown < 32 * 1024, f"pgfront grew by {grown} KiB"


def test_bytes_in_counts_each_byte_once(pgfront_factory, userlist):
    """Transaction mode replays a client's bytes once a server connection is lent: count them once."""
    p = pooled(pgfront_factory, userlist, "transaction")
    a = raw(p, application_name="r7_bytes")

    def bytes_in() -> int:
        rows = [r for r in admin_rows(p, "SHOW CLIENTS") if r["application_name"] == "r7_bytes"]
        assert len(rows) == 1, rows
        return int(rows[0]["bytes_in"])

    start = bytes_in()
    sent = 0
    for i in range(5):
        q = pq.query(f"SELECT {i}")
        sent += len(q)
        a.send(q)
        a.read_until(b"Z", 5)
    assert bytes_in() - start == sent
    a.close()


def test_query_text_that_is_not_utf8_keeps_statistics_working(pgfront_factory, userlist, tmp_path):
    """Statistics of a query whose text is not UTF-8 must not break the worker's snapshot (read by the
    other workers and the admin console) nor its final flush at shutdown."""
    run_dir = tmp_path / "run"
    snapshot = run_dir / "stats-0.json"  # this worker's published statistics
    p = pooled(pgfront_factory, userlist, "transaction",
               extra=f"[stats]\nflush_interval = '200ms'\n[server]\nrun_dir = '{run_dir}'\n")
    a = raw(p)
    a.send(pq.msg(b"Q", b"SELECT '\xff'\0"))  # not UTF-8: the server refuses it
    assert errors(a.read_until(b"Z", 5)) == ["22021"]
    for _ in range(3):
        assert errors(simple(a, "SELECT 'r8_marker'", 5)) == []
    wait_for(lambda: snapshot.exists() and b'"SELECT $1"' in snapshot.read_bytes(), 3,
             "the periodic snapshot to list the later queries")
    queries = {r["query"]: r for r in admin_rows(p, "SHOW QUERIES 1000")}
    # the refused text has the same shape (its literal's bytes do not count): one fingerprint, one error
    assert int(queries["SELECT $1"]["calls"]) == 4, queries
    assert errors(simple(a, "SELECT count(*) FROM pg_class", 5)) == []  # a fingerprint of its own
    a.close()
    p.proc.terminate()  # at once: the final flush at shutdown must carry the last query
    assert p.proc.wait(20) == 0
    log = p.log()
    assert "Traceback" not in log and "surrogates" not in log, log
    assert b"SELECT count(*) FROM pg_class" in snapshot.read_bytes()


BIG_ROWS = 50  # rows of 1000 bytes: small enough to be cached (one server read), 200 of them make 10 MB


def cached_pool(pgfront_factory, userlist: str, pg, redis_server, tmp_path, table: str):
    """Transaction pooling (one server connection) with the read cache on for `table`, which holds
    BIG_ROWS rows of 1000 bytes; its read is warmed into the in-process cache so the next ones are
    answered locally, with no server connection involved."""
    pg.psql(f"DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v text); "
            f"INSERT INTO {table} SELECT repeat('x', 1000) FROM generate_series(1, {BIG_ROWS})")
    rules = rules_file(tmp_path, table, 'cache = { ttl = "60s" }')
    # hits checked against Redis this recently are answered at once, as the client's chunk is read
    p = pooled(pgfront_factory, userlist, "transaction",
               extra=rules + cache_config(redis_server, "local_validity = '60s'\n"))
    w = raw(p)
    deadline = time.monotonic() + 10
    while True:  # the first reads bypass while the table's catalog facts load, then one fills the cache
        simple(w, f"SELECT v FROM {table}", 5)
        hit = {r["name"]: r["value"] for r in admin_rows(p, "SHOW STATS")}.get("cache_hit", "0")
        if int(hit) > 0:
            break
        assert time.monotonic() < deadline, "the cache never served a hit"
        time.sleep(0.05)
    w.close()
    return p


def stalled_client(p) -> socket.socket:
    """A client that reads nothing (a small receive buffer, so pgfront's write buffer fills quickly)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.settimeout(10)
    s.connect(("127.0.0.1", p.port))
    s.sendall(pq.startup_message({"user": "postgres", "database": "postgres"}))
    return s


def test_server_connection_paused_for_a_slow_client_is_not_pooled_paused(pgfront_factory, userlist, pg,
                                                                          redis_server, tmp_path):
    """A client that stops reading pauses its server connection (backpressure); when its transaction
    ends right then, the connection must not go back to the pool still paused, or the next client on
    it waits forever. The cached replies, queued behind a server query, are all written at its
    ReadyForQuery, in the very write after which the connection is released."""
    p = cached_pool(pgfront_factory, userlist, pg, redis_server, tmp_path, "r1_big")
    a = stalled_client(p)
    # cache hits are decided as the chunk is read, so they all queue behind the server's reply to
    # SELECT 1 (a statement with no function call: nothing that might write makes later reads bypass)
    a.sendall(pq.query("SELECT 1") + pq.query("SELECT v FROM r1_big") * 200)
    time.sleep(1.0)  # the server answered; ~10 MB of replies wait in pgfront for `a`
    a.close()  # `a` ends without reading them
    b = raw(p)
    b.send(pq.query("SELECT 1"))
    try:
        got = b.read_until(b"Z", 5)
    except TimeoutError:
        pytest.fail("the next client on the pooled server connection got no answer within 5 s")
    assert errors(got) == [] and types(got) == "TDCZ", got
    b.close()


def test_cache_invalidation_does_not_lift_client_backpressure(pgfront_factory, userlist, pg, redis_server,
                                                              tmp_path):
    """Resuming the server socket after a cache invalidation must not undo the pause that a slow client
    put on it: otherwise pgfront reads a big result at full speed into memory."""
    p = cached_pool(pgfront_factory, userlist, pg, redis_server, tmp_path, "r2_big")
    pg.psql("DROP TABLE IF EXISTS r2_w; CREATE TABLE r2_w (v int)")
    a = stalled_client(p)
    before = rss_kib(p.proc.pid)
    # cache hits queue behind SELECT 1; the INSERT sent after them makes SELECT 1's ReadyForQuery a
    # commit point: pgfront invalidates, then relays it and the queued hits (~10 MB, the client's
    # buffer overflows: backpressure), then resumes reading the server; then ~125 MB the client never
    # reads (a join: no function call, which the cache would count as a possible write too)
    a.sendall(pq.query("SELECT 1") + pq.query("SELECT v FROM r2_big") * 200
              + pq.query("INSERT INTO r2_w VALUES (1)")
              + pq.query("SELECT a.v FROM r2_big a, r2_big b, r2_big c"))
    time.sleep(2.5)  # without backpressure, pgfront reads it all within about a second
    grown = rss_kib(p.proc.pid) - before
    a.close()
    assert pg.psql("SELECT count(*) FROM r2_w").strip() == "1"
    assert grown < 64 * 1024, f"pgfront buffered {grown} KiB for a client that reads nothing"


# -- found by the pool checker: what a reset undoes, pgfront's own RESETs, locally answered Parses ----------


def _settings_query() -> str:
    return "SELECT current_setting('search_path'), current_setting('TimeZone')"


def test_rollback_only_reset_keeps_what_it_did_not_undo(pgfront_factory, userlist, pg):
    """A client leaving inside a transaction costs its connection a ROLLBACK only: the settings pgfront
    applied for it, and the statements prepared on it, are still there, and pgfront must know it (a
    later client would run under them, or be told its statement 'already exists')."""
    pg.psql("CREATE SCHEMA IF NOT EXISTS rb_s")
    default = (pg.psql("SHOW search_path").strip(), pg.psql("SHOW TimeZone").strip())
    p = pooled(pgfront_factory, userlist, "transaction")
    sql = "SELECT %s::int * 3"

    async def clients() -> tuple:
        a = await aconnect(p, options="-c search_path=rb_s -c TimeZone=Asia/Tokyo")
        assert await (await a.execute(sql, [1], prepare=True)).fetchone() == (3,)
        await a.execute("BEGIN")
        await a.execute("SELECT 1")
        await a.close()  # leaves inside the transaction: ROLLBACK only, no reset query
        b = await aconnect(p)
        try:
            seen = await (await b.execute(_settings_query())).fetchone()
            got = await (await b.execute(sql, [2], prepare=True)).fetchone()
            return seen, got
        finally:
            await b.close()

    assert run(clients()) == (default, (6,))


def test_own_reset_of_a_previous_clients_setting_keeps_the_new_ones_accounted(pgfront_factory, userlist, pg):
    """Client B's settings query RESETs what A had and sets B's own: that RESET is pgfront's, and must not
    make pgfront forget B's settings, or C would inherit them."""
    pg.psql("CREATE SCHEMA IF NOT EXISTS rs_s")
    default = (pg.psql("SHOW search_path").strip(), pg.psql("SHOW TimeZone").strip())
    p = pooled(pgfront_factory, userlist, "transaction")

    async def clients() -> list:
        seen = []
        for options in ("-c search_path=rs_s", "-c TimeZone=Asia/Tokyo", None):
            c = await aconnect(p, **({"options": options} if options else {}))
            try:
                seen.append(await (await c.execute(_settings_query())).fetchone())
            finally:
                await c.close()
        return seen

    assert run(clients()) == [("rs_s", default[1]), (default[0], "Asia/Tokyo"), default]


def test_session_state_in_a_statement_the_pool_knows_still_pins(pgfront_factory, userlist, pg):
    """A Parse of a statement the pool prepared before is answered without a server; a SET must still
    pin its client (and get its connection reset), not leave its setting to whoever comes next."""
    default_tz = pg.psql("SHOW TimeZone").strip()
    p = pooled(pgfront_factory, userlist, "transaction")
    set_tz = "SET TimeZone = 'Asia/Tokyo'"

    async def clients() -> list:
        seen = []
        for _ in range(2):  # the first teaches the pool the statement, the second meets it known
            a = await aconnect(p, prepare_threshold=0)  # every statement a named prepared one
            await a.execute(set_tz)
            seen.append((await (await a.execute("SHOW TimeZone")).fetchone())[0])
            await a.close()
            b = await aconnect(p)
            try:
                seen.append((await (await b.execute("SHOW TimeZone")).fetchone())[0])
            finally:
                await b.close()
        return seen

    assert run(clients()) == ["Asia/Tokyo", default_tz] * 2


def test_max_db_connections_lets_another_roles_waiter_in_once_an_idle_connection_closes(pgfront_factory, tmp_path):
    """Two roles, one database, max_db_connections = 1, as PgBouncer: the second role waits while the first
    role's pool keeps the database's only server connection, and opens its own as soon as that one closes
    for server_idle_timeout (woken then, not when its own query_wait_timeout runs out)."""
    users = tmp_path / "userlist.txt"
    users.write_text('"postgres" ""\n"trustuser" ""\n')
    p = pooled(pgfront_factory, str(users), "transaction",
               pool_extra="max_db_connections = 1\nserver_idle_timeout = '1s'\nquery_wait_timeout = '60s'\n")

    async def scenario() -> tuple[float, int]:
        first = await apg(p)
        try:
            assert await first.fetchval("SELECT 1") == 1  # its connection now idle in the first role's pool
            began = time.monotonic()
            other = await asyncpg.connect(host="127.0.0.1", port=p.port, user="trustuser", database="postgres",
                                          ssl=False, timeout=30)
            try:
                return time.monotonic() - began, await other.fetchval("SELECT 2")
            finally:
                await other.close()
        finally:
            await first.close()

    waited, got = run(scenario(), timeout=60)
    assert got == 2 and waited < 15, f"the other role's login and read took {waited:.1f} s (idle timeout 1 s)"
