"""`python3 -m benchmarks mirror`: what mirroring every statement to a slow shadow costs the clients.

Issue 16: "With mirroring at share 1.0 to a slow shadow, client p95 latency stays within 5% of p95
with no mirroring." Mirroring is meant to be free for clients: statements go to the shadow after the
client has its reply, through a bounded queue that drops what the shadow cannot keep up with, and they
are run and compared by a child process of the worker under SCHED_IDLE. This checks it end to end.

The set-up. A throwaway PostgreSQL (`pgbench -i -s 10`) is the primary. The shadow is a second one
with the same data in which `pgbench_accounts` is a view that sleeps SHADOW_SLEEP_S, so every mirrored
`pgbench -S` read takes 50 ms there; its processes run under SCHED_IDLE, as if it were on another
machine (its CPU per statement must not be counted against pgfront on 2 shared cores). ONE pgfront
process (one worker, the benchmark targets' settings) sits in front of the primary with a
`[mirror.slow]` target (2 connections, queue_size QUEUE_SIZE), so its shadow runner process exists in
every arm: the arms differ only in the rules file, switched with the admin console's RELOAD (checked
with SHOW RULES) over a connection held open:

- "off": no rule: nothing is mirrored;
- "rule": a rule matching every statement with `mirror = { to = "slow", share = 1e-12 }`: it never
  samples one, so it costs the rule's matching and nothing of mirroring;
- "on": the same rule at share 1.0: every statement is offered to the mirror. The shadow takes ~40
  statements a second (2 connections at 50 ms), so nearly all are turned away: the queue is full all
  the time, the worst case for the relay (each offered, counted and dropped).

The load is open-loop: ONE pgbench -S run per mode at a fixed rate (`-R`; by default 25% of the TPS
the same pgfront reaches with no rule and no rate limit, measured first), so a transaction's latency is
its own cost through pgfront, not time queued behind the others (with -R pgbench counts it from the
transaction's scheduled start, so falling behind the rate shows in it). At saturation on 2 cores p95
would be hostage to how the scheduler shares them out. While pgbench runs, the arms take turns on a
fixed timetable: `--rounds` rounds (default 150), each the three arms in a random order (seeded: the
same schedule every time), `--seconds` each (default 0.6). Each transaction belongs to the arm in force
at its scheduled start; those of the first GUARD_S of an arm's turn (the switch, and the shadow's
queue draining after "on": 2 statements per connection, 0.1 s) and of its last TAIL_S are left out. A
change in the machine's load thus hits the three arms alike, within seconds, and no arm always
follows another.

On a machine shared with other jobs, CPU-bound processes of others make each wake-up of pgbench,
PostgreSQL and pgfront wait for a time slice (a millisecond or more), and p95 measures them: with
others using 1 to 1.4 of the 2 cores, the rounds' own p95 ratios spread from 0.7x to 1.6x and the
medians of 150 rounds moved by 10% between runs. `--realtime` (root or CAP_SYS_NICE) runs the
measured path, PostgreSQL's backends, the pgfront worker and pgbench, under SCHED_RR for the
timetable's run (`realtime`): nobody else's time slice delays them, while the mirror's runner process
and the shadow stay under SCHED_IDLE (the runner leaves any real-time policy it inherits), as they are
in production relative to the worker. p95 is then pgfront's own, the mirror's cost included; the
calibration runs before, without it. The load of other processes is shown either way ("others":
the machine's CPU use less this benchmark's processes).

Per arm: p50/p95/p99 (medians over the rounds), the worker's and the runner's CPU (scheduler run
time, /proc/PID/task/*/schedstat). The figures: over the rounds, the median of each round's own ratio
p95(on)/p95(off), the goal's figure, with its interquartile range, the same for p50 and p99, and for
on/rule (mirroring alone) and rule/off (matching the rule alone); and the ratios of the arms' pooled
percentiles (all their counted transactions) with a 95% bootstrap interval over the rounds. The goal
is reported, never asserted. SHOW MIRRORS gives the mirror target's counters over the mode.
"""

from __future__ import annotations

import bisect
import contextlib
import glob
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from proxy.devdb import TempPostgres

