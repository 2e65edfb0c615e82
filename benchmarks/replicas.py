"""`python3 -m benchmarks replicas`: issue 15's three goals for read replicas, measured.

1. With one replica, at least 95% of pgbench -S reads are served by it (`replica_share`).
2. Read-your-writes violations: 0, with replay on the replica paused and resumed under many writing
   clients (`replica_ryw`).
3. Routing adds at most 5% CPU per query: machine instructions per pgbench -S query (callgrind) through
   a pooled session routed to a replica, against the same session with no replica, both in transaction
   pooling (`hotroute`, counted like `hotpath --instructions`), with passthrough for reference. Part (a)
   also gives pgfront's CPU per transaction under pgbench with and without the replica, and part (d)
   the instructions per transaction of two real pgfront processes under callgrind, the whole worker
   counted (`replica_process`).

It starts its own throwaway primary (pgbench -i) and streaming replica, and two pgfront processes in
transaction pooling, one with the replica as its [[replica]] and default [routing], one without. Goals
are reported as met or not, never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from proxy.devdb import TempPostgres, TempReplica

from . import machine, replica_process, replica_ryw, replica_share
from .replica_env import RoutedPgfront, start_servers
from .targets import Env, Unavailable

GOAL_CPU = 1.05  # issue 15: routing adds at most 5% CPU per query


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def count_instructions(protocols: list[str], cores: list[str]) -> dict:
    """Instructions per query: passthrough, transaction pooling, and pooling routed to a replica."""
    from proxy.core import core

    from .instructions import per_query

    if shutil.which("valgrind") is None:
        return {"error": "valgrind is not installed (Debian: apt-get install valgrind)"}
    if core() != "compiled":
        cores = ["pure"]  # the compiled core is not built here (scripts/setup.sh builds it)
    out: dict = {}
    for which in cores:
        for proto in protocols:
            row = {}
            for mode in (proto, f"pool-{proto}", f"route-{proto}"):
                log(f"counting {mode} ({which} core) under callgrind...")
                row[mode.partition("-")[0] if "-" in mode else "passthrough"] = per_query(mode, pure=which == "pure")
            row["ratio"] = row["route"] / row["pool"]
            row["goal_met"] = row["ratio"] <= GOAL_CPU
            out[f"{which}/{proto}"] = row
    return out


PRODUCTION_TPS = 4000  # the rate part (a) runs pgbench at: the probes' share per transaction there


def print_ratios(c: dict, routed: str, unit: str) -> None:
    """A line per row of (c) or (d): routed vs pooled without a replica, against the goal."""
    if "error" in c:
        print(f"  not counted: {c['error']}")
        return
    for key, row in c.items():
        ratio = row[routed] / row["pool"]
        passthrough = f" (passthrough {row['passthrough']:,.0f})" if "passthrough" in row else ""
        print(f"  {key:17} routed {row[routed]:9,.0f}, pooled without a replica {row['pool']:9,.0f} {unit}: "
              f"{ratio:.3f}x; goal <= {GOAL_CPU:.2f}x: {'met' if ratio <= GOAL_CPU else 'NOT met'}{passthrough}")


def main(*, modes: list[str], scale: int, seconds: float, rounds: int, clients: int, rate: float | None,
         ryw_clients: int, ryw_seconds: float, pause_s: float, run_s: float, instructions: list[str], cores: list[str],
         process: list[str] | None = None, process_transactions: int = 2000, json_path: Path | None = None) -> int:
    process = process or []
    settings = {"modes": modes, "scale": scale, "seconds": seconds, "rounds": rounds, "clients": clients,
                "rate": rate, "ryw_clients": ryw_clients, "ryw_seconds": ryw_seconds, "pause_s": pause_s, "run_s": run_s,
                "instructions": instructions, "cores": cores, "process": process,
                "process_transactions": process_transactions}
    results: dict = {"settings": settings, "loadavg_at_start": round(os.getloadavg()[0], 2), "share": {}}
    # SIGTERM ends the run through the `finally` below: the servers and pgfronts run in sessions of their
    # own, so a plain kill of this process would leave them running
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="pgfront-replicas-"))
    work.chmod(0o755)  # PostgreSQL runs as `postgres` when we are root, with its directory in here
    pg: TempPostgres | None = None
    replica: TempReplica | None = None
    targets: list[RoutedPgfront] = []
    failed = False
    try:
        log(f"primary and replica, pgbench -i -s {scale}...")
        pg, replica = start_servers(work, scale)
        results["machine"] = machine.info(pg.bin)
        routed = RoutedPgfront("pgfront-routed", "pgfront, one replica", replica)
        pool = RoutedPgfront("pgfront-pool", "pgfront, no replica", None)
        targets = [routed, pool]
        env = Env(pg, None, work)
        for t in targets:
            t.start(env)
        routed.wait_usable()
        log(f"primary :{pg.port}, replica :{replica.port}, pgfront routed :{routed.port}, no replica :{pool.port}")
        for mode in modes:
            try:
                results["share"][mode] = replica_share.run_mode(mode, routed, pool, pg, replica, rounds=rounds,
                                                                seconds=seconds, clients=clients, rate=rate, log=log)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                failed = True
                results["share"][mode] = {"error": str(e)}
                log(f"{mode}: {e}")
        try:
            results["ryw"] = replica_ryw.run(routed, pg, replica, clients=ryw_clients, seconds=ryw_seconds,
                                             pause_s=pause_s, run_s=run_s, log=log)
        except (RuntimeError, OSError, TimeoutError) as e:
            failed = True
            results["ryw"] = {"error": str(e)}
            log(f"read-your-writes: {e}")
        if process and shutil.which("valgrind") is None:
            results["process"] = {"error": "valgrind is not installed (Debian: apt-get install valgrind)"}
        elif process:
            try:
                results["process"], results["process_idle"] = replica_process.count(work, pg, replica, process,
                                                                                     process_transactions, log)
            except (RuntimeError, OSError, subprocess.SubprocessError) as e:
                failed = True
                results["process"] = {"error": str(e)}
                log(f"real processes under callgrind: {e}")
    except (RuntimeError, OSError, Unavailable, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        failed = True
    finally:
        for t in targets:
            t.stop()
        for server in (replica, pg):
            if server is not None:
                server.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    if instructions and not failed:
        results["instructions"] = count_instructions(instructions, cores)
    results["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    report(results)
    if json_path:
        json_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        log(f"results: {json_path}")
    return 1 if failed else 0


def report(results: dict) -> None:
    s = results["settings"]
    rate = f"at {s['rate']:g} tps" if s["rate"] else "as fast as it goes"
    print(f"\n(a) pgbench -S through pgfront with one replica, {s['clients']} clients {rate}, {s['rounds']} x "
          f"{s['seconds']:g} s per mode and pgfront, scale {s['scale']}")
    for mode, m in results["share"].items():
        replica_share.print_mode(mode, m)
    if "ryw" in results:
        print("\n(b) read-your-writes: write, then read it back at once, replay paused "
              f"{s['pause_s']:g} s in every {s['pause_s'] + s['run_s']:g} s")
        replica_ryw.print_result(results["ryw"])
    if "instructions" in results:
        print("\n(c) routing's cost: instructions per pgbench -S query in the in-process relay (callgrind)")
        print_ratios(results["instructions"], "route", "instructions per query")
    if "process" in results:
        print(f"\n(d) routing's cost in real pgfront processes: the whole worker's instructions per pgbench -S "
              f"transaction under callgrind, one client, {s['process_transactions']:,} transactions per run, "
              "2 alternating runs each")
        print_ratios(results["process"], "routed", "per transaction")
        idle = results.get("process_idle")
        if idle and "error" not in results["process"]:
            print(f"  the replica's health probes (a round a second), with no client: {idle['probes']:,.0f} "
                  f"instructions per second ({idle['routed']:,.0f} idle with the replica, {idle['pool']:,.0f} "
                  f"without); {idle['probes'] / PRODUCTION_TPS:,.0f} per transaction at {PRODUCTION_TPS:,} tps. "
                  "Under callgrind a transaction lasts longer, so their share of each one counted above is larger:")
            for key, row in results["process"].items():
                print(f"  {key:17} {row['seconds_per_transaction'] * 1e3:.2f} ms per transaction under callgrind, "
                      f"probes {row['probe_share']:,.0f} of its instructions: {row['ratio_less_probes']:.3f}x "
                      "without them")
    print(f"\nload average {results['loadavg_at_start']} at the start, {results['loadavg_at_end']} at the end")
