"""Throwaway PostgreSQL clusters built from the installed server binaries.

Used by `pgfront serve` when no upstream is configured (so a newcomer can psql through pgfront at
once), by the test suite and by the benchmarks. When running as root the cluster runs as the
`postgres` system user, since the server refuses to run as root.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def find_pg_bin(prefer: str | None = None) -> Path:
    """Directory holding initdb/postgres: $PG_BIN, then the newest /usr/lib/postgresql/*/bin."""
    if prefer:
        return Path(prefer)
    env = os.environ.get("PG_BIN")
    if env:
        return Path(env)
    # Debian keeps the server binaries out of PATH; prefer the newest installed major version
    cands = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[-3]))
    if cands:
        return Path(cands[-1]).parent
    found = shutil.which("postgres") or shutil.which("initdb")
    if found:
        return Path(found).parent
    raise RuntimeError("no PostgreSQL server binaries found (install postgresql, or set PG_BIN)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_pids(parent: int) -> list[int]:
    """Pids whose parent is `parent` (from /proc)."""
    pids = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                fields = f.read().rpartition(")")[2].split()  # after "pid (comm)": state, ppid, ...
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.split("/")[2]))
    return pids


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie no longer holds memory or sockets)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _demote_args() -> tuple[dict, int | None]:
    """(popen kwargs, uid) to run a server binary as `postgres` when we are root."""
    if os.geteuid() != 0:
        return {}, None
    pw = pwd.getpwnam("postgres")

    def demote() -> None:
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)

    return {"preexec_fn": demote}, pw.pw_uid


class TempPostgres:
    """A PostgreSQL cluster in a temporary directory on a free port.

    `hba` lines replace the default (trust for everything on loopback); `settings` go to
    postgresql.conf. The cluster listens on 127.0.0.1 and on a Unix socket in its directory.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        hba: list[str] | None = None,
        superuser: str = "postgres",
        base_dir: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.settings = settings or {}
        self.hba = hba
        self.superuser = superuser
        self.bin = find_pg_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="pgfront-pg-", dir=base_dir))
        self.data = self.dir / "data"
        self.log = self.dir / "server.log"
        self.proc: subprocess.Popen | None = None
        self._popen_kw, uid = _demote_args()
        if uid is not None:
            os.chown(self.dir, uid, -1)
        self._create_data()

    # -- set-up ---------------------------------------------------------------------------
    def _run(self, *args: str) -> None:
        res = subprocess.run(args, capture_output=True, text=True, **self._popen_kw)
        if res.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {res.stderr.strip() or res.stdout.strip()}")

    def _create_data(self) -> None:
        """initdb a new cluster into self.data (TempReplica copies its primary's instead)."""
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", self.superuser, "-A", "trust",
            "-E", "UTF8", "--locale=C", "--no-sync",
        )
        self._configure({
            "listen_addresses": "'127.0.0.1'",
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
            "logging_collector": "off",
        })
        if self.hba is not None:
            lines = ["local all all trust"] + list(self.hba)
            (self.data / "pg_hba.conf").write_text("\n".join(lines) + "\n")

    def _configure(self, conf: dict[str, str]) -> None:
        """Append this cluster's port and socket directory, `conf`, then self.settings to postgresql.conf
        (the server takes the last line of a setting, so this overrides what a copied file says)."""
        lines = {"port": str(self.port), "unix_socket_directories": f"'{self.dir}'", **conf, **self.settings}
        with open(self.data / "postgresql.conf", "a") as f:
            for k, v in lines.items():
                f.write(f"{k} = {v}\n")

    # -- lifecycle ------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> TempPostgres:
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [str(self.bin / "postgres"), "-D", str(self.data)],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, **self._popen_kw,
        )
        logf.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited: {self.log.read_text()[-2000:]}")
            res = subprocess.run(
                [str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"],
                capture_output=True,
            )
            if res.returncode == 0:
                return
            time.sleep(0.05)
        raise RuntimeError(f"postgres did not start on port {self.port}: {self.log.read_text()[-2000:]}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the postmaster: mode 'fast' (SIGINT), 'immediate' (SIGQUIT) or 'kill' (SIGKILL)."""
        if not self.proc or self.proc.poll() is not None:
            return
        if mode == "kill":
            self._kill()
            return
        sig = {"fast": signal.SIGINT, "immediate": signal.SIGQUIT}[mode]
        self.proc.send_signal(sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def _kill(self) -> None:
        """SIGKILL the postmaster, then its orphaned children: a busy backend outlives its postmaster and
        keeps the shared memory attached, so the next start() would fail ("pre-existing shared memory
        block is still in use"). Children change their process titles and each is its own process group,
        so they are found by parent pid, with the postmaster frozen so that it forks no new one meanwhile."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        children = child_pids(self.proc.pid)
        self.proc.kill()
        self.proc.wait()
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.02)
        (self.data / "postmaster.pid").unlink(missing_ok=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- access ---------------------------------------------------------------------------
    def dsn(self, user: str | None = None, dbname: str = "postgres", password: str | None = None) -> str:
        user = user or self.superuser
        auth = f"{user}:{password}@" if password else f"{user}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres", user: str | None = None) -> str:
        res = subprocess.run(
            [str(self.bin / "psql"), "-X", "-At", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
             "-p", str(self.port), "-U", user or self.superuser, "-d", dbname, "-c", sql],
            capture_output=True, text=True,
        )
        if res.returncode != 0:
            raise RuntimeError(f"psql failed: {res.stderr.strip()}")
        return res.stdout

    def fresh_database(self, name: str, sql: str, owner: str | None = None) -> TempPostgres:
        """Database `name`, created anew (a previous run's copy is dropped), with `sql` run in it as
        `owner` (default: the superuser). Returns self, for test fixtures."""
        self.psql(f"DROP DATABASE IF EXISTS {name}")
        self.psql(f"CREATE DATABASE {name}" + (f" OWNER {owner}" if owner else ""))
        self.psql(sql, dbname=name, user=owner)
        return self

    def lsn(self, expr: str = "pg_current_wal_insert_lsn()") -> int:
        """A pg_lsn expression evaluated on this server, as a byte position (0 when it is NULL)."""
        return int(self.psql(f"SELECT coalesce(({expr} - '0/0'::pg_lsn)::int8, 0)").strip())

    def replica(self, *, port: int | None = None, settings: dict[str, str] | None = None) -> TempReplica:
        """A started streaming replica of this (running) cluster. The cluster needs wal_level replica or
        logical, a free WAL sender and an hba line allowing replication connections from 127.0.0.1."""
        return TempReplica(self, port=port, settings=settings, base_dir=str(self.dir.parent)).start()

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class TempReplica(TempPostgres):
    """A hot standby of a TempPostgres, streaming its WAL (no replication slot, no WAL archive).

    Made with pg_basebackup -R, so it keeps its primary's settings and pg_hba.conf; only the port, the
    socket directory, hot standby and `settings` are set anew. Stopping or killing it and starting it
    again resumes streaming from where it stopped (as long as the primary still has that WAL).
    """

    def __init__(self, primary: TempPostgres, *, port: int | None = None, settings: dict[str, str] | None = None,
                 base_dir: str | None = None) -> None:
        self.primary = primary
        super().__init__(port=port, settings=settings, superuser=primary.superuser, base_dir=base_dir)

    def _create_data(self) -> None:
        # a fast checkpoint: the default spread one makes the copy wait up to checkpoint_timeout * 0.9
        self._run(
            str(self.bin / "pg_basebackup"), "-D", str(self.data), "-R", "-X", "stream", "--checkpoint=fast",
            "--no-sync", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", self.primary.superuser,
        )
        self._configure({"hot_standby": "on", "hot_standby_feedback": "on"})

    def pause_replay(self, timeout: float = 10.0) -> None:
        """Pause WAL replay and wait until it has taken effect (WAL keeps arriving, it is not applied)."""
        self.psql("SELECT pg_wal_replay_pause()")
        self._wait_for("SELECT pg_get_wal_replay_pause_state() = 'paused'", timeout, "replay to pause")

    def resume_replay(self) -> None:
        self.psql("SELECT pg_wal_replay_resume()")

    def replay_lsn(self) -> int:
        return self.lsn("pg_last_wal_replay_lsn()")

    def wait_caught_up(self, timeout: float = 30.0) -> None:
        """Wait until this replica has replayed everything its primary had written when called."""
        target = self.primary.lsn()
        self._wait_for(f"SELECT pg_last_wal_replay_lsn() >= '{target >> 32:X}/{target & 0xFFFFFFFF:X}'",
                       timeout, "the replica to catch up")

    def promote(self) -> None:
        """End recovery: the replica becomes a primary of its own (pg_promote waits for that, up to 60 s)."""
        if self.psql("SELECT pg_promote()").strip() != "t":
            raise RuntimeError(f"promotion failed: {self.log.read_text()[-2000:]}")

    def _wait_for(self, sql: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while self.psql(sql).strip() != "t":
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what} on port {self.port}")
            time.sleep(0.02)


class TempRedis:
    """A redis-server on a free loopback port, persisting nothing, for tests and benchmarks."""

    def __init__(self, port: int | None = None, extra: list[str] | None = None) -> None:
        self.port = port or free_port()
        self.extra = extra or []
        self.dir = Path(tempfile.mkdtemp(prefix="pgfront-redis-"))
        self.proc: subprocess.Popen | None = None
        exe = shutil.which("redis-server")
        if not exe:
            raise RuntimeError("redis-server not found (install the redis-server package)")
        self.exe = exe

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> TempRedis:
        self.proc = subprocess.Popen(
            [self.exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.dir), *self.extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def pause(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc:
            self.proc.send_signal(signal.SIGCONT)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TempRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
