"""Running pgbench against one port and turning its output into numbers.

Throughput comes from pgbench's own summary ("tps = ..."); latency percentiles come from the
per-transaction logs (`-l --log-prefix`), whose third column is each transaction's latency in
microseconds, one file per pgbench thread.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PGBENCH = shutil.which("pgbench") or "pgbench"


@dataclass
class Load:
    """What pgbench runs: a builtin script (-b NAME) or a custom file, in one protocol mode."""

    builtin: str | None = "select-only"  # select-only, tpcb-like, simple-update
    script: str | None = None  # text of a custom script, used when builtin is None
    mode: str = "simple"  # simple, extended, prepared
    clients: int = 8
    threads: int = 2
    reconnect: bool = False  # -C: a new connection per transaction
    rate: float | None = None  # -R: transactions per second in all (None: as fast as possible)


@dataclass
class Result:
    tps: float | None = None
    transactions: int = 0
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    error: str | None = None  # set when pgbench failed: the reason shown instead of numbers
    extra: dict[str, float | int | str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and self.tps is not None


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..1)."""
    if not sorted_values:
        return float("nan")
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return float(sorted_values[idx])


def read_latencies_us(prefix: str, skip_s: float = 0.0) -> list[int]:
    """All transaction latencies (microseconds) from pgbench's per-thread log files; with skip_s, those
    of transactions that ended in the first skip_s seconds after the first one ended are left out (new
    connections, new PostgreSQL backends: a start-up cost, not the steady state)."""
    rows: list[tuple[int, int]] = []  # (end in epoch us, latency us)
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            for line in f:
                parts = line.split()
                # client_id transaction_no latency_us script_no epoch epoch_us [lag_us]; failed ones say "failed"
                if len(parts) >= 3 and parts[2].isdigit():
                    end = int(parts[4]) * 1_000_000 + int(parts[5]) if len(parts) >= 6 else 0
                    rows.append((end, int(parts[2])))
    if skip_s > 0 and rows:
        first = min(end for end, _ in rows)
        rows = [r for r in rows if r[0] >= first + skip_s * 1e6]
    return sorted(lat for _, lat in rows)


_TPS = re.compile(r"^tps = ([\d.]+)", re.M)
_LAG = re.compile(r"rate limit schedule lag: avg ([\d.]+) \(max ([\d.]+)\) ms")
_TXNS = re.compile(r"number of transactions actually processed: (\d+)")


def _failure_reason(stdout: str, stderr: str, code: int) -> str:
    lines = [ln.strip() for ln in (stderr + "\n" + stdout).splitlines() if ln.strip()]
    for key in ("ERROR:", "FATAL:", "error:", "aborted", "could not"):
        for ln in lines:
            if key in ln:
                return _short(ln)
    return _short(lines[-1]) if lines else f"pgbench exited with status {code}"


def _short(text: str, limit: int = 160) -> str:
    text = re.sub(r"^pgbench: (error: )?", "", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run(port: int, load: Load, seconds: float, *, dbname: str = "postgres", user: str = "postgres",
        host: str = "127.0.0.1", timeout: float | None = None, skip_s: float = 0.0) -> Result:
    """Run pgbench for `seconds` against host:port and return throughput and latency (the latency
    percentiles without the transactions of the first skip_s seconds, see `read_latencies_us`)."""
    work = Path(tempfile.mkdtemp(prefix="pgfront-bench-"))
    try:
        args = [PGBENCH, "-h", host, "-p", str(port), "-U", user, "-n", "-c", str(load.clients),
                "-j", str(min(load.threads, load.clients)), "-T", str(max(1, round(seconds))),
                "-M", load.mode, "-l", f"--log-prefix={work / 'txn'}"]
        if load.reconnect:
            args.append("-C")
        if load.rate:
            args += ["-R", str(load.rate)]
        if load.builtin:
            args += ["-b", load.builtin]
        else:
            script = work / "script.sql"
            script.write_text(load.script or "")
            args += ["-f", str(script)]
        args.append(dbname)
        # no TLS or GSSAPI negotiation round trips: the same plain startup for every target
        env = {**os.environ, "PGCONNECT_TIMEOUT": "10", "PGSSLMODE": "disable", "PGGSSENCMODE": "disable"}
        limit = timeout or seconds + 20  # -T ends the run; past this the target is stuck
        try:
            proc = subprocess.run(args, capture_output=True, text=True, cwd=work, env=env, timeout=limit)
        except subprocess.TimeoutExpired:
            return Result(error=f"pgbench did not finish within {limit:.0f}s", extra={"stuck": 1})
        tps = _TPS.search(proc.stdout)
        txns = _TXNS.search(proc.stdout)
        if proc.returncode != 0 or not tps or not txns or int(txns.group(1)) == 0:
            reason = _failure_reason(proc.stdout, proc.stderr, proc.returncode)
            return Result(error=reason, extra={"stuck": 1} if "timeout expired" in reason else {})
        lat = read_latencies_us(str(work / "txn"), skip_s)
        lag = _LAG.search(proc.stdout)  # with -R: how late transactions started, on average and at most
        extra: dict[str, float | int | str] = {"counted": len(lat)}
        if lag:
            extra |= {"lag_avg_ms": float(lag.group(1)), "lag_max_ms": float(lag.group(2))}
        return Result(tps=float(tps.group(1)), transactions=int(txns.group(1)),
                      p50_ms=percentile(lat, 0.50) / 1000, p95_ms=percentile(lat, 0.95) / 1000,
                      p99_ms=percentile(lat, 0.99) / 1000, extra=extra)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def initialize(port: int, scale: int, *, dbname: str = "postgres", user: str = "postgres") -> None:
    """pgbench -i: create and load the pgbench tables (fillfactor defaults, no vacuum of others)."""
    res = subprocess.run([PGBENCH, "-h", "127.0.0.1", "-p", str(port), "-U", user, "-i", "-q",
                          "-s", str(scale), dbname], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"pgbench -i failed: {res.stderr.strip()[-500:]}")
