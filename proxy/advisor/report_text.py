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
    for col in ("index", "cost before → after", "saves", "queries helped"):
        t.add_column(col, overflow="fold")
    for r in report["recommendations"]:
        gain = format_cut(r["improvement"]) if r["improvement"] is not None else "not validated"
        t.add_row(r["create_sql"], f"{_cost(r['est_cost_before'])} → {_cost(r['est_cost_after'])}", gain,
                  "\n".join(_short(q["query"], 60) for q in r["queries"]))
    con.print(t)

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
        out.append(_md_table(["fingerprint", "calls", "mean ms", "cost before", "cost after", "query"],
                             [[q["fingerprint"], q["calls"], q["mean_ms"], _cost(q["cost_before"]),
                               _cost(q["cost_after"]), f"`{_short(q['query'], 80)}`"] for q in r["queries"]]))
        out.append("")
    if not report["recommendations"]:
        out += ["_none_", ""]
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
