"""Part (d) of `python3 -m benchmarks replicas`: routing's cost in a real pgfront process, counted by
callgrind.

The in-process harness (`hotroute`) counts the relay alone. Here two real pgfront processes run under
callgrind, one with the replica as its [[replica]] and one without, both in transaction pooling with
the benchmark targets' settings, and pgbench -S drives each over real sockets (one client, N
transactions after a warm-up). callgrind's counters are zeroed before and dumped after each run
(`callgrind_control`), so the figure is the whole worker's user-space instructions per transaction:
the event loop, the transports, the pool, the replica's health probes and routing, all of it, and
nothing of the kernel or the machine's load. The runs alternate (pool, routed, pool, routed) and each
figure is the mean of its two, which agree within a fraction of a percent.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from proxy.devdb import TempPostgres, TempReplica, free_port

from .replica_env import RoutedPgfront
from .targets import BENCH_PASSWORD, Env

WARM_UP = 300  # transactions before counting: shapes, statistics entries, pool connections
IDLE_SECONDS = 10  # the idle window counted for each pgfront: the replica's health probes (one round a second)


def _total(out: Path) -> int:
    """Instructions in the newest dump of `out` (callgrind numbers them out.1, out.2...)."""
    dumps = [f for f in glob.glob(f"{out}.*") if f.rsplit(".", 1)[1].isdigit()]
    newest = max(dumps, key=lambda f: int(f.rsplit(".", 1)[1]))
    m = re.search(r"^(?:summary|totals):\s*(\d+)", Path(newest).read_text(errors="replace"), re.M)
    if m is None:
        raise RuntimeError(f"no total in {newest}")
    return int(m.group(1))


def _pgbench(port: int, mode: str, n: int, deadline: float) -> None:
    """pgbench -S, one client, n transactions; retried until pgfront (slow to start under valgrind) takes it."""
    while True:
        res = subprocess.run(["pgbench", "-n", "-S", "-M", mode, "-c", "1", "-t", str(n), "-h", "127.0.0.1",
                              "-p", str(port), "-U", "postgres", "postgres"], capture_output=True, text=True,
                             env={**os.environ, "PGPASSWORD": BENCH_PASSWORD}, timeout=600)
        if res.returncode == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"pgbench through pgfront under callgrind failed: {res.stderr[-500:]}")
        time.sleep(1)


def _counted(proc: subprocess.Popen, out: Path, label: str, run: Callable[[], None]) -> tuple[int, float]:
    """Instructions `proc` ran during `run()` (callgrind's counters zeroed before, dumped after), and its seconds."""
    subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
    began = time.monotonic()
    run()
    seconds = time.monotonic() - began
    subprocess.run(["callgrind_control", "-d", label, str(proc.pid)], check=True, capture_output=True)
    time.sleep(1)  # the dump is written by the process itself
    return _total(out), seconds


def count(work: Path, pg: TempPostgres, replica: TempReplica, modes: list[str], n: int,
          log: Callable[[str], None]) -> tuple[dict, dict]:
    """({mode: {"pool": instructions per transaction, "routed": ..., "ratio": routed / pool, ...}}, the idle
    cost: {"pool": instructions per second with no client, "routed": ..., "probes": routed - pool}).

    The routed pgfront's replica is probed once a second whatever the load. Under callgrind a transaction
    lasts several times longer than at full speed, so the probes' share of each transaction counted is
    larger than in production: each row also gives it ("probe_share", from the idle cost and the run's
    length, "seconds_per_transaction"), and the ratio without it ("ratio_less_probes")."""
    env = Env(pg, None, work)
    procs: dict[str, tuple[subprocess.Popen, int, Path]] = {}
    try:
        for key, rep in (("pool", None), ("routed", replica)):
            target = RoutedPgfront(f"pgfront-cg-{key}", key, rep)
            cfg = work / f"{target.key}.toml"
            cfg.write_text(target.config_text(env))
            port, out = free_port(), work / f"{target.key}.callgrind"
            cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no", sys.executable,
                   "-m", "proxy", "serve", "--config", str(cfg), "--listen", f"127.0.0.1:{port}",
                   "--upstream", f"postgresql://postgres@127.0.0.1:{pg.port}/postgres", "--workers", "1"]
            with open(work / f"{target.key}.log", "w") as logfile:
                proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent, stdout=logfile,
                                        stderr=subprocess.STDOUT, env={**os.environ, "PYTHONHASHSEED": "0"})
            procs[key] = (proc, port, out)
        results: dict = {}
        for mode in modes:
            counted: dict[str, list[float]] = {"pool": [], "routed": []}
            routed_seconds: list[float] = []
            for key in ("pool", "routed", "pool", "routed"):
                proc, port, out = procs[key]
                _pgbench(port, mode, WARM_UP, time.monotonic() + 240)
                total, seconds = _counted(proc, out, f"{mode}-{key}",
                                          lambda port=port, mode=mode: _pgbench(port, mode, n, time.monotonic() + 240))
                counted[key].append(total / n)
                if key == "routed":
                    routed_seconds.append(seconds)
                log(f"{mode}: pgfront {key:6} under callgrind: {counted[key][-1]:,.0f} instructions per transaction "
                    f"({seconds:.1f} s)")
            pool, routed = (sum(v) / len(v) for v in (counted["pool"], counted["routed"]))
            results[mode] = {"pool": pool, "routed": routed, "ratio": routed / pool, "runs": counted,
                             "seconds_per_transaction": sum(routed_seconds) / len(routed_seconds) / n}
        idle: dict = {}
        for key in ("pool", "routed"):
            proc, _port, out = procs[key]
            total, seconds = _counted(proc, out, f"idle-{key}", lambda: time.sleep(IDLE_SECONDS))
            idle[key] = total / seconds
        idle["probes"] = max(0.0, idle["routed"] - idle["pool"])
        log(f"idle: {idle['pool']:,.0f} instructions per second without a replica, {idle['routed']:,.0f} with it")
        for row in results.values():
            row["probe_share"] = idle["probes"] * row["seconds_per_transaction"]
            row["ratio_less_probes"] = (row["routed"] - row["probe_share"]) / row["pool"]
        return results, idle
    finally:
        for proc, _port, _out in procs.values():
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
