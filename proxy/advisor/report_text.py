"""Text (rich console) and Markdown renderings of the advisor report."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def human_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def format_cut(share: float) -> str:
    """A cost cut as a percentage that never rounds a 99.6% cut up to a suspicious 100%."""
    return ">99%" if share > 0.99 else f"{share:.0%}"


def _cost(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.1f}"


def _status(ok: bool | None) -> tuple[str, str]:
    return {True: ("OK", "green"), False: ("MISS", "red"), None: ("n/a", "dim")}[ok]


def _short(sql: str, width: int = 90) -> str:
    flat = " ".join(sql.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _hypopg_line(report: dict[str, Any]) -> str:
    h = report["hypopg"]
    if h["validated"]:
        return f"HypoPG {h['version']}: every recommendation was validated with hypothetical indexes."
    return f"NOT VALIDATED: {h['note'] or 'HypoPG unavailable'}"


def render_text(report: dict[str, Any], color: bool = True, width: int = 120) -> str:
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=color, no_color=not color, width=width, highlight=False)
    con.rule(f"[bold]pgfront index advisor[/] — database {report['database']} — {report['generated_at']}")
    con.print(_hypopg_line(report), style="green" if report["hypopg"]["validated"] else "bold red")

    t = Table(title="Scorecard", show_lines=False)
    for col in ("figure", "value", "target", "status", "note"):
        t.add_column(col)
    for f in report["scorecard"]:
        label, style = _status(f["ok"])
        t.add_row(f["name"], f["display"], f["target"], Text(label, style=style), f["note"])
    con.print(t)

    t = Table(title=f"Recommended indexes ({len(report['recommendations'])})")
    measured = "verify" in report  # advisor verify: the measured speedup beside the estimate
    for col in ("index", "cost before → after", "saves", "queries helped") + (("measured (estimated)",) * measured):
        t.add_column(col, overflow="fold")
    for r in report["recommendations"]:
        gain = format_cut(r["improvement"]) if r["improvement"] is not None else "not validated"
        t.add_row(r["create_sql"], f"{_cost(r['est_cost_before'])} → {_cost(r['est_cost_after'])}", gain,
                  "\n".join(_short(q["query"], 60) for q in r["queries"]), *((measured_cell(r),) * measured))
    con.print(t)
    _verify_text(con, report)

    _index_table(con, "Unused indexes", report["unused_indexes"], ("index", "table", "size", "drop"),
                 lambda r: (r["index"], r["table"], human_bytes(r["size_bytes"]), r["drop_sql"]))
    _index_table(con, "Duplicate and redundant indexes", report["duplicate_indexes"],
                 ("index", "kind", "covered by", "size", "drop"),
                 lambda r: (r["index"], r["kind"], r["duplicate_of"], human_bytes(r["size_bytes"]), r["drop_sql"]))
    _index_table(con, "Maintenance", report["maintenance"], ("table", "advice", "why"),
                 lambda r: (r["table"], r["sql"], r["reason"]))
    _index_table(con, "Top fingerprints", report["top_fingerprints"], ("fingerprint", "calls", "mean ms", "p95 ms", "query"),
                 lambda r: (r["fingerprint"], str(r["calls"]), f"{r['mean_ms']:.2f}",
                            "n/a" if r["p95_ms"] is None else f"{r['p95_ms']:.2f}", _short(r["query"], 70)))
    for title, key, what in (("Cache candidates", "cache_candidates", "expected hit rate {expected_hit_rate:.0%}"),
                             ("Unbounded results", "limit_candidates", "about {rows:,} rows per call")):
        items = report[key]
        con.rule(f"{title} ({len(items)})")
        for c in items:
            con.print(f"[bold]{c['fingerprint']}[/] {_short(c['query'])} — {what.format(**c)}")
            con.print(c["rule"], markup=False)
    return buf.getvalue()


def _index_table(con: Console, title: str, rows: list[dict[str, Any]], cols: tuple[str, ...], row_of) -> None:
    t = Table(title=f"{title} ({len(rows)})")
    for col in cols:
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(*row_of(r))
    con.print(t)


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    def cell(s: Any) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) if rows else "_none_"


def render_markdown(report: dict[str, Any]) -> str:
    out = [f"# pgfront index advisor — {report['database']}", "", f"Generated {report['generated_at']}.", "",
           f"**{_hypopg_line(report)}**", "", "## Scorecard", ""]
    out.append(_md_table(["figure", "value", "target", "status"],
                         [[f["name"], f["display"], f["target"], _status(f["ok"])[0]] for f in report["scorecard"]]))
    out += ["", "## Recommended indexes", ""]
    for r in report["recommendations"]:
        gain = f"{format_cut(r['improvement'])} lower estimated cost" if r["improvement"] is not None \
            else "not validated"
        out += [f"### {r['index_name']} on {r['table']}", "", "```sql", r["create_sql"], "```", "",
                f"Estimated cost {_cost(r['est_cost_before'])} → {_cost(r['est_cost_after'])} ({gain}); "
                f"size about {human_bytes(r['est_size_bytes'])}.", ""]
        if "measured" in r:
            out.extend(_md_measured(r))
        else:
            out.append(_md_table(["fingerprint", "calls", "mean ms", "cost before", "cost after", "query"],
                                 [[q["fingerprint"], q["calls"], q["mean_ms"], _cost(q["cost_before"]),
                                   _cost(q["cost_after"]), f"`{_short(q['query'], 80)}`"] for q in r["queries"]]))
        out.append("")
    if not report["recommendations"]:
        out += ["_none_", ""]
    if "verify" in report:
        out.extend(_md_verify(report["verify"]))
    out += ["## Unused indexes", "", _md_table(
        ["index", "table", "size", "drop"],
        [[r["index"], r["table"], human_bytes(r["size_bytes"]), f"`{r['drop_sql']}`"] for r in report["unused_indexes"]])]
    out += ["", "## Duplicate and redundant indexes", "", _md_table(
        ["index", "kind", "covered by", "size"],
        [[r["index"], r["kind"], r["duplicate_of"], human_bytes(r["size_bytes"])] for r in report["duplicate_indexes"]])]
    out += ["", "## Maintenance", "", _md_table(
        ["table", "advice", "why"], [[r["table"], f"`{r['sql']}`", r["reason"]] for r in report["maintenance"]])]
    for title, key in (("Cache candidates", "cache_candidates"), ("Unbounded results", "limit_candidates")):
        out += ["", f"## {title}", ""]
        for c in report[key]:
            out += [f"- `{c['fingerprint']}` `{_short(c['query'], 80)}`", "", "```toml", c["rule"].rstrip(), "```", ""]
        if not report[key]:
            out.append("_none_")
    return "\n".join(out) + "\n"


# ---- `advisor verify`: what was measured on the target ------------------------------------------------

def ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.2f}"


def times(x: float | None) -> str:
    return "n/a" if x is None else f"×{x:,.1f}"


def change(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.0%}"


def measured_cell(r: dict[str, Any]) -> str:
    m = r.get("measured")
    if not m:
        return "not built"
    if m["speedup"] is None:
        return m["note"] or "n/a"
    flags = " — slower writes" if m["writes_slower"] else ""
    return f"{times(m['speedup'])} ({times(m['est_speedup'])}){flags}"


def verify_line(v: dict[str, Any]) -> str:
    """Where the indexes were built, how the capture was replayed, and what was left behind."""
    if not v["indexes"]:
        return v["note"] or "Nothing was built."
    where = "the primary, CONCURRENTLY" if v["on_primary"] else "a copy"
    speed = "as fast as possible" if not v["speed"] else f"at {v['speed']:g}x the recorded pace"
    cap = v["capture"]
    left = (f"left on the target: {', '.join(v['left_on_target'])}" if v["left_on_target"]
            else "dropped again afterwards")
    return (f"Built {len(v['indexes'])} indexes on {v['target']} ({where}), {left}. Replayed "
            f"{cap['statements']} captured statements of database {v['database']} "
            f"({cap['sessions']} session{'s' * (cap['sessions'] != 1)}) "
            f"{v['rounds']} times before and {v['rounds']} times after, each phase after a warm-up, {speed}, "
            f"{v['concurrency']} sessions at most; writes {'replayed' if v['writes'] else 'not replayed'}. "
            "Latencies are medians of the rounds' percentiles.")


def _fingerprint_row(f: dict[str, Any], width: int) -> list[str]:
    return [f["fingerprint"], str(f["calls"]), ms(f["before_p50_ms"]), ms(f["after_p50_ms"]), ms(f["before_p95_ms"]),
            ms(f["after_p95_ms"]), times(f["speedup"]) + (" SLOWER" if f["slower"] else ""), _short(f["query"], width)]


_FP_COLS = ["fingerprint", "calls", "p50 before ms", "p50 after ms", "p95 before ms", "p95 after ms", "measured",
            "query"]
_WRITE_COLS = ["table", "new indexes", "writes before ms", "writes after ms", "write overhead", ""]


def _write_row(w: dict[str, Any]) -> list[str]:
    flag = "SLOWER WRITES" if w["slower"] else w["note"]
    return [w["table"], ", ".join(w["indexes"]), ms(w["before_ms"]), ms(w["after_ms"]), change(w["overhead"]), flag]


def _verify_text(con: Console, report: dict[str, Any]) -> None:
    v = report.get("verify")
    if v is None:
        return
    con.rule(f"Measured on the target ({len(v['indexes'])} indexes)")
    con.print(verify_line(v), markup=False, highlight=False)
    for w in v["warnings"]:
        con.print(f"warning: {w}", style="bold red", markup=False, highlight=False)
    if not v["indexes"]:
        return
    t = Table(title="Measured per fingerprint (ms)")
    for col in _FP_COLS:
        t.add_column(col, overflow="fold", no_wrap=col == "fingerprint",
                     justify="right" if "ms" in col or col == "calls" else "left")
    for f in v["fingerprints"]:
        t.add_row(*_fingerprint_row(f, 50))
    con.print(t)
    t = Table(title="Write overhead per table that gained an index (writes: calls × p50 per round)")
    for col in _WRITE_COLS:
        t.add_column(col, overflow="fold")
    for w in v["write_overhead"]:
        t.add_row(*_write_row(w))
    con.print(t)


def _md_measured(r: dict[str, Any]) -> list[str]:
    """A recommendation's queries with what was measured beside what was estimated."""
    m = r["measured"]
    line = (f"Measured: {times(m['speedup'])} faster (estimated {times(m['est_speedup'])}), "
            f"{ms(m['before_ms'])} → {ms(m['after_ms'])} ms per replay round" if m["speedup"] is not None
            else f"Measured: {m['note'] or 'n/a'}")
    if m["write_overhead"] is not None:
        line += f"; write overhead on {r['table']}: {change(m['write_overhead'])}"
        line += " **(writes got slower)**" if m["writes_slower"] else ""
    rows = []
    for q in r["queries"]:
        qm = q.get("measured") or {}
        rows.append([q["fingerprint"], q["calls"], _cost(q["cost_before"]), _cost(q["cost_after"]),
                     ms(qm.get("before_p50_ms")), ms(qm.get("after_p50_ms")), ms(qm.get("before_p95_ms")),
                     ms(qm.get("after_p95_ms")), times(qm.get("speedup")), times(qm.get("est_speedup")),
                     f"`{_short(q['query'], 60)}`"])
    return [line + ".", "", _md_table(
        ["fingerprint", "calls", "cost before", "cost after", "p50 before ms", "p50 after ms", "p95 before ms",
         "p95 after ms", "measured", "estimated", "query"], rows)]


def _md_verify(v: dict[str, Any]) -> list[str]:
    out = ["## Measured on the target", "", verify_line(v), ""]
    out += [f"- **warning:** {w}" for w in v["warnings"]]
    if v["warnings"]:
        out.append("")
    if not v["indexes"]:
        return out
    rows = [_fingerprint_row(f, 80) for f in v["fingerprints"]]
    out += ["### Per fingerprint", "", _md_table(_FP_COLS, [[*r[:-1], f"`{r[-1]}`"] for r in rows]), ""]
    out += ["### Write overhead", "", "Writes: calls × p50 per replay round, of the statements writing the table.",
            "", _md_table(_WRITE_COLS[:-1] + ["note"], [_write_row(w) for w in v["write_overhead"]]), ""]
    return out