from . import machine, pgbench, procstat
from .targets import Env, Pgfront, Unavailable
from .tracing_cost import SCALE, log

SHADOW_SLEEP_S = 0.05  # per statement on the shadow (per scan of pgbench_accounts)
GOAL = 1.05  # issue 16: client p95 with mirroring at most 5% above p95 without
GUARD_S = 0.15  # the start of each arm's stretch, left out: the switch, the shadow's queue draining after "on"
TAIL_S = 0.05  # and its end: transactions scheduled then would still run at the next switch
LEAD_S = 1.5  # pgbench's start, before the timetable: connections and PostgreSQL backends starting
BOOTSTRAP = 200  # resamples of the rounds for the pooled ratios' intervals
QUIET = 0.5  # cores: a round whose segments all had less CPU used by other processes is "quiet"
QUEUE_SIZE = 4  # the target's queue: full all the time under "on", drained within GUARD_S after it (2 x 50 ms)
CALIBRATE_S = 3  # each of the two closed-loop runs that measure the maximum TPS
COUNTERS = ("queued", "sent", "dropped", "compared", "mismatched", "errors")  # SHOW MIRRORS, per target
ARMS = ("off", "rule", "on")
RULES = {
    "off": "# mirror off: no rules\n",
    "on": '[[rule]]\nname = "mirror-all"\nmatch = {}\nmirror = { to = "slow", share = 1.0 }\n',
    # the same rule, matching every statement, that (all but) never samples one: what matching it costs alone
    "rule": '[[rule]]\nname = "mirror-never"\nmatch = {}\nmirror = { to = "slow", share = 1e-12 }\n',
}
RULE_NAMES = {"off": [], "on": ["mirror-all"], "rule": ["mirror-never"]}
RATIOS = (("on", "off"), ("on", "rule"), ("rule", "off"))  # the goal's figure first


class MirrorPgfront(Pgfront):
    """pgfront passthrough with `rules_path` as its one rules file, plus `extra` appended to its config."""

    def __init__(self, key: str, label: str, rules_path: Path, extra: str = "") -> None:
        super().__init__(key, label, "passthrough")
        self.rules_path, self.extra = rules_path, extra

    def config_text(self, env: Env) -> str:
        base = super().config_text(env)
        if "files = []" not in base:
            raise RuntimeError("the passthrough config has no `files = []` to point at the rules file")
        return base.replace("files = []", f'files = ["{self.rules_path}"]', 1) + self.extra


@dataclass
class Segment:
    """One arm's stretch of time within a mode's pgbench run."""

    round: int  # 0: the warm-up round, not counted
    arm: str  # "off", "rule" or "on"
    switch: float  # wall clock (time.time()) when the switch to this arm began
    start: float  # when its rules were in force (RELOAD answered)
    end: float = 0.0  # when the switch to the next arm began
    worker_cpu_s: float = 0.0  # the worker process's CPU over [start, end] (the relay's event loop)
    runner_cpu_s: float = 0.0  # its shadow runner process's
    machine_busy: float = 0.0  # the whole machine's CPU use over it, in cores (of os.cpu_count())
    others: float = 0.0  # of that, what was not this benchmark's (pgfront, PostgreSQL, pgbench, this process)
    transactions: int = 0  # scheduled within its counted window: [start + GUARD_S, end - TAIL_S)
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    latencies: list[int] = field(default_factory=list, repr=False)  # counted ones, ascending (us)

    @property
    def worker_cpu_us_per_txn(self) -> float:
        return self.worker_cpu_s / self.transactions * 1e6 if self.transactions else 0.0

    @property
    def runner_cpu_ms_per_s(self) -> float:
        return self.runner_cpu_s / (self.end - self.start) * 1e3 if self.end > self.start else 0.0


