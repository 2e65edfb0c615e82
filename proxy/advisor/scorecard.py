"""The scorecard opening the report: a handful of health figures, each against its target.

Figures only a running pgfront knows (its cache hit ratio, pool utilisation) come from its
Prometheus endpoint (`--stats-url`); without it they show as n/a. Metric names looked for:
`pgfront_cache_hits_total` / `pgfront_cache_misses_total` (else any `*cache_hits_total` /
`*cache_misses_total`, or a `*cache_hit_ratio` gauge), and a
`*pool_utilisation` / `*pool_utilization` gauge (or `*pool_active*` over `*pool_size*`/`*pool_max*`).
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from prometheus_client.parser import text_string_to_metric_families

from proxy.advisor.collect import Statement
from proxy.slowlog.explain import walk_plan

SMALL_TABLE_ROWS = 1000  # a sequential scan of a table this small is fine


@dataclass
class Figure:
    name: str
    value: float | None
    display: str
    target: str
    ok: bool | None  # None: not known
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "display": self.display, "target": self.target,
                "ok": self.ok, "note": self.note}


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def fetch_metrics(url: str, timeout: float = 5.0) -> dict[str, float]:
    """Sample name -> value summed over label sets."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (an operator-given URL)
        text = resp.read().decode("utf-8", "replace")
    return parse_metrics(text)


def parse_metrics(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name] = out.get(sample.name, 0.0) + float(sample.value)
    return out


def _find(metrics: dict[str, float], pattern: str) -> float | None:
    rx = re.compile(pattern)
    values = [v for k, v in metrics.items() if rx.search(k)]
    return sum(values) if values else None


def pgfront_cache_hit_ratio(metrics: dict[str, float]) -> float | None:
    ratio = _find(metrics, r"cache_hit_ratio$")
    if ratio is not None:
        return ratio
    # pgfront exports totals (pgfront_cache_*) and per-fingerprint copies (pgfront_query_cache_*): never both
    hits, misses = metrics.get("pgfront_cache_hits_total"), metrics.get("pgfront_cache_misses_total")
    if hits is None or misses is None:
        hits, misses = _find(metrics, r"cache_hits?_total$"), _find(metrics, r"cache_miss(es)?_total$")
    if hits is None or misses is None or hits + misses == 0:
        return None
    return hits / (hits + misses)


def pool_utilisation(metrics: dict[str, float]) -> float | None:
    direct = _find(metrics, r"pool_utili[sz]ation$")
    if direct is not None:
        return direct
    active, size = _find(metrics, r"pool_active\w*$"), _find(metrics, r"pool_(size|max)\w*$")
    return active / size if active is not None and size else None


def index_served(plans: list[dict[str, Any]], rows_of: Callable[[str], float]) -> bool:
    """No sequential scan of a table bigger than SMALL_TABLE_ROWS in any of the plans."""
    return not any(n.get("Node Type") == "Seq Scan" and rows_of(n.get("Relation Name", "")) >= SMALL_TABLE_ROWS
                   for p in plans for n in walk_plan(p.get("Plan", p)))


async def database_figures(conn: asyncpg.Connection) -> dict[str, float | None]:
    row = await conn.fetchrow(
        "SELECT blks_hit, blks_read, deadlocks, "
        "extract(epoch FROM now() - coalesce(stats_reset, pg_postmaster_start_time())) AS seconds "
        "FROM pg_stat_database WHERE datname = current_database()")
    hit, read = row["blks_hit"] or 0, row["blks_read"] or 0
    hours = max(float(row["seconds"] or 0) / 3600.0, 1 / 60)
    return {"buffer_hit_ratio": hit / (hit + read) if hit + read else None,
            "deadlocks_per_hour": (row["deadlocks"] or 0) / hours, "stats_seconds": float(row["seconds"] or 0)}


def build_scorecard(cfg_advisor: Any, statements: list[Statement], served: dict[str, bool],
                    db: dict[str, float | None], metrics: dict[str, float] | None,
                    metrics_note: str = "") -> list[Figure]:
    p95_target = float(cfg_advisor.p95_target_ms)
    scan_target = float(cfg_advisor.index_scan_share_target)
    hit_target = float(cfg_advisor.cache_hit_target)
    pool_target = float(cfg_advisor.pool_utilisation_target)
    deadlock_target = float(getattr(cfg_advisor, "deadlocks_per_hour_target", 1.0))
    figures = []

    p95s = {s.fingerprint: s.p95_ms() for s in statements}
    known = {fp: v for fp, v in p95s.items() if v is not None}
    meeting = sum(1 for v in known.values() if v < p95_target)
    worst = max(known.values(), default=None)
    figures.append(Figure(
        "p95 latency per fingerprint", worst,
        f"{meeting}/{len(known)} under target" + (f", worst {worst:.1f} ms" if worst is not None else ""),
        f"< {p95_target:g} ms", (meeting == len(known)) if known else None,
        "from slow-log durations (slow executions only) or pg_stat_statements mean + 1.645 sd"))

    total = sum(s.calls for s in statements if s.fingerprint in served)
    by_index = sum(s.calls for s in statements if served.get(s.fingerprint))
    share = by_index / total if total else None
    figures.append(Figure("calls served by index scans", share, _pct(share), f"> {scan_target:.0%}",
                          None if share is None else share > scan_target,
                          f"a plan counts when it reads no table over {SMALL_TABLE_ROWS} rows sequentially"))

    pg_hit = pgfront_cache_hit_ratio(metrics) if metrics else None
    figures.append(Figure("pgfront cache hit ratio", pg_hit, _pct(pg_hit), f"> {hit_target:.0%}",
                          None if pg_hit is None else pg_hit > hit_target,
                          metrics_note or ("" if metrics else "needs --stats-url")))
    buf = db.get("buffer_hit_ratio")
    figures.append(Figure("Postgres buffer cache hit ratio", buf, _pct(buf), f"> {hit_target:.0%}",
                          None if buf is None else buf > hit_target, "pg_stat_database blks_hit / (hit + read)"))
    pool = pool_utilisation(metrics) if metrics else None
    figures.append(Figure("pool utilisation", pool, _pct(pool), f"< {pool_target:.0%}",
                          None if pool is None else pool < pool_target,
                          metrics_note or ("" if metrics else "needs --stats-url")))
    dl = db.get("deadlocks_per_hour")
    figures.append(Figure("deadlocks per hour", dl, "n/a" if dl is None else f"{dl:.2f}", f"< {deadlock_target:g}",
                          None if dl is None else dl < deadlock_target, "pg_stat_database since its last reset"))
    return figures
