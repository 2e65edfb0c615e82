"""Starting and stopping the helper servers the benchmark puts in front of PostgreSQL.

A Service is one subprocess in its own session (so stopping it reaches its forked children too),
logging to a file, optionally run as the `postgres` system user (PgBouncer and Pgpool-II refuse,
or misbehave, as root) with a raised open-files limit (1,000s of held client connections).
"""

from __future__ import annotations

import os
import pwd
import resource
import signal
import socket
import subprocess
import time
from pathlib import Path

FD_LIMIT = 65536


def _preexec(as_postgres: bool):
    pw = pwd.getpwnam("postgres") if as_postgres and os.geteuid() == 0 else None

    def setup() -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, max(hard, FD_LIMIT)))
        except (ValueError, OSError):  # not root: the hard limit is the ceiling
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        if pw is not None:
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)

    return setup


def give_to_postgres(path: Path) -> None:
    """Let the `postgres` user write into a directory we created (only matters as root)."""
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for p in [path, *path.rglob("*")]:
            os.chown(p, pw.pw_uid, pw.pw_gid)


def psql_ok(port: int, sql: str = "SELECT 1", timeout: float = 10.0) -> str | None:
    """None if `sql` runs through port, else the error text."""
    try:
        res = subprocess.run(["psql", "-X", "-At", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                              "-d", "postgres", "-c", sql], capture_output=True, text=True, timeout=timeout,
                             env={**os.environ, "PGCONNECT_TIMEOUT": str(int(timeout))})
    except subprocess.TimeoutExpired:
        return f"psql timed out after {timeout:.0f}s"
    return None if res.returncode == 0 else (res.stderr.strip().splitlines() or ["psql failed"])[-1]


class Service:
    def __init__(self, name: str, args: list[str], log: Path, *, as_postgres: bool = False,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.name, self.args, self.log_path = name, args, log
        self.as_postgres, self.env, self.cwd = as_postgres, env, cwd
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, port: int, timeout: float = 20.0) -> None:
        """Spawn and wait until `SELECT 1` runs through port; raise RuntimeError with the log tail."""
        logf = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, preexec_fn=_preexec(self.as_postgres),
                                     env=self.env, cwd=self.cwd)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}: {self.log_tail()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"{self.name} did not listen on port {port}: {self.log_tail()}")
        err = psql_ok(port, timeout=max(1.0, deadline - time.monotonic()))
        if err:
            self.stop()
            raise RuntimeError(f"{self.name} does not answer queries: {err}")

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])[-400:]

    def stop(self) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            os.killpg(self.proc.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once continued
        except ProcessLookupError:
            return
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
