"""`pgfront top`: a live terminal table of the busiest fingerprints.

Reads either pgfront's admin console (SHOW QUERIES on dbname=pgfront, over the simple query protocol
with psycopg) or, with --run-dir, the workers' snapshot files directly.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from proxy.stats import ORDER_BY, load_merged

Row = dict[str, Any]

# (row key, header, justify) of the columns shown; calls/s is computed between two refreshes
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("calls", "calls", "right"),
    ("calls_per_s", "calls/s", "right"),
    ("total_ms", "total ms", "right"),
    ("mean_ms", "mean ms", "right"),
    ("p95_ms", "p95 ms", "right"),
    ("p99_ms", "p99 ms", "right"),
    ("rows", "rows", "right"),
    ("errors", "errors", "right"),
    ("cache_hit_pct", "cache hit %", "right"),
    ("fingerprint", "fingerprint", "left"),
    ("query", "query", "left"),
)
_DROP_ORDER = ("errors", "rows", "p99_ms", "calls_per_s", "fingerprint", "cache_hit_pct", "mean_ms")
_QUERY_MIN = 30


def _number(value: Any) -> float:
    """Admin-console rows arrive as text; run-dir rows as numbers."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def _format(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value or "")
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return str(value)  # text from the admin console, shown as sent


def derive(rows: list[Row], previous: dict[str, tuple[float, float]], now: float) -> None:
    """Add calls/s (against the previous sample, which is updated) and the cache hit ratio."""
    for row in rows:
        calls = _number(row.get("calls"))
        hits, misses = _number(row.get("cache_hits")), _number(row.get("cache_misses"))
        row["cache_hit_pct"] = round(100 * hits / (hits + misses), 1) if hits + misses else ""
        before = previous.get(row.get("fingerprint", ""))
        row["calls_per_s"] = round((calls - before[0]) / (now - before[1]), 1) if before and now > before[1] else ""
        previous[row.get("fingerprint", "")] = (calls, now)


def render_table(rows: list[Row], title: str = "pgfront top", width: int = 200) -> Table:
    """The table `pgfront top` shows, from SHOW QUERIES rows, fitted to `width` columns of screen.

    Numbers never shrink: on a narrow screen the least useful columns go, and the query is cut short.
    """
    cells = {key: [" ".join(str(row.get(key, "")).split()) if key == "query" else _format(row.get(key))
                   for row in rows] for key, _, _ in COLUMNS}
    widths = {key: max([len(header), *map(len, cells[key])]) for key, header, _ in COLUMNS}
    shown = [c for c in COLUMNS if c[0] != "query"]

    def used() -> int:  # each column is padded by one space on both sides, plus a separator
        return sum(widths[k] + 3 for k, _, _ in shown)

    for key in _DROP_ORDER:
        if used() + _QUERY_MIN <= width:
            break
        shown = [c for c in shown if c[0] != key]
    table = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False)
    for key, header, justify in shown:
        table.add_column(header, justify=justify, no_wrap=True, min_width=widths[key])  # type: ignore[arg-type]
    table.add_column("query", no_wrap=True, overflow="ellipsis", max_width=max(_QUERY_MIN, width - used() - 1))
    for i in range(len(rows)):
        table.add_row(*(cells[key][i] for key, _, _ in shown), cells["query"][i])
    return table


# -- sources ----------------------------------------------------------------------------------------
def run_dir_source(run_dir: str, order_by: str, limit: int) -> Callable[[], list[Row]]:
    return lambda: load_merged(run_dir).top(limit, order_by)


class AdminSource:
    """SHOW QUERIES n BY order over pgfront's admin console; reconnects after a failure."""

    def __init__(self, host: str, port: int, user: str, order_by: str, limit: int) -> None:
        self.conninfo = {"host": host, "port": port, "user": user, "dbname": "pgfront"}
        self.order_by, self.limit = order_by, limit
        self._conn: Any = None

    def __call__(self) -> list[Row]:
        import psycopg  # only this source needs it

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(**self.conninfo, autocommit=True, connect_timeout=5)
        try:
            with self._conn.cursor() as cur:
                # no parameters: psycopg uses the simple query protocol, which the console speaks
                cur.execute(f"SHOW QUERIES {int(self.limit)} BY {self.order_by}")
                names = [d.name for d in cur.description or ()]
                rows = [dict(zip(names, values, strict=True)) for values in cur.fetchall()]
        except psycopg.OperationalError:
            self.close()
            raise
        return rows

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


# -- the command ------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    if args.run_dir:
        source = run_dir_source(args.run_dir, args.order_by, args.limit)
        where = args.run_dir
    else:
        source = AdminSource(args.host, args.port, args.user, args.order_by, args.limit)
        where = f"{args.user}@{args.host}:{args.port}"
    console = Console() if sys.stdout.isatty() else Console(width=200)  # piped: do not cut columns
    previous: dict[str, tuple[float, float]] = {}

    def sample() -> Table:
        rows = source()
        derive(rows, previous, time.monotonic())
        title = f"pgfront top — {where} — by {args.order_by} — {time.strftime('%H:%M:%S')}"
        return render_table(rows, title, console.width)

    try:
        if args.once:
            console.print(sample())
            return 0
        with Live(sample(), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                try:
                    live.update(sample(), refresh=True)
                except Exception as e:  # pgfront restarting, say: show why and try again
                    live.update(Text(f"pgfront top: {e} (retrying every {args.interval}s)", style="red"),
                                refresh=True)
    except KeyboardInterrupt:
        return 0
    except Exception as e:  # connection refused, auth failure, unreadable run dir: one line, exit 1
        print(f"pgfront top: {e}".strip(), file=sys.stderr)
        return 1
    finally:
        if isinstance(source, AdminSource):
            source.close()


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("top", help="live table of the busiest query fingerprints",
                              description="Show the top query fingerprints, refreshed every --interval seconds.")
    p.add_argument("--host", default="127.0.0.1", help="pgfront host (admin console)")
    p.add_argument("--port", type=int, default=6432, help="pgfront port")
    p.add_argument("--user", default="postgres", help="a role listed in admin.users")
    p.add_argument("--run-dir", default="", help="read worker snapshots from this directory instead")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    p.add_argument("--limit", type=int, default=20, help="fingerprints shown")
    p.add_argument("--order-by", default="total_time", choices=ORDER_BY, help="ranking")
    p.add_argument("--once", action="store_true", help="print one table and exit")
    p.set_defaults(func=run)
