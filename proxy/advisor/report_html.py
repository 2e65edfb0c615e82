"""The HTML report: one self-contained file (inline CSS and SVG) from report.html."""

from __future__ import annotations

from html import escape
from importlib import resources
from string import Template
from typing import Any

from proxy.advisor import svg
from proxy.advisor.report_text import change, format_cut, human_bytes, ms, times, verify_line


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
        chart = svg.before_after(r["est_cost_before"], r["est_cost_after"])
        if "measured" in r:  # advisor verify: what the replay measured beside what the planner estimated
            gain += _measured_pills(r)
            chart = (f'<div class="muted">estimated cost</div>{chart}<div class="muted">measured: ms per replay round'
                     f'</div>{svg.before_after(r["measured"]["before_ms"], r["measured"]["after_ms"])}')
            queries = _measured_queries(r)
        else:
            queries = _table(["fingerprint", "calls", "mean ms", "cost before", "cost after", "query"], [
                [_code(q["fingerprint"]), f'{q["calls"]:,}', f'{q["mean_ms"]:.2f}', _cost(q["cost_before"]),
                 _cost(q["cost_after"]), f'<span class="q">{_code(q["query"][:300])}</span>'] for q in r["queries"]],
                numeric=frozenset({1, 2, 3, 4}))
        cards.append(
            f'<div class="card"><div class="rec"><div><h3>{escape(r["index_name"])} on {escape(r["table"])} {gain}</h3>'
            f'<pre>{escape(r["create_sql"])}</pre>'
            f'<div class="muted">{escape(", ".join(r["reasons"]))} · estimated size {human_bytes(r["est_size_bytes"])}'
            f'</div></div><div>{chart}</div></div>'
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
        verify=_verify(report),
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


# ---- `advisor verify`: measured before and after, side by side ------------------------------------------

def _measured_pills(r: dict[str, Any]) -> str:
    m = r["measured"]
    pills = (f' <span class="pill ok">measured {times(m["speedup"])} (estimated {times(m["est_speedup"])})</span>'
             if m["speedup"] is not None else f' <span class="pill na">{escape(m["note"] or "not measured")}</span>')
    if m["slower"]:
        pills += ' <span class="pill bad">a query got slower</span>'
    if m["writes_slower"]:
        pills += f' <span class="pill bad">writes {change(m["write_overhead"])}</span>'
    return pills


def _measured_queries(r: dict[str, Any]) -> str:
    rows = []
    for q in r["queries"]:
        m = q.get("measured") or {}
        rows.append([_code(q["fingerprint"]), f'{q["calls"]:,}', _cost(q["cost_before"]), _cost(q["cost_after"]),
                     ms(m.get("before_p50_ms")), ms(m.get("after_p50_ms")), ms(m.get("before_p95_ms")),
                     ms(m.get("after_p95_ms")), times(m.get("speedup")), times(m.get("est_speedup")),
                     f'<span class="q">{_code(q["query"][:300])}</span>'])
    return _table(["fingerprint", "calls", "cost before", "cost after", "p50 before ms", "p50 after ms",
                   "p95 before ms", "p95 after ms", "measured", "estimated", "query"], rows,
                  numeric=frozenset(range(1, 10)))


_BEFORE, _BEFORE_P95, _AFTER, _AFTER_P95 = "#c62828", "#f2b8b5", "#2e7d32", "#b9dfbb"


def side_by_side(rows: list[tuple[str, float | None, float | None, float | None, float | None, bool]],
                 width: int = 1000, row_h: int = 26) -> str:
    """Latency per row (label, p50 before, p95 before, p50 after, p95 after, slower) as two panels, before
    on the left and after on the right, on one scale: a dark bar for the p50 over a light one for the p95."""
    if not rows:
        return ""
    label_w, gap, value_w = 190, 24, 130
    panel_w = (width - label_w - gap) / 2
    plot_w = panel_w - value_w
    top = max((v for r in rows for v in r[1:5] if v is not None), default=0.0) or 1.0
    h = 22 + row_h * len(rows)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" viewBox="0 0 {width} {h}" '
             f'role="img" {svg._FONT} font-size="12">']
    for i, title in enumerate(("before", "after")):
        x = label_w + i * (panel_w + gap)
        parts.append(f'<text x="{x:.1f}" y="14" font-weight="600" fill="#344054">{title}</text>')
    for n, (label, b50, b95, a50, a95, slow) in enumerate(rows):
        y = 22 + n * row_h
        parts.append(f'<text x="{label_w - 8}" y="{y + row_h * 0.62:.1f}" text-anchor="end" '
                     f'fill="{"#c62828" if slow else "#333"}">{escape(label)}</text>')
        for i, (p50, p95, dark, light) in enumerate(((b50, b95, _BEFORE, _BEFORE_P95), (a50, a95, _AFTER, _AFTER_P95))):
            x = label_w + i * (panel_w + gap)
            if p50 is None:
                parts.append(f'<text x="{x:.1f}" y="{y + row_h * 0.62:.1f}" fill="#888">n/a</text>')
                continue
            if p95 is not None:
                parts.append(f'<rect x="{x:.1f}" y="{y + 4}" width="{max(1.5, plot_w * p95 / top):.1f}" '
                             f'height="{row_h - 8}" rx="2" fill="{light}"><title>p95 {escape(ms(p95))} ms</title></rect>')
            w = max(1.5, plot_w * p50 / top)
            parts.append(f'<rect x="{x:.1f}" y="{y + 8}" width="{w:.1f}" height="{row_h - 16}" rx="2" fill="{dark}">'
                         f'<title>p50 {escape(ms(p50))} ms</title></rect>')
            end = x + max(w, plot_w * (p95 or 0) / top)
            flag = " ▲ slower" if slow and i else ""
            parts.append(f'<text x="{end + 5:.1f}" y="{y + row_h * 0.62:.1f}" fill="{"#c62828" if flag else "#333"}">'
                         f'{escape(ms(p50))} ms{flag}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _verify(report: dict[str, Any]) -> str:
    v = report.get("verify")
    if v is None:
        return ""
    warn = "".join(f'<div class="banner bad">{escape(w)}</div>' for w in v["warnings"])
    out = [f'<h2>Measured on the target ({len(v["indexes"])} indexes)</h2>',
           f'<div class="banner info">{escape(verify_line(v))}</div>', warn]
    if not v["indexes"]:
        return "".join(out)
    top = v["fingerprints"][:20]
    chart = side_by_side([(("write " if f["write"] else "") + f["fingerprint"], f["before_p50_ms"],
                           f["before_p95_ms"], f["after_p50_ms"], f["after_p95_ms"], f["slower"]) for f in top])
    out.append(f'<p class="muted">Per fingerprint, before the indexes (left) and after (right) on one scale: the dark '
               f'bar is the p50, the light one the p95 (ms, medians of {v["rounds"]} replay rounds).</p>'
               f'<div class="card">{chart}</div>')
    out.append(_table(["fingerprint", "calls", "p50 before ms", "p50 after ms", "p95 before ms", "p95 after ms",
                       "measured", "query"], [
        [_code(f["fingerprint"]), f'{f["calls"]:,}', ms(f["before_p50_ms"]), ms(f["after_p50_ms"]),
         ms(f["before_p95_ms"]), ms(f["after_p95_ms"]),
         times(f["speedup"]) + (' <span class="pill bad">slower</span>' if f["slower"] else ""),
         f'<span class="q">{_code(f["query"][:300])}</span>'] for f in v["fingerprints"]],
        numeric=frozenset(range(1, 7))))
    out.append('<h3 class="sub">Write overhead per table that gained an index</h3>'
               '<p class="muted">Writes: calls × p50 per replay round, of the statements writing the table.</p>')
    out.append(_table(["table", "new indexes", "writes before ms", "writes after ms", "overhead", "note"], [
        [escape(w["table"]), escape(", ".join(w["indexes"])), ms(w["before_ms"]), ms(w["after_ms"]),
         change(w["overhead"]) + (' <span class="pill bad">slower writes</span>' if w["slower"] else ""),
         escape(w["note"])] for w in v["write_overhead"]], numeric=frozenset({2, 3, 4})))
    out.append('<h3 class="sub">Indexes built</h3>')
    out.append(_table(["index", "table", "built with", "seconds", "size"], [
        [escape(i["index_name"]), escape(i["table"]), _code(i["sql"]), f'{i["build_seconds"]:.2f}',
         human_bytes(i["size_bytes"])] for i in v["indexes"]], numeric=frozenset({3, 4})))
    return "".join(out)