def make_shadow(work: Path) -> tuple[TempPostgres, float]:
    """The slow shadow: a PostgreSQL cluster of its own with the same data, in which pgbench_accounts is a
    view that sleeps SHADOW_SLEEP_S per scan, its processes under SCHED_IDLE (as if it were on another
    machine: its CPU, about 0.3 ms per statement, must not be counted against pgfront on the 2 shared
    cores). Returns it and the execution time in ms of one pgbench -S read there, to show the sleep works."""
    shadow = TempPostgres(base_dir=str(work)).start()
    try:
        pgbench.initialize(shadow.port, SCALE)
        shadow.psql("ALTER TABLE pgbench_accounts RENAME TO pgbench_accounts_data; CREATE VIEW pgbench_accounts AS "
                    f"SELECT a.* FROM pgbench_accounts_data a, pg_sleep({SHADOW_SLEEP_S})")
        assert shadow.proc is not None
        # the postmaster's policy is inherited by the backends it starts from now on (the runner's)
        with contextlib.suppress(AttributeError, OSError):
            os.sched_setscheduler(shadow.proc.pid, os.SCHED_IDLE, os.sched_param(0))
        plan = shadow.psql("EXPLAIN (ANALYZE, TIMING OFF) SELECT abalance FROM pgbench_accounts WHERE aid = 1")
        found = re.search(r"Execution Time: ([\d.]+) ms", plan)
        if not found:
            raise RuntimeError(f"no execution time in EXPLAIN ANALYZE on the shadow: {plan[-300:]}")
        return shadow, float(found.group(1))
    except BaseException:
        shadow.cleanup()
        raise


class Console:
    """A connection to pgfront's admin console (dbname=pgfront), held open: switching arms costs no
    process start-up (a psql) while pgbench runs."""

    def __init__(self, port: int) -> None:
        import psycopg

        self.conn = psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="pgfront",
                                    sslmode="disable", gssencmode="disable", connect_timeout=10, autocommit=True)

    def query(self, sql: str) -> list[dict[str, str]]:
        """One statement in the simple query protocol (the console's); its rows as text."""
        from psycopg import pq

        res = self.conn.pgconn.exec_(sql.encode())
        if res.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
            raise RuntimeError(f"{sql} failed: {(res.error_message or b'').decode(errors='replace').strip()}")
        cols = [(res.fname(i) or b"").decode() for i in range(res.nfields)]
        return [{c: (res.get_value(r, i) or b"").decode() for i, c in enumerate(cols)} for r in range(res.ntuples)]

    def mirror_counters(self) -> dict[str, dict[str, str]]:
        """SHOW MIRRORS: each mirror target's row, by target name."""
        return {row["target"]: row for row in self.query("SHOW MIRRORS")}

    def switch(self, rules_path: Path, arm: str) -> None:
        """Make `arm`'s rules pgfront's rules: write the file, RELOAD, and check SHOW RULES."""
        rules_path.write_text(RULES[arm])
        self.query("RELOAD")
        names = [r.get("name") for r in self.query("SHOW RULES")]
        if names != RULE_NAMES[arm]:
            raise RuntimeError(f"after RELOAD for {arm!r} the rules are {names}, not {RULE_NAMES[arm]}")

    def close(self) -> None:
        self.conn.close()


def runner_pid(pid: int) -> int | None:
    """The worker's shadow runner process (its child running proxy.shadow.mirror_process)."""
    for p in procstat.tree(pid)[1:]:
        try:
            if b"proxy.shadow.mirror_process" in Path(f"/proc/{p}/cmdline").read_bytes():
                return p
        except OSError:
            continue
    return None


def _policy(pid: int | None) -> str:
    """A process's scheduling policy and niceness, e.g. "SCHED_IDLE, nice 10"."""
    if pid is None:
        return "gone"
    try:
        names = {getattr(os, n): n for n in ("SCHED_OTHER", "SCHED_BATCH", "SCHED_IDLE", "SCHED_FIFO", "SCHED_RR")
                 if hasattr(os, n)}
        return f"{names.get(os.sched_getscheduler(pid), '?')}, nice {os.getpriority(os.PRIO_PROCESS, pid)}"
    except OSError:
        return "unknown"


