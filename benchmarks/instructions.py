"""`python3 -m benchmarks hotpath --instructions`: machine instructions per query, counted by callgrind.

Wall-clock and CPU timings move with whatever else the machine runs; an instruction count does not.
Each figure is the difference between two runs of the in-process harness (`benchmarks.hotpath.drive`)
that differ only in how many pgbench -S transactions they feed, divided by that difference: start-up,
imports and the warm-up cancel out, and what is left is the relay's own cost per query (the
interpreter's included, the kernel's and the event loop's not).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHORT, LONG = 1_000, 6_000  # transactions per run: the difference is what is counted
_COLLECTED = re.compile(r"Collected\s*:\s*(\d+)")


def count(mode: str, n: int, config: str | None, cwd: Path, pure: bool = False) -> int:
    """Instructions callgrind counts for a whole `drive(mode, n)` process (`pure`: the interpreted core)."""
    with tempfile.TemporaryDirectory() as tmp:
        code = f"from benchmarks.hotpath import drive; drive({mode!r}, {n}, {config!r})"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", sys.executable, "-c", code]
        env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(cwd),
               "PGFRONT_PURE_PYTHON": "1" if pure else "",
               # with tracing on: callgrind runs the relay ~50x slower than real time, so the span
               # exporter's 5 s timer would send batches ~50x smaller than at a real query rate; without
               # it, batches go out full (512 spans), as they do at a production rate
               "OTEL_BSP_SCHEDULE_DELAY": "3600000"}
        res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    m = _COLLECTED.search(res.stderr)
    if res.returncode != 0 or m is None:
        raise RuntimeError(f"callgrind failed for {mode}: {res.stderr[-2000:]}")
    return int(m.group(1))


def per_query(mode: str, config: str | None = None, cwd: Path | None = None, pure: bool = False) -> float:
    cwd = cwd or Path(__file__).resolve().parent.parent
    return (count(mode, LONG, config, cwd, pure) - count(mode, SHORT, config, cwd, pure)) / (LONG - SHORT)


def label_of(mode: str, config: str | None = None) -> str:
    if mode.startswith("hit-"):
        return "cache hit"
    if mode.startswith("pool-"):
        return "transaction pooling"
    if mode.startswith("route-"):
        return "transaction pooling, routed to a replica"
    return f"config {Path(config).name}" if config else "passthrough"


def main(modes: list[str], config: str | None, cores: list[str]) -> int:
    if shutil.which("valgrind") is None:
        print("error: valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    from proxy.core import core

    if "compiled" in cores and core() != "compiled":
        print("note: the compiled core is not built here (scripts/setup.sh builds it): counting the pure core only",
              file=sys.stderr)
        cores = ["pure"]
    for which in cores:
        for mode in modes:
            label = label_of(mode, config)
            print(f"counting {mode} ({label}, {which} core) under callgrind...", file=sys.stderr, flush=True)
            n = per_query(mode, config, pure=which == "pure")
            print(f"{which:8s} {mode:12s} {n:9,.0f} instructions per query ({label}, callgrind, "
                  f"{LONG:,} - {SHORT:,} transactions)", flush=True)
    return 0
