"""`pgfront advisor verify`: measure the advice on a copy of the database before taking it.

The report's speedups are the planner's estimates (costs with HypoPG's hypothetical indexes). This
builds the recommended indexes for real on a target the user names (a shadow or a copy), replays
the captured workload (`proxy.shadow.replay`) against it before and after, and adds what it
measured to the report: `report["verify"]`, and `measured` on each recommendation and its queries.

- Per fingerprint: p50 and p95 before and after, and the measured speedup (before p50 / after p50)
  beside the estimated one (cost before / cost after).
- Per table that gained an index: its write statements' p50 before and after, the indexes' write
  overhead. Writes are replayed only with `writes` (a copy that may be written to).
- Warnings: a fingerprint slower after by more than noise; an index whose table's writes got slower.

Each phase is replayed `rounds` times after one warm-up replay (which fills the caches and is not
counted), and a fingerprint's percentiles are the medians of its per-round ones, so one disturbed
round does not decide. The indexes are built together, as applying the report would build them, so
a statement helped by two of them is measured with both.

The primary is refused unless `on_primary`: then the indexes are built and dropped CONCURRENTLY
(no write waits on them), and writes are never replayed (they would run a second time there).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql as pgsql
from psycopg.conninfo import conninfo_to_dict

from proxy.advisor import report as report_mod
from proxy.advisor.report_text import human_bytes
from proxy.shadow.replay import (
    SKIPPED_KINDS,
    Capture,
    CaptureError,
    ReplayReport,
    TargetError,
    load,
    pacing,
    percentile,
    replay,
    safe_target,
)

# a change smaller than both of these is noise: replays of one capture differ by a few percent, and
# a fast statement's latency by a round trip's jitter
NOISE_SHARE = 0.10
NOISE_MS = 0.2


class VerifyError(Exception):
    """verify refuses to run, or cannot: the message says why."""


@dataclass
class VerifyOptions:
    capture: list[str]  # capture files, globs or the [capture] path
    target: str  # postgresql:// URL where the indexes are built and the capture replayed
    cfg: Any  # proxy.config.Config
    slowlogs: list[Path] = field(default_factory=list)  # what `advisor report` reads
    catalog: str | None = None  # where the recommendations are computed (HypoPG); None: the target
    min_improvement: float = 0.2
    primaries: list[str] = field(default_factory=list)  # URLs of the primary: refused without on_primary
    on_primary: bool = False
    writes: bool = False  # replay writes too (the target is a copy that may be written)
    keep: bool = False  # leave the indexes on the target
    speed: float = 1.0  # replay timeline speed-up; 0 = as fast as possible
    concurrency: int = 50
    rounds: int = 3
    timeout: float | None = 600.0  # statement_timeout for replayed statements, seconds


class Progress(report_mod.Progress):
    """The report's progress hooks plus phase notes."""

    def note(self, message: str) -> None:
        pass


# ---- which database, which server ------------------------------------------------------------------

def workload_database(capture: Capture, wanted: str | None = None) -> str:
    """The database the captured workload ran on: `wanted` when the capture has it, else the one with
    the most statements (verify replays one database; the target is a copy of it)."""
    counts: dict[str, int] = {}
    for s in capture.sessions:
        counts[s.database] = counts.get(s.database, 0) + len(s.statements)
    if wanted in counts:
        return wanted
    if not counts:
        raise VerifyError("the capture holds no sessions")
    return max(counts, key=lambda db: counts[db])


def only_database(capture: Capture, database: str) -> Capture:
    """The capture without the sessions of other databases (they would fail on the copy)."""
    sessions = [s for s in capture.sessions if s.database == database]
    return replace(capture, sessions=sessions, statements=sum(len(s.statements) for s in sessions))


def with_database(url: str, database: str) -> str:
    """`url` naming `database` when it names none (asyncpg and psycopg would use the user's name). URLs
    only: asyncpg, which computes the report, reads no other form."""
    if not url.startswith(("postgresql://", "postgres://")):
        raise VerifyError(f"expected a postgresql:// URL, got {safe_target(url)}")
    parts = urlsplit(url)
    if parts.path.strip("/"):
        return url
    return parts._replace(path="/" + database).geturl()