def calibrate(console: Console, t: MirrorPgfront, mode: str, clients: int) -> float:
    """The most TPS of two closed-loop (no -R) runs of pgbench -S with no rule: saturation."""
    console.switch(t.rules_path, "off")
    best = 0.0
    for _ in range(2):
        res = pgbench.run(t.port, pgbench.Load(mode=mode, clients=clients, threads=2), CALIBRATE_S)
        if not res.ok or res.tps is None:
            raise RuntimeError(f"calibration: pgbench failed: {res.error}")
        best = max(best, res.tps)
    return best


@contextlib.contextmanager
def realtime(on: bool, pg_pid: int | None, worker: int) -> Iterator[None]:
    """With `on`: SCHED_RR (priority 1) for this process's thread (pgbench, started from it, inherits it),
    the PostgreSQL postmaster (the backends it starts from now on inherit it) and every thread of the
    pgfront worker, for the timetable's run; SCHED_OTHER again after. The shadow runner process (which
    leaves a real-time policy it is handed, see `mirror_process.lower_priority`) and the shadow stay under
    SCHED_IDLE. On a machine shared with other jobs, these then wait for no one else's time slice: the
    latency measured is pgfront's, the mirror's included, not the other jobs'."""
    if not on:
        yield
        return
    tids = [0, *([pg_pid] if pg_pid else [])]
    with contextlib.suppress(OSError):
        tids += [int(x) for x in os.listdir(f"/proc/{worker}/task")]
    done: list[int] = []
    try:
        for tid in tids:
            try:
                os.sched_setscheduler(tid, os.SCHED_RR, os.sched_param(1))
            except PermissionError as e:
                raise RuntimeError("--realtime needs root or CAP_SYS_NICE (SCHED_RR)") from e
            except ProcessLookupError:
                continue
            done.append(tid)
        yield
    finally:
        for tid in done:
            with contextlib.suppress(OSError):
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


def drive(console: Console, t: MirrorPgfront, mode: str, clients: int, rate: float, orders: list[list[str]],
          seconds: float, pg_pid: int | None, rt: bool = False) -> tuple[list[Segment], str]:
    """One pgbench -S run at `rate` through t, the arms switched every `seconds` in `orders` (a round each,
    the first one the warm-up) on a fixed timetable; the segments, with their transactions' latencies
    read from pgbench's per-transaction log. Returns the segments and pgbench's output."""
    assert t.pid
    runner = runner_pid(t.pid)
    if runner is None:
        raise RuntimeError(f"{t.label} has no shadow runner process")
    plan = [(i, arm) for i, order in enumerate(orders) for arm in order]
    total = LEAD_S + len(plan) * seconds + 1  # pgbench's -T: the timetable, and a second to spare
    work = Path(tempfile.mkdtemp(prefix="pgfront-mirror-bench-"))
    env = {**os.environ, "PGCONNECT_TIMEOUT": "10", "PGSSLMODE": "disable", "PGGSSENCMODE": "disable"}
    args = [pgbench.PGBENCH, "-h", "127.0.0.1", "-p", str(t.port), "-U", "postgres", "-n", "-c", str(clients),
            "-j", "2", "-T", str(round(total)), "-M", mode, "-R", str(rate), "-b", "select-only", "-l",
            f"--log-prefix={work / 'txn'}", "postgres"]
    segments: list[Segment] = []
    try:
        with realtime(rt, pg_pid, t.pid):
            console.switch(t.rules_path, plan[0][1])
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work,
                                    env=env)
            t0 = time.time() + LEAD_S  # connections made, the first arm's rules in force
            roots = [t.pid, proc.pid, *([pg_pid] if pg_pid else [])]
            try:
                for k, (i, arm) in enumerate(plan):
                    at = t0 + k * seconds
                    if k:  # the first arm was switched to before pgbench started
                        time.sleep(max(0.0, at - time.time()))
                    switch = time.time()
                    if k:
                        console.switch(t.rules_path, arm)
                    seg = Segment(i, arm, switch, time.time())
                    if segments:
                        _close(segments[-1], switch, t.pid, runner, roots)
                    seg.worker_cpu_s, seg.runner_cpu_s = procstat.run_seconds(t.pid), procstat.run_seconds(runner)
                    seg.machine_busy, seg.others = procstat.machine_busy_seconds(), _own_cpu(roots)
                    segments.append(seg)
                    if proc.poll() is not None:
                        break
                time.sleep(max(0.0, t0 + len(plan) * seconds - time.time()))
                _close(segments[-1], time.time(), t.pid, runner, roots)
                out, _ = proc.communicate(timeout=total + 30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"pgbench failed: {out.strip()[-300:]}")
        _latencies(segments, str(work / "txn"))
        return segments, out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _close(seg: Segment, end: float, pid: int, runner: int, roots: list[int]) -> None:
    """A segment ends at `end`: its CPU figures become differences."""
    seg.end = end
    seg.worker_cpu_s = procstat.run_seconds(pid) - seg.worker_cpu_s
    seg.runner_cpu_s = procstat.run_seconds(runner) - seg.runner_cpu_s
    busy = procstat.machine_busy_seconds() - seg.machine_busy
    seg.machine_busy = busy / (end - seg.start)
    seg.others = max(0.0, busy - (_own_cpu(roots) - seg.others)) / (end - seg.start)


