"""`python3 -m benchmarks run|profile|hotpath|tracing|mirror|replicas`: the command line of the benchmark harness."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console

from . import report
from .runner import RESULTS_DIR, Bench, Options
from .scenarios import SCENARIOS
from .targets import CONFIGS, all_targets

HOT_MODES = ["simple", "extended", "prepared"]  # pgbench -S through the relay
HIT_MODES = ["hit-simple", "hit-extended", "hit-prepared"]  # a read the cache answers
# pgbench -S in transaction pooling, without (pool-*) and with (route-*) a replica to route reads to
ROUTE_MODES = ["pool-simple", "pool-extended", "route-simple", "route-extended"]


def _keys(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [k for v in values for k in v.split(",") if k]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python3 -m benchmarks", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    epilog = ("scenarios: " + ", ".join(s.key for s in SCENARIOS)
              + "\ntargets: " + ", ".join(t.key for t in all_targets()))
    run = sub.add_parser("run", help="run the side-by-side benchmark", epilog=epilog,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--quick", action="store_true", help="fewer scenarios, 1 s runs, scale 1 (under a minute)")
    run.add_argument("--json", action="store_true", help="print the results as JSON instead of tables")
    run.add_argument("--scenarios", nargs="+", action="extend", metavar="KEY", help="only these (space or comma separated)")
    run.add_argument("--targets", nargs="+", action="extend", metavar="KEY", help="only these targets")
    run.add_argument("--seconds", type=float, help="length of each pgbench run (default 4, --quick 1)")
    run.add_argument("--rounds", type=int, help="split each cell's time into this many pgbench runs and "
                                                "keep the best (default 2, --quick 1)")
    run.add_argument("--scale", type=int, help="pgbench scale factor (default 10, --quick 1)")
    run.add_argument("--clients", type=int, default=8, help="pgbench clients (default 8)")
    run.add_argument("--threads", type=int, default=2, help="pgbench threads (default 2)")
    run.add_argument("--idle-clients", type=int, help="idle connections for the memory measurement "
                                                      "(default 10000, --quick 2000)")
    run.add_argument("--no-workers", action="store_true", help="skip the 1 vs 2 workers scaling run")
    run.add_argument("--cache-config", type=Path, default=CONFIGS / "pgfront-cache.toml",
                     help="config template for the pgfront + cache target")
    run.add_argument("--output-dir", type=Path, default=RESULTS_DIR,
                     help="where latest.json and latest.md go (default benchmarks/results)")
    run.add_argument("--keep", action="store_true", help="keep the scratch directory with configs and logs")
    run.set_defaults(func=cmd_run)
    prof = sub.add_parser("profile", help="profile pgfront (cProfile) under pgbench -S and print hot functions")
    prof.add_argument("--seconds", type=float, default=10)
    prof.add_argument("--mode", default="simple", choices=["simple", "extended", "prepared"])
    prof.add_argument("--rules", action="store_true", help="with the repo's default rules")
    prof.add_argument("--top", type=int, default=30)
    prof.set_defaults(func=cmd_profile)
    hot = sub.add_parser("hotpath", help="the relay's Python cost per query, in-process, without sockets")
    hot.add_argument("--mode", nargs="+", default=None, choices=[*HOT_MODES, *HIT_MODES, *ROUTE_MODES],
                     help="pgbench -S in each protocol, (hit-*) a read the cache answers, or (pool-*, route-*) "
                          "pgbench -S in transaction pooling without and with a replica; default: the three "
                          "protocols, and with --instructions the three cache hits too")
    hot.add_argument("-n", type=int, default=50_000, help="queries per timed round (default 50,000)")
    hot.add_argument("--profile", action="store_true", help="print cProfile's ranking of one round")
    hot.add_argument("--config", help="a pgfront config file: its rule files and [mirror.NAME] targets are "
                     "wired as a worker wires them (default: no rules, no cache)")
    hot.add_argument("--instructions", action="store_true",
                     help="count instructions per query with valgrind's callgrind instead of timing")
    hot.add_argument("--core", nargs="+", default=["compiled", "pure"], choices=["compiled", "pure"],
                     help="with --instructions: which relay cores to count (default both)")
    hot.add_argument("--tracing", type=float, metavar="RATIO",
                     help="with OpenTelemetry tracing on at this sample ratio, exporting to an OTLP receiver "
                          "run by this command (the export's cost is counted too)")
    hot.set_defaults(func=cmd_hotpath)
    tr = sub.add_parser("tracing", help="pgfront's CPU per query with OpenTelemetry tracing on vs off, "
                                        "under pgbench -S, alternating runs")
    tr.add_argument("--ratio", type=float, default=0.01, help="sample_ratio of the traced pgfront (default 0.01)")
    tr.add_argument("--rounds", type=int, default=5, help="runs of each target per mode (default 5)")
    tr.add_argument("--seconds", type=float, default=8, help="length of each pgbench run (default 8)")
    tr.add_argument("--clients", type=int, default=8, help="pgbench clients (default 8)")
    tr.add_argument("--rate", type=float, help="pgbench -R: a fixed rate of transactions per second, below "
                                               "saturation, where CPU per transaction is steadier (default: "
                                               "as fast as possible)")
    tr.add_argument("--mode", nargs="+", default=HOT_MODES, choices=HOT_MODES,
                    help="pgbench protocol modes (default all three)")
    tr.add_argument("--json", type=Path, metavar="PATH", help="also write the results here as JSON")
    tr.set_defaults(func=cmd_tracing)
    mi = sub.add_parser("mirror", help="client p50/p95 latency with every statement mirrored to a slow (50 ms) "
                                       "shadow vs the same rule never sampling vs no rule: one pgfront switched by "
                                       "RELOAD under one pgbench -S at a fixed rate below saturation, many short "
                                       "rounds of the three in random order")
    mi.add_argument("--rounds", type=int, default=150, help="rounds of the three arms per mode (default 150)")
    mi.add_argument("--seconds", type=float, default=0.6, help="each arm's time in a round (default 0.6)")
    mi.add_argument("--clients", type=int, default=8, help="pgbench clients (default 8)")
    mi.add_argument("--rate", type=float, help="pgbench -R: transactions per second in all (default: --load "
                                               "times the TPS measured at saturation first)")
    mi.add_argument("--load", type=float, default=0.25, help="the rate as a share of the TPS at saturation, when "
                                                             "--rate is not given (default 0.25)")
    mi.add_argument("--seed", type=int, default=16, help="seed of the rounds' random orders (default 16)")
    mi.add_argument("--realtime", action="store_true",
                    help="run PostgreSQL, the pgfront worker and pgbench under SCHED_RR during the measured runs "
                         "(root or CAP_SYS_NICE), the shadow and the mirror's runner process staying under "
                         "SCHED_IDLE: on a machine shared with other jobs, their time slices then do not decide "
                         "the p95")
    mi.add_argument("--mode", nargs="+", default=HOT_MODES, choices=HOT_MODES,
                    help="pgbench protocol modes (default all three)")
    mi.add_argument("--json", type=Path, metavar="PATH", help="also write the results here as JSON")
    mi.set_defaults(func=cmd_mirror)
    rp = sub.add_parser("replicas", help="read replicas (issue 15): the share of pgbench -S reads a replica serves, "
                                         "read-your-writes violations with replay paused and resumed, and "
                                         "routing's instructions per query")
    rp.add_argument("--mode", nargs="+", default=HOT_MODES, choices=HOT_MODES,
                    help="pgbench protocol modes for the share of reads (default all three)")
    rp.add_argument("--scale", type=int, default=10, help="pgbench scale factor (default 10)")
    rp.add_argument("--seconds", type=float, default=5, help="length of each pgbench run (default 5)")
    rp.add_argument("--rounds", type=int, default=2, help="runs of each pgfront per mode, alternating (default 2)")
    rp.add_argument("--clients", type=int, default=8, help="pgbench clients (default 8)")
    rp.add_argument("--rate", type=float, default=4000, help="pgbench -R for the share of reads: transactions per "
                                                             "second in all, below saturation, where CPU per "
                                                             "transaction is steadier (default 4000; 0: as fast as "
                                                             "possible)")
    rp.add_argument("--ryw-clients", type=int, default=32, help="read-your-writes clients (default 32)")
    rp.add_argument("--ryw-seconds", type=float, default=15, help="length of the read-your-writes run (default 15)")
    rp.add_argument("--pause", type=float, default=1.5, help="seconds replay stays paused each time (default 1.5)")
    rp.add_argument("--resume", type=float, default=1.5, help="seconds replay runs between pauses (default 1.5)")
    rp.add_argument("--instructions", nargs="*", default=["simple", "extended"], choices=["simple", "extended"],
                    help="protocols whose instructions per query callgrind counts (default both; none: skip)")
    rp.add_argument("--core", nargs="+", default=["compiled"], choices=["compiled", "pure"],
                    help="relay cores counted (default compiled)")
    rp.add_argument("--process", nargs="*", default=HOT_MODES, choices=HOT_MODES,
                    help="protocols for part (d): real pgfront processes under callgrind, the whole worker's "
                         "instructions per transaction (default all three; none: skip)")
    rp.add_argument("--process-transactions", type=int, default=2000,
                    help="pgbench transactions per counted run of part (d) (default 2000)")
    rp.add_argument("--json", type=Path, metavar="PATH", help="also write the results here as JSON")
    rp.set_defaults(func=cmd_replicas)
    return ap


def cmd_run(args: argparse.Namespace) -> int:
    opts = Options(quick=args.quick, seconds=args.seconds, rounds=args.rounds, scale=args.scale, scenarios=_keys(args.scenarios),
                   targets=_keys(args.targets), idle_clients=args.idle_clients, workers=not args.no_workers,
                   cache_config=args.cache_config, clients=args.clients, threads=args.threads, keep=args.keep)
    try:
        bench = Bench(opts)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        results = report.with_goals(bench.run())
    except (RuntimeError, OSError) as e:  # no cluster, no pgbench: nothing could be measured
        print(f"error: {e}", file=sys.stderr)
        return 1
    report.save(results, args.output_dir)
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        report.print_table(results, Console(width=220))
        print(f"results: {args.output_dir / 'latest.json'}, {args.output_dir / 'latest.md'}", file=sys.stderr)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from .profiling import profile

    return profile(args.seconds, args.mode, args.rules, args.top)


def cmd_hotpath(args: argparse.Namespace) -> int:
    if args.tracing is not None:
        return _with_tracing(args)
    if args.instructions:
        from .instructions import main as instructions

        return instructions(args.mode or [*HOT_MODES, *HIT_MODES], args.config, args.core)
    from .hotpath import main as hotpath

    return hotpath(args.mode or HOT_MODES, args.n, args.profile, args.config)


def _with_tracing(args: argparse.Namespace) -> int:
    """hotpath with [tracing] on: spans go to a real OTLP/HTTP receiver in this process (the counted or
    timed relay runs in its own process under callgrind, or here)."""
    import tempfile

    from tests.otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver().start()
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
            f.write(f'[tracing]\nendpoint = "{receiver.url}"\nsample_ratio = {args.tracing}\n'
                    '[rules]\nfiles = []\nwatch = false\n')
        args.config, args.tracing = f.name, None
        return cmd_hotpath(args)
    finally:
        receiver.stop()
        print(f"tracing: {len(receiver.spans())} spans received", file=sys.stderr)


def cmd_tracing(args: argparse.Namespace) -> int:
    from .tracing_cost import main as tracing_cost

    return tracing_cost(args.mode, ratio=args.ratio, rounds=args.rounds, seconds=args.seconds,
                        clients=args.clients, rate=args.rate, json_path=args.json)


def cmd_mirror(args: argparse.Namespace) -> int:
    from .mirror_cost import main as mirror_cost

    return mirror_cost(args.mode, rounds=args.rounds, seconds=args.seconds, clients=args.clients, rate=args.rate,
                       load_share=args.load, seed=args.seed, realtime=args.realtime, json_path=args.json)


def cmd_replicas(args: argparse.Namespace) -> int:
    from .replicas import main as replicas

    if (min(args.scale, args.rounds, args.clients, args.ryw_clients, args.process_transactions) < 1
            or min(args.seconds, args.ryw_seconds) < 1 or args.rate < 0):
        print("error: need --scale, --rounds, --clients, --ryw-clients, --process-transactions >= 1, --seconds, "
              "--ryw-seconds >= 1 and --rate >= 0", file=sys.stderr)
        return 2
    return replicas(modes=args.mode, scale=args.scale, seconds=args.seconds, rounds=args.rounds, clients=args.clients,
                    rate=args.rate or None, ryw_clients=args.ryw_clients, ryw_seconds=args.ryw_seconds, pause_s=args.pause, run_s=args.resume,
                    instructions=args.instructions, cores=args.core, process=args.process,
                    process_transactions=args.process_transactions, json_path=args.json)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
