"""`python3 -m benchmarks profile`: where pgfront spends its CPU under pgbench -S.

Runs one pgfront (one worker, so the profile covers the process serving the clients) under
cProfile against a throwaway scale-1 database, drives it with pgbench for a few seconds, stops it
with SIGTERM (pgfront exits normally, so cProfile writes its stats) and prints the functions with
the most own time. cProfile slows Python code down by itself; read the ranking, not the numbers.
For a sampling profile without that overhead, run `py-spy record -o pgfront.svg --pid PID`
(pip install py-spy) against a pgfront started by hand.
"""

from __future__ import annotations

import pstats
import shutil
import sys
import tempfile
from pathlib import Path

from proxy.devdb import TempPostgres

from . import pgbench
from .targets import Env, Pgfront, Unavailable


def profile(seconds: float, mode: str, rules: bool, top: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="pgfront-profile-"))
    stats_file = work / "pgfront.prof"
    target = Pgfront("pgfront-profiled", "pgfront (cProfile)", "rules" if rules else "passthrough",
                     python_args=["-m", "cProfile", "-o", str(stats_file)])
    work.chmod(0o755)  # the cluster runs as postgres inside it
    pg = TempPostgres(base_dir=str(work))
    try:
        pg.start()
        pgbench.initialize(pg.port, 1)
        try:
            target.start(Env(pg, None, work))
        except Unavailable as e:
            print(f"pgfront did not start: {e}", file=sys.stderr)
            return 1
        res = pgbench.run(target.port, pgbench.Load("select-only", mode=mode), seconds)
        target.stop()
        if not res.ok:
            print(f"pgbench failed: {res.error}", file=sys.stderr)
            return 1
        print(f"pgbench -S -M {mode} through pgfront under cProfile: {res.tps:,.0f} TPS, "
              f"{res.transactions:,} transactions\n")
        if not stats_file.exists():
            print("pgfront wrote no profile (did it exit cleanly on SIGTERM?)", file=sys.stderr)
            return 1
        st = pstats.Stats(str(stats_file))
        st.sort_stats("tottime").print_stats(top)
        print(f"per query: divide a function's tottime by {res.transactions:,} transactions")
        return 0
    finally:
        target.stop()
        pg.cleanup()
        shutil.rmtree(work, ignore_errors=True)
