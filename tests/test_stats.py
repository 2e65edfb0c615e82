"""proxy.stats: per-fingerprint statistics, folding, snapshots merged across workers, reset; top rendering."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from proxy import stats as st
from proxy.stats import OTHER, MergedStats, Stats, StatsPublisher, load_merged, request_reset
from proxy.top import derive, render_table

ROW_KEYS = {
    "fingerprint", "query", "calls", "total_ms", "mean_ms", "min_ms", "max_ms", "p50_ms", "p95_ms", "p99_ms",
    "rows", "errors", "error_classes", "cache_hits", "cache_misses", "cache_bypasses", "rewrites", "blocks", "throttled", "tags",
    "first_seen", "last_seen", "database", "user",
}


def exact_percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q * len(ordered))) - 1]


def feed(stats: Stats, fingerprint: str, latencies: list[float], query: str = "SELECT $1") -> None:
    for seconds in latencies:
        stats.record(fingerprint, query, "app", "alice", seconds, 1, None)


# -- the histogram ----------------------------------------------------------------------------------
def test_buckets_are_about_five_percent_wide() -> None:
    assert st.bucket_of(0) == 0 and st.bucket_of(1e-7) == 0
    previous = 0
    for seconds in (2e-6, 1e-5, 3.3e-4, 0.01, 0.5, 1.0, 42.0, 3600.0):
        k = st.bucket_of(seconds)
        assert k > previous
        previous = k
        assert st.bucket_upper(k - 1) < seconds <= st.bucket_upper(k) * (1 + 1e-9)
        assert 1.04 < st.bucket_upper(k) / st.bucket_upper(k - 1) < 1.06
    assert st.bucket_of(1e12) == st.bucket_of(1e15)  # capped


@pytest.mark.parametrize("latencies", [
    [0.001 * (1 + i / 10) for i in range(1000)],  # 1 ms .. 101 ms, evenly spread
    [0.002] * 900 + [0.020] * 90 + [0.200] * 10,  # a fast majority with slow tails
    [random.Random(7).lognormvariate(-6, 1.2) for _ in range(5000)],  # a realistic skewed mix
])
def test_percentiles_within_a_few_percent(latencies: list[float]) -> None:
    stats = Stats()
    feed(stats, "f", latencies)
    q = stats.queries["f"]
    for p in (0.50, 0.95, 0.99):
        assert q.percentile(p) == pytest.approx(exact_percentile(latencies, p), rel=0.03)
    row = load_merged_from(stats).top(1)[0]
    assert row["calls"] == len(latencies)
    assert row["total_ms"] == pytest.approx(sum(latencies) * 1e3, rel=1e-6)
    assert row["mean_ms"] == pytest.approx(sum(latencies) * 1e3 / len(latencies), rel=1e-3)
    assert row["min_ms"] == pytest.approx(min(latencies) * 1e3, abs=1e-3)
    assert row["max_ms"] == pytest.approx(max(latencies) * 1e3, abs=1e-3)
    assert row["p99_ms"] == pytest.approx(exact_percentile(latencies, 0.99) * 1e3, rel=0.03)


def load_merged_from(stats: Stats) -> MergedStats:
    merged = MergedStats()
    merged.add_live(stats)
    return merged


# -- one worker -------------------------------------------------------------------------------------
def test_record_counts_rows_errors_and_identity() -> None:
    stats = Stats()
    stats.record("f", "SELECT * FROM t WHERE id = $1", "app", "alice", 0.002, 3, None)
    stats.record("f", "SELECT * FROM t WHERE id = $1", "app", "bob", 0.004, 0, "23505")
    stats.record("f", "SELECT * FROM t WHERE id = $1", "app2", "bob", 0.001, 0, "23503")
    stats.record("f", "SELECT * FROM t WHERE id = $1", "app2", "bob", 0.001, 0, "42P01")
    stats.record("f", "SELECT * FROM t WHERE id = $1", "app2", "bob", 0.001, 5, "00000")
    row = load_merged_from(stats).top(5)[0]
    assert set(row) == ROW_KEYS
    assert row["calls"] == 5 and row["rows"] == 8
    assert row["errors"] == 3 and row["error_classes"] == "23:2,42:1"
    assert (row["database"], row["user"]) == ("app2", "bob")
    assert row["query"] == "SELECT * FROM t WHERE id = $1"
    assert row["first_seen"] <= row["last_seen"] and row["last_seen"].endswith("Z")


def test_query_text_is_the_first_seen() -> None:
    stats = Stats()
    stats.record("f", "SELECT * FROM t WHERE id IN ($1)", "app", "alice", 0.001, 1)
    stats.record("f", "SELECT * FROM t WHERE id IN ($1, $2)", "app", "alice", 0.001, 1)
    assert stats.queries["f"].query == "SELECT * FROM t WHERE id IN ($1)"


def test_cache_and_rule_events() -> None:
    stats = Stats()
    for event in ("hit", "hit", "hit", "miss", "bypass", "invalidation"):
        stats.cache_event("f", event)  # before the first record(): the entry is created
    stats.rule_event("f", "no_unbounded", "rewrite", observed=False)
    stats.rule_event("f", "no_unbounded", "rewrite", observed=False)
    stats.rule_event("f", "no_delete_all", "block", observed=True)
    stats.record("f", "SELECT 1", "app", "alice", 0.001, 1)
    q = stats.queries["f"]
    assert q.cache == {"hit": 3, "miss": 1, "bypass": 1, "invalidation": 1}
    assert q.rules == {("no_unbounded", "rewrite", "enforce"): 2, ("no_delete_all", "block", "observe"): 1}
    row = q.row()
    assert (row["cache_hits"], row["cache_misses"], row["cache_bypasses"]) == (3, 1, 1)
    assert (row["rewrites"], row["blocks"], row["query"]) == (2, 1, "SELECT 1")


def test_counters_and_gauges() -> None:
    stats = Stats()
    stats.inc(st.BYTES_RECEIVED, 100)
    stats.inc(st.BYTES_RECEIVED, 23)
    stats.inc(st.SLOW_QUERIES)
    stats.set_gauge(st.CLIENT_CONNECTIONS, 7)
    stats.set_gauge(st.CLIENT_CONNECTIONS, 5)
    assert stats.counters == {st.BYTES_RECEIVED: 123, st.SLOW_QUERIES: 1}
    assert stats.gauges == {st.CLIENT_CONNECTIONS: 5}


def test_least_used_fold_into_other() -> None:
    stats = Stats(max_fingerprints=100)
    feed(stats, "heavy", [0.5] * 10)  # early, busy: must survive the flood of light ones after it
    total_calls = 10
    for i in range(1, 1001):
        # fingerprint i costs i us: each newcomer outweighs the ones before it
        calls = 1 + i % 3
        feed(stats, f"fp{i}", [i / 1e6 / calls] * calls)
        total_calls += calls
        assert len(stats.queries) <= 110
    assert 100 <= len(stats.queries) <= 110
    assert set(stats.queries) == {"heavy"} | {f"fp{i}" for i in range(1002 - len(stats.queries), 1001)}
    assert stats.other.calls + sum(q.calls for q in stats.queries.values()) == total_calls
    assert stats.folded == 1001 - len(stats.queries)

    merged = load_merged_from(stats)
    top, rest = merged.split_top(3)
    assert [q.fingerprint for q in top] == ["heavy", "fp1000", "fp999"]
    assert rest.fingerprint == OTHER and rest.calls + sum(q.calls for q in top) == total_calls
    assert merged.everything().calls == total_calls
    assert merged.everything().total == pytest.approx(5 + sum(i / 1e6 for i in range(1, 1001)))


def deep_size(stats: Stats) -> int:
    """Bytes held by the per-fingerprint structures (containers and their contents)."""
    seen: set[int] = set()
    todo: list[object] = [stats.queries, stats.other]
    size = 0
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        size += sys.getsizeof(obj)
        if isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, tuple | list):
            todo.extend(obj)
        elif isinstance(obj, st.QueryStats):
            todo.extend(getattr(obj, name) for name in st.QueryStats.__slots__)
    return size


def test_cardinality_and_memory_bounded_under_100k_shapes() -> None:
    stats = Stats(max_fingerprints=5000)

    def run(start: int, stop: int) -> None:
        for i in range(start, stop):
            stats.record(f"{i:016x}", f"SELECT * FROM t{i} WHERE a = $1", "app", "alice", 0.001 + (i % 97) / 1e4, 1)
            stats.cache_event(f"{i:016x}", "miss")

    run(0, 20_000)
    after_20k = deep_size(stats)
    run(20_000, 100_000)
    assert len(stats.queries) <= 5500
    assert stats.other.calls + sum(q.calls for q in stats.queries.values()) == 100_000
    assert deep_size(stats) < after_20k * 1.25  # no growth with the number of shapes seen


# -- many workers -----------------------------------------------------------------------------------
def two_workers(run_dir: Path) -> tuple[Stats, StatsPublisher, Stats, StatsPublisher]:
    a, b = Stats(), Stats()
    return a, StatsPublisher(a, run_dir, 1), b, StatsPublisher(b, run_dir, 2)


def test_merge_two_workers_through_snapshot_files(tmp_path: Path) -> None:
    a, pub_a, b, pub_b = two_workers(tmp_path)
    fast = [0.001 * (1 + i / 100) for i in range(400)]
    slow = [0.050 * (1 + i / 100) for i in range(100)]
    feed(a, "shared", fast)
    feed(b, "shared", slow)
    feed(b, "only_b", [0.5])
    a.cache_event("shared", "hit")
    b.cache_event("shared", "miss")
    a.inc(st.BYTES_SENT, 10)
    b.inc(st.BYTES_SENT, 32)
    a.set_gauge(st.CLIENT_CONNECTIONS, 3)
    b.set_gauge(st.CLIENT_CONNECTIONS, 4)
    assert pub_a.flush() and pub_b.flush()
    assert sorted(p.name for p in tmp_path.glob("stats-*.json")) == ["stats-1.json", "stats-2.json"]

    merged = load_merged(tmp_path)
    assert merged.workers == 2
    rows = {r["fingerprint"]: r for r in merged.top(10)}
    assert rows["shared"]["calls"] == 500 and rows["only_b"]["calls"] == 1
    both = fast + slow
    assert rows["shared"]["p50_ms"] == pytest.approx(exact_percentile(both, 0.5) * 1e3, rel=0.03)
    assert rows["shared"]["p95_ms"] == pytest.approx(exact_percentile(both, 0.95) * 1e3, rel=0.03)
    assert rows["shared"]["min_ms"] == pytest.approx(1.0) and rows["shared"]["max_ms"] == pytest.approx(99.5)
    assert (rows["shared"]["cache_hits"], rows["shared"]["cache_misses"]) == (1, 1)
    assert merged.counters[st.BYTES_SENT] == 42 and merged.gauges[st.CLIENT_CONNECTIONS] == 7
    assert [r["fingerprint"] for r in merged.top(10, order_by="calls")] == ["shared", "only_b"]
    assert [r["fingerprint"] for r in merged.top(10, order_by="max_time")] == ["only_b", "shared"]
    with pytest.raises(ValueError, match="cannot order by"):
        merged.top(10, order_by="nonsense")


def test_live_stats_replace_their_own_file(tmp_path: Path) -> None:
    a, pub_a, b, pub_b = two_workers(tmp_path)
    feed(a, "f", [0.001])
    feed(b, "f", [0.001])
    pub_a.flush()
    pub_b.flush()
    feed(a, "f", [0.001] * 5)  # not flushed yet: only the live object knows
    assert load_merged(tmp_path).top(1)[0]["calls"] == 2
    assert load_merged(tmp_path, live=a).top(1)[0]["calls"] == 7


def test_flush_skips_when_nothing_changed(tmp_path: Path) -> None:
    a = Stats()
    pub = StatsPublisher(a, tmp_path / "run", "w")
    assert pub.flush()  # creates the directory and the first snapshot
    assert not pub.flush()
    a.inc("x")
    assert pub.flush()
    pub.remove()
    assert not pub.path.exists()


def test_dead_workers_files_are_dropped(tmp_path: Path) -> None:
    a, pub_a, b, pub_b = two_workers(tmp_path)
    feed(a, "f", [0.001])
    feed(b, "f", [0.001])
    pub_a.flush()
    pub_b.flush()
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(gone.stdout)
    snap = pub_b.path.read_bytes().replace(f'"pid":{os.getpid()}'.encode(), f'"pid":{dead_pid}'.encode())
    assert snap != pub_b.path.read_bytes()
    pub_b.path.write_bytes(snap)
    (tmp_path / "stats-garbage.json").write_text("{not json")
    merged = load_merged(tmp_path)
    assert merged.workers == 1 and merged.top(1)[0]["calls"] == 1
    assert not pub_b.path.exists()


def test_reset_reaches_every_worker(tmp_path: Path) -> None:
    a, pub_a, b, pub_b = two_workers(tmp_path)
    feed(a, "f", [0.001] * 3)
    feed(b, "f", [0.001] * 4)
    a.inc(st.BYTES_SENT, 5)
    pub_a.flush()
    pub_b.flush()

    merged = load_merged(tmp_path, live=a)
    assert merged.top(1)[0]["calls"] == 7
    assert merged.reset() == 1  # RESET STATS on worker a's admin console
    assert a.queries == {} and a.generation == 1
    # b has not flushed since: its pre-reset numbers no longer count, its counters still do
    merged = load_merged(tmp_path, live=a)
    assert merged.top(5) == [] and merged.counters[st.BYTES_SENT] == 5

    feed(b, "f", [0.001] * 2)  # b keeps working until its next flush, which applies the reset
    pub_b.flush()
    assert b.generation == 1 and b.queries == {}
    feed(b, "f", [0.001])
    feed(a, "f", [0.001])
    pub_a.flush()
    pub_b.flush()
    assert load_merged(tmp_path).top(1)[0]["calls"] == 2

    assert request_reset(tmp_path) == 2
    assert load_merged(tmp_path, live=a).top(5) == []  # `a` applies it when it is merged as live
    assert a.generation == 2


def test_merged_reset_needs_a_run_dir() -> None:
    with pytest.raises(ValueError):
        MergedStats().reset()


# -- pgfront top rendering --------------------------------------------------------------------------
def test_render_table_from_rows(tmp_path: Path) -> None:
    a = Stats()
    pub = StatsPublisher(a, tmp_path, 1)
    feed(a, "aaaa000011112222", [0.010] * 4, query="SELECT * FROM orders WHERE id = $1")
    feed(a, "bbbb000011112222", [0.001] * 2, query="UPDATE   orders\n SET x = $1")
    a.cache_event("aaaa000011112222", "hit")
    a.cache_event("aaaa000011112222", "miss")
    pub.flush()
    rows = load_merged(tmp_path).top(10)
    previous: dict[str, tuple[float, float]] = {}
    derive(rows, previous, now=100.0)
    assert rows[0]["calls_per_s"] == "" and rows[0]["cache_hit_pct"] == 50.0
    feed(a, "aaaa000011112222", [0.010] * 6, query="SELECT * FROM orders WHERE id = $1")
    pub.flush()
    rows = load_merged(tmp_path).top(10)
    derive(rows, previous, now=102.0)
    assert rows[0]["calls_per_s"] == 3.0

    console = Console(record=True, width=250)
    console.print(render_table(rows, title="test top"))
    text = console.export_text()
    assert "test top" in text and "calls/s" in text and "p99 ms" in text
    assert "SELECT * FROM orders WHERE id = $1" in text
    assert "UPDATE orders SET x = $1" in text  # whitespace collapsed onto one line
    assert "aaaa000011112222" in text and "50.0" in text


def test_render_table_from_admin_console_text() -> None:
    rows = [{"fingerprint": "a", "total_ms": "50.25", "calls": "10", "cache_hits": "3", "cache_misses": "1"},
            {"fingerprint": "b", "total_ms": "5.5", "calls": "2", "cache_hits": "0", "cache_misses": "0"}]
    derive(rows, {}, now=1.0)
    assert rows[0]["cache_hit_pct"] == 75.0 and rows[1]["cache_hit_pct"] == ""
    console = Console(record=True, width=200)
    console.print(render_table(rows))
    text = console.export_text()
    assert "50.25" in text and "75.00" in text


def test_render_table_narrow_screen_keeps_numbers_whole() -> None:
    rows = [{"fingerprint": "f" * 16, "query": "SELECT " + "x, " * 100 + "y FROM t", "calls": 123456,
             "total_ms": 98765.4321, "mean_ms": 1.5, "p95_ms": 2.5, "p99_ms": 3.5, "rows": 7, "errors": 0}]
    console = Console(record=True, width=70)
    console.print(render_table(rows, width=70))
    text = console.export_text()
    assert "123,456" in text and "98,765.43" in text and "SELECT x, x" in text
    assert max(len(line) for line in text.splitlines()) <= 70