def _endpoints(url: str) -> set[tuple[str, str]]:
    """The (address, port) pairs a URL reaches: host names resolved, so localhost and 127.0.0.1 meet."""
    params = conninfo_to_dict(url)
    hosts = (params.get("hostaddr") or params.get("host") or os.environ.get("PGHOST") or "localhost").split(",")
    ports = (params.get("port") or os.environ.get("PGPORT") or "5432").split(",")
    out: set[tuple[str, str]] = set()
    for i, host in enumerate(hosts):
        port = ports[i] if i < len(ports) else ports[-1]
        if host.startswith(("/", "@")):  # a Unix socket directory (or an abstract one)
            out.add((host.rstrip("/"), port))
            continue
        try:
            out.update((str(info[4][0]), port) for info in socket.getaddrinfo(host, None))
        except OSError:
            out.add((host.lower(), port))
    return out


def primary_match(target: str, primaries: list[str], databases: set[str]) -> str | None:
    """The primary URL the target is (same server and database), or None. A URL naming no database
    stands for every database of the captured workload: a pgfront upstream names none."""
    try:
        target_at = _endpoints(target)
        target_db = conninfo_to_dict(target).get("dbname")
    except psycopg.Error as e:
        raise VerifyError(f"--target: not a PostgreSQL URL: {e}") from None
    target_dbs = {target_db} if target_db else databases
    for url in primaries:
        try:
            at, db = _endpoints(url), conninfo_to_dict(url).get("dbname")
        except psycopg.Error:
            continue
        if target_at & at and target_dbs & ({db} if db else databases):
            return url
    return None


# ---- the indexes on the target -------------------------------------------------------------------

@dataclass
class Built:
    rec: dict[str, Any]
    qualified: str  # "schema"."name", for DROP INDEX
    sql: str  # as run
    done: bool = False
    seconds: float = 0.0
    size_bytes: int | None = None


def index_sql(rec: dict[str, Any], concurrently: bool) -> str:
    """The recommendation's CREATE INDEX, CONCURRENTLY only on the primary: on a copy a plain build is
    faster and nothing waits on its lock but the replay, which is not running then."""
    body = rec["create_sql"].strip().rstrip(";").removeprefix("CREATE INDEX CONCURRENTLY ")
    return f"CREATE INDEX {'CONCURRENTLY ' if concurrently else ''}{body}"


def _split(qualified: str) -> tuple[str, str]:
    schema, _, name = qualified.partition(".")
    return (schema, name) if name else ("public", schema)


def _ident(conn: psycopg.AsyncConnection, *parts: str) -> str:
    return pgsql.Identifier(*parts).as_string(conn)


async def _prepare(conn: psycopg.AsyncConnection, recs: list[dict[str, Any]], concurrently: bool) -> list[Built]:
    """Refuse a standby and indexes already there (a previous run with --keep: the BEFORE phase would
    already have them)."""
    if (await (await conn.execute("SELECT pg_is_in_recovery()")).fetchone())[0]:
        raise VerifyError("the target is a standby (read-only): indexes cannot be built there")
    out = []
    for rec in recs:
        schema, _ = _split(rec["table"])
        qualified = _ident(conn, schema, rec["index_name"])
        row = await (await conn.execute("SELECT to_regclass(%s)::text", [qualified])).fetchone()
        if row[0] is not None:
            raise VerifyError(f"index {row[0]} already exists on the target (left by verify --keep?): drop it "
                              "or verify on a fresh copy")
        out.append(Built(rec, qualified, index_sql(rec, concurrently)))
    return out


async def _analyze(conn: psycopg.AsyncConnection, tables: list[str]) -> None:
    for table in tables:
        await conn.execute(f"ANALYZE {_ident(conn, *_split(table))}")


async def _build(conn: psycopg.AsyncConnection, built: list[Built], progress: Progress) -> None:
    progress.start("building the indexes", len(built))
    for b in built:
        t0 = time.perf_counter()
        await conn.execute(b.sql)
        b.seconds = time.perf_counter() - t0
        b.done = True
        row = await (await conn.execute("SELECT pg_relation_size(to_regclass(%s))", [b.qualified])).fetchone()
        b.size_bytes = row[0]
        progress.advance(1)
        progress.note(f"built {b.qualified} in {b.seconds:.1f} s ({human_bytes(b.size_bytes)})")


