"""`pgfront serve`: configuration errors, workers, limits, shutdown, the throwaway local upstream."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import psycopg
import pytest

from proxy.devdb import free_port
from proxy.wire import protocol as pq
from tests.conftest import ROOT
from tests.wire_client import RawConn, error_code


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd="/tmp")


@pytest.mark.parametrize(
    "body, expected",
    [
        ("[server]\nworkers = 'many'\n", "[server] workers: expected a whole number"),
        ("[server]\nlisten = 'nowhere'\n", "[server] listen: not HOST:PORT"),
        ("[server]\nmax_message_size = '12 parsecs'\n", "[server] max_message_size: not a size"),
        ("[sever]\n", "unknown section [sever]"),
        ("[server]\nlisten_port = 1\n", "[server] unknown key 'listen_port'"),
        ("[cache]\nredis_timeout = 'soon'\n", "[cache] redis_timeout: not a duration"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_config_is_one_clear_line_and_exit_2(tmp_path, body, expected):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(body)
    res = run_cli("serve", "--config", str(cfg))
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], res.stderr


def test_bad_flags(tmp_path):
    res = run_cli("serve", "--listen", "nope")
    assert res.returncode == 2 and "[server] listen" in res.stderr
    res = run_cli("serve", "--upstream", "mysql://x")
    assert res.returncode == 2 and "upstream" in res.stderr
    res = run_cli("serve", "--workers", "x")
    assert res.returncode == 2 and "invalid int value" in res.stderr
    res = run_cli("serve", "--config", str(tmp_path / "missing.toml"))
    assert res.returncode == 2 and "no such config file" in res.stderr


def test_committed_config_is_valid():
    from proxy import config

    cfg = config.load(ROOT / "config.toml")
    assert cfg.server.listen == ("127.0.0.1", 6432)
    assert cfg.server.upstream == "postgresql://localhost:5432"
    documented = (ROOT / "config.toml").read_text()
    for section, keys in config.SCHEMA.items():
        assert f"[{section}]" in documented
        for key in keys:
            assert f"\n{key} =" in documented or f"\n# {key} =" in documented, f"{section}.{key} undocumented"


def test_unreachable_upstream_gives_clear_error(pgfront_factory):
    dead = free_port()
    p = pgfront_factory(upstream=f"postgresql://127.0.0.1:{dead}", config="[server]\nconnect_timeout = '2s'\n")
    with pytest.raises(psycopg.OperationalError, match="could not connect to the upstream"):
        psycopg.connect(p.conninfo())


def test_message_size_limit(pgfront_factory):
    p = pgfront_factory(config="[server]\nmax_message_size = '64kB'\n")
    c = RawConn(p.port)
    c.startup()
    c.send(pq.query("SELECT '" + "x" * 100_000 + "'"))
    t, body = c.read_msg()
    assert t == b"E" and error_code(body) == "54000" and b"exceeds the limit" in body
    # a normal-sized query on a fresh connection still works
    with psycopg.connect(p.conninfo()) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_startup_timeout_drops_silent_clients(pgfront_factory):
    p = pgfront_factory(config="[server]\nstartup_timeout = '1s'\n")
    s = socket.create_connection(("127.0.0.1", p.port))
    s.settimeout(5)
    data = s.recv(1000)
    assert data[:1] == b"E" and b"startup timeout" in data


def test_workers_share_the_port_and_cancel_works_across_them(pgfront_factory, pg):
    p = pgfront_factory(args=["--workers", "2"])
    pids = set()
    for _ in range(20):
        with psycopg.connect(p.conninfo()) as conn:
            assert conn.execute("SELECT 1").fetchone()[0] == 1
    # which worker answered is the kernel's choice; count the worker processes instead
    out = subprocess.run(["pgrep", "-P", str(p.proc.pid)], capture_output=True, text=True).stdout.split()
    pids.update(out)
    assert len(pids) == 2
    # a cancel arrives on a new connection, possibly at the other worker: it must still land
    for _ in range(4):
        with psycopg.connect(p.conninfo()) as conn:
            threading.Timer(0.3, conn.cancel).start()
            with pytest.raises(psycopg.errors.QueryCanceled):
                conn.execute("SELECT pg_sleep(20)")


def test_sigterm_lets_running_transactions_finish(pgfront_factory):
    p = pgfront_factory(config="[server]\nshutdown_timeout = '10s'\n")
    conn = psycopg.connect(p.conninfo())
    conn.execute("SELECT 1")  # a transaction is now open
    idle = psycopg.connect(p.conninfo(), autocommit=True)
    p.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    # new connections are refused while draining
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(p.conninfo(), connect_timeout=2)
    # the open transaction can still finish
    assert conn.execute("SELECT 2").fetchone()[0] == 2
    conn.commit()
    assert p.proc.wait(15) == 0
    with pytest.raises(psycopg.OperationalError):
        idle.execute("SELECT 1")
    conn.close()


def test_upstream_local_starts_a_throwaway_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--upstream", "local", "--listen",
                             f"127.0.0.1:{port}", "--config", str(ROOT / "config.toml")],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres") as conn:
                    assert conn.execute("SELECT 1").fetchone()[0] == 1
                    break
            except psycopg.OperationalError:
                time.sleep(0.3)
        else:
            pytest.fail("pgfront with a local upstream never answered")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert "psql" in out


def test_connection_limits(pgfront_factory):
    p = pgfront_factory(config="[server]\nmax_client_conn = 4\nmax_user_client_conn = 2\nmax_db_client_conn = 3\n")
    a = psycopg.connect(p.conninfo())
    b = psycopg.connect(p.conninfo())
    with pytest.raises(psycopg.OperationalError, match='too many connections for role "postgres"'):
        psycopg.connect(p.conninfo())
    c = psycopg.connect(p.conninfo(user="trustuser"))
    with pytest.raises(psycopg.OperationalError, match='too many connections for database "postgres"'):
        psycopg.connect(p.conninfo(user="trustuser"))
    d = psycopg.connect(p.conninfo(user="trustuser", dbname="app"))
    with pytest.raises(psycopg.OperationalError, match="too many clients already"):
        psycopg.connect(p.conninfo(user="trustuser", dbname="app"))
    for conn in (a, b, c, d):
        conn.close()
    time.sleep(0.2)
    with psycopg.connect(p.conninfo()) as conn:
        assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_client_idle_timeout(pgfront_factory):
    p = pgfront_factory(config="[server]\nclient_idle_timeout = '1s'\n")
    conn = psycopg.connect(p.conninfo(), autocommit=True)
    conn.execute("SELECT 1")
    time.sleep(2.5)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")


def test_sighup_reloads_config_and_keeps_it_when_invalid(pgfront_factory):
    p = pgfront_factory(config="[admin]\nusers = ['postgres']\n")
    from tests.conftest import psql

    assert psql(p.port, "SHOW STATS", user="trustuser", dbname="pgfront", check=False).returncode != 0
    p.config_path.write_text("[admin]\nusers = ['postgres', 'trustuser']\n[rules]\nfiles = []\n"
                             "[server]\nworkers = 1\nlisten = '127.0.0.1:1'\n")
    p.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while psql(p.port, "SHOW STATS", user="trustuser", dbname="pgfront", check=False).returncode != 0:
        assert time.monotonic() < deadline, p.log()
        time.sleep(0.2)
    # the listen flag given on the command line still wins over the file; RELOAD names what needs a restart
    res = psql(p.port, "RELOAD", dbname="pgfront", check=False)
    assert res.returncode == 0
    # a broken file: the running configuration stays
    p.config_path.write_text("[admin]\nusers = 'nobody\n")
    p.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert psql(p.port, "SHOW STATS", user="trustuser", dbname="pgfront", check=False).returncode == 0
    assert "config not reloaded" in p.log()
