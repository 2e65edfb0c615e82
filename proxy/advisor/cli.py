"""`pgfront advisor report`: read the slow log (and pg_stat_statements), write the advisor report."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import asyncpg
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from proxy.advisor import report as report_mod
from proxy.advisor.report_html import render_html
from proxy.advisor.report_text import render_markdown, render_text
from proxy.slowlog.store import rotated_paths

FORMATS = ("text", "md", "json", "html")


class RichProgress(report_mod.Progress):
    """A rich progress bar on stderr: bytes while reading the slow log, items afterwards."""

    def __init__(self, enabled: bool) -> None:
        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=self.console, transient=True, disable=not enabled)
        self.bytes_bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                  TimeElapsedColumn(), console=self.console, transient=True, disable=not enabled)
        self.active: Progress | None = None
        self.task: Any = None

    def start(self, label: str, total: float | None) -> None:
        self.stop()
        self.active = self.bytes_bar if label.startswith("reading") else self.bar
        self.active.start()
        self.task = self.active.add_task(label, total=total)

    def advance(self, amount: float = 1) -> None:
        if self.active is not None:
            self.active.advance(self.task, amount)

    def stop(self) -> None:
        if self.active is not None:
            self.active.stop()
            self.active = None


def slowlog_paths(given: list[str] | None, cfg: Any) -> list[Path]:
    """Each given path with its rotated siblings (oldest first); default: the configured store."""
    out: list[Path] = []
    for p in given or [cfg.slowlog.path]:
        out.extend(rotated_paths(p) or [Path(p)])
    return out


def render(report: dict[str, Any], fmt: str, cfg: Any, color: bool = False) -> str:
    if fmt == "json":
        return json.dumps(report, indent=2, default=str) + "\n"
    if fmt == "md":
        return render_markdown(report)
    if fmt == "html":
        return render_html(report, float(cfg.advisor.p95_target_ms))
    return render_text(report, color=color)


def run_report(args: argparse.Namespace) -> int:
    from proxy.config import ConfigError, load

    try:
        cfg = load(getattr(args, "advisor_config", None) or getattr(args, "config", None))
    except ConfigError as e:
        print(f"pgfront advisor: {e}", file=sys.stderr)
        return 2
    upstream = args.upstream or cfg.server.upstream
    min_improvement = args.min_improvement if args.min_improvement is not None else float(cfg.advisor.min_improvement)
    opts = report_mod.Options(upstream=upstream, cfg=cfg, slowlogs=slowlog_paths(args.slowlog, cfg),
                              min_improvement=min_improvement, stats_url=args.stats_url)
    progress = RichProgress(enabled=not args.quiet and sys.stderr.isatty())
    try:
        report = asyncio.run(report_mod.build_report(opts, progress))
    except (TimeoutError, OSError, asyncpg.PostgresError) as e:
        print(f"pgfront advisor: {upstream}: {e}", file=sys.stderr)
        return 1
    finally:
        progress.stop()
    text = render(report, args.format, cfg, color=args.output is None and sys.stdout.isatty())
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
        if not args.quiet:
            print(f"wrote {args.output} ({len(report['recommendations'])} recommendations)", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    advisor = subparsers.add_parser("advisor", help="index advisor: reports from captured slow plans")
    sub = advisor.add_subparsers(dest="advisor_command", required=True)
    p = sub.add_parser("report", help="recommend indexes, flag unused/duplicate ones, score the workload")
    p.add_argument("--slowlog", action="append", metavar="PATH",
                   help="slow-plan store(s) to read, rotated siblings included (default: [slowlog] path)")
    p.add_argument("--upstream", metavar="DSN", help="PostgreSQL to analyse (default: [server] upstream)")
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("--output", metavar="FILE", help="write the report here instead of stdout")
    p.add_argument("--min-improvement", type=float, default=None, metavar="SHARE",
                   help="keep an index only if it cuts a query's estimated cost by this share (default: config, 0.2)")
    p.add_argument("--stats-url", metavar="URL", help="pgfront's /metrics, for its cache hit ratio and pool use")
    p.add_argument("--config", dest="advisor_config", metavar="FILE", help="config.toml for targets and paths")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_report)
    v = sub.add_parser("verify", help="build the recommended indexes on a copy, replay the capture before and "
                                      "after, and report measured speedups and write overhead",
                       description="Compute the recommendations as `advisor report` does, build them on --target "
                                   "(a shadow or a copy; the primary only with --on-primary, CONCURRENTLY), "
                                   "replay the capture before and after (--rounds each, after a warm-up), drop "
                                   "them unless --keep, and report p50/p95 per fingerprint before and after, the "
                                   "measured speedup beside the estimated one, the write overhead per table that "
                                   "gained an index (--writes), and warnings for anything that got slower. "
                                   "Exit 0 when verified (warnings are in the report), 1 when a server failed, "
                                   "2 when refused.")
    v.add_argument("--capture", action="extend", nargs="+", required=True, metavar="PATH",
                   help="capture files, globs, or the [capture] path (reads PATH.N)")
    v.add_argument("--target", required=True, metavar="URL",
                   help="postgresql:// URL of a shadow or a copy of the database: the indexes are built there")
    v.add_argument("--on-primary", action="store_true",
                   help="allow the target to be the primary: indexes are built and dropped CONCURRENTLY")
    v.add_argument("--writes", action="store_true",
                   help="replay writes too (a copy that may be written): measures the indexes' write overhead")
    v.add_argument("--keep", action="store_true", help="leave the indexes on the target")
    v.add_argument("--speed", default="1", help="replay timeline speed-up: 2 = twice as fast, max = no waiting "
                                               "(default 1: the recorded pace)")
    v.add_argument("--concurrency", type=int, default=50, help="sessions replayed at once, at most (default 50)")
    v.add_argument("--rounds", type=int, default=3, help="measured replays per phase, after a warm-up (default 3)")
    v.add_argument("--timeout", type=float, default=600.0,
                   help="cancel replayed statements slower than this many seconds (default 600; 0 = no limit)")
    v.add_argument("--format", choices=(*FORMATS, "markdown"), default="text")
    v.add_argument("-o", "--output", metavar="FILE", help="write the report here instead of stdout")
    v.add_argument("--slowlog", action="append", metavar="PATH",
                   help="slow-plan store(s) to read, rotated siblings included (default: [slowlog] path)")
    v.add_argument("--upstream", metavar="URL", help="the primary, refused as a target without --on-primary "
                                                     "(default: [server] upstream)")
    v.add_argument("--catalog", metavar="URL", help="database the recommendations are computed on, with HypoPG "
                                                    "(default: the target)")
    v.add_argument("--min-improvement", type=float, default=None, metavar="SHARE",
                   help="keep an index only if it cuts a query's estimated cost by this share (default: config)")
    v.add_argument("--config", dest="advisor_config", metavar="FILE", help="config.toml for the upstream and paths")
    v.add_argument("--quiet", action="store_true", help="no progress on stderr")
    v.set_defaults(func=_run_verify)


def _run_verify(args: argparse.Namespace) -> int:
    from proxy.advisor.verify import run_cli  # psycopg and the replay engine only when verifying

    return run_cli(args)
