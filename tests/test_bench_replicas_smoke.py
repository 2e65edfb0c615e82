"""`python3 -m benchmarks replicas` runs end to end at a tiny size and fills every figure.

Benchmarks are not tests: nothing here looks at how fast anything was, or at the share of reads the
replica served. Read-your-writes is the exception: a violation is a bug at any size and speed.
(Callgrind's parts, (c) and (d), are left out: minutes under valgrind; `tests/test_routing_memo.py`
drives the harness of (c).)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_replicas_benchmark_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "replicas.json"
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks", "replicas", "--scale", "1", "--seconds", "1", "--rounds", "1",
         "--mode", "simple", "--ryw-clients", "4", "--ryw-seconds", "2", "--pause", "0.5", "--resume", "0.5",
         "--instructions", "--process", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())
    share = results["share"]["simple"]
    assert share["reads_replica"] + share["reads_primary"] > 0, share
    assert 0 <= share["share"] <= 1 and isinstance(share["goal_met"], bool)
    assert share["pgbench_transactions"] > 0 and share["cpu_us_per_txn_routed"] > 0 and share["tps_pool"] > 0
    assert set(share["routed_metric"]) <= {"primary", "replica1"}
    ryw = results["ryw"]
    assert ryw["reads"] > 0 and ryw["reads_replica"] + ryw["reads_primary"] == ryw["reads"], ryw
    assert ryw["violations"] == 0, ryw["violation_examples"]
    assert "instructions" not in results and "process" not in results
    assert "(a) pgbench -S" in res.stdout and "(b) read-your-writes" in res.stdout
