"""The `pgfront` command."""

from __future__ import annotations

import argparse
import importlib
import sys

from proxy import __version__
from proxy.config import ConfigError
from proxy.core import core

# modules that add subcommands through register(subparsers)
_SUBCOMMAND_MODULES: list[str] = ["proxy.rules.cli", "proxy.advisor.cli", "proxy.top"]


def _serve(args: argparse.Namespace, extra: dict[str, dict] | None = None) -> int:
    from proxy import config as config_mod
    from proxy import log as log_mod
    from proxy.server import main_serve
    from proxy.upstream import parse_upstream

    overrides: dict[str, dict] = {section: dict(values) for section, values in (extra or {}).items()}
    if args.listen:
        overrides.setdefault("server", {})["listen"] = args.listen
    if args.upstream is not None:
        overrides.setdefault("server", {})["upstream"] = args.upstream
    if args.workers is not None:
        overrides.setdefault("server", {})["workers"] = args.workers
    if args.metrics is not None:
        overrides.setdefault("metrics", {})["listen"] = args.metrics
    if args.rules:
        overrides.setdefault("rules", {})["files"] = args.rules
    if args.slow_ms is not None:
        overrides.setdefault("slowlog", {})["threshold_ms"] = args.slow_ms
    if args.slowlog is not None:
        overrides.setdefault("slowlog", {})["path"] = args.slowlog
    cfg = config_mod.load(args.config, overrides)
    cfg.reload_from = (args.config, overrides)  # SIGHUP re-reads the file with the same flags on top
    log_mod.setup(cfg.server.log_level, cfg.server.log_format)
    _check_rules(cfg)
    local = None
    dsn = cfg.server.upstream
    if dsn in ("", "local"):
        from proxy.devdb import TempPostgres

        print("pgfront: starting a throwaway PostgreSQL for you (upstream = local)...", file=sys.stderr)
        local = TempPostgres(settings={"shared_preload_libraries": "'pg_stat_statements'"}).start()
        dsn = local.dsn()
        host, port = cfg.server.listen
        print(f"pgfront: ready; try: psql \"host={host} port={port} user=postgres dbname=postgres\"",
              file=sys.stderr)
    try:
        upstream = parse_upstream(dsn)
    except ValueError as e:
        raise ConfigError(f"[server] upstream: {e}") from None
    try:
        return main_serve(cfg, upstream)
    finally:
        if local is not None:
            local.cleanup()


def _capture(args: argparse.Namespace) -> int:
    """`pgfront capture`: serve with [capture] on for --seconds (or until Ctrl-C), then say what was captured
    and how to replay it. An instance already running captures with [capture] path in its config."""
    import os
    import signal
    import threading
    import time

    from proxy.config import parse_size

    out = args.out or f"pgfront-capture-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
    section: dict[str, object] = {"path": out}
    if args.share is not None:
        section["share"] = args.share
    if args.max_size is not None:
        try:
            section["max_size"] = parse_size(args.max_size)
        except ValueError as e:
            raise ConfigError(f"--max-size: {e}") from None
    if args.seconds is not None and args.seconds <= 0:
        raise ConfigError("--seconds: must be more than 0")
    # SIGTERM is the graceful stop: workers finish their statements and close their capture files
    stop = threading.Timer(args.seconds or 0, os.kill, (os.getpid(), signal.SIGTERM))
    stop.daemon = True
    if args.seconds is not None:
        stop.start()
    until = f"for {args.seconds:g} s" if args.seconds is not None else "until Ctrl-C"
    print(f"pgfront: capturing to {out}.N (one file per worker) {until}", file=sys.stderr)
    try:
        rc = _serve(args, {"capture": section})
    finally:
        stop.cancel()  # serve ended first (an error): the timer must not signal what runs next
    from proxy.shadow.replay import CaptureError, load

    try:
        capture = load(out)
    except CaptureError as e:
        print(f"pgfront: nothing captured ({e})", file=sys.stderr)
        return rc or 1
    sessions = len(capture.sessions)
    print(f"pgfront: captured {capture.statements} statement{'s' * (capture.statements != 1)} in {sessions} "
          f"session{'s' * (sessions != 1)} over {capture.seconds:.1f} s to {', '.join(map(str, capture.files))}"
          + (f"; {capture.dropped} more did not fit in max_size" if capture.dropped else ""), file=sys.stderr)
    print(f"pgfront: replay it with: pgfront replay {out} --target postgresql://HOST:PORT/", file=sys.stderr)
    return rc


