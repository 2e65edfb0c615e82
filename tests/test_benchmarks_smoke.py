"""The benchmark harness runs end to end in --quick mode and fills every cell.

Benchmarks are not tests: nothing here looks at how fast anything was, only that every scenario x
target cell holds a number or an explicit "n/a" with a reason, and that the JSON, markdown and
goal lists are complete.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.pgbench import percentile, read_latencies_us
from benchmarks.scenarios import QUICK_SCENARIOS
from benchmarks.targets import all_targets

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("bench")
    res = subprocess.run(
        [sys.executable, "-m", "benchmarks", "run", "--quick", "--json", "--output-dir", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=150,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout), out, res.stderr


def test_every_cell_is_a_number_or_a_reason(quick_run) -> None:
    results, _, _ = quick_run
    targets = [t.key for t in all_targets()]
    assert [s["key"] for s in results["scenarios"]] == QUICK_SCENARIOS
    assert [t["key"] for t in results["targets"]] == targets
    for scenario in QUICK_SCENARIOS:
        row = results["cells"][scenario]
        assert set(row) == {t.key for t in all_targets() if t.only is None or scenario in t.only}, scenario
        for target, cell in row.items():
            if "na" in cell:
                assert isinstance(cell["na"], str) and cell["na"].strip(), (scenario, target)
            else:
                assert cell["tps"] > 0 and cell["transactions"] > 0, (scenario, target, cell)
                assert cell["p50_ms"] <= cell["p99_ms"], (scenario, target, cell)
    # the baseline a ratio is computed against is always measured
    assert all("tps" in results["cells"][s]["direct"] for s in QUICK_SCENARIOS)


def test_extras_goals_and_machine_info(quick_run) -> None:
    results, _, _ = quick_run
    m = results["machine"]
    assert m["cores"] >= 1 and m["cpu"] and m["date"]
    goals = results["goals"]
    assert len(goals) == 14
    for g in goals:
        assert g["pass"] in (True, False, None)
        assert g["pass"] is not None or g["why"], g  # an unmeasured goal says why
    idle = results["extras"]["idle_memory"]
    assert set(idle) == {"pgfront", "pgbouncer"}
    for key, m in idle.items():
        assert "na" in m or m["bytes_per_client"] is not None and m["clients"] > 0, (key, m)
    workers = results["extras"]["workers"]
    assert "ratio" in workers or workers["na"]


def test_markdown_and_json_files_written(quick_run) -> None:
    results, out, _ = quick_run
    saved = json.loads((out / "latest.json").read_text())
    assert saved["cells"] == results["cells"]
    md = (out / "latest.md").read_text()
    table_rows = [ln for ln in md.splitlines() if ln.startswith("| ") and not ln.startswith("| scenario")
                  and not ln.startswith("| goal") and "|---" not in ln]
    labels = {t.label for t in all_targets()}
    cell_rows = [r for r in table_rows if r.split(" | ")[1] in labels]
    assert len(cell_rows) == sum(t.only is None or s in t.only for s in QUICK_SCENARIOS for t in all_targets())
    for r in cell_rows:
        tps_col = r.split(" | ")[2]
        assert tps_col == "n/a" or tps_col.replace(",", "").replace(".", "").isdigit(), r


def test_table_rows_show_reason_for_na() -> None:
    results = {
        "scenarios": [{"key": "s", "label": "S"}],
        "targets": [{"key": "direct", "label": "direct"}, {"key": "x", "label": "X", "available": False,
                                                            "reason": "binary missing"}],
        "cells": {"s": {"direct": {"tps": 100.0, "p50_ms": 1.0, "p99_ms": 2.0, "transactions": 100},
                        "x": {"na": "not available: binary missing"}}},
    }
    rows = list(report.rows(results))
    assert rows[0][2] == "100" and rows[1][2] == "n/a" and rows[1][-1]
    assert "binary missing" in report.markdown(results)
    assert all(g["pass"] is None for g in report.goals(results))


def test_latency_percentiles_from_pgbench_logs(tmp_path) -> None:
    # pgbench -l lines: client_id transaction_no latency_us script_no epoch epoch_us
    (tmp_path / "txn.123").write_text("0 0 100 0 1 1\n0 1 300 0 1 2\n0 2 failed 0 1 3\n")
    (tmp_path / "txn.123.1").write_text("1 0 200 0 1 1\n")
    lat = read_latencies_us(str(tmp_path / "txn"))
    assert lat == [100, 200, 300]
    assert percentile(lat, 0.5) == 200 and percentile(lat, 0.99) == 300


def test_latencies_without_the_first_seconds(tmp_path) -> None:
    # the 5th and 6th columns: when each transaction ended (epoch seconds, microseconds)
    (tmp_path / "txn.1").write_text("0 0 900 0 100 0\n0 1 100 0 100 400000\n0 2 200 0 100 600000\n"
                                    "0 3 300 0 101 0\n")
    assert read_latencies_us(str(tmp_path / "txn"), skip_s=0.5) == [200, 300]
    assert read_latencies_us(str(tmp_path / "txn")) == [100, 200, 300, 900]


def test_mirror_benchmark_pooled_percentiles() -> None:
    """The mirror benchmark's percentile of several ascending lists, some counted twice (a bootstrap
    resample), is pgbench.percentile of their merged list."""
    import random

    from benchmarks.mirror_cost import pooled_percentile, quartiles

    rng = random.Random(16)
    for _ in range(100):
        parts = [(sorted(rng.randint(1, 500) for _ in range(rng.randint(1, 40))), rng.randint(1, 3))
                 for _ in range(rng.randint(1, 6))]
        merged = sorted(v for values, times in parts for _ in range(times) for v in values)
        for q in (0.0, 0.5, 0.95, 0.99, 1.0):
            assert pooled_percentile(parts, q) == percentile(merged, q)
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (2.0, 3.0, 4.0)
