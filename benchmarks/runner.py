"""Runs every scenario against every target and collects the numbers into one results dict.

Set-up is self-contained: a throwaway PostgreSQL loaded by `pgbench -i`, a throwaway Redis, and
each target on a free port. Scenarios run one after the other, each against all targets in turn,
so neighbouring numbers in the table were measured close together in time.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

from proxy.devdb import TempPostgres, TempRedis

from . import machine, pgbench, procstat
from .idle import Holder
from .report import CACHE_SIDE_BY_SIDE
from .scenarios import QUICK_SCENARIOS, Scenario, by_key
from .targets import CONFIGS, Env, Pgfront, Target, Unavailable, all_targets

RESULTS_DIR = Path(__file__).resolve().parent / "results"

NOTES = [
    "The machine's cores are shared: pgbench itself (2 threads), PostgreSQL and the proxy under test all "
    "compete for the same CPUs, so every proxy's CPU cost also slows the database and the client; "
    "absolute numbers are far below dedicated hardware and ratios are the meaningful part.",
    "TPS is pgbench's own figure (excluding connection set-up, except for churn), the best of the "
    "rounds a cell's time is split into; p50/p99 come from that round's per-transaction logs.",
    "CPU us/txn: user+system CPU time of the target's processes during the run divided by "
    "transactions (for direct Postgres: the postmaster and all backends; for proxies: the proxy only).",
    "mem: proportional set size (PSS) of the target's processes while the idle clients are held.",
    "PostgreSQL runs with fsync off, shared_buffers 512MB and no parallel query (8 clients already "
    "fill the cores); every target talks to the same cluster over TCP on 127.0.0.1.",
]


@dataclass
class Options:
    quick: bool = False
    seconds: float | None = None  # pgbench time per cell, split over `rounds` runs
    rounds: int | None = None  # the best run counts: less exposed to other processes' bursts
    scale: int | None = None
    scenarios: list[str] | None = None
    targets: list[str] | None = None
    idle_clients: int | None = None  # memory-per-idle-client measurement
    idle_backend_cap: int | None = None  # ...when each idle client costs a PostgreSQL backend
    workers: bool = True  # the 1 vs 2 workers scaling run
    cache_config: Path = CONFIGS / "pgfront-cache.toml"
    clients: int = 8
    threads: int = 2
    keep: bool = False  # keep the scratch directory (logs, configs) for a look afterwards

    def resolve(self) -> Options:
        q = self.quick
        self.seconds = self.seconds or (1 if q else 4)
        self.rounds = self.rounds or (1 if q else 2)
        self.scale = self.scale or (1 if q else 10)
        self.scenarios = self.scenarios or (QUICK_SCENARIOS if q else None)
        self.idle_clients = self.idle_clients or (2000 if q else 10000)
        self.idle_backend_cap = self.idle_backend_cap or 2000
        return self


_T0 = time.monotonic()


def log(msg: str) -> None:
    """Progress on stderr, so --json output on stdout stays clean."""
    print(f"[{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def na(reason: str) -> dict[str, str]:
    return {"na": reason}


def _flag_missing_cache_hits(cell: dict, direct: dict) -> None:
    """A cache that serves hits beats PostgreSQL by a wide margin on the aggregate: say so if not."""
    if "tps" in cell and "tps" in direct and cell["tps"] < 2 * direct["tps"]:
        cell["note"] = "no sign of cache hits: TPS is close to direct Postgres"


class Bench:
    def __init__(self, opts: Options) -> None:
        self.opts = opts.resolve()
        self.scenarios: list[Scenario] = by_key(self.opts.scenarios)
        targets = all_targets()
        if self.opts.targets:
            known = {t.key for t in targets}
            unknown = [k for k in self.opts.targets if k not in known]
            if unknown:
                raise ValueError(f"unknown target(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
            targets = [t for t in targets if t.key in self.opts.targets]
        self.targets: list[Target] = targets
        self.unavailable: dict[str, str] = {}
        self.hangs: dict[str, int] = {}  # target key -> pgbench runs that did not finish
        self.work = Path(tempfile.mkdtemp(prefix="pgfront-benchmarks-"))
        self.work.chmod(0o755)  # PgBouncer and Pgpool-II run as postgres and read their configs here
        self.pg: TempPostgres | None = None
        self.redis: TempRedis | None = None
        self.env: Env | None = None

    # -- set-up ---------------------------------------------------------------------------
    def setup(self) -> None:
        o = self.opts
        max_conn = max(1200, o.idle_backend_cap + 200)
        self.pg = TempPostgres(settings={"max_connections": str(max_conn), "shared_buffers": "512MB",
                                         "max_parallel_workers_per_gather": "0"},
                               base_dir=str(self.work)).start()
        log(f"PostgreSQL on port {self.pg.port}; pgbench -i -s {o.scale}")
        pgbench.initialize(self.pg.port, o.scale)
        try:
            self.redis = TempRedis().start()
        except RuntimeError as e:
            log(f"no Redis: {e}")
        self.env = Env(self.pg, self.redis, self.work, o.cache_config)
        for t in self.targets:
            try:
                t.start(self.env)
                log(f"{t.label}: port {t.port}")
            except Unavailable as e:
                self.unavailable[t.key] = str(e)
                log(f"{t.label}: not available: {e}")

    def teardown(self) -> None:
        for t in self.targets:
            t.stop()
        if self.redis:
            self.redis.cleanup()
        if self.pg:
            self.pg.cleanup()
        if self.opts.keep:
            log(f"kept scratch directory {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- one cell -------------------------------------------------------------------------
    def _dead(self, t: Target) -> str | None:
        svc = t.service
        if t.is_proxy and (svc is None or svc.proc is None or svc.proc.poll() is not None):
            return f"{t.label} is not running: {svc.log_tail() if svc else 'never started'}"
        return None

    def measure(self, sc: Scenario, t: Target, rounds: int | None = None) -> dict:
        if t.key in self.unavailable:
            return na(f"not available: {self.unavailable[t.key]}")
        if sc.key in t.skip:
            return na(t.skip[sc.key])
        dead = self._dead(t)
        if dead:
            return na(dead)
        load = replace(sc.load, clients=self.opts.clients, threads=self.opts.threads)
        cell: dict = {}
        pid = t.pid
        with ExitStack() as stack:
            if sc.idle_connections:
                holder = stack.enter_context(Holder(t.port, sc.idle_connections))
                cell["idle_held"] = holder.opened
                if holder.opened < sc.idle_connections:
                    cell["note"] = f"held {holder.opened} of {sc.idle_connections} idle clients: {holder.error}"
            cpu0 = procstat.tree_cpu_seconds(pid) if pid else 0.0
            res, total = self._best_of_rounds(t.port, load, rounds or self.opts.rounds or 1)
            cpu1 = procstat.tree_cpu_seconds(pid) if pid else 0.0
            if sc.idle_connections and pid:
                cell["mem_bytes"] = procstat.tree_pss_bytes(pid)
        if not res.ok:
            dead = self._dead(t)
            if res.extra.get("stuck"):
                self._after_hang(t)
            return na(t.explain(f"pgbench failed: {res.error}") + (f" ({dead})" if dead else ""))
        cell.update(tps=res.tps, p50_ms=res.p50_ms, p99_ms=res.p99_ms, transactions=total)
        if pid and total:
            cell["cpu_us_per_txn"] = (cpu1 - cpu0) / total * 1e6
        return cell

    def _after_hang(self, t: Target) -> None:
        """A target that stopped answering is restarted once; if it hangs again, its remaining cells
        are skipped, so one stuck target cannot stretch the run by a timeout per cell."""
        self.hangs[t.key] = self.hangs.get(t.key, 0) + 1
        if self.hangs[t.key] >= 2 or not t.is_proxy:
            self.unavailable[t.key] = "stopped measuring: pgbench hung twice on this target"
            return
        log(f"{t.label} stopped answering: restarting it")
        t.stop()
        try:
            assert self.env
            t.start(self.env)
        except Unavailable as e:
            self.unavailable[t.key] = f"did not restart after hanging: {e}"

    def _best_of_rounds(self, port: int, load: pgbench.Load, rounds: int) -> tuple[pgbench.Result, int]:
        """The highest-TPS of `rounds` pgbench runs, and the transactions of all of them."""
        each = max(1.0, (self.opts.seconds or 1) / (self.opts.rounds or 1))
        best: pgbench.Result | None = None
        total = 0
        for _ in range(rounds):
            res = pgbench.run(port, load, each)
            if not res.ok:
                return res, 0
            total += res.transactions
            if best is None or (res.tps or 0) > (best.tps or 0):
                best = res
        assert best is not None
        return best, total

    # -- extra measurements ---------------------------------------------------------------
    def _client_backends(self) -> int:
        assert self.pg
        return int(self.pg.psql("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"))

    def idle_memory(self, t: Target) -> dict:
        """RSS growth of the target per idle client connection (startup done, no query)."""
        if t.key in self.unavailable:
            return na(f"not available: {self.unavailable[t.key]}")
        dead = self._dead(t)
        if dead or not t.pid:
            return na(dead or "no process to measure")
        wanted = self.opts.idle_clients or 0
        before = self._client_backends()
        with Holder(t.port, 50) as probe:
            per_client_backend = probe.opened > 0 and self._client_backends() - before >= probe.opened // 2
        out: dict = {"requested": wanted}
        n = wanted
        if per_client_backend and n > (self.opts.idle_backend_cap or n):
            n = self.opts.idle_backend_cap or n
            out["note"] = (f"{t.label} keeps one PostgreSQL backend per idle client, so this was measured "
                           f"with {n} clients, not {wanted}")
        time.sleep(0.5)
        rss0 = procstat.tree_rss_bytes(t.pid)
        with Holder(t.port, n, timeout=300) as h:
            time.sleep(1.0)
            rss1 = procstat.tree_rss_bytes(t.pid)
        if h.opened == 0:
            return na(f"no idle client could connect: {h.error}")
        if h.opened < n:
            out["note"] = (out.get("note", "") + f" only {h.opened} of {n} connected ({h.error})").strip()
        out.update(clients=h.opened, rss_before=rss0, rss_after=rss1, bytes_per_client=(rss1 - rss0) / h.opened,
                   backend_per_client=per_client_backend)
        return out

    def workers_scaling(self) -> dict:
        """pgbench -S (simple) through pgfront passthrough with 1 and with 2 workers. Runs alternate
        between the two, so a change in the machine's load hits both alike; each side's best counts."""
        one = next((t for t in self.targets if t.key == "pgfront"), None)
        if one is None or one.key in self.unavailable:
            return na("pgfront passthrough target not selected or not available")
        sc = by_key(["select-simple"])[0]
        two = Pgfront("pgfront-2w", "pgfront passthrough, 2 workers", "passthrough", workers=2)
        try:
            assert self.env
            two.start(self.env)
        except Unavailable as e:
            return na(f"2 workers: {e}")
        best: dict[int, dict] = {}
        try:
            for _ in range(max(2, self.opts.rounds or 1)):
                for n, t in ((1, one), (2, two)):
                    m = self.measure(sc, t, rounds=1)
                    if "na" in m:
                        return na(f"{n} worker(s): {m['na']}")
                    if n not in best or m["tps"] > best[n]["tps"]:
                        best[n] = m
        finally:
            two.stop()
        return {"workers_1": best[1], "workers_2": best[2], "ratio": best[2]["tps"] / best[1]["tps"]}

    def _run_matrix(self, cells: dict) -> None:
        for sc in self.scenarios:
            row = cells.setdefault(sc.key, {})
            for t in self.targets:
                if t.only is not None and sc.key not in t.only:
                    continue
                row[t.key] = cell = self.measure(sc, t)
                if sc.cache and t.key.startswith("pgfront-cache"):
                    _flag_missing_cache_hits(cell, row.get("direct", {}))
                log(f"{sc.key:16} {t.key:14} " + (f"{cell['tps']:>10,.0f} tps" if "tps" in cell
                                                   else f"n/a: {cell['na']}"))

    def _run_extras(self, extras: dict) -> None:
        for key in ("pgfront", "pgbouncer"):
            t = next((x for x in self.targets if x.key == key), None)
            if t is not None:
                extras.setdefault("idle_memory", {})[key] = m = self.idle_memory(t)
                log(f"idle memory {key}: " + (f"{m['bytes_per_client']:,.0f} B/client over {m['clients']}"
                                              if "na" not in m else m["na"]))
        if self.opts.workers:
            extras["workers"] = w = self.workers_scaling()
            log("workers 2 vs 1: " + (f"{w['ratio']:.2f}x" if "ratio" in w else w["na"]))
        for scenario, key in CACHE_SIDE_BY_SIDE.items():
            if any(sc.key == scenario for sc in self.scenarios):
                extras[key] = c = self.side_by_side(scenario, "pgfront-cache", "pgpool")
                log(f"cache hits vs Pgpool-II, {scenario}, alternating: "
                    + (f"{c['ratio']:.2f}x" if "ratio" in c else c["na"]))

    def side_by_side(self, scenario: str, key: str, base: str, rounds: int = 5) -> dict:
        """Two targets measured in turn, `rounds` times each after one warm-up run each, on one scenario:
        a change in the machine's load between two cells of the table hits both alike here. The ratio
        is of the medians (a best-of favours whichever target is noisier)."""
        targets = {t.key: t for t in self.targets}
        if key not in targets or base not in targets:
            return na(f"{key} or {base} not selected")
        sc = by_key([scenario])[0]
        runs: dict[str, list[int]] = {key: [], base: []}
        for i in range(rounds + 1):
            for k in (base, key):
                m = self.measure(sc, targets[k], rounds=1)
                if "na" in m:
                    return na(f"{k}: {m['na']}")
                if i:  # the first run of each only warms caches and connections
                    runs[k].append(round(m["tps"]))
        mid = {k: statistics.median(v) for k, v in runs.items()}
        return {"target": key, "base": base, "runs": runs, "tps": mid[key], "base_tps": mid[base],
                "ratio": mid[key] / mid[base]}

    def _note_other_load(self, results: dict, started: float, busy0: float, own0: float) -> None:
        """Share of the machine's CPU that processes other than ours used during the run (every
        process we started has been waited for by now, so its CPU time is in our rusage)."""
        others = (procstat.machine_busy_seconds() - busy0) - (procstat.own_cpu_seconds() - own0)
        capacity = (time.monotonic() - started) * (os.cpu_count() or 1)
        share = max(0.0, others / capacity) if capacity else 0.0
        results["machine"]["other_processes_cpu_share"] = round(share, 3)
        if share > 0.05:
            results["notes"].insert(0, f"Other processes used {share:.0%} of the machine's CPU during this run, "
                                       "so the numbers are lower and noisier than on an idle machine.")

    # -- everything -----------------------------------------------------------------------
    def run(self) -> dict:
        started = time.monotonic()
        o = self.opts
        results: dict = {
            "settings": {"quick": o.quick, "seconds": o.seconds, "rounds": o.rounds, "scale": o.scale,
                         "clients": o.clients, "threads": o.threads},
            "scenarios": [{"key": s.key, "label": s.label} for s in self.scenarios],
            "targets": [{"key": t.key, "label": t.label, **({"only": sorted(t.only)} if t.only else {})}
                        for t in self.targets],
            "cells": {},
            "extras": {},
            "notes": list(NOTES),
        }
        load_before = os.getloadavg()[0]
        busy0, own0 = procstat.machine_busy_seconds(), procstat.own_cpu_seconds()
        try:
            self.setup()
            assert self.pg
            results["machine"] = machine.info(self.pg.bin)
            results["machine"]["loadavg_at_start"] = round(load_before, 2)
            pgbench.run(self.pg.port, pgbench.Load(), 1)  # warm the buffer cache
            self._run_matrix(results["cells"])
            self._run_extras(results["extras"])
        finally:
            self.teardown()
        for entry in results["targets"]:  # after the run: a target may have been given up on midway
            entry["available"] = entry["key"] not in self.unavailable
            if not entry["available"]:
                entry["reason"] = self.unavailable[entry["key"]]
        if "machine" in results:
            results["machine"]["loadavg_at_end"] = round(os.getloadavg()[0], 2)
            self._note_other_load(results, started, busy0, own0)
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        return results