def _own_cpu(roots: list[int]) -> float:
    """CPU seconds of the benchmark's processes: the trees of `roots`, and this process."""
    return sum(procstat.tree_cpu_seconds(p) for p in roots) + procstat.cpu_seconds(os.getpid())


def _latencies(segments: list[Segment], prefix: str) -> None:
    """Each transaction to the segment its scheduled start (its end less its latency, counted by pgbench
    from the scheduled start with -R) falls in, unless within GUARD_S of the segment's start or TAIL_S
    of its end; then each segment's percentiles."""
    starts = [s.start for s in segments]
    lats: list[list[int]] = [[] for _ in segments]
    for path in glob.glob(prefix + ".*"):
        with open(path) as f:
            for line in f:
                parts = line.split()
                # client_id transaction_no latency_us script_no epoch epoch_us lag_us
                if len(parts) < 6 or not parts[2].isdigit():
                    continue
                lat = int(parts[2])
                scheduled = int(parts[4]) + int(parts[5]) / 1e6 - lat / 1e6
                k = bisect.bisect_right(starts, scheduled - GUARD_S) - 1
                if k >= 0 and scheduled < segments[k].end - TAIL_S:
                    lats[k].append(lat)
    for seg, values in zip(segments, lats, strict=True):
        values.sort()
        seg.latencies = values
        seg.transactions = len(values)
        if values:
            seg.p50_ms, seg.p95_ms, seg.p99_ms = (pgbench.percentile(values, q) / 1000 for q in (0.50, 0.95, 0.99))


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile)."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def pooled_percentile(parts: list[tuple[list[int], int]], q: float) -> float:
    """The nearest-rank percentile q of the union of ascending lists, each counted `times` times (as
    `pgbench.percentile` on the merged list), by a binary search on the value: no merging or sorting."""
    total = sum(len(values) * times for values, times in parts)
    if not total:
        return float("nan")
    rank = min(total - 1, max(0, round(q * (total - 1)))) + 1  # values at or below it
    lo, hi = min(v[0] for v, _ in parts if v), max(v[-1] for v, _ in parts if v)
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(bisect.bisect_right(values, mid) * times for values, times in parts) >= rank:
            hi = mid
        else:
            lo = mid + 1
    return float(lo)


def pooled_ratios(rounds: list[dict[str, Segment]], seed: int) -> dict:
    """Per pair of arms, the ratio of the percentiles of all their counted transactions (each arm's
    spread evenly over the same stretch of time, so over the same mix of the machine's conditions), with
    a 95% interval from a bootstrap over the rounds (BOOTSTRAP resamples)."""
    rng = random.Random(seed)
    draws = [Counter(rng.randrange(len(rounds)) for _ in rounds) for _ in range(BOOTSTRAP)]
    out: dict = {}
    for q, name in ((0.95, "p95"), (0.50, "p50")):
        def pct(arm: str, picks: Counter[int] | None = None, q: float = q) -> float:
            if picks is None:
                return pooled_percentile([(v[arm].latencies, 1) for v in rounds], q)
            return pooled_percentile([(rounds[i][arm].latencies, n) for i, n in picks.items()], q)

        whole = {a: pct(a) for a in ARMS}
        boot = [{a: pct(a, d) for a in ARMS} for d in draws]
        for a, b in RATIOS:
            ratios = sorted(x[a] / x[b] for x in boot)
            lo, hi = ratios[int(0.025 * (len(ratios) - 1))], ratios[int(0.975 * (len(ratios) - 1))]
            out.setdefault(f"{a}/{b}", {})[name] = {"ratio": whole[a] / whole[b], "lo": lo, "hi": hi}
        for a in ARMS:
            out.setdefault("ms", {}).setdefault(a, {})[name] = whole[a] / 1000
    return out


