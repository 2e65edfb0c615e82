"""Turning a results dict into goals, a rich table for the terminal and a markdown page.

Ratios are TPS of the row's target over TPS of a baseline in the same scenario. Goals are shown
as pass/fail; nothing here asserts anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

BASELINES = [("direct", "vs direct"), ("pgbouncer", "vs PgBouncer"), ("forwarder", "vs forwarder"),
             ("pgpool", "vs Pgpool")]
IDLE_GOAL_BYTES = 16 * 1024
WORKERS_GOAL = 1.1


def tps(results: dict, scenario: str, target: str) -> float | None:
    return results.get("cells", {}).get(scenario, {}).get(target, {}).get("tps")


def ratio(results: dict, scenario: str, target: str, baseline: str) -> float | None:
    a, b = tps(results, scenario, target), tps(results, scenario, baseline)
    return a / b if a is not None and b else None


def _ratio_goal(results: dict, name: str, scenario: str, target: str, base: str, want: float) -> dict:
    r = ratio(results, scenario, target, base)
    missing = [k for k in (target, base) if tps(results, scenario, k) is None]
    return {"goal": name, "want": f">= {want:.2f}x", "value": None if r is None else round(r, 3),
            "shown": "n/a" if r is None else f"{r:.2f}x", "pass": None if r is None else r >= want,
            "why": f"no number for {', '.join(missing)} in {scenario}" if missing else ""}


CACHE_GOAL = 1.5  # cache hits vs Pgpool-II's query cache, in both protocols
CACHE_SIDE_BY_SIDE = {"aggregate": "cache_vs_pgpool", "aggregate-extended": "cache_vs_pgpool_extended"}


def _cache_goal(results: dict, scenario: str) -> dict:
    """Cache hits vs Pgpool-II: from the alternating side-by-side runs when made, else the table's cells."""
    name = f"pgfront cache hits vs Pgpool-II query cache, {scenario}"
    side = results.get("extras", {}).get(CACHE_SIDE_BY_SIDE[scenario], {})
    r = side.get("ratio")
    if r is None:
        return _ratio_goal(results, name, scenario, "pgfront-cache", "pgpool", CACHE_GOAL)
    runs = side["runs"]
    return {"goal": name + " (alternating runs)", "want": f">= {CACHE_GOAL:.2f}x", "value": round(r, 3),
            "shown": f"{r:.2f}x", "pass": r >= CACHE_GOAL,
            "why": f"TPS per run: pgfront {runs[side['target']]}, Pgpool-II {runs[side['base']]}"}


def goals(results: dict) -> list[dict]:
    out = [
        *(_ratio_goal(results, f"pgfront passthrough vs uvloop forwarder, pgbench -S {m}", f"select-{m}",
                      "pgfront", "forwarder", 0.95) for m in ("simple", "extended", "prepared")),
        *(_ratio_goal(results, f"pgfront passthrough vs PgBouncer, pgbench -S {m}", f"select-{m}",
                      "pgfront", "pgbouncer", 0.90) for m in ("simple", "extended")),
        *(_ratio_goal(results, f"pgfront + rules vs PgBouncer, pgbench -S {m}", f"select-{m}",
                      "pgfront-rules", "pgbouncer", 0.90) for m in ("simple", "extended")),
        _ratio_goal(results, "pgfront transaction pooling vs PgBouncer, pgbench -S simple", "select-simple",
                    "pgfront-pool", "pgbouncer", 0.90),
        _ratio_goal(results, "pgfront transaction pooling vs PgBouncer, connection churn (-C)", "churn",
                    "pgfront-pool", "pgbouncer", 0.90),
        _ratio_goal(results, "pgfront + cache vs passthrough, TPC-B", "tpcb", "pgfront-cache", "pgfront", 0.95),
        *(_cache_goal(results, sc) for sc in CACHE_SIDE_BY_SIDE),
    ]
    idle = results.get("extras", {}).get("idle_memory", {}).get("pgfront", {})
    b = idle.get("bytes_per_client")
    out.append({"goal": "pgfront memory per idle client", "want": "<= 16 KiB",
                "value": None if b is None else round(b), "shown": "n/a" if b is None else f"{b / 1024:.1f} KiB",
                "pass": None if b is None else b <= IDLE_GOAL_BYTES,
                "why": idle.get("na", idle.get("note", "" if idle else "not measured in this run"))})
    w = results.get("extras", {}).get("workers", {})
    r = w.get("ratio")
    out.append({"goal": "pgfront 2 workers vs 1 worker, pgbench -S simple", "want": f">= {WORKERS_GOAL:.2f}x",
                "value": None if r is None else round(r, 3), "shown": "n/a" if r is None else f"{r:.2f}x",
                "pass": None if r is None else r >= WORKERS_GOAL,
                "why": w.get("na", "" if w else "not measured in this run (--no-workers)")})
    return out


