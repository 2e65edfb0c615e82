"""Shared fixtures: a throwaway PostgreSQL 15 cluster, a throwaway Redis and pgfront processes.

Nothing is mocked: the cluster is initdb'd into a temp dir on a free port (as `postgres` when we are
root) with scram-sha-256 by default and one md5, one cleartext and one trust role, so every auth
method is exercised through pgfront.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from proxy.devdb import TempPostgres, TempRedis, TempReplica, free_port

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "s3cret-pw"


def pytest_report_header(config) -> str:
    from proxy.core import core

    return f"pgfront relay core: {core()} (PGFRONT_PURE_PYTHON={os.environ.get('PGFRONT_PURE_PYTHON', '')})"


def pytest_configure(config) -> None:
    """Never test yesterday's code: a compiled module older than its source stops the run."""
    from proxy.core import _extension, stale

    if os.environ.get("PGFRONT_PURE_PYTHON") == "1":
        return
    old = [name for name in stale() if _extension(name) is not None]
    if old:
        pytest.exit(f"the compiled relay core is older than its sources ({', '.join(old)}): run scripts/setup.sh "
                    "(or set PGFRONT_PURE_PYTHON=1)", returncode=4)

HBA = [
    "host all trustuser 127.0.0.1/32 trust",
    "host all md5user 127.0.0.1/32 md5",
    "host all pwuser 127.0.0.1/32 password",
    "host all postgres 127.0.0.1/32 trust",
    "host replication all 127.0.0.1/32 trust",
    "host all all 127.0.0.1/32 scram-sha-256",
]


def _make_cluster() -> TempPostgres:
    pg = TempPostgres(
        settings={
            "password_encryption": "'scram-sha-256'",
            "shared_preload_libraries": "'pg_stat_statements'",
            "wal_level": "logical",
            "max_replication_slots": "10",
            "max_wal_senders": "10",
        },
        hba=HBA,
    ).start()
    pg.psql(
        f"""
        CREATE ROLE trustuser LOGIN;
        CREATE ROLE pwuser LOGIN PASSWORD '{PASSWORD}';
        CREATE ROLE scramuser LOGIN PASSWORD '{PASSWORD}';
        CREATE ROLE app LOGIN PASSWORD '{PASSWORD}';
        SET password_encryption = 'md5';
        CREATE ROLE md5user LOGIN PASSWORD '{PASSWORD}';
        GRANT ALL ON SCHEMA public TO PUBLIC;
        """
    )
    pg.psql("CREATE DATABASE app OWNER app")
    return pg


@pytest.fixture(scope="session")
def pg() -> TempPostgres:
    cluster = _make_cluster()
    yield cluster
    cluster.cleanup()


class Replicated:
    """A primary made like the session cluster (same roles, `app` database) and streaming replicas of it."""

    def __init__(self) -> None:
        self.primary = _make_cluster()
        self.replicas: list[TempReplica] = []
        try:
            self.replica = self.add_replica()
        except BaseException:
            self.cleanup()
            raise

    def add_replica(self) -> TempReplica:
        """One more streaming replica (about half a second: a fast-checkpoint pg_basebackup of a small cluster)."""
        r = self.primary.replica()
        self.replicas.append(r)
        return r

    def cleanup(self) -> None:
        for r in self.replicas:
            r.cleanup()
        self.primary.cleanup()


@pytest.fixture(scope="module")
def replicated() -> Replicated:
    """A fresh primary with one streaming replica, per module: its tests pause replay, kill and promote."""
    rep = Replicated()
    yield rep
    rep.cleanup()


@pytest.fixture(scope="session")
def redis_server() -> TempRedis:
    r = TempRedis().start()
    yield r
    r.cleanup()


class Pgfront:
    """A `pgfront serve` subprocess on a free port."""

    def __init__(self, upstream: str, config: str = "", args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pgfront-test-"))
        self.config_path = self.dir / "config.toml"
        body = config
        if "[rules]" not in body:
            body += "\n[rules]\nfiles = []\nwatch = false\n"
        self.config_path.write_text(body)
        self.log_path = self.dir / "pgfront.log"
        self.args = [
            sys.executable, "-m", "proxy", "serve", "--config", str(self.config_path),
            "--listen", f"127.0.0.1:{self.port}", "--upstream", upstream, *(args or []),
        ]
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> Pgfront:
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=logf, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(self.dir), start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pgfront exited {self.proc.returncode}: {self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgfront did not listen: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def dsn(self, user: str = "postgres", dbname: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}@" if password else f"{user}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{dbname}"

    def conninfo(self, user: str = "postgres", dbname: str = "postgres", **extra: str) -> str:
        parts = [f"host=127.0.0.1 port={self.port} user={user} dbname={dbname}"]
        parts += [f"{k}={v}" for k, v in extra.items()]
        return " ".join(parts)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Pgfront:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def pgfront_factory(pg):
    started: list[Pgfront] = []

    def make(config: str = "", args: list[str] | None = None, upstream: str | None = None,
             env: dict[str, str] | None = None) -> Pgfront:
        p = Pgfront(upstream or f"postgresql://127.0.0.1:{pg.port}", config, args, env).start()
        started.append(p)
        return p

    yield make
    for p in started:
        p.stop()


@pytest.fixture(scope="module")
def proxy(pg):
    """One passthrough pgfront shared by a test module."""
    p = Pgfront(f"postgresql://127.0.0.1:{pg.port}").start()
    yield p
    p.stop()


def psql(port: int, sql: str, user: str = "postgres", dbname: str = "postgres", password: str | None = None,
         extra_args: list[str] | None = None, input: str | None = None, env: dict[str, str] | None = None,
         check: bool = True) -> subprocess.CompletedProcess:
    """Run the real psql client against 127.0.0.1:port."""
    e = {**os.environ, **(env or {})}
    if password:
        e["PGPASSWORD"] = password
    args = ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(port), "-U", user,
            "-d", dbname, *(extra_args or [])]
    if sql is not None:
        args += ["-c", sql]
    res = subprocess.run(args, capture_output=True, text=True, env=e, input=input, timeout=120)
    if check and res.returncode != 0:
        raise AssertionError(f"psql failed ({res.returncode}): {res.stderr}")
    return res