def summarize(segments: list[Segment], seed: int = 0) -> dict:
    """Per arm the medians over the rounds; per pair of arms the rounds' own ratios' quartiles, and the
    ratios of the pooled percentiles."""
    by_round: dict[int, dict[str, Segment]] = {}
    for s in segments:
        if s.round > 0 and s.transactions:
            by_round.setdefault(s.round, {})[s.arm] = s
    rounds = [v for v in by_round.values() if all(a in v for a in ARMS)]
    if not rounds:
        raise RuntimeError("no complete round was measured")
    fields = ("p50_ms", "p95_ms", "p99_ms", "transactions", "worker_cpu_us_per_txn", "runner_cpu_ms_per_s",
              "machine_busy", "others")
    arms = {a: {f: statistics.median(getattr(v[a], f) for v in rounds) for f in fields} for a in ARMS}
    for a in ARMS:  # over all its transactions, the worker's CPU per transaction
        mine = [v[a] for v in rounds]
        arms[a]["worker_cpu_us_per_txn_all"] = sum(s.worker_cpu_s for s in mine) / sum(s.transactions for s in mine) * 1e6
    ratios = {}
    for a, b in RATIOS:
        entry = {}
        for f in ("p95_ms", "p50_ms", "p99_ms"):
            q1, med, q3 = quartiles([getattr(v[a], f) / getattr(v[b], f) for v in rounds])
            entry[f[:3]] = {"median": med, "q1": q1, "q3": q3}
        ratios[f"{a}/{b}"] = entry
    quiet = [v for v in rounds if max(s.others for s in v.values()) < QUIET]
    quiet_ratios = {f"{a}/{b}": quartiles([v[a].p95_ms / v[b].p95_ms for v in quiet]) for a, b in RATIOS} if quiet else {}
    return {"rounds": len(rounds), "arms": arms, "ratios": ratios, "pooled": pooled_ratios(rounds, seed),
            "quiet_rounds": len(quiet), "quiet_p95_ratios": quiet_ratios,
            "goal_met": ratios["/".join(RATIOS[0])]["p95"]["median"] <= GOAL}


def run_mode(mode: str, t: MirrorPgfront, console: Console, *, rounds: int, seconds: float, clients: int,
             rate: float | None, load_share: float, seed: int, pg_pid: int | None, rt: bool = False) -> dict:
    max_tps = calibrate(console, t, mode, clients)
    if rate is None:
        rate = max(100.0, round(max_tps * load_share, -2))
    log(f"{mode}: {max_tps:,.0f} TPS at saturation (no rule); pgbench -R {rate:,.0f} ({rate / max_tps:.0%} of it), "
        f"{rounds} rounds of {len(ARMS)} x {seconds:g} s")
    rng = random.Random(seed)
    orders = [list(ARMS)]  # round 0: the warm-up
    for _ in range(rounds):
        order = list(ARMS)
        rng.shuffle(order)
        orders.append(order)
    before = console.mirror_counters().get("slow", {})
    segments, out = drive(console, t, mode, clients, rate, orders, seconds, pg_pid, rt)
    after = console.mirror_counters().get("slow", {})
    tps = re.search(r"^tps = ([\d.]+)", out, re.M)
    for i in range(1, len(orders)):
        got = {s.arm: s for s in segments if s.round == i and s.transactions}
        if len(got) == len(ARMS):
            log(f"{mode} round {i}/{rounds} ({','.join(orders[i])}): p95 "
                + "  ".join(f"{a} {got[a].p95_ms:.3f}" for a in ARMS)
                + " ms  " + "  ".join(f"{a}/{b} {got[a].p95_ms / got[b].p95_ms:.3f}x" for a, b in RATIOS[:2])
                + f"  others {statistics.mean(s.others for s in got.values()):.2f} cores")
    return summarize(segments, seed) | {
        "max_tps": max_tps, "rate": rate, "load_share": rate / max_tps, "tps": float(tps.group(1)) if tps else None,
        "orders": orders,
        # over this mode (calibration and warm-up included); "queued" is a gauge: its value at the end
        "mirror": {c: int(after.get(c, 0)) - (0 if c == "queued" else int(before.get(c, 0))) for c in COUNTERS},
        "segments": [{k: v for k, v in asdict(s).items() if k != "latencies"} | {"worker_cpu_us_per_txn": s.worker_cpu_us_per_txn,
                                  "runner_cpu_ms_per_s": s.runner_cpu_ms_per_s} for s in segments],
    }