async def _drop(target: str, built: list[Built], concurrently: bool, progress: Progress) -> list[str]:
    """Drop every index verify was to build, built or not (a CONCURRENTLY build failing half-way leaves an
    invalid one), on a connection of its own: the one that built them may be what failed. Returns the
    indexes it could not drop."""
    left = []
    try:
        async with await psycopg.AsyncConnection.connect(target, autocommit=True) as conn:
            for b in built:
                try:
                    await conn.execute(f"DROP INDEX {'CONCURRENTLY ' if concurrently else ''}IF EXISTS "
                                       f"{b.qualified}")
                except psycopg.Error:
                    left.append(b.qualified)
    except (psycopg.Error, OSError):
        left = [b.qualified for b in built if b.done]
    if left:
        progress.note(f"could not drop {', '.join(left)}: drop them by hand")
    return left


# ---- replaying --------------------------------------------------------------------------------------

def replayable(capture: Capture, writes: bool) -> int:
    """Statements a replay runs (for the progress bar): not COPY, writes only with `writes`."""
    return sum(1 for s in capture.sessions for st in s.statements
               if st.kind not in SKIPPED_KINDS and (writes or not st.write))


async def _phase(name: str, capture: Capture, target: str, opts: VerifyOptions,
                 progress: Progress) -> list[ReplayReport]:
    """One warm-up replay, then `rounds` measured ones."""
    total = replayable(capture, opts.writes)
    runs = []
    for i in range(opts.rounds + 1):
        label = f"{name}, warm-up" if i == 0 else f"{name}, round {i} of {opts.rounds}"
        progress.start(f"replaying {label}", total)
        try:
            run = await replay(capture, target, speed=opts.speed, concurrency=opts.concurrency, writes=opts.writes,
                               timeout=opts.timeout, progress=lambda _done, _total: progress.advance(1))
        except TargetError as e:
            raise VerifyError(f"cannot connect to {safe_target(target)}: {e}") from None
        progress.note(f"replayed {label}: {run.replayed} statements in {run.wall_seconds:.1f} s"
                      + (f", {run.errors} errors" if run.errors else ""))
        if i:
            runs.append(run)
    return runs


# ---- what was measured ------------------------------------------------------------------------------

def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def phase_figures(runs: list[ReplayReport], fp: str) -> dict[str, Any]:
    """A fingerprint's p50/p95 in ms (medians of the rounds' own), calls per round and errors."""
    p50s, p95s, calls, errors = [], [], 0, 0
    for run in runs:
        f = run.fingerprints.get(fp)
        if f is None:
            continue
        calls = max(calls, f.calls)
        errors += sum(f.errors.values())
        if f.replayed_seconds:
            p50s.append(percentile(f.replayed_seconds, 0.50))
            p95s.append(percentile(f.replayed_seconds, 0.95))
    return {"p50_ms": _ms(statistics.median(p50s)) if p50s else None,
            "p95_ms": _ms(statistics.median(p95s)) if p95s else None, "calls": calls, "errors": errors}


def slower(before_ms: float | None, after_ms: float | None) -> bool:
    """Slower by more than noise: over NOISE_SHARE and over NOISE_MS."""
    if before_ms is None or after_ms is None:
        return False
    return after_ms > before_ms * (1 + NOISE_SHARE) and after_ms - before_ms > NOISE_MS


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def compare_fingerprint(fp: str, normalized: str, write: bool, before: list[ReplayReport],
                        after: list[ReplayReport]) -> dict[str, Any]:
    b, a = phase_figures(before, fp), phase_figures(after, fp)
    change = round(a["p50_ms"] / b["p50_ms"] - 1, 4) if a["p50_ms"] is not None and b["p50_ms"] else None
    return {
        "fingerprint": fp, "query": normalized, "write": write, "calls": max(b["calls"], a["calls"]),
        "before_p50_ms": b["p50_ms"], "before_p95_ms": b["p95_ms"],
        "after_p50_ms": a["p50_ms"], "after_p95_ms": a["p95_ms"],
        "speedup": _ratio(b["p50_ms"], a["p50_ms"]), "change": change,
        "slower": slower(b["p50_ms"], a["p50_ms"]), "errors_before": b["errors"], "errors_after": a["errors"],
    }


