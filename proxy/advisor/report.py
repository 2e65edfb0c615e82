"""Build the advisor report (a plain dict, rendered by report_text / report_html or dumped as JSON)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from proxy.advisor import caching, maintenance, scorecard
from proxy.advisor.candidates import Candidate, build_candidates
from proxy.advisor.catalog import Catalog
from proxy.advisor.collect import Statement, Workload
from proxy.advisor.hypo import (
    Chosen,
    Scored,
    Validator,
    disable_hypopg,
    enable_hypopg,
    plan_indexes,
    prune_prefixes,
)
from proxy.slowlog.explain import quote_ident
from proxy.slowlog.store import read_records

MAX_STATEMENTS = 200  # heaviest fingerprints analysed
MAX_CANDIDATES = 300


@dataclass
class Options:
    upstream: str
    cfg: Any  # proxy.config.Config
    slowlogs: list[Path] = field(default_factory=list)
    min_improvement: float = 0.2
    stats_url: str | None = None
    # the database the slow-log records are about; None: the one `upstream` connects to (`advisor
    # verify` analyses a copy that may be named otherwise than the database the workload ran on)
    database: str | None = None


class Progress:
    """The report's progress hooks; the CLI plugs a rich progress bar in, tests nothing."""

    def start(self, label: str, total: float | None) -> None:
        pass

    def advance(self, amount: float = 1) -> None:
        pass


def index_name(cand: Candidate, taken: set[str]) -> str:
    words = [cand.table.name] + [re.sub(r"\b(desc|asc|text_pattern_ops)\b", "", k.lower()) for k in cand.keys]
    if cand.predicate:
        pred_words = re.findall(r"[a-z0-9]+", cand.predicate.lower())
        words += [w for w in pred_words if w not in " ".join(words)]
    base = re.sub(r"[^a-z0-9]+", "_", "_".join(words)).strip("_")[:58]
    name, n = f"{base}_idx", 1
    while name in taken:
        n += 1
        name = f"{base}_{n}_idx"
    taken.add(name)
    return name


def _statement_brief(st: Statement, before: float | None, after: float | None) -> dict[str, Any]:
    return {"fingerprint": st.fingerprint, "query": st.normalized, "calls": st.calls,
            "mean_ms": round(st.mean_ms, 3), "cost_before": before, "cost_after": after}


def _recommendation(cand: Candidate, name: str, statements: dict[str, Statement], before: dict[str, float],
                    after: dict[str, float] | None, size: int | None, validated: bool) -> dict[str, Any]:
    fps = sorted(after if after is not None else cand.fingerprints & before.keys(),
                 key=lambda fp: -statements[fp].weight_ms)
    cost_before = round(sum(before[fp] for fp in fps), 2) if fps else None
    cost_after = round(sum(after[fp] for fp in fps), 2) if after is not None and fps else None
    saved = sum(statements[fp].weight_ms * (1 - after[fp] / before[fp]) for fp in fps if before[fp] > 0) \
        if after is not None else None
    return {
        "table": cand.table.qualified, "columns": list(cand.keys), "predicate": cand.predicate, "kind": cand.kind,
        "index_name": name,
        "create_sql": f"CREATE INDEX CONCURRENTLY {quote_ident(name)} {cand.definition()};",
        "est_cost_before": cost_before, "est_cost_after": cost_after,
        "improvement": round(1 - cost_after / cost_before, 4) if cost_before and cost_after is not None else None,
        "est_time_saved_ms": round(saved, 1) if saved is not None else None,
        "est_size_bytes": size, "validated": validated, "reasons": cand.reasons,
        "fingerprints": fps,
        "queries": [_statement_brief(statements[fp], before.get(fp), after.get(fp) if after else None) for fp in fps],
    }


def _unvalidated_choice(cands: list[Candidate]) -> list[Candidate]:
    """Without what-if costs: each statement's first-choice candidates, and a partial index instead of
    a full one for the statements it serves."""
    partial = {(c.table.oid, fp) for c in cands if c.predicate for fp in c.fingerprints}
    return [c for c in cands if c.primary
            and (c.predicate or not all((c.table.oid, fp) in partial for fp in c.fingerprints))]


async def _recommend(conn: asyncpg.Connection, validator: Validator, cands: list[Candidate],
                     statements: dict[str, Statement], before: dict[str, float], hypo_ok: bool,
                     min_improvement: float, progress: Progress, taken: set[str]) -> list[dict[str, Any]]:
    if not hypo_ok:
        kept = prune_prefixes([Scored(c) for c in _unvalidated_choice(cands) if c.fingerprints & before.keys()])
        return [_recommendation(s.candidate, index_name(s.candidate, taken), statements, before, None, None, False)
                for s in kept]
    progress.start("validating candidates with HypoPG", len(cands))
    validator.tick = lambda: progress.advance(1)
    weights = {fp: max(st.weight_ms, 1e-3) for fp, st in statements.items()}
    picked = await validator.greedy(cands, before, weights, min_improvement)
    chosen: list[Chosen] = await validator.combined(picked, before)
    recs = [_recommendation(c.candidate, index_name(c.candidate, taken), statements, c.before, c.after,
                            c.size_bytes, True) for c in chosen]
    return sorted(recs, key=lambda r: -(r["est_time_saved_ms"] or 0))