def _ratio(q: dict) -> str:
    return f"{q['median']:.3f}x (IQR {q['q1']:.3f}-{q['q3']:.3f})"


def print_mode(mode: str, m: dict, settings: dict) -> None:
    if "error" in m:
        print(f"\n{mode}: failed: {m['error']}")
        return
    rt = ", PostgreSQL, the worker and pgbench under SCHED_RR" if settings.get("realtime") else ""
    print(f"\n{mode}: pgbench -S -M {mode} -c {settings['clients']} -j 2 -R {m['rate']:g} ({m['load_share']:.0%} of the "
          f"{m['max_tps']:,.0f} TPS at saturation; {m['tps'] or 0:,.0f} TPS done), {m['rounds']} rounds of the "
          f"{len(ARMS)} arms in random order, {settings['seconds']:g} s each, the first {GUARD_S:g} s and last {TAIL_S:g} s of each left out; "
          f"medians over the rounds{rt}")
    print(f"  {'':5} {'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'txns':>6} {'worker us/txn':>13} "
          f"{'runner ms/s':>11} {'machine':>7} {'others':>6}")
    for a in ARMS:
        v = m["arms"][a]
        print(f"  {a:5} {v['p50_ms']:7.3f} {v['p95_ms']:7.3f} {v['p99_ms']:7.3f} {v['transactions']:6,.0f} "
              f"{v['worker_cpu_us_per_txn_all']:13.1f} {v['runner_cpu_ms_per_s']:11.1f} {v['machine_busy']:7.2f} "
              f"{v['others']:6.2f}")
    for key, label in (("on/off", "mirroring vs no rule (the goal)"), ("on/rule", "mirroring alone"),
                       ("rule/off", "matching the rule alone")):
        r = m["ratios"][key]
        print(f"  {key:8} p95 {_ratio(r['p95'])}  p50 {_ratio(r['p50'])}  p99 {_ratio(r['p99'])}  {label}")
    pooled = m["pooled"]
    print("  pooled (the percentile of all of an arm's transactions; 95% bootstrap interval over the rounds): "
          + ", ".join(f"{a} p95 {pooled['ms'][a]['p95']:.3f} ms" for a in ARMS))
    for key in ("on/off", "on/rule", "rule/off"):
        r = pooled[key]
        print(f"  {key:8} p95 {r['p95']['ratio']:.3f}x ({r['p95']['lo']:.3f}-{r['p95']['hi']:.3f})  "
              f"p50 {r['p50']['ratio']:.3f}x ({r['p50']['lo']:.3f}-{r['p50']['hi']:.3f})")
    if m["quiet_p95_ratios"]:
        print(f"  {m['quiet_rounds']} quiet rounds (other processes below {QUIET:g} cores throughout): p95 "
              + ", ".join(f"{k} {q[1]:.3f}x (IQR {q[0]:.3f}-{q[2]:.3f})" for k, q in m["quiet_p95_ratios"].items()))
    else:
        print(f"  no quiet round (other processes below {QUIET:g} cores throughout)")
    med = m["ratios"]["on/off"]["p95"]["median"]
    print(f"  goal: p95 within {GOAL - 1:.0%}: {'met' if m['goal_met'] else 'NOT met'} ({med - 1:+.1%})")
    mc = m["mirror"]
    print("  mirror 'slow' over this mode: " + ", ".join(f"{c} {mc[c]:,}" for c in COUNTERS))