def _weighted(rows: list[dict[str, Any]], key: str) -> float:
    """Milliseconds per round: calls x p50."""
    return sum(r["calls"] * r[key] for r in rows)


async def written_tables(conn: psycopg.AsyncConnection, capture: Capture) -> dict[str, set[int]]:
    """Write fingerprint -> OIDs (on the target) of the tables it writes, from the statements' text."""
    from proxy.sql import analyze

    out: dict[str, set[int]] = {}
    for s in capture.sessions:
        for st in s.statements:
            if not st.write or st.fingerprint in out:
                continue
            oids = out[st.fingerprint] = set()
            for name in analyze(st.sql).tables_written:
                try:
                    row = await (await conn.execute("SELECT to_regclass(%s)::oid", [name])).fetchone()
                except psycopg.Error:  # a name to_regclass cannot parse: not a table we indexed
                    continue
                if row[0] is not None:
                    oids.add(row[0])
    return out


def write_overhead(tables: dict[str, int], built: list[Built], writers: dict[str, set[int]],
                   measured: dict[str, dict[str, Any]], writes: bool) -> list[dict[str, Any]]:
    """Per table that gained an index: its write statements before and after."""
    out = []
    for table, oid in sorted(tables.items()):
        rows = [measured[fp] for fp, oids in writers.items() if oid in oids and fp in measured
                and measured[fp]["before_p50_ms"] is not None and measured[fp]["after_p50_ms"] is not None]
        before = _weighted(rows, "before_p50_ms") if rows else None
        after = _weighted(rows, "after_p50_ms") if rows else None
        if not writes:
            note = "writes were not replayed (verify --writes on a copy measures them)"
        elif not rows:
            note = "no write to this table in the capture"
        else:
            note = ""
        out.append({
            "table": table, "indexes": [b.rec["index_name"] for b in built if b.rec["table"] == table],
            "statements": sorted(rows, key=lambda r: -r["calls"] * r["before_p50_ms"]),
            "before_ms": round(before, 3) if before is not None else None,
            "after_ms": round(after, 3) if after is not None else None,
            "overhead": round(after / before - 1, 4) if before and after is not None else None,
            "slower": any(r["slower"] for r in rows), "note": note,
        })
    return out


def annotate(recs: list[dict[str, Any]], built: list[Built], measured: dict[str, dict[str, Any]],
             overhead: list[dict[str, Any]]) -> None:
    """`measured` on each recommendation and each of its queries, beside the estimates."""
    by_table = {w["table"]: w for w in overhead}
    by_rec = {id(b.rec): b for b in built}
    for rec in recs:
        rows = [measured[fp] for fp in rec["fingerprints"] if fp in measured
                and measured[fp]["before_p50_ms"] is not None and measured[fp]["after_p50_ms"] is not None]
        before = _weighted(rows, "before_p50_ms") if rows else None
        after = _weighted(rows, "after_p50_ms") if rows else None
        writes = by_table.get(rec["table"])
        b = by_rec.get(id(rec))
        rec["measured"] = {
            "fingerprints": len(rows), "before_ms": round(before, 3) if before is not None else None,
            "after_ms": round(after, 3) if after is not None else None,
            "speedup": _ratio(before, after), "est_speedup": _ratio(rec["est_cost_before"], rec["est_cost_after"]),
            "slower": any(r["slower"] for r in rows),
            "write_overhead": writes["overhead"] if writes else None,
            "writes_slower": bool(writes and writes["slower"]),
            "build_seconds": round(b.seconds, 3) if b else None, "size_bytes": b.size_bytes if b else None,
            "note": "" if rows else "no statement of it was in the capture",
        }
        for q in rec["queries"]:
            m = measured.get(q["fingerprint"])
            q["measured"] = None if m is None else {
                **{k: m[k] for k in ("before_p50_ms", "before_p95_ms", "after_p50_ms", "after_p95_ms", "speedup",
                                     "slower", "calls")},
                "est_speedup": _ratio(q["cost_before"], q["cost_after"])}