def _histogram(durations: list[float], bins: int = 12) -> dict[str, Any]:
    if not durations:
        return {"edges": [], "counts": []}
    lo, hi = min(durations), max(durations)
    width = (hi - lo) / bins or 1.0
    counts = [0] * bins
    for d in durations:
        counts[min(bins - 1, int((d - lo) / width))] += 1
    return {"edges": [round(lo + i * width, 3) for i in range(bins + 1)], "counts": counts}


async def build_report(opts: Options, progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Progress()
    conn = await asyncpg.connect(opts.upstream, statement_cache_size=0,
                                 server_settings={"application_name": "pgfront-advisor"})
    try:
        return await _build(conn, opts, progress)
    finally:
        await conn.close()


async def _build(conn: asyncpg.Connection, opts: Options, progress: Progress) -> dict[str, Any]:
    database = await conn.fetchval("SELECT current_database()")
    workload = Workload()
    total_bytes = sum(p.stat().st_size for p in opts.slowlogs if p.exists())
    progress.start("reading slow log", total_bytes)
    workload.add_records(read_records([p for p in opts.slowlogs if p.exists()], progress.advance),
                         opts.database or database)
    await workload.add_pg_stat_statements(conn)
    catalog = await Catalog.load(conn)
    statements = workload.ranked()[:MAX_STATEMENTS]
    by_fp = {s.fingerprint: s for s in statements}

    hypo = await enable_hypopg(conn)
    try:
        validator = Validator(conn, statements)
        progress.start("explaining the workload", len(statements))
        validator.tick = lambda: progress.advance(1)
        before = await validator.baseline(reset_hypopg=hypo.available)
        builder = build_candidates(catalog, [s for s in statements if s.fingerprint in before])
        cands = sorted(builder.candidates.values(),
                       key=lambda c: -sum(by_fp[fp].weight_ms for fp in c.fingerprints))[:MAX_CANDIDATES]
        taken = {i.name for i in catalog.indexes}
        recs = await _recommend(conn, validator, cands, by_fp, before, hypo.available, opts.min_improvement,
                                progress, taken)
        hypo.validated = hypo.available
    finally:
        await disable_hypopg(conn, hypo)

    plans = validator.plans
    rows_of = {t.name: t.reltuples for t in catalog.tables.values()}
    served = {fp: scorecard.index_served(p, lambda n: rows_of.get(n, 0.0)) for fp, p in plans.items() if p}
    db = await scorecard.database_figures(conn)
    metrics, metrics_note = None, ""
    if opts.stats_url:
        try:
            metrics = scorecard.fetch_metrics(opts.stats_url)
        except Exception as e:  # any failure: the figures show as n/a with the reason
            metrics_note = f"could not read {opts.stats_url}: {e}"
    figures = scorecard.build_scorecard(opts.cfg.advisor, statements, served, db, metrics, metrics_note)
    window = _window_seconds(statements, await _pgss_seconds(conn) if workload.pgss_available else None)

    return {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "database": database,
        "sources": {
            "slowlog_files": [str(p) for p in opts.slowlogs], "slowlog_records": workload.records,
            "records_other_databases": workload.other_databases,
            "pg_stat_statements": {"available": workload.pgss_available, "note": workload.pgss_note},
            "statements": len(statements), "explain_failures": validator.failures,
        },
        "hypopg": hypo.as_dict(),
        "min_improvement": opts.min_improvement,
        "scorecard": [f.as_dict() for f in figures],
        "recommendations": recs,
        "not_proposed": {"low_selectivity": [vars(r) for r in builder.rejections], "covered": builder.covered},
        "unused_indexes": maintenance.unused_indexes(catalog),
        "duplicate_indexes": maintenance.duplicate_indexes(catalog) + maintenance.prefix_redundant_indexes(catalog),
        "maintenance": maintenance.table_maintenance(catalog),
        "cache_candidates": caching.cache_candidates(catalog, statements, window, float(db["stats_seconds"] or 0)),
        "limit_candidates": caching.limit_candidates(statements),
        "top_fingerprints": [_top(st, before, served, plans.get(st.fingerprint, [])) for st in statements[:20]],
    }


def _top(st: Statement, before: dict[str, float], served: dict[str, bool], plans: list) -> dict[str, Any]:
    p95 = st.p95_ms()
    return {"fingerprint": st.fingerprint, "query": st.normalized, "source": st.source, "calls": st.calls,
            "mean_ms": round(st.mean_ms, 3), "p95_ms": round(p95, 3) if p95 is not None else None,
            "total_ms": round(st.weight_ms, 1), "est_cost": before.get(st.fingerprint),
            "index_served": served.get(st.fingerprint), "indexes_used": sorted(set().union(*map(plan_indexes, plans))),
            "histogram": _histogram(st.durations_ms)}


async def _pgss_seconds(conn: asyncpg.Connection) -> float | None:
    try:
        return float(await conn.fetchval(
            "SELECT extract(epoch FROM now() - stats_reset) FROM pg_stat_statements_info"))
    except asyncpg.PostgresError:
        return None


def _window_seconds(statements: list[Statement], pgss_seconds: float | None) -> float:
    """Seconds the call counts span: pg_stat_statements' age, else the slow log's first to last record."""
    if pgss_seconds:
        return pgss_seconds
    times = [t for s in statements for t in (s.first_seen, s.last_seen) if t]
    if len(times) < 2:
        return 3600.0
    span = datetime.fromisoformat(max(times)) - datetime.fromisoformat(min(times))
    return max(span.total_seconds(), 1.0)