def main(modes: list[str], *, rounds: int = 150, seconds: float = 0.6, clients: int = 8, rate: float | None = None,
         load_share: float = 0.25, seed: int = 16, realtime: bool = False, json_path: Path | None = None) -> int:
    if rounds < 1 or seconds < GUARD_S + TAIL_S + 0.2 or clients < 1 or (rate is not None and rate <= 0) or not 0 < load_share <= 1:
        print(f"error: need --rounds >= 1, --seconds >= {GUARD_S + TAIL_S + 0.2:g}, --clients >= 1, --rate > 0, 0 < --load <= 1",
              file=sys.stderr)
        return 2
    settings = {"rounds": rounds, "seconds": seconds, "clients": clients, "threads": 2, "rate": rate,
                "load_share": load_share, "seed": seed, "realtime": realtime, "scale": SCALE, "guard_s": GUARD_S, "tail_s": TAIL_S, "lead_s": LEAD_S,
                "queue_size": QUEUE_SIZE, "shadow_sleep_s": SHADOW_SLEEP_S, "goal_p95_ratio": GOAL}
    results: dict = {"settings": settings, "modes": {}, "loadavg_at_start": round(os.getloadavg()[0], 2)}
    work = Path(tempfile.mkdtemp(prefix="pgfront-mirror-"))
    work.chmod(0o755)  # PostgreSQL runs as `postgres` when we are root, with its directory in here
    pg: TempPostgres | None = None
    shadow: TempPostgres | None = None
    t: MirrorPgfront | None = None
    console: Console | None = None
    failed = False
    try:
        pg = TempPostgres(settings={"shared_buffers": "512MB", "max_parallel_workers_per_gather": "0"},
                          base_dir=str(work)).start()
        results["machine"] = machine.info(pg.bin)
        log(f"PostgreSQL on port {pg.port}; pgbench -i -s {SCALE}")
        pgbench.initialize(pg.port, SCALE)
        shadow, results["shadow_read_ms"] = make_shadow(work)
        log(f"shadow PostgreSQL on port {shadow.port} (SCHED_IDLE): one pgbench -S read takes "
            f"{results['shadow_read_ms']:.1f} ms there")
        rules_path = work / "mirror-rules.toml"
        rules_path.write_text(RULES["off"])
        t = MirrorPgfront("mirror", "pgfront with [mirror.slow]", rules_path,
                          f'[mirror.slow]\nurl = "{shadow.dsn()}"\nqueue_size = {QUEUE_SIZE}\n')
        t.start(Env(pg, None, work))
        assert t.pid
        runner = runner_pid(t.pid)
        results["runner_policy"] = _policy(runner)
        log(f"{t.label}: port {t.port}, pid {t.pid}, shadow runner pid {runner} ({results['runner_policy']})")
        pgbench.run(pg.port, pgbench.Load(), 1)  # warm the buffer cache
        console = Console(t.port)
        for mode in modes:
            try:
                results["modes"][mode] = run_mode(mode, t, console, rounds=rounds, seconds=seconds, clients=clients,
                                                  rate=rate, load_share=load_share, seed=seed,
                                                  pg_pid=pg.proc.pid if pg.proc else None, rt=realtime)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                failed = True
                results["modes"][mode] = {"error": str(e)}
                log(f"{mode}: {e}")
        results["mirror_counters"] = console.mirror_counters()
    except (RuntimeError, OSError, Unavailable, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        failed = True
    finally:
        if console is not None:
            console.close()
        if t is not None:
            t.stop()
        if pg:
            pg.cleanup()
        if shadow:
            shadow.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    results["loadavg_at_end"] = round(os.getloadavg()[0], 2)
    print(f"load average at the start {results['loadavg_at_start']}, at the end {results['loadavg_at_end']}")
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