def warnings_for(fingerprints: list[dict[str, Any]], overhead: list[dict[str, Any]]) -> list[str]:
    """A slower write into a table that gained an index is said once, as that index's write overhead."""
    out = []
    overheads = {r["fingerprint"] for w in overhead for r in w["statements"]}
    for f in fingerprints:
        if f["slower"] and f["fingerprint"] not in overheads:
            out.append(f"{f['fingerprint']} got slower: p50 {f['before_p50_ms']:.2f} → {f['after_p50_ms']:.2f} ms "
                       f"(+{f['change']:.0%}): {_flat(f['query'])}")
        if f["errors_after"] > f["errors_before"]:
            out.append(f"{f['fingerprint']} failed {f['errors_after']} times after, {f['errors_before']} before: "
                       f"{_flat(f['query'])}")
    for w in overhead:
        for r in w["statements"]:
            if r["slower"]:
                out.append(f"{', '.join(w['indexes'])} on {w['table']}: writes to it got slower: "
                           f"{r['fingerprint']} p50 {r['before_p50_ms']:.2f} → {r['after_p50_ms']:.2f} ms "
                           f"(+{r['change']:.0%}): {_flat(r['query'])}")
    return out


def _flat(sql: str, width: int = 100) -> str:
    text = " ".join(sql.split())
    return text if len(text) <= width else text[:width - 1] + "…"


# ---- the whole run ----------------------------------------------------------------------------------

async def verify(opts: VerifyOptions, progress: Progress | None = None) -> dict[str, Any]:
    """The advisor report with the measurements of its indexes on `opts.target` (see the module doc).
    Raises VerifyError when refused, CaptureError for an unreadable capture."""
    progress = progress or Progress()
    full, capture, database = _workload(opts)
    target = with_database(opts.target, database)
    sessions = len(capture.sessions)
    progress.note(f"capture: {capture.statements} statements of database {database} in {sessions} "
                  f"session{'s' * (sessions != 1)} over {capture.seconds:.1f} s"
                  + (f" ({full.statements - capture.statements} of other databases left out)"
                     if full.statements > capture.statements else ""))
    catalog = with_database(opts.catalog or target, database)
    progress.note(f"computing the recommendations on {safe_target(catalog)}")
    report = await report_mod.build_report(report_mod.Options(
        upstream=catalog, cfg=opts.cfg, slowlogs=opts.slowlogs, min_improvement=opts.min_improvement,
        database=database), progress)
    section = report["verify"] = _section(opts, target, database, full, capture)
    recs = report["recommendations"]
    if not recs:
        section["note"] = ("no index to verify: the report recommends none (indexes left on the target by "
                           "--keep would already serve the workload)")
        return report
    if opts.on_primary:
        progress.note("on the primary: indexes are built and dropped CONCURRENTLY, writes are not replayed")
    run = await _measure(opts, target, capture, recs, progress)
    section["left_on_target"] = run.left
    _summarise(section, recs, run, opts.writes)
    return report


def _workload(opts: VerifyOptions) -> tuple[Capture, Capture, str]:
    """The capture as read, its sessions of the workload's database, and that database; refusals."""
    if opts.rounds < 1:
        raise VerifyError("--rounds: must be at least 1")
    for url in (opts.target, opts.catalog or opts.target):
        with_database(url, "")  # VerifyError unless a postgresql:// URL, before anything is read
    full = load(opts.capture)
    database = workload_database(full, conninfo_to_dict(opts.target).get("dbname"))
    capture = only_database(full, database)
    if not capture.statements:
        raise VerifyError("the capture holds no statements: nothing to replay")
    primary = primary_match(opts.target, opts.primaries, {s.database for s in full.sessions})
    if primary is not None and not opts.on_primary:
        raise VerifyError(f"the target is the primary ({safe_target(primary)}): verify builds indexes on a shadow "
                          "or a copy; pass --on-primary to build them there (CONCURRENTLY)")
    if opts.on_primary and opts.writes:
        raise VerifyError("--writes with --on-primary would run the captured writes a second time on the primary")
    return full, capture, database


