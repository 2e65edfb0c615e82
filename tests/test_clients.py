"""Real drivers through pgfront: psql, psycopg 3 (incl. pipeline mode), asyncpg, pg8000, pgbench."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time

import asyncpg
import pg8000.native
import psycopg
import pytest

from tests.conftest import PASSWORD, psql


@pytest.fixture(scope="module", autouse=True)
def data(pg):
    pg.psql("DROP TABLE IF EXISTS items; CREATE TABLE items (id int primary key, name text, price numeric, "
            "at timestamptz default now(), blob bytea)")
    pg.psql("INSERT INTO items SELECT g, 'item ' || g, g * 1.5, now(), decode(md5(g::text), 'hex') "
            "FROM generate_series(1, 1000) g")
    pg.psql("GRANT ALL ON items TO PUBLIC")


def test_psql_basic_and_multi_statement(proxy):
    out = psql(proxy.port, "SELECT count(*) FROM items; SELECT 'two'").stdout.split()
    assert out == ["1000", "two"]


def test_psql_error_keeps_session_usable(proxy):
    res = psql(proxy.port, None, extra_args=["-v", "ON_ERROR_STOP=0"],
               input="SELECT 1/0;\nSELECT 42;\n", check=False)
    assert "division by zero" in res.stderr and "42" in res.stdout


@pytest.mark.parametrize("user", ["trustuser", "pwuser", "md5user", "scramuser"])
def test_auth_methods_with_psycopg(proxy, user):
    with psycopg.connect(proxy.conninfo(user=user, password=PASSWORD)) as conn:
        assert conn.execute("SELECT current_user").fetchone()[0] == user


@pytest.mark.parametrize("user", ["pwuser", "md5user", "scramuser"])
def test_wrong_password_is_refused(proxy, user):
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.conninfo(user=user, password="wrong"))


@pytest.mark.parametrize("user", ["md5user", "scramuser"])
def test_auth_methods_with_asyncpg_and_pg8000(proxy, user):
    async def go():
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user=user, password=PASSWORD,
                                     database="postgres")
        try:
            return await conn.fetchval("SELECT current_user")
        finally:
            await conn.close()

    assert asyncio.run(go()) == user
    conn = pg8000.native.Connection(user, host="127.0.0.1", port=proxy.port, password=PASSWORD, database="postgres")
    assert conn.run("SELECT current_user")[0][0] == user
    conn.close()


def test_psycopg_extended_text_and_binary(proxy):
    with psycopg.connect(proxy.conninfo()) as conn:
        row = conn.execute("SELECT id, name, price, blob FROM items WHERE id = %s", [7]).fetchone()
        assert row[:3] == (7, "item 7", pytest.approx(10.5))
        with conn.cursor(binary=True) as cur:
            cur.execute("SELECT id, name, blob FROM items WHERE id = ANY(%s) ORDER BY id", [[1, 2, 3]])
            rows = cur.fetchall()
        assert [r[0] for r in rows] == [1, 2, 3] and isinstance(rows[0][2], bytes) and len(rows[0][2]) == 16


def test_psycopg_prepared_statements(proxy):
    with psycopg.connect(proxy.conninfo(), prepare_threshold=0) as conn:
        for i in range(1, 20):
            assert conn.execute("SELECT name FROM items WHERE id = %s", [i]).fetchone()[0] == f"item {i}"


def test_psycopg_pipeline_mode(proxy):
    with psycopg.connect(proxy.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE pl (a int)")
        with conn.pipeline():
            for i in range(100):
                conn.execute("INSERT INTO pl VALUES (%s)", [i])
            cur = conn.execute("SELECT sum(a) FROM pl")
        assert cur.fetchone()[0] == sum(range(100))
        # an error inside a pipeline aborts the rest of it, as it would directly
        with pytest.raises(psycopg.errors.DivisionByZero):
            with conn.pipeline():
                conn.execute("INSERT INTO pl VALUES (1000)")
                conn.execute("SELECT 1/0")
                conn.execute("INSERT INTO pl VALUES (2000)")
        assert conn.execute("SELECT count(*) FROM pl WHERE a >= 1000").fetchone()[0] == 0


def test_psycopg_transactions_and_status(proxy):
    with psycopg.connect(proxy.conninfo()) as conn:
        pgconn = conn.pgconn
        conn.execute("SELECT 1")
        assert pgconn.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        with pytest.raises(psycopg.errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        assert pgconn.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert pgconn.transaction_status == psycopg.pq.TransactionStatus.IDLE


def test_asyncpg_prepared_binary_and_cursor_prefetch(proxy):
    async def go():
        conn = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres", database="postgres")
        try:
            stmt = await conn.prepare("SELECT id, price, at, blob FROM items WHERE id <= $1 ORDER BY id")
            rows = await stmt.fetch(5)
            assert [r["id"] for r in rows] == [1, 2, 3, 4, 5]
            ids = []
            async with conn.transaction():
                # a cursor with prefetch uses Execute with a row limit: PortalSuspended through the proxy
                async for r in conn.cursor("SELECT id FROM items ORDER BY id", prefetch=7):
                    ids.append(r["id"])
            assert ids == list(range(1, 1001))
            await conn.executemany("INSERT INTO items (id, name) VALUES ($1, $2) ON CONFLICT DO NOTHING",
                                   [(i, f"x{i}") for i in range(5000, 5050)])
            assert await conn.fetchval("SELECT count(*) FROM items WHERE id >= 5000") == 50
        finally:
            await conn.close()

    asyncio.run(go())


def test_pg8000_basic(proxy):
    conn = pg8000.native.Connection("postgres", host="127.0.0.1", port=proxy.port, database="postgres")
    assert conn.run("SELECT name FROM items WHERE id = :id", id=3) == [["item 3"]]
    conn.run("START TRANSACTION")
    conn.run("SELECT 1")
    conn.run("ROLLBACK")
    conn.close()


def test_listen_notify_asyncpg(proxy):
    async def go():
        a = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres", database="postgres")
        b = await asyncpg.connect(host="127.0.0.1", port=proxy.port, user="postgres", database="postgres")
        got: asyncio.Queue = asyncio.Queue()
        await a.add_listener("jobs", lambda *args: got.put_nowait(args[3]))
        await b.execute("NOTIFY jobs, 'job-1'")
        payload = await asyncio.wait_for(got.get(), 5)
        await a.close()
        await b.close()
        return payload

    assert asyncio.run(go()) == "job-1"


def test_notice_and_parameter_status(proxy):
    notices = []
    with psycopg.connect(proxy.conninfo(), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        conn.execute("DO $$ BEGIN RAISE NOTICE 'careful'; END $$")
        conn.execute("SET application_name = 'reporting'")
        assert conn.info.parameter_status("application_name") == "reporting"
    assert notices == ["careful"]


def test_cancel_request_reaches_the_backend(proxy):
    with psycopg.connect(proxy.conninfo()) as conn:
        threading.Timer(0.5, conn.cancel).start()
        t0 = time.monotonic()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(30)")
        assert time.monotonic() - t0 < 10
        conn.rollback()
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_client_disconnect_cancels_running_query(pg, proxy):
    from proxy.wire import protocol as pq
    from tests.wire_client import RawConn

    c = RawConn(proxy.port)
    c.startup(application_name="walkaway")
    c.send(pq.query("SELECT pg_sleep(60)"))
    time.sleep(0.5)
    c.sock.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        left = pg.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'walkaway'").strip()
        if left == "0":
            break
        time.sleep(0.1)
    assert left == "0", "the upstream backend kept running after its client went away"


def test_startup_options_psql(proxy):
    out = psql(proxy.port, "SHOW work_mem", env={"PGOPTIONS": "-c work_mem=7MB"}).stdout.strip()
    assert out == "7MB"


def test_copy_both_ways_large(proxy, tmp_path):
    """100 MB through COPY FROM STDIN and back out through COPY TO STDOUT, compared byte for byte."""
    line = b"x" * 99 + b"\n"
    n = 1_000_000
    with psycopg.connect(proxy.conninfo(), autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bigcopy; CREATE UNLOGGED TABLE bigcopy (t text)")
        with conn.cursor() as cur:
            with cur.copy("COPY bigcopy FROM STDIN") as cp:
                chunk = line * 10_000
                for _ in range(n // 10_000):
                    cp.write(chunk)
            assert conn.execute("SELECT count(*) FROM bigcopy").fetchone()[0] == n
            size = 0
            with cur.copy("COPY bigcopy TO STDOUT") as cp:
                for chunk_out in cp:
                    data = bytes(chunk_out)
                    assert data.count(b"x") == len(data) - data.count(b"\n")
                    size += len(data)
            assert size == len(line) * n
        with pytest.raises(psycopg.errors.InvalidTextRepresentation):
            with conn.cursor() as cur, cur.copy("COPY items (id) FROM STDIN") as cp:
                cp.write(b"not-a-number\n")
        assert conn.execute("SELECT 1").fetchone()[0] == 1
        conn.execute("DROP TABLE bigcopy")


def test_psql_copy_from_stdin(proxy):
    psql(proxy.port, "CREATE TABLE IF NOT EXISTS pcopy (a int, b text)")
    psql(proxy.port, None, extra_args=["-c", "\\copy pcopy FROM STDIN"], input="1\tone\n2\ttwo\n")
    assert psql(proxy.port, "SELECT string_agg(b, ',' ORDER BY a) FROM pcopy").stdout.strip() == "one,two"


@pytest.mark.parametrize("mode", ["simple", "extended", "prepared"])
def test_pgbench_modes(pg, proxy, mode):
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGUSER": "postgres"}
    if mode == "simple":
        subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-p", str(proxy.port), "postgres"], env=env,
                       check=True, capture_output=True)
    res = subprocess.run(["pgbench", "-M", mode, "-c", "4", "-j", "2", "-t", "200", "-p", str(proxy.port),
                          "postgres"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "number of failed transactions: 0" in res.stdout
    assert "number of transactions actually processed: 800/800" in res.stdout
