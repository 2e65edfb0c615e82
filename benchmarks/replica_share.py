"""Part (a) of `python3 -m benchmarks replicas`: which server answered pgbench -S through pgfront.

Counted on the servers themselves, for each run of pgbench -S against the pgfront with a replica:

- pg_stat_statements `calls` of pgbench's read, on each server: exact, and updated as each statement
  ends. The share served by the replica is its calls over both servers' calls;
- pg_stat_database `xact_commit` of the database, on each server: every transaction, so it also holds
  pgfront's own probes (about one a second on each server) and the benchmark's snapshot queries: a
  cross-check. An idle backend reports its counts up to 10 s late (PGSTAT_IDLE_INTERVAL), so after
  every run (of either pgfront) each server's count is read until it has caught up with its
  pg_stat_statements count (or 12 s pass), and no run's counts leak into the next one's;
- pgfront's `pgfront_routed_transactions_total{upstream}`, and pgbench's own transaction count.

The pgfront without a replica runs the same load between them (alternating, so that the machine's
load falls on both alike), for pgfront's CPU per transaction side by side: at a fixed rate (pgbench
-R) by default, so that both do the same work per second and neither's CPU per transaction moves with
how many transactions an event loop turn happens to carry.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

from proxy.devdb import TempPostgres

from . import pgbench, procstat
from .replica_env import REPLICA_NAME, RoutedPgfront, routed_delta

GOAL_SHARE = 0.95  # issue 15: at least 95% of pgbench -S reads served by the one replica
STATS_SETTLE_S = 12.0  # idle backends report xact_commit within PGSTAT_IDLE_INTERVAL (10 s)
_COUNTS = ("SELECT (SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
           "WHERE query LIKE '%FROM pgbench_accounts WHERE aid = $1%'), "
           "(SELECT xact_commit FROM pg_stat_database WHERE datname = 'postgres')")


def server_counts(server: TempPostgres) -> tuple[int, int]:
    """(pgbench reads run here, transactions committed here) so far."""
    calls, commits = server.psql(_COUNTS).strip().split("|")
    return int(calls), int(commits)


def settled_counts(server: TempPostgres, before: tuple[int, int]) -> tuple[int, int]:
    """server_counts once the commits reported since `before` cover the reads run since (or after
    STATS_SETTLE_S): the backends of a run have reported its transactions."""
    now, deadline = server_counts(server), time.monotonic() + STATS_SETTLE_S
    while now[1] - before[1] < now[0] - before[0] and time.monotonic() < deadline:
        time.sleep(0.25)
        now = server_counts(server)
    return now


@dataclass
class Run:
    target: str  # "routed" or "pool"
    round: int
    tps: float
    transactions: int
    cpu_us_per_txn: float  # pgfront's (its process tree's) CPU per pgbench transaction
    # routed runs only: what each server counted, and pgfront's routing counter
    reads_replica: int = 0
    reads_primary: int = 0
    commits_replica: int = 0
    commits_primary: int = 0
    routed: dict[str, int] | None = None


def _run(t: RoutedPgfront, load: pgbench.Load, seconds: float) -> tuple[pgbench.Result, float]:
    assert t.pid
    cpu0 = procstat.tree_cpu_seconds(t.pid)
    res = pgbench.run(t.port, load, seconds)
    if not res.ok:
        raise RuntimeError(f"{t.label}: pgbench failed: {res.error}")
    return res, procstat.tree_cpu_seconds(t.pid) - cpu0


def counted_run(t: RoutedPgfront, pg: TempPostgres, replica: TempPostgres, load: pgbench.Load, seconds: float,
                rnd: int) -> Run:
    """One pgbench run through `t`, with both servers' counters read around it."""
    p0, r0, m0 = server_counts(pg), server_counts(replica), t.routed()
    res, cpu = _run(t, load, seconds)
    r1, p1, m1 = settled_counts(replica, r0), settled_counts(pg, p0), t.routed()
    run = Run("routed", rnd, res.tps or 0.0, res.transactions, cpu / res.transactions * 1e6)
    if t.replica is None:
        run.target = "pool"
        return run
    run.reads_replica, run.reads_primary = r1[0] - r0[0], p1[0] - p0[0]
    run.commits_replica, run.commits_primary = r1[1] - r0[1], p1[1] - p0[1]
    run.routed = routed_delta(m0, m1)
    return run