def _section(opts: VerifyOptions, target: str, database: str, full: Capture, capture: Capture) -> dict[str, Any]:
    """report["verify"], before anything was measured."""
    return {
        "target": safe_target(target), "database": database, "on_primary": opts.on_primary,
        "concurrently": opts.on_primary, "writes": opts.writes, "rounds": opts.rounds, "speed": opts.speed,
        "concurrency": opts.concurrency, "keep": opts.keep,
        "capture": {"files": [str(p) for p in full.files], "sessions": len(capture.sessions),
                    "statements": capture.statements, "seconds": round(capture.seconds, 3),
                    "other_databases_statements": full.statements - capture.statements},
        "indexes": [], "left_on_target": [], "fingerprints": [], "write_overhead": [], "warnings": [],
        "replay_warnings": [], "phases": {}, "note": "",
    }


@dataclass
class Measured:
    built: list[Built]
    before: list[ReplayReport]
    after: list[ReplayReport]
    writers: dict[str, set[int]]  # write fingerprint -> OIDs of the tables it writes
    tables: dict[str, int]  # table that gained an index -> its OID on the target
    left: list[str]  # indexes left on the target


async def _measure(opts: VerifyOptions, target: str, capture: Capture, recs: list[dict[str, Any]],
                   progress: Progress) -> Measured:
    """BEFORE, build, AFTER, and the indexes dropped again (unless --keep), whatever happened."""
    concurrently = opts.on_primary
    async with await psycopg.AsyncConnection.connect(target, autocommit=True) as conn:
        built = await _prepare(conn, recs, concurrently)
        names = sorted({r["table"] for r in recs})
        await _analyze(conn, names)  # both phases plan with fresh statistics, not only the AFTER one
        before = await _phase("BEFORE", capture, target, opts, progress)
        try:
            await _build(conn, built, progress)
            await _analyze(conn, names)  # expression indexes get their statistics only from ANALYZE
            after = await _phase("AFTER", capture, target, opts, progress)
            writers = await written_tables(conn, capture) if opts.writes else {}
            tables = {}
            for name in names:
                row = await (await conn.execute("SELECT to_regclass(%s)::oid", [_ident(conn, *_split(name))])
                             ).fetchone()
                tables[name] = row[0]
        finally:
            if opts.keep:
                left = [b.qualified for b in built if b.done]
            else:
                progress.note("dropping the indexes")
                left = await _drop(target, built, concurrently, progress)
    return Measured(built, before, after, writers, tables, left)


def _summarise(section: dict[str, Any], recs: list[dict[str, Any]], run: Measured, writes: bool) -> None:
    """The figures into report["verify"] and onto each recommendation."""
    runs = run.before + run.after
    normalized = {fp: f.normalized for r in runs for fp, f in r.fingerprints.items()}
    write_fps = {fp for r in runs for fp, f in r.fingerprints.items() if f.write}
    fingerprints = [compare_fingerprint(fp, text, fp in write_fps, run.before, run.after)
                    for fp, text in normalized.items()]
    fingerprints = [f for f in fingerprints if f["calls"]]  # skipped writes and COPY were not measured
    fingerprints.sort(key=lambda f: -(f["calls"] * (f["before_p50_ms"] or 0.0)))
    measured = {f["fingerprint"]: f for f in fingerprints}
    overhead = write_overhead(run.tables, run.built, run.writers, measured, writes)
    annotate(recs, run.built, measured, overhead)
    section.update(
        indexes=[{"index_name": b.rec["index_name"], "table": b.rec["table"], "sql": b.sql,
                  "build_seconds": round(b.seconds, 3), "size_bytes": b.size_bytes} for b in run.built],
        fingerprints=fingerprints, write_overhead=overhead, warnings=warnings_for(fingerprints, overhead),
        replay_warnings=sorted({w for r in runs for w in r.warnings}),
        phases={name: {"wall_seconds": [round(r.wall_seconds, 3) for r in phase],
                       "errors": sum(r.errors for r in phase), "differences": sum(r.differences for r in phase)}
                for name, phase in (("before", run.before), ("after", run.after))},
    )
    if run.left and not section["keep"]:
        section["warnings"].append(f"could not drop {', '.join(run.left)} from the target")