# -- cell formatting ------------------------------------------------------------------------
def _num(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _ratio_text(r: float | None) -> str:
    if r is None:
        return ""
    return f"{r:.2f}x" if r >= 0.1 else f"{r:.2g}x"


def _short(text: str, limit: int = 140) -> str:
    """Table notes stay one or two lines; the JSON keeps the whole reason."""
    if text.startswith("not available"):
        return "not available (see below)"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mib(v: float | None) -> str:
    return "" if v is None else f"{v / 2**20:,.0f} MiB"


def rows(results: dict) -> Iterator[list[str]]:
    """One row per scenario x target: label columns, numbers, ratios, cost, note."""
    labels = {t["key"]: t["label"] for t in results["targets"]}
    keys = set(labels)
    for sc in results["scenarios"]:
        cells = results["cells"].get(sc["key"], {})
        for t in results["targets"]:
            if t["key"] not in cells and t.get("only") and sc["key"] not in t["only"]:
                continue  # a target measured in other scenarios only
            c = cells.get(t["key"], {"na": "not run"})
            if "na" in c:
                yield [sc["key"], labels[t["key"]], "n/a", "", "", "", "", "", "", "", "", _short(c["na"])]
                continue
            ratios = []
            for base, _ in BASELINES:
                show = base in keys and base != t["key"] and (base != "pgpool" or sc["key"] in CACHE_SIDE_BY_SIDE)
                r = ratio(results, sc["key"], t["key"], base) if show else None
                ratios.append(_ratio_text(r))
            yield [sc["key"], labels[t["key"]], f"{c['tps']:,.0f}", _num(c.get("p50_ms"), ".2f"),
                   _num(c.get("p99_ms"), ".2f"), *ratios, _num(c.get("cpu_us_per_txn"), ",.0f"),
                   _mib(c.get("mem_bytes")), c.get("note", "")]


HEADERS = ["scenario", "target", "TPS", "p50 ms", "p99 ms", *(h for _, h in BASELINES), "CPU us/txn",
           "mem", "note"]


def _machine_line(results: dict) -> str:
    m = results.get("machine", {})
    s = results.get("settings", {})
    return (f"{m.get('date', '?')} - {m.get('cores', '?')} cores ({m.get('cpu', '?')}), "
            f"{m.get('memory_gib', '?')} GiB, {_others(m)} - {m.get('postgres', '?')}, {m.get('pgbouncer', '?')}, "
            f"{m.get('pgpool', '?')} - pgbench scale {s.get('scale')}, {s.get('clients')} clients, "
            f"{s.get('threads')} threads, best of {s.get('rounds')} x {_each(s)} s per cell" + (" (--quick)" if s.get("quick") else ""))


def _others(m: dict) -> str:
    share = m.get("other_processes_cpu_share")
    return "other processes' CPU share unknown" if share is None else f"other processes used {share:.0%} of the CPU"


def _each(settings: dict) -> str:
    each = max(1.0, (settings.get("seconds") or 1) / (settings.get("rounds") or 1))
    return f"{each:g}"


def _goal_mark(g: dict) -> str:
    return {True: "PASS", False: "FAIL", None: "n/a"}[g["pass"]]


def _idle_lines(results: dict) -> list[str]:
    out = []
    for key, m in results.get("extras", {}).get("idle_memory", {}).items():
        if "na" in m:
            out.append(f"{key}: n/a ({m['na']})")
        else:
            out.append(f"{key}: {m['bytes_per_client']:,.0f} bytes per idle client "
                       f"({m['clients']} clients, RSS {_mib(m['rss_before'])} -> {_mib(m['rss_after'])})"
                       + (f"; {m['note']}" if m.get("note") else ""))
    return out


def _workers_lines(results: dict) -> list[str]:
    w = results.get("extras", {}).get("workers")
    if not w:
        return []
    if "na" in w:
        return [f"workers: n/a ({w['na']})"]
    return [f"workers: pgbench -S simple through pgfront passthrough: {w['workers_1']['tps']:,.0f} TPS with "
            f"1 worker, {w['workers_2']['tps']:,.0f} TPS with 2 ({w['ratio']:.2f}x)"]


def _side_by_side_lines(results: dict) -> list[str]:
    out = []
    for scenario, key in CACHE_SIDE_BY_SIDE.items():
        c = results.get("extras", {}).get(key)
        if not c:
            continue
        if "na" in c:
            out.append(f"cache hits vs Pgpool-II, {scenario}: n/a ({c['na']})")
            continue
        out.append(f"cache hits vs Pgpool-II, {scenario}, alternating runs (TPS): pgfront + cache "
                   f"{c['runs'][c['target']]}, Pgpool-II {c['runs'][c['base']]}; medians {c['tps']:,.0f} vs "
                   f"{c['base_tps']:,.0f} ({c['ratio']:.2f}x)")
    return out


def _unavailable_lines(results: dict) -> list[str]:
    return [f"{t['label']}: not available: {t.get('reason', '?')}" for t in results.get("targets", [])
            if t.get("available") is False]


def _cpu_lines(results: dict) -> list[str]:
    out = []
    for sc in ("select-simple", "select-extended", "select-prepared"):
        for key in ("pgfront", "pgfront-rules", "forwarder", "pgbouncer"):
            c = results.get("cells", {}).get(sc, {}).get(key, {})
            if "cpu_us_per_txn" in c:
                out.append(f"{sc} {key}: {c['cpu_us_per_txn']:.1f} us CPU per query")
    return out


def print_table(results: dict, console: Console | None = None) -> None:
    console = console or Console(width=200)
    table = Table(title="pgfront side-by-side benchmark", caption=_machine_line(results), show_lines=False)
    for h in HEADERS:
        table.add_column(h, justify="right" if h not in ("scenario", "target", "note") else "left",
                         overflow="fold", max_width=48 if h == "note" else None)
    last = None
    for r in rows(results):
        if last is not None and r[0] != last:
            table.add_section()
        last = r[0]
        table.add_row(*r)
    console.print(table)
    goals_table = Table(title="goals (ratios, not asserted)")
    for h in ("goal", "want", "measured", "result", "why"):
        goals_table.add_column(h, overflow="fold", max_width=70 if h == "why" else None)
    for g in goals(results):
        style = {True: "green", False: "red", None: "yellow"}[g["pass"]]
        goals_table.add_row(g["goal"], g["want"], g["shown"], f"[{style}]{_goal_mark(g)}[/]", g["why"])
    console.print(goals_table)
    for line in _unavailable_lines(results) + _idle_lines(results) + _workers_lines(results) + _side_by_side_lines(results) + _cpu_lines(results):
        console.print(" - " + line, markup=False)
    for note in results.get("notes", []):
        console.print(f"[dim]note: {note}[/]")


def markdown(results: dict) -> str:
    out = [f"_{_machine_line(results)}_", "", "| " + " | ".join(HEADERS) + " |",
           "|" + "|".join("---" if i in (0, 1, len(HEADERS) - 1) else "---:" for i in range(len(HEADERS))) + "|"]
    for r in rows(results):
        out.append("| " + " | ".join(x.replace("|", "\\|") for x in r) + " |")
    out += ["", "| goal | want | measured | result |", "|---|---|---|---|"]
    for g in goals(results):
        out.append(f"| {g['goal']} | {g['want']} | {g['shown']} | {_goal_mark(g)}"
                   + (f" ({g['why']})" if g["why"] and g["pass"] is None else "") + " |")
    extra = _unavailable_lines(results) + _idle_lines(results) + _workers_lines(results) + _side_by_side_lines(results) + _cpu_lines(results)
    if extra:
        out += [""] + [f"- {x}" for x in extra]
    out += ["", "Notes:", ""] + [f"- {n}" for n in results.get("notes", [])]
    return "\n".join(out) + "\n"


def save(results: dict, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    j, m = directory / "latest.json", directory / "latest.md"
    j.write_text(json.dumps(results, indent=2, default=str) + "\n")
    m.write_text(markdown(results))
    return j, m


def with_goals(results: dict) -> dict[str, Any]:
    return {**results, "goals": goals(results)}
