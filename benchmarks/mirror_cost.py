"""`python3 -m benchmarks mirror`: what mirroring every statement to a slow shadow costs the clients.

Issue 16: "With mirroring at share 1.0 to a slow shadow, client p95 latency stays within 5% of p95
with no mirroring." Mirroring is meant to be free for clients: statements go to the shadow after the
client has its reply, through a bounded queue that drops what the shadow cannot keep up with. This
checks it end to end. One throwaway PostgreSQL (`pgbench -i -s 10`) holds the primary database
`postgres` and a copy of it, `shadow_slow`, in which `pgbench_accounts` is a view that sleeps
SHADOW_SLEEP_S, so every mirrored `pgbench -S` read takes 50 ms there. Three pgfront processes (one
worker, the benchmark targets' settings, a rules file each) sit in front of the primary: "off" has
no mirror rule and no [mirror] table; "on" mirrors every statement (share 1.0) to `shadow_slow`,
with the default queue_size and connections. With 2 shadow connections at 50 ms each, the shadow
takes ~40 statements a second, so nearly everything is dropped: the queue is full all the time,
which is the worst case for the relay (every statement is offered, counted and turned away). The third,
"rule", has the same rule and [mirror] table with a share so small (1e-12) that it never
samples: it tells what matching a rule on every statement costs apart from mirroring (p95 rule/off,
and on/rule for mirroring itself); the goal's figure stays on/off.

pgbench -S drives each target in turn at a fixed rate (`-R`, below saturation), so a transaction's
latency is its own cost through pgfront, not time spent queued behind others; the order alternates
every round, so a change in the machine's load (a shared, noisy 2-core box) hits both alike. For
each run it records p50/p95/p99 latency from pgbench's per-transaction logs (with -R these are
counted from each transaction's scheduled start, so falling behind the rate shows up in them),
the TPS, and pgfront's CPU (user + sys of its process tree, the mirror's runner process included;
and of the worker process alone) per transaction. The figure is the
ratio on/off of the medians of p95; the median of each round's own ratio is shown next to it. The
goal is reported, never asserted. Afterwards the "on" pgfront's admin console (SHOW MIRRORS) gives
the mirror target's counters: queued, sent, dropped, compared, mismatched, errors.

The "on" pgfront keeps draining its full queue into the shadow between its runs (at ~40 statements
a second); that is part of running with a slow shadow, and it overlaps the "off" runs a little.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from proxy.devdb import TempPostgres

from . import machine, pgbench, procstat
from .targets import Env, Pgfront, Unavailable
from .tracing_cost import SCALE, WARMUP_S, log

SHADOW_DB = "shadow_slow"
SHADOW_SLEEP_S = 0.05  # per statement on the shadow (per scan of pgbench_accounts)
GOAL = 1.05  # issue 16: client p95 with mirroring at most 5% above p95 without
COUNTERS = ("queued", "sent", "dropped", "compared", "mismatched", "errors")  # SHOW MIRRORS, per target
RULES_OFF = "# mirror off: no rules\n"
RULES_ON = '[[rule]]\nname = "mirror-all"\nmatch = {}\nmirror = { to = "slow", share = 1.0 }\n'
# the same rule, matching every statement, that (all but) never samples one: what matching it costs alone
RULES_RULE = RULES_ON.replace("share = 1.0", "share = 1e-12")


class MirrorPgfront(Pgfront):
    """pgfront passthrough with `rules` as its one rules file, plus `extra` appended to its config."""

    def __init__(self, key: str, label: str, rules: str, extra: str = "") -> None:
        super().__init__(key, label, "passthrough")
        self.rules, self.extra = rules, extra

    def config_text(self, env: Env) -> str:
        path = env.work / f"{self.key}-rules.toml"
        path.write_text(self.rules)
        base = super().config_text(env)
        if "files = []" not in base:
            raise RuntimeError("the passthrough config has no `files = []` to point at the rules file")
        return base.replace("files = []", f'files = ["{path}"]', 1) + self.extra


@dataclass
class Run:
    round: int
    target: str  # "off" or "on"
    tps: float
    transactions: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    cpu_s: float  # pgfront's CPU over the run (its process tree: the worker and its mirror runner process)
    worker_cpu_s: float  # of that, the worker process's own (the relay's event loop)

    @property
    def cpu_us_per_txn(self) -> float:
        return self.cpu_s / self.transactions * 1e6

    @property
    def worker_cpu_us_per_txn(self) -> float:
        return self.worker_cpu_s / self.transactions * 1e6


def make_shadow(pg: TempPostgres) -> float:
    """The slow shadow database, a copy of `postgres` (nothing may be connected to it); returns the
    execution time in ms of one pgbench -S read there, to show the sleep works."""
    pg.psql(f"CREATE DATABASE {SHADOW_DB} TEMPLATE postgres")
    pg.psql("ALTER TABLE pgbench_accounts RENAME TO pgbench_accounts_data; CREATE VIEW pgbench_accounts AS "
            f"SELECT a.* FROM pgbench_accounts_data a, pg_sleep({SHADOW_SLEEP_S})", dbname=SHADOW_DB)
    plan = pg.psql("EXPLAIN (ANALYZE, TIMING OFF) SELECT abalance FROM pgbench_accounts WHERE aid = 1",
                   dbname=SHADOW_DB)
    found = re.search(r"Execution Time: ([\d.]+) ms", plan)
    if not found:
        raise RuntimeError(f"no execution time in EXPLAIN ANALYZE on {SHADOW_DB}: {plan[-300:]}")
    return float(found.group(1))


def mirror_counters(pg: TempPostgres, port: int) -> dict[str, dict[str, str]]:
    """SHOW MIRRORS on pgfront's admin console: each mirror target's row, by target name."""
    env = {**os.environ, "PGSSLMODE": "disable", "PGGSSENCMODE": "disable", "PGCONNECT_TIMEOUT": "10"}
    res = subprocess.run([str(pg.bin / "psql"), "-X", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                          "-d", "pgfront", "-A", "-F", "|", "-P", "footer=off", "-c", "SHOW MIRRORS"],
                         capture_output=True, text=True, env=env, timeout=30)
    if res.returncode != 0:
        raise RuntimeError(f"SHOW MIRRORS failed: {res.stderr.strip()}")
    header, *lines = res.stdout.splitlines()
    cols = header.split("|")
    rows = [dict(zip(cols, line.split("|", len(cols) - 1), strict=True)) for line in lines if line]
    return {row["target"]: row for row in rows}


def measure(t: Pgfront, load: pgbench.Load, seconds: float) -> tuple[pgbench.Result, float, float]:
    """One pgbench run against t: its result and pgfront's CPU seconds over the run (its process tree,
    and its main process alone: with one worker, the worker)."""
    svc = t.service
    if svc is None or svc.proc is None or svc.proc.poll() is not None:
        raise RuntimeError(f"{t.label} is not running: {svc.log_tail() if svc else 'never started'}")
    assert t.pid
    cpu0, own0 = procstat.tree_cpu_seconds(t.pid), procstat.cpu_seconds(t.pid)
    res = pgbench.run(t.port, load, seconds)
    if not res.ok:
        raise RuntimeError(f"{t.label}: pgbench failed: {res.error}")
    return res, procstat.tree_cpu_seconds(t.pid) - cpu0, procstat.cpu_seconds(t.pid) - own0


def run_mode(mode: str, targets: dict[str, Pgfront], pg: TempPostgres, *, rounds: int, seconds: float,
             clients: int, rate: float) -> dict:
    load = pgbench.Load(mode=mode, clients=clients, threads=2, rate=rate)
    before = mirror_counters(pg, targets["on"].port).get("slow", {})
    offered = 0  # statements the "on" pgfront handled in this mode: each may be mirrored
    for key, t in targets.items():
        res, _, _ = measure(t, load, WARMUP_S)
        offered += res.transactions if key == "on" else 0
        log(f"{mode}: warmed up {key}")
    runs: list[Run] = []
    keys = list(targets)
    for i in range(rounds):
        order = keys[i % len(keys):] + keys[:i % len(keys)]  # each first in turn, each after each
        for key in order if i % 2 == 0 else order[::-1]:
            res, cpu, own = measure(targets[key], load, seconds)
            assert res.tps is not None and res.p50_ms is not None and res.p95_ms is not None and res.p99_ms is not None
            runs.append(r := Run(i + 1, key, res.tps, res.transactions, res.p50_ms, res.p95_ms, res.p99_ms, cpu, own))
            offered += r.transactions if key == "on" else 0
            log(f"{mode} round {i + 1}/{rounds} mirror {key:4}: p50 {r.p50_ms:6.2f}  p95 {r.p95_ms:6.2f}  "
                f"p99 {r.p99_ms:6.2f} ms  {r.tps:7,.0f} tps  {r.cpu_us_per_txn:6.1f} us CPU/txn")
    after = mirror_counters(pg, targets["on"].port).get("slow", {})
    side = {k: [r for r in runs if r.target == k] for k in keys}
    med = {(k, f): statistics.median(getattr(r, f) for r in v)
           for k, v in side.items() for f in ("p50_ms", "p95_ms", "p99_ms", "tps", "cpu_us_per_txn", "worker_cpu_us_per_txn")}

    def paired(a: str, b: str) -> float:  # the median of each round's own a/b, less drift-prone
        return statistics.median(x.p95_ms / y.p95_ms for x, y in zip(side[a], side[b], strict=True))

    p95_ratio = med["on", "p95_ms"] / med["off", "p95_ms"]
    split = {}  # how much of on/off is matching the rule (rule/off), how much mirroring itself (on/rule)
    if "rule" in side:
        split = {"p95_ratio_rule_off": med["rule", "p95_ms"] / med["off", "p95_ms"],
                 "p95_ratio_rule_off_rounds_median": paired("rule", "off"),
                 "p95_ratio_on_rule": med["on", "p95_ms"] / med["rule", "p95_ms"],
                 "p95_ratio_on_rule_rounds_median": paired("on", "rule")}
    return {f"{f}_{k}": v for (k, f), v in med.items()} | {  # p50_ms_off, ..., cpu_us_per_txn_on
        "p95_ratio": p95_ratio,
        "p95_ratio_rounds_median": paired("on", "off"),
        **split,
        "cpu_ratio": med["on", "cpu_us_per_txn"] / med["off", "cpu_us_per_txn"],
        "goal_met": p95_ratio <= GOAL,
        "statements_offered": offered,
        # over this mode (warm-up included); "queued" is a gauge: its value at the end
        "mirror": {c: int(after.get(c, 0)) - (0 if c == "queued" else int(before.get(c, 0))) for c in COUNTERS},
        "runs": [asdict(r) | {"cpu_us_per_txn": r.cpu_us_per_txn, "worker_cpu_us_per_txn": r.worker_cpu_us_per_txn}
                 for r in runs],
    }


def print_mode(mode: str, m: dict, settings: dict) -> None:
    print(f"\n{mode}: pgbench -S -M {mode} -c {settings['clients']} -j 2 -T {settings['seconds']:g} "
          f"-R {settings['rate']:g}, {settings['rounds']} rounds (medians)")
    if "error" in m:
        print(f"  failed: {m['error']}")
        return
    print(f"  {'':11} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'TPS':>8} {'CPU us/txn':>10} {'worker':>7}")
    for k in ("off", "rule", "on"):
        if f"p50_ms_{k}" not in m:
            continue
        print(f"  {'mirror ' + k:11} {m[f'p50_ms_{k}']:7.2f} {m[f'p95_ms_{k}']:7.2f} {m[f'p99_ms_{k}']:7.2f} "
              f"{m[f'tps_{k}']:8,.0f} {m[f'cpu_us_per_txn_{k}']:10.1f} {m[f'worker_cpu_us_per_txn_{k}']:7.1f}")
    print(f"  p95 on/off {m['p95_ratio']:.3f}x (median of the rounds' own ratios {m['p95_ratio_rounds_median']:.3f}x); "
          f"CPU/txn on/off {m['cpu_ratio']:.3f}x")
    if "p95_ratio_rule_off" in m:
        print(f"  of which: p95 rule/off {m['p95_ratio_rule_off']:.3f}x (rounds {m['p95_ratio_rule_off_rounds_median']:.3f}x), "
              f"on/rule {m['p95_ratio_on_rule']:.3f}x (rounds {m['p95_ratio_on_rule_rounds_median']:.3f}x)")
    print(f"  goal: p95 within {GOAL - 1:.0%}: {'met' if m['goal_met'] else 'NOT met'} ({m['p95_ratio'] - 1:+.2%})")
    mc = m["mirror"]
    print(f"  mirror 'slow' over this mode: {m['statements_offered']:,} statements offered, "
          + ", ".join(f"{c} {mc[c]:,}" for c in COUNTERS))
    print(f"  {'round':>5} {'first':>5} {'off p50':>7} {'on p50':>7} {'off p95':>7} {'on p95':>7} {'on/off':>7} "
          f"{'off p99':>7} {'on p99':>7} {'off tps':>8} {'on tps':>8} {'off cpu':>7} {'on cpu':>7}")
    by_round: dict[int, dict[str, dict]] = {}
    for r in m["runs"]:
        by_round.setdefault(r["round"], {})[r["target"]] = r
    for n, pair in by_round.items():
        off, on = pair["off"], pair["on"]
        first = next(r["target"] for r in m["runs"] if r["round"] == n)
        print(f"  {n:5} {first:>5} {off['p50_ms']:7.2f} {on['p50_ms']:7.2f} {off['p95_ms']:7.2f} {on['p95_ms']:7.2f} "
              f"{on['p95_ms'] / off['p95_ms']:6.3f}x {off['p99_ms']:7.2f} {on['p99_ms']:7.2f} {off['tps']:8,.0f} "
              f"{on['tps']:8,.0f} {off['cpu_us_per_txn']:7.1f} {on['cpu_us_per_txn']:7.1f}")


def main(modes: list[str], *, rounds: int = 5, seconds: float = 8, clients: int = 8, rate: float = 4000,
         json_path: Path | None = None) -> int:
    if rounds < 1 or seconds < 1 or clients < 1 or rate <= 0:
        print("error: need --rounds >= 1, --seconds >= 1, --clients >= 1, --rate > 0", file=sys.stderr)
        return 2
    settings = {"rounds": rounds, "seconds": seconds, "clients": clients, "threads": 2, "rate": rate,
                "scale": SCALE, "warmup_s": WARMUP_S, "shadow_sleep_s": SHADOW_SLEEP_S, "goal_p95_ratio": GOAL}
    results: dict = {"settings": settings, "modes": {}, "loadavg_at_start": round(os.getloadavg()[0], 2)}
    work = Path(tempfile.mkdtemp(prefix="pgfront-mirror-"))
    work.chmod(0o755)  # PostgreSQL runs as `postgres` when we are root, with its directory in here
    targets: dict[str, Pgfront] = {"off": MirrorPgfront("mirror-off", "pgfront, mirror off", RULES_OFF)}
    # "rule": the share 1.0 rule's match without its mirroring (set up below, with the shadow's url)
    pg: TempPostgres | None = None
    failed = False
    try:
        pg = TempPostgres(settings={"shared_buffers": "512MB", "max_parallel_workers_per_gather": "0"},
                          base_dir=str(work)).start()
        results["machine"] = machine.info(pg.bin)
        log(f"PostgreSQL on port {pg.port}; pgbench -i -s {SCALE}")
        pgbench.initialize(pg.port, SCALE)
        results["shadow_read_ms"] = make_shadow(pg)
        log(f"shadow database {SHADOW_DB}: one pgbench -S read takes {results['shadow_read_ms']:.1f} ms there")
        slow = f'[mirror.slow]\nurl = "{pg.dsn(dbname=SHADOW_DB)}"\n'
        targets["rule"] = MirrorPgfront("mirror-rule", "pgfront, mirror rule never sampling", RULES_RULE, slow)
        targets["on"] = MirrorPgfront("mirror-on", "pgfront, mirror on", RULES_ON, slow)
        env = Env(pg, None, work)
        for t in targets.values():
            t.start(env)
            log(f"{t.label}: port {t.port}, pid {t.pid}")
        pgbench.run(pg.port, pgbench.Load(), 1)  # warm the buffer cache
        for mode in modes:
            try:
                results["modes"][mode] = run_mode(mode, targets, pg, rounds=rounds, seconds=seconds,
                                                  clients=clients, rate=rate)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                failed = True
                results["modes"][mode] = {"error": str(e)}
                log(f"{mode}: {e}")
        results["mirror_counters"] = mirror_counters(pg, targets["on"].port)
    except (RuntimeError, OSError, Unavailable, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        failed = True
    finally:
        for t in targets.values():
            t.stop()
        if pg:
            pg.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    results["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    for mode, m in results["modes"].items():
        print_mode(mode, m, settings)
    for name, row in results.get("mirror_counters", {}).items():
        print(f"\nSHOW MIRRORS after all runs, target {name!r} ({row.get('connected', '?')} connected): "
              + ", ".join(f"{c} {int(row.get(c, 0)):,}" for c in COUNTERS)
              + (f"; last error: {row['last_error']}" if row.get("last_error") else ""))
    if json_path:
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"results: {json_path}", file=sys.stderr)
    return 1 if failed else 0