# ---- the command ------------------------------------------------------------------------------------

def _progress(enabled: bool, bars: bool) -> Progress:
    """Phase notes on stderr (unless --quiet), bars only on a terminal."""
    from proxy.advisor.cli import RichProgress

    class Notes(RichProgress, Progress):
        def start(self, label: str, total: float | None) -> None:
            super().start(label, total)
            assert self.active is not None
            for task in list(self.active.tasks):  # one bar, the current phase's, not one per phase so far
                if task.id != self.task:
                    self.active.remove_task(task.id)

        def note(self, message: str) -> None:
            if enabled:  # above a live bar, if one is running: rich keeps the bar below the lines it prints
                self.console.print(f"pgfront advisor verify: {message}", markup=False, highlight=False,
                                   soft_wrap=True)

    return Notes(enabled=enabled and bars)


def summary_line(report: dict[str, Any]) -> str:
    v = report["verify"]
    if not v["indexes"]:
        return v["note"] or "nothing verified"
    parts = []
    for r in report["recommendations"]:
        m = r.get("measured") or {}
        speed = f"x{m['speedup']:g}" if m.get("speedup") else "n/a"
        est = f"x{m['est_speedup']:g}" if m.get("est_speedup") else "n/a"
        parts.append(f"{r['index_name']} measured {speed} (estimated {est})")
    left = v["left_on_target"]
    tail = f"; left on the target: {', '.join(left)}" if left else "; the indexes were dropped from the target"
    warnings = len(v["warnings"])
    return "; ".join(parts) + f"; {warnings} warning{'s' * (warnings != 1)}" + tail


def run_cli(args: argparse.Namespace) -> int:
    """0 when verified (warnings are in the report), 1 when a server failed, 2 when refused or misused."""
    import asyncpg
    import uvloop

    from proxy.advisor.cli import render, slowlog_paths
    from proxy.config import ConfigError
    from proxy.config import load as load_config

    def fail(message: str, code: int = 2) -> int:
        print(f"pgfront advisor verify: {message}", file=sys.stderr)
        return code

    try:
        cfg = load_config(args.advisor_config)
    except ConfigError as e:
        return fail(str(e))
    try:
        speed = pacing(args)
    except ValueError as e:
        return fail(str(e))
    primaries = [u for u in (cfg.server.upstream, args.upstream) if u and u != "local"]
    min_improvement = args.min_improvement if args.min_improvement is not None else float(cfg.advisor.min_improvement)
    opts = VerifyOptions(
        capture=args.capture, target=args.target, cfg=cfg, slowlogs=slowlog_paths(args.slowlog, cfg),
        catalog=args.catalog, min_improvement=min_improvement, primaries=primaries, on_primary=args.on_primary,
        writes=args.writes, keep=args.keep, speed=speed, concurrency=args.concurrency, rounds=args.rounds,
        timeout=args.timeout or None)
    if not primaries and not args.quiet:
        print("pgfront advisor verify: no primary known ([server] upstream or --upstream): cannot check that "
              "the target is not it", file=sys.stderr)
    progress = _progress(not args.quiet, sys.stderr.isatty())
    try:
        # as `pgfront replay` does: uvloop's lower overhead per statement is less client time in the latencies
        report = uvloop.run(verify(opts, progress))
    except (VerifyError, CaptureError) as e:
        return fail(str(e))
    except (TimeoutError, OSError, asyncpg.PostgresError, psycopg.Error) as e:
        return fail(f"{type(e).__name__}: {e}", 1)
    finally:
        progress.stop()
    fmt = "md" if args.format == "markdown" else args.format
    text = render(report, fmt, cfg, color=args.output is None and sys.stdout.isatty())
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    if not args.quiet:
        print(f"pgfront advisor verify: {summary_line(report)}", file=sys.stderr)
    return 0
