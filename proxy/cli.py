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


def _serve(args: argparse.Namespace) -> int:
    from proxy import config as config_mod
    from proxy import log as log_mod
    from proxy.server import main_serve
    from proxy.upstream import parse_upstream

    overrides: dict[str, dict] = {}
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
    if args.command == "serve" and args.config is None:
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
