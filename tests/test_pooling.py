"""Connection pooling: session and transaction modes, prepared statements across server connections,
no session state leaking between clients, waits, cancels and SHOW POOLS."""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading

import asyncpg
import psycopg
import pytest

from tests.conftest import PASSWORD, psql


@pytest.fixture(scope="module")
def userlist(pg, tmp_path_factory):
    path = tmp_path_factory.mktemp("pool") / "userlist.txt"
    scram = pg.psql("SELECT rolpassword FROM pg_authid WHERE rolname = 'scramuser'").strip()
    path.write_text(f'"app" "{PASSWORD}"\n"scramuser" "{scram}"\n"postgres" "{PASSWORD}"\n')
    pg.psql("GRANT ALL ON SCHEMA public TO app")
    return path


def pooled(pgfront_factory, userlist, mode="transaction", size=20, extra=""):
    return pgfront_factory(config=f"[auth]\nmode = 'userlist'\nfile = '{userlist}'\n"
                                  f"[pool]\nmode = '{mode}'\ndefault_pool_size = {size}\n{extra}"
                                  "[server]\nmax_client_conn = 5000\n")


def server_conns(pg, user="app") -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' "
                       "AND backend_type = 'client backend'").strip())


def test_1000_clients_over_20_servers_pgbench(pgfront_factory, userlist, pg):
    p = pooled(pgfront_factory, userlist)
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGUSER": "app", "PGPASSWORD": PASSWORD}
    subprocess.run(["pgbench", "-i", "-s", "1", "-q", "-p", str(p.port), "app"], env=env, check=True,
                   capture_output=True)
    for mode in ("simple", "extended", "prepared"):
        res = subprocess.run(["pgbench", "-M", mode, "-c", "1000", "-j", "2", "-t", "3", "-p", str(p.port), "app"],
                             env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "number of failed transactions: 0" in res.stdout
        assert "actually processed: 3000/3000" in res.stdout
        assert server_conns(pg) <= 20, pg.psql("SELECT application_name, state, backend_start, query FROM "
                                                "pg_stat_activity WHERE usename = 'app'")
    pools = psql(p.port, "SHOW POOLS", dbname="pgfront", password=PASSWORD).stdout
    assert "app|app|transaction" in pools


def test_asyncpg_and_psycopg_autoprepare_across_servers(pgfront_factory, userlist, pg):
    p = pooled(pgfront_factory, userlist, size=3)
    pg.psql("DROP TABLE IF EXISTS pool_t; CREATE TABLE pool_t (id int primary key, v text); "
            "INSERT INTO pool_t SELECT g, 'v' || g FROM generate_series(1, 100) g; GRANT ALL ON pool_t TO app",
            dbname="app")

    async def worker(n: int) -> int:
        conn = await asyncpg.connect(host="127.0.0.1", port=p.port, user="app", password=PASSWORD, database="app")
        try:
            total = 0
            stmt = await conn.prepare("SELECT v FROM pool_t WHERE id = $1")
            for i in range(1, 31):
                assert await stmt.fetchval(i) == f"v{i}"
                total += await conn.fetchval("SELECT count(*) FROM pool_t WHERE id <= $1", i)
                async with conn.transaction():
                    await conn.execute("UPDATE pool_t SET v = v WHERE id = $1", n)
            return total
        finally:
            await conn.close()

    async def many():
        return await asyncio.gather(*(worker(n) for n in range(1, 21)))

    assert all(t == sum(range(1, 31)) for t in asyncio.run(many()))

    def psy(n: int) -> None:
        with psycopg.connect(p.conninfo(user="app", dbname="app", password=PASSWORD), prepare_threshold=0,
                             autocommit=True) as conn:
            for i in range(1, 21):
                assert conn.execute("SELECT v FROM pool_t WHERE id = %s", [i]).fetchone()[0] == f"v{i}"

    threads = [threading.Thread(target=psy, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert server_conns(pg) <= 3


def test_no_session_state_leaks_between_clients(pgfront_factory, userlist):
    for mode in ("session", "transaction"):
        p = pooled(pgfront_factory, userlist, mode=mode, size=1)
        with psycopg.connect(p.conninfo(user="app", dbname="app", password=PASSWORD), autocommit=True) as a:
            a.execute("SET statement_timeout = '1234ms'")
            a.execute("CREATE TEMP TABLE secret_tmp (x int)")
            a.execute("PREPARE leaky AS SELECT 1")
            a.execute("LISTEN leaky_channel")
            assert a.execute("SHOW statement_timeout").fetchone()[0] == "1234ms"
            pid_a = a.execute("SELECT pg_backend_pid()").fetchone()[0]
        with psycopg.connect(p.conninfo(user="app", dbname="app", password=PASSWORD), autocommit=True) as b:
            assert b.execute("SELECT pg_backend_pid()").fetchone()[0] == pid_a  # the same server connection
            assert b.execute("SHOW statement_timeout").fetchone()[0] == "0"
            assert b.execute("SELECT count(*) FROM pg_prepared_statements WHERE name = 'leaky'").fetchone()[0] == 0
            assert b.execute("SELECT count(*) FROM pg_listening_channels()").fetchone()[0] == 0
            assert b.execute("SELECT to_regclass('pg_temp.secret_tmp')").fetchone()[0] is None


def test_transaction_mode_refuses_session_state_when_configured(pgfront_factory, userlist):
    p = pooled(pgfront_factory, userlist, extra="session_state = 'refuse'\n")
    with psycopg.connect(p.conninfo(user="app", dbname="app", password=PASSWORD), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="transaction pooling"):
            conn.execute("SET search_path = public")
        with pytest.raises(psycopg.errors.FeatureNotSupported, match="advisory lock"):
            conn.execute("SELECT pg_advisory_lock(1)")
        conn.execute("BEGIN")
        conn.execute("SET LOCAL work_mem = '8MB'")  # transaction-scoped: fine
        conn.execute("COMMIT")


def test_startup_settings_follow_the_client(pgfront_factory, userlist):
    p = pooled(pgfront_factory, userlist, size=1)
    with psycopg.connect(p.conninfo(user="app", dbname="app", password=PASSWORD, application_name="alpha",
                                    options="'-c search_path=pg_catalog'"), autocommit=True) as a:
        assert a.execute("SHOW application_name").fetchone()[0] == "alpha"
        assert a.execute("SHOW search_path").fetchone()[0] == "pg_catalog"
    with psycopg.connect(p.conninfo(user="app", dbname="app", password=PASSWORD, application_name="beta"),
                         autocommit=True) as b:
        assert b.execute("SHOW application_name").fetchone()[0] == "beta"


def test_waiting_for_a_server_and_timeout(pgfront_factory, userlist):
    p = pooled(pgfront_factory, userlist, size=1, extra="query_wait_timeout = '1s'\n")
    holder = psycopg.connect(p.conninfo(user="app", dbname="app", password=PASSWORD))
    holder.execute("SELECT 1")  # a transaction is open: the only server connection is taken
    with psycopg.connect(p.conninfo(user="app", dbname="app", password=PASSWORD), autocommit=True) as other:
        with pytest.raises(psycopg.OperationalError, match="query_wait_timeout"):
            other.execute("SELECT 2")
    holder.commit()
    with psycopg.connect(p.conninfo(user="app", dbname="app", password=PASSWORD), autocommit=True) as third:
        assert third.execute("SELECT 3").fetchone()[0] == 3
    holder.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_cancel_in_transaction_mode(pgfront_factory, userlist, workers):
    p = pooled(pgfront_factory, userlist, extra="", size=4) if workers == 1 else pgfront_factory(
        config=f"[auth]\nmode = 'userlist'\nfile = '{userlist}'\n[pool]\nmode = 'transaction'\n",
        args=["--workers", "2"])
    for _ in range(3):
        with psycopg.connect(p.conninfo(user="app", dbname="app", password=PASSWORD), autocommit=True) as conn:
            threading.Timer(0.4, conn.cancel).start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")
            assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_transaction_pooling_needs_local_auth(tmp_path):
    from proxy import config

    with pytest.raises(config.ConfigError, match="needs \\[auth\\] mode"):
        config.load(None, {"pool": {"mode": "transaction"}})
