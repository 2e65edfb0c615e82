"""Hold many idle PostgreSQL client connections open, each past its startup (ReadyForQuery seen).

Runs as its own process so the benchmark harness needs no extra file descriptors:
`python3 -m benchmarks.idle --port P --count N` prints one JSON line
(`{"open": K, "failed": F, "error": "..."}`) once every connection has been tried, then holds the
connections until stdin closes or it receives SIGTERM. Trust, or the password in $PGPASSWORD.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import select
import signal
import struct
import subprocess
import sys
from pathlib import Path


def startup_message(user: str, dbname: str) -> bytes:
    params = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in
                      (("user", user), ("database", dbname), ("application_name", "pgfront-bench-idle")))
    body = struct.pack("!i", 196608) + params + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _error_text(body: bytes) -> str:
    for field in body.split(b"\0"):
        if field[:1] == b"M":
            return field[1:].decode(errors="replace")
    return body.decode(errors="replace")


async def open_one(host: str, port: int, user: str, dbname: str) -> asyncio.StreamWriter:
    from proxy.auth import Secret, UpstreamLogin

    reader, writer = await asyncio.open_connection(host, port)
    writer.write(startup_message(user, dbname))
    # trust, or the password in $PGPASSWORD (pgfront's pooling target authenticates clients itself)
    login = UpstreamLogin(user, Secret("plain", os.environ.get("PGPASSWORD", "")))
    while True:
        head = await reader.readexactly(5)
        kind, length = head[:1], struct.unpack("!i", head[1:])[0]
        body = await reader.readexactly(length - 4)
        if kind == b"E":
            writer.close()
            raise ConnectionError(_error_text(body))
        if kind == b"R":
            reply = login.answer(body)
            if reply:
                writer.write(reply)
        if kind == b"Z":
            return writer


async def hold(host: str, port: int, count: int, user: str, dbname: str, concurrency: int,
               stop_on_error: bool) -> None:
    writers: list[asyncio.StreamWriter] = []
    failed = 0
    error = ""
    sem = asyncio.Semaphore(concurrency)
    give_up = asyncio.Event()

    async def one() -> None:
        nonlocal failed, error
        async with sem:
            if give_up.is_set():
                return
            try:
                writers.append(await asyncio.wait_for(open_one(host, port, user, dbname), 30))
            except (OSError, ConnectionError, asyncio.IncompleteReadError, TimeoutError) as e:
                failed += 1
                error = error or f"{type(e).__name__}: {e}"
                if stop_on_error:
                    give_up.set()

    await asyncio.gather(*(one() for _ in range(count)))
    print(json.dumps({"open": len(writers), "failed": failed, "error": error}), flush=True)
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, done.set)
    loop.add_reader(sys.stdin.fileno(), lambda: done.set() if not sys.stdin.buffer.read1(1) else None)
    await done.wait()
    for w in writers:
        w.close()


def raise_fd_limit(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
    except (ValueError, OSError):  # not root: the hard limit is the ceiling
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(want, hard)), hard))


class Holder:
    """Parent side: `with Holder(port, n) as h:` holds n idle connections (h.opened of them made it)."""

    def __init__(self, port: int, count: int, *, timeout: float = 120.0, keep_going: bool = False) -> None:
        self.port, self.count, self.timeout, self.keep_going = port, count, timeout, keep_going
        self.opened = self.failed = 0
        self.error = ""
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Holder:
        args = [sys.executable, "-m", "benchmarks.idle", "--port", str(self.port), "--count", str(self.count)]
        if self.keep_going:
            args.append("--keep-going")
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     cwd=Path(__file__).resolve().parent.parent)
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
        if not line:
            self.close()
            self.error = f"idle client holder gave no answer within {self.timeout:.0f}s"
            self.failed = self.count
            return self
        report = json.loads(line)
        self.opened, self.failed, self.error = report["open"], report["failed"], report["error"]
        return self

    def close(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __exit__(self, *exc: object) -> None:
        self.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks.idle", description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--user", default="postgres")
    ap.add_argument("--dbname", default="postgres")
    ap.add_argument("--concurrency", type=int, default=64, help="connection attempts in flight")
    ap.add_argument("--keep-going", action="store_true", help="keep trying after the first failure")
    args = ap.parse_args(argv)
    raise_fd_limit(args.count + 256)
    asyncio.run(hold(args.host, args.port, args.count, args.user, args.dbname, args.concurrency,
                     not args.keep_going))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