def run_mode(mode: str, routed: RoutedPgfront, pool: RoutedPgfront, pg: TempPostgres, replica: TempPostgres, *,
             rounds: int, seconds: float, clients: int, rate: float | None, log) -> dict:
    load = pgbench.Load(mode=mode, clients=clients, threads=2, rate=rate)
    for t in (routed, pool):  # warm-up: connections opened, statements prepared, both servers' buffers read
        counted_run(t, pg, replica, load, 2, 0)
    runs: list[Run] = []
    for i in range(rounds):
        for t in (routed, pool) if i % 2 == 0 else (pool, routed):
            r = counted_run(t, pg, replica, load, seconds, i + 1)
            runs.append(r)
            log(f"{mode} round {i + 1}: {t.label:20} {r.tps:7,.0f} tps, {r.cpu_us_per_txn:5.1f} us CPU/txn"
                + (f", replica served {r.reads_replica:,} of {r.reads_replica + r.reads_primary:,} reads"
                   if t.replica is not None else ""))
    mine = [r for r in runs if r.target == "routed"]
    other = [r for r in runs if r.target == "pool"]
    reads_r, reads_p = sum(r.reads_replica for r in mine), sum(r.reads_primary for r in mine)
    com_r, com_p = sum(r.commits_replica for r in mine), sum(r.commits_primary for r in mine)
    metric: dict[str, int] = {}
    for r in mine:
        for k, v in (r.routed or {}).items():
            metric[k] = metric.get(k, 0) + v
    share = reads_r / (reads_r + reads_p) if reads_r + reads_p else 0.0
    med = {k: {f: statistics.median(getattr(r, f) for r in v) for f in ("tps", "cpu_us_per_txn")}
           for k, v in (("routed", mine), ("pool", other))}
    return {
        "share": share,
        "goal_met": share >= GOAL_SHARE,
        "reads_replica": reads_r, "reads_primary": reads_p,
        "commits_replica": com_r, "commits_primary": com_p,
        "commit_share": com_r / (com_r + com_p) if com_r + com_p else 0.0,
        "routed_metric": metric,
        "metric_share": metric.get(REPLICA_NAME, 0) / max(1, sum(metric.values())),
        "pgbench_transactions": sum(r.transactions for r in mine),
        "tps_routed": med["routed"]["tps"], "tps_pool": med["pool"]["tps"],
        "tps_ratio": med["routed"]["tps"] / med["pool"]["tps"],
        "cpu_us_per_txn_routed": med["routed"]["cpu_us_per_txn"], "cpu_us_per_txn_pool": med["pool"]["cpu_us_per_txn"],
        "cpu_ratio": med["routed"]["cpu_us_per_txn"] / med["pool"]["cpu_us_per_txn"],
        "runs": [asdict(r) for r in runs],
    }


def print_mode(mode: str, m: dict) -> None:
    if "error" in m:
        print(f"  {mode:9} failed: {m['error']}")
        return
    print(f"  {mode:9} replica served {m['share']:7.2%} of the reads ({m['reads_replica']:,} replica, "
          f"{m['reads_primary']:,} primary, pg_stat_statements); goal >= {GOAL_SHARE:.0%}: "
          f"{'met' if m['goal_met'] else 'NOT met'}")
    mm = m["routed_metric"]
    print(f"  {'':9} cross-checks: xact_commit {m['commit_share']:.2%} ({m['commits_replica']:,} replica, "
          f"{m['commits_primary']:,} primary, probes included); pgfront routed {m['metric_share']:.2%} "
          f"({', '.join(f'{k} {v:,}' for k, v in mm.items())}); pgbench counted {m['pgbench_transactions']:,}")
    print(f"  {'':9} vs pgfront without a replica: pgfront CPU per transaction {m['cpu_us_per_txn_routed']:.1f} / "
          f"{m['cpu_us_per_txn_pool']:.1f} us = {m['cpu_ratio']:.3f}x (TPS {m['tps_routed']:,.0f} / "
          f"{m['tps_pool']:,.0f})")