def _replay(args: argparse.Namespace) -> int:
    from proxy.shadow.replay import run_cli

    return run_cli(args)


def config_defaults() -> str:
    from proxy.config import render_defaults

    return render_defaults()


def _check_rules(cfg) -> None:
    """Refuse to start on a broken rule file: the operator sees every problem at once."""
    from proxy.components import load_rule_holder
    from proxy.rules import RuleError

    try:
        load_rule_holder(cfg)
    except RuleError as e:
        raise ConfigError(f"[rules] files: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgfront", description="PostgreSQL wire-protocol proxy")
    parser.add_argument("--version", action="version", version=f"pgfront {__version__} ({core()} core)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sp = sub.add_parser("serve", help="run the proxy")
    sp.add_argument("--config", help="config file (default: ./config.toml if present)")
    sp.add_argument("--listen", help="HOST:PORT to accept clients on (default 127.0.0.1:6432)")
    sp.add_argument("--upstream", help="PostgreSQL URL to proxy to; 'local' starts a throwaway server")
    sp.add_argument("--workers", type=int, help="worker processes sharing the port")
    sp.add_argument("--metrics", help="HOST:PORT for /metrics and /healthz")
    sp.add_argument("--rules", action="append", help="rule file or glob (repeatable)")
    sp.add_argument("--slow-ms", type=float, help="capture plans of statements slower than this")
    sp.add_argument("--slowlog", help="slow-plan store path")
    sp.set_defaults(func=_serve)
    cap = sub.add_parser("capture", help="serve with a capture of statements on, for pgfront replay",
                         description="Run the proxy (as `serve` does) with [capture] on for --seconds, writing "
                                     "OUT.N (one file per worker). A running pgfront captures when [capture] "
                                     "path is set in its config (restart to apply).")
    cap.add_argument("--seconds", type=float, help="stop after this long (default: at Ctrl-C or SIGTERM)")
    cap.add_argument("--out", help="capture base path (default: ./pgfront-capture-DATE-TIME.jsonl)")
    cap.add_argument("--share", type=float, help="share of statements captured, 0 to 1 (default [capture] share)")
    cap.add_argument("--max-size", help="stop capturing at this size per worker file, e.g. 500MiB")
    cap.add_argument("--config", help="config file (default: ./config.toml if present)")
    cap.add_argument("--listen", help="HOST:PORT to accept clients on")
    cap.add_argument("--upstream", help="PostgreSQL URL to proxy to")
    cap.add_argument("--workers", type=int, help="worker processes sharing the port")
    cap.set_defaults(func=_capture, metrics=None, rules=None, slow_ms=None, slowlog=None)
    rp = sub.add_parser("replay", help="replay a capture against a server and compare latencies and results",
                        description="Replay captured sessions against --target on the recorded timeline and report, "
                                    "per fingerprint, recorded and replayed p50/p95 latency, results that differ "
                                    "from the recorded ones, and errors. Exit 0 when replayed (differences are "
                                    "reported, not failures), 2 when the capture or the target is unusable.")
    rp.add_argument("capture", nargs="+", help="capture files, globs, or the [capture] path (reads PATH.N)")
    rp.add_argument("--target", required=True, help="PostgreSQL URL; without a database or user in it each "
                                                    "session uses its recorded one")
    rp.add_argument("--speed", default="1", help="timeline speed-up: 2 = twice as fast, max = no waiting (default 1)")
    rp.add_argument("--concurrency", type=int, default=50, help="sessions replayed at once, at most (default 50)")
    rp.add_argument("--writes", action="store_true", help="also replay writes (INSERT/UPDATE/DELETE/DDL): only "
                                                          "against a copy of the database")
    rp.add_argument("--timeout", type=float, default=600.0, help="cancel statements slower than this many "
                                                                 "seconds (default 600; 0 = no limit)")
    rp.add_argument("--json", help="also write the report as JSON to this path")
    rp.add_argument("--quiet", action="store_true", help="no progress on stderr")
    rp.set_defaults(func=_replay)
    cp = sub.add_parser("config", help="print a config.toml with every key at its default, documented")
    cp.set_defaults(func=lambda _args: print(config_defaults()) or 0)
    for name in _SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.command in ("serve", "capture") and args.config is None:
        import os

        if os.path.exists("config.toml"):
            args.config = "config.toml"
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"pgfront: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
