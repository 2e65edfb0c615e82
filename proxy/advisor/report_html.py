"""The HTML report: one self-contained file (inline CSS and SVG) from report.html."""

from __future__ import annotations

from html import escape
from importlib import resources
from string import Template
from typing import Any

from proxy.advisor import svg
from proxy.advisor.report_text import format_cut, human_bytes


def _status_class(ok: bool | None) -> str:
    return {True: "ok", False: "bad", None: "na"}[ok]


def _cost(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.1f}"


def _table(headers: list[str], rows: list[list[str]], numeric: frozenset[int] = frozenset()) -> str:
    """Cells are HTML already (escape before calling)."""
    if not rows:
        return '<p class="muted">None found.</p>'
    head = "".join(f'<th class="num">{h}</th>' if i in numeric else f"<th>{h}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _code(s: str) -> str:
    return f"<code>{escape(s)}</code>"


def _scorecard(report: dict[str, Any]) -> str:
    tiles = []
    for f in report["scorecard"]:
        cls = _status_class(f["ok"])
        tiles.append(f'<div class="tile {cls}"><div class="name">{escape(f["name"])}</div>'
                     f'<div class="value">{escape(f["display"])}</div>'
                     f'<div class="target">target {escape(f["target"])}'
                     f'{" · " + escape(f["note"]) if f["note"] else ""}</div></div>')
    return "".join(tiles)


def _fingerprints(report: dict[str, Any], p95_target: float) -> str:
    rows = []
    for fp in report["top_fingerprints"][:10]:
        h = fp["histogram"]
        ok = None if fp["p95_ms"] is None else fp["p95_ms"] < p95_target
        p95 = "n/a" if fp["p95_ms"] is None else f'{fp["p95_ms"]:.2f} ms'
        served = {True: "index", False: "seq scan", None: "n/a"}[fp["index_served"]]
        rows.append(
            f'<div><h3><code>{escape(fp["fingerprint"])}</code> <span class="pill {_status_class(ok)}">p95 {p95}</span>'
            f' <span class="pill {_status_class(fp["index_served"])}">{served}</span></h3>'
            f'<div class="q"><code>{escape(fp["query"][:400])}</code></div>'
            f'<div class="muted">{fp["calls"]:,} calls · mean {fp["mean_ms"]:.2f} ms · source {escape(fp["source"])}'
            f' · est. cost {_cost(fp["est_cost"])}</div></div>'
            f'<div>{svg.histogram(h["edges"], h["counts"], marker=p95_target)}</div>')
    if not rows:
        return '<p class="muted">No statements in the slow log or pg_stat_statements.</p>'
    return f'<div class="card fps">{"".join(rows)}</div>'


def _recommendations(report: dict[str, Any]) -> str:
    cards = []
    for r in report["recommendations"]:
        gain = (f'<span class="pill ok">{format_cut(r["improvement"])} lower cost</span>' if r["improvement"] is not None
                else '<span class="pill bad">not validated</span>')
        queries = _table(["fingerprint", "calls", "mean ms", "cost before", "cost after", "query"], [
            [_code(q["fingerprint"]), f'{q["calls"]:,}', f'{q["mean_ms"]:.2f}', _cost(q["cost_before"]),
             _cost(q["cost_after"]), f'<span class="q">{_code(q["query"][:300])}</span>'] for q in r["queries"]],
            numeric=frozenset({1, 2, 3, 4}))
        cards.append(
            f'<div class="card"><div class="rec"><div><h3>{escape(r["index_name"])} on {escape(r["table"])} {gain}</h3>'
            f'<pre>{escape(r["create_sql"])}</pre>'
            f'<div class="muted">{escape(", ".join(r["reasons"]))} · estimated size {human_bytes(r["est_size_bytes"])}'
            f'</div></div><div>{svg.before_after(r["est_cost_before"], r["est_cost_after"])}</div></div>'
            f'{queries}</div>')
    return "".join(cards) or '<p class="muted">No index would cut the workload\'s estimated cost enough.</p>'


def _rules(items: list[dict[str, Any]], describe) -> str:
    cards = [f'<div class="card"><div><code>{escape(c["fingerprint"])}</code> {describe(c)}</div>'
             f'<div class="q"><code>{escape(c["query"][:300])}</code></div><pre>{escape(c["rule"])}</pre></div>'
             for c in items]
    return "".join(cards) or '<p class="muted">None found.</p>'


def render_html(report: dict[str, Any], p95_target_ms: float = 50.0) -> str:
    template = Template(resources.files("proxy.advisor").joinpath("report.html").read_text(encoding="utf-8"))
    hypo = report["hypopg"]
    banner = (f'<div class="banner ok">Validated with HypoPG {escape(hypo["version"] or "")}: every recommendation '
              f'lowers the planner\'s estimated cost by at least {report["min_improvement"]:.0%}.</div>'
              if hypo["validated"] else
              f'<div class="banner bad">NOT VALIDATED — {escape(hypo["note"] or "HypoPG unavailable")}</div>')
    src = report["sources"]
    pgss = "pg_stat_statements" if src["pg_stat_statements"]["available"] else "no pg_stat_statements"
    top = report["top_fingerprints"][:12]
    np_ = report["not_proposed"]
    return template.substitute(
        database=escape(report["database"]),
        generated_at=escape(report["generated_at"]),
        sources=escape(f'{src["slowlog_records"]} slow-log records, {pgss}, {src["statements"]} fingerprints'),
        hypopg_banner=banner,
        scorecard=_scorecard(report),
        time_chart=svg.hbar_chart([(t["fingerprint"], t["total_ms"]) for t in top], " ms"),
        fingerprints=_fingerprints(report, p95_target_ms),
        rec_count=len(report["recommendations"]),
        recommendations=_recommendations(report),
        unused_count=len(report["unused_indexes"]),
        unused=_table(["index", "table", "size", "drop"], [
            [escape(r["index"]), escape(r["table"]), human_bytes(r["size_bytes"]), _code(r["drop_sql"])]
            for r in report["unused_indexes"]], numeric=frozenset({2})),
        duplicate_count=len(report["duplicate_indexes"]),
        duplicates=_table(["index", "kind", "covered by", "size", "definition"], [
            [escape(r["index"]), escape(r["kind"]), escape(r["duplicate_of"]), human_bytes(r["size_bytes"]),
             _code(r["definition"])] for r in report["duplicate_indexes"]], numeric=frozenset({3})),
        maintenance_count=len(report["maintenance"]),
        maintenance=_table(["table", "advice", "why"], [
            [escape(r["table"]), _code(r["sql"]), escape(r["reason"])] for r in report["maintenance"]]),
        cache_count=len(report["cache_candidates"]),
        cache=_rules(report["cache_candidates"], lambda c: (
            f'<span class="pill ok">expected hit rate {c["expected_hit_rate"]:.0%}</span> '
            f'<span class="muted">{c["calls"]:,} calls · mean {c["mean_ms"]:.2f} ms · '
            f'table writes {c["table_writes_per_s"]:g}/s</span>')),
        limit_count=len(report["limit_candidates"]),
        limits=_rules(report["limit_candidates"], lambda c: (
            f'<span class="pill bad">about {c["rows"]:,} rows per call</span>')),
        not_proposed=_table(["fingerprint", "table", "why"], [
            [_code(r["fingerprint"]), escape(r["table"]), escape(r["reason"])] for r in np_["low_selectivity"]] + [
            [_code(r["fingerprint"]), escape(r["table"]),
             escape(f'({", ".join(r["keys"])}) is already served by index {r["covered_by"]}')] for r in np_["covered"]]),
    )
