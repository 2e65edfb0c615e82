"""Replays a capture (`shadow.capture`) against a target server and compares it with the recorded run.

`load(paths)` reads the per-worker capture files and merges them into sessions ordered by time;
`replay(capture, target)` runs each session on its own connection, on the recorded timeline (scaled by
`speed`), and returns a `ReplayReport`: per fingerprint the recorded and replayed latencies, the
statements whose results differ from the recorded ones (row count, rows' digest, or error), and the
errors. `pgfront replay` (`run_cli`) prints it; `pgfront advisor verify` calls `replay` twice and
compares the reports' percentiles.

Statements are run as their clients sent them: a simple Query as one (it may hold several statements),
an extended-protocol statement with the captured Bind values, formats and Parse types, raw bytes in and
out, its rows digested exactly as the relay digests them (`shadow.runner.digest_result`). A session
keeps one connection, so its transactions replay as they ran; writes are skipped unless asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psycopg
from psycopg import generators, pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from proxy.shadow.capture import FORMAT, VERSION, capture_paths, decode_params, encode_params
from proxy.shadow.digest import same
from proxy.shadow.runner import (
    CONNECT_FAILED,
    CONNECTION_LOST,
    TIMED_OUT,
    UNSUPPORTED,
    ShadowResult,
    run_statement,
)

SKIPPED_KINDS = frozenset({"copy", "empty"})  # COPY needs a data stream the capture does not hold
_GRACE = 2.0  # seconds past the statement_timeout before a silent server's connection is dropped
_CHUNK_ROWS = 1000
_IN_TRANSACTION = frozenset({pq.TransactionStatus.INTRANS, pq.TransactionStatus.INERROR})


class CaptureError(Exception):
    """The capture is missing or is not a readable pgfront capture."""


class TargetError(Exception):
    """The replay target cannot be connected to."""

    def __init__(self, message: str, sqlstate: str = CONNECT_FAILED) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


# ---- the capture ----------------------------------------------------------------------------------

@dataclass(slots=True)
class Statement:
    started: float  # wall clock when it arrived at pgfront
    seconds: float  # its latency as the client saw it
    sql: str
    fingerprint: str
    kind: str
    write: bool
    in_transaction: bool
    rows: int
    sqlstate: str | None
    digest: str | None
    params: list[bytes | None] | None  # None: a simple Query
    param_formats: list[int] = field(default_factory=list)
    param_types: list[int] = field(default_factory=list)
    result_formats: list[int] = field(default_factory=list)
    settings: dict[str, str] | None = None  # result-shaping settings the client session had, when recorded


@dataclass(slots=True)
class Session:
    key: str  # file.run.session: connection ids repeat across worker files and worker restarts
    database: str
    user: str
    application_name: str
    started: float
    ended: float | None = None
    statements: list[Statement] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)  # its startup parameters, when recorded


@dataclass
class Capture:
    files: list[Path]
    sessions: list[Session]  # by start time
    normalized: dict[str, str]  # fingerprint -> normalized text
    started: float = 0.0
    ended: float = 0.0
    statements: int = 0
    dropped: int = 0  # sampled but not written (max_size), as the footers of cleanly closed files say
    truncated: bool = False  # some worker reached max_size
    bad_lines: int = 0  # unreadable lines skipped (a worker killed mid-write leaves a torn last line)
    share: float = 1.0  # the smallest share a worker captured with

    @property
    def seconds(self) -> float:
        return max(0.0, self.ended - self.started)


def resolve(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Capture files from paths: a file, a glob, or the configured base path (its `{path}.N` files)."""
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    out: list[Path] = []
    for item in items:
        text = str(item)
        if Path(text).is_file():
            found = [Path(text)]
        elif any(c in text for c in "*?["):
            found = [Path(p) for p in sorted(glob.glob(text)) if Path(p).is_file()]
        else:
            found = capture_paths(text)
        if not found:
            raise CaptureError(f"no capture at {text} (looked for that file and for {text}.0, {text}.1, ...)")
        out.extend(p for p in found if p not in out)
    return out


def load(paths: str | Path | Iterable[str | Path]) -> Capture:
    """Read capture files (see `resolve`) and merge them: sessions by start time, each with its
    statements in the order they arrived."""
    files = resolve(paths)
    capture = Capture(files=files, sessions=[], normalized={})
    sessions: dict[str, Session] = {}
    shares: list[float] = []
    for index, path in enumerate(files):
        _read_file(index, path, capture, sessions, shares)
    capture.share = min(shares, default=1.0)
    capture.sessions = sorted(sessions.values(), key=lambda s: s.started)
    starts, ends = [], []
    for s in capture.sessions:
        s.statements.sort(key=lambda st: st.started)  # stable: pipelined statements keep file order
        starts.append(s.started)
        if s.statements:
            last = s.statements[-1]
            ends.append(last.started + last.seconds)
            starts.append(s.statements[0].started)
        if s.ended is not None:
            ends.append(s.ended)
        capture.statements += len(s.statements)
    capture.started = min(starts, default=0.0)
    capture.ended = max(ends, default=capture.started)
    return capture


def _read_file(index: int, path: Path, capture: Capture, sessions: dict[str, Session],
               shares: list[float]) -> None:
    run = -1  # each header starts a run of the worker (a restarted worker appends to its file)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below
    except OSError as e:
        raise CaptureError(f"{path}: cannot read: {e.strerror or e}") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                rec = None
            if run < 0 and not (isinstance(rec, dict) and rec.get("type") == "header"
                                and rec.get("format") == FORMAT):
                raise CaptureError(f"{path}: not a pgfront capture (line {lineno} is not a capture header)")
            if not isinstance(rec, dict):
                capture.bad_lines += 1
                continue
            kind = rec.get("type")
            try:
                if kind == "header":
                    version = rec.get("version")
                    if not isinstance(version, int) or version > VERSION:
                        raise CaptureError(f"{path}: capture format version {version!r}; this pgfront reads "
                                           f"up to {VERSION}")
                    run += 1
                    shares.append(float(rec.get("share", 1.0)))
                elif kind == "fingerprint":
                    capture.normalized[str(rec["fingerprint"])] = str(rec["normalized"])
                elif kind == "session":
                    key = f"{index}.{run}.{rec['session']}"
                    sessions[key] = Session(key, str(rec["database"]), str(rec["user"]),
                                            str(rec.get("application_name") or ""), float(rec["started"]),
                                            settings=_settings(rec) or {})
                elif kind == "end":
                    s = sessions.get(f"{index}.{run}.{rec['session']}")
                    if s is not None:
                        s.ended = float(rec["ended"])
                elif kind == "statement":
                    st = _statement(rec)
                    key = f"{index}.{run}.{rec['session']}"
                    s = sessions.get(key)
                    if s is None:  # its session began before the capture did (or its record was dropped)
                        s = sessions[key] = Session(key, str(rec["database"]), str(rec["user"]),
                                                    str(rec.get("application_name") or ""), st.started)
                    s.statements.append(st)
                elif kind == "full":
                    capture.truncated = True
                elif kind == "footer":
                    capture.dropped += int(rec.get("dropped", 0)) + int(rec.get("backlog_dropped", 0))
                # other types: written by a newer pgfront; what this one knows still replays
            except (KeyError, TypeError, ValueError):
                capture.bad_lines += 1


def _statement(rec: dict[str, Any]) -> Statement:
    def ints(name: str) -> list[int]:
        values = rec.get(name) or []
        if not isinstance(values, list):
            raise ValueError(name)
        return [int(v) for v in values]

    sqlstate = rec.get("sqlstate")
    digest = rec.get("digest")
    return Statement(
        started=float(rec["started"]), seconds=float(rec["seconds"]), sql=str(rec["sql"]),
        fingerprint=str(rec["fingerprint"]), kind=str(rec.get("kind", "unknown")), write=bool(rec.get("write")),
        in_transaction=bool(rec.get("in_transaction")), rows=int(rec.get("rows") or 0),
        sqlstate=str(sqlstate) if sqlstate is not None else None, digest=str(digest) if digest is not None else None,
        params=decode_params(rec.get("params")), param_formats=ints("param_formats"),
        param_types=ints("param_types"), result_formats=ints("result_formats"), settings=_settings(rec))


def _settings(rec: dict[str, Any]) -> dict[str, str] | None:
    settings = rec.get("settings")
    if settings is None:
        return None
    if not isinstance(settings, dict):
        raise ValueError("settings")
    return {str(k): str(v) for k, v in settings.items()}


# ---- one session's connection ---------------------------------------------------------------------

class ReplayConnection:
    """One connection to the target in autocommit mode: statements run one at a time, and a transaction
    a statement opens stays open for the next ones (unlike the mirror's ShadowRunner, which rolls back
    after each statement). `execute` never raises: failures come back as a SQLSTATE."""

    def __init__(self, conn: psycopg.AsyncConnection, timeout: float | None) -> None:
        self.conn: psycopg.AsyncConnection | None = conn
        self.timeout = timeout
        self.applied: dict[str, str] = {}  # settings made by `execute`, to set only what changes

    @classmethod
    async def open(cls, conninfo: str, timeout: float | None = None, connect_timeout: float = 10.0
                   ) -> ReplayConnection:
        """Connect; TargetError when the target refuses or cannot be reached. `timeout`: the server
        cancels statements slower than this (statement_timeout); None: no limit."""
        try:
            conn = await asyncio.wait_for(psycopg.AsyncConnection.connect(conninfo, autocommit=True),
                                          connect_timeout + _GRACE)
        except TimeoutError:
            raise TargetError(f"no answer within {connect_timeout:g} s") from None
        except (psycopg.Error, OSError) as e:
            sqlstate = getattr(e, "sqlstate", None) or CONNECT_FAILED
            raise TargetError(str(e).strip() or type(e).__name__, sqlstate) from None
        if timeout:
            # the server cancels a slow statement itself; the session may SET its own later, as it did
            try:
                await conn.execute(f"SET statement_timeout = {max(1, round(timeout * 1000))}")
            except (psycopg.Error, OSError) as e:
                await conn.close()
                raise TargetError(str(e).strip() or type(e).__name__, CONNECTION_LOST) from None
        return cls(conn, timeout)

    @property
    def broken(self) -> bool:
        return self.conn is None or self.conn.closed

    @property
    def in_transaction(self) -> bool:
        return self.conn is not None and self.conn.pgconn.transaction_status in _IN_TRANSACTION

    async def execute(self, st: Statement) -> ShadowResult:
        conn = self.conn
        if conn is None or conn.closed:
            return ShadowResult(sqlstate=CONNECTION_LOST, message="the connection was lost earlier")
        t0 = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout + _GRACE if self.timeout else None):
                if st.settings:
                    await self.apply(st.settings)
                return await self._execute(conn, st)
        except TimeoutError:
            await self.close()
            return ShadowResult(seconds=time.perf_counter() - t0, sqlstate=TIMED_OUT,
                                message=f"no answer within {self.timeout + _GRACE:g} s")
        except (psycopg.Error, OSError) as e:
            await self.close()
            return ShadowResult(seconds=time.perf_counter() - t0, sqlstate=CONNECTION_LOST,
                                message=str(e).strip() or type(e).__name__)

    async def _execute(self, conn: psycopg.AsyncConnection, st: Statement) -> ShadowResult:
        t0 = time.perf_counter()
        out = await run_statement(conn, st.sql, st.params, st.param_formats, st.param_types, st.result_formats,
                                  _CHUNK_ROWS)
        if out is None:
            await self.close()  # a COPY: no data to send or place to put it, give the connection up
            return ShadowResult(sqlstate=UNSUPPORTED, message="COPY is not replayed", seconds=time.perf_counter() - t0)
        return out

    async def apply(self, settings: dict[str, str]) -> None:
        """Make the session's result-shaping settings (TimeZone, DateStyle, ...) the client's, so equal
        values print, and digest, the same. A setting the target refuses is not asked again."""
        conn = self.conn
        if conn is None:
            return
        pgconn = conn.pgconn
        for name, value in settings.items():
            if self.applied.get(name) == value:
                continue
            # set_config with parameters: names and values from the capture are never spliced into SQL
            pgconn.send_query_params(b"SELECT pg_catalog.set_config($1, $2, false)", [name.encode(), value.encode()])
            await conn.wait(generators.execute(pgconn))
            self.applied[name] = value

    async def end_transaction(self, commit: bool) -> None:
        """Close a transaction whose end the capture did not sample (share < 1)."""
        conn = self.conn
        if conn is None:
            return
        failed = conn.pgconn.transaction_status == pq.TransactionStatus.INERROR
        try:
            await conn.execute("COMMIT" if commit and not failed else "ROLLBACK")
        except (psycopg.Error, OSError):
            await self.close()

    async def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()


def session_conninfo(target: str, session: Session) -> str:
    """The target URL for a session: its own database and user unless the URL names them."""
    given = conninfo_to_dict(target)
    extra: dict[str, str] = {}
    if "dbname" not in given and session.database:
        extra["dbname"] = session.database
    if "user" not in given and session.user:
        extra["user"] = session.user
    if "application_name" not in given:
        extra["application_name"] = "pgfront-replay"
    return make_conninfo(target, **extra)


def safe_target(target: str) -> str:
    """The target as given (URL or conninfo) with its password masked, for reports."""
    if target.startswith(("postgresql://", "postgres://")):
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(target)
            if parts.password is None:
                return target
            return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":********@", 1)).geturl()
        except ValueError:
            return "(unparsable target)"
    try:
        given = conninfo_to_dict(target)
    except psycopg.Error:
        return "(unparsable target)"
    if "password" not in given:
        return target
    given["password"] = "********"
    return make_conninfo("", **given)


# ---- the report -----------------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (q from 0 to 1) of unsorted values; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


@dataclass(slots=True)
class Difference:
    """A statement whose replayed result is not the recorded one."""

    kind: str  # rows (another row count), digest (same count, other rows), error (another outcome)
    fingerprint: str
    sql: str
    params: list[Any] | None  # as in the capture file
    recorded: str
    replayed: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "sql": self.sql, "params": self.params, "recorded": self.recorded,
                "replayed": self.replayed}


@dataclass
class FingerprintResult:
    fingerprint: str
    normalized: str
    kind: str
    write: bool
    calls: int = 0  # replayed (or tried: a session that could not connect counts its statements as errors)
    skipped: int = 0  # not replayed: writes (without writes=True), COPY
    recorded_seconds: list[float] = field(default_factory=list)  # of the replayed statements only
    replayed_seconds: list[float] = field(default_factory=list)
    differences: int = 0
    example: Difference | None = None  # the first difference
    unverified: int = 0  # rows counted the same but no digest to compare (a row too large to hash)
    errors: dict[str, int] = field(default_factory=dict)  # SQLSTATE -> replayed statements failing with it
    error_messages: dict[str, str] = field(default_factory=dict)  # SQLSTATE -> the first message

    @property
    def recorded_p50(self) -> float | None:
        return percentile(self.recorded_seconds, 0.50)

    @property
    def recorded_p95(self) -> float | None:
        return percentile(self.recorded_seconds, 0.95)

    @property
    def replayed_p50(self) -> float | None:
        return percentile(self.replayed_seconds, 0.50)

    @property
    def replayed_p95(self) -> float | None:
        return percentile(self.replayed_seconds, 0.95)

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint, "normalized": self.normalized, "kind": self.kind,
            "write": self.write, "calls": self.calls, "skipped": self.skipped,
            "recorded_p50_ms": _ms(self.recorded_p50), "recorded_p95_ms": _ms(self.recorded_p95),
            "replayed_p50_ms": _ms(self.replayed_p50), "replayed_p95_ms": _ms(self.replayed_p95),
            "differences": self.differences, "example": self.example.to_dict() if self.example else None,
            "unverified": self.unverified, "errors": dict(self.errors), "error_messages": dict(self.error_messages),
        }


@dataclass
class ReplayReport:
    target: str  # password masked
    speed: float  # 0: as fast as possible
    concurrency: int
    writes: bool
    capture_seconds: float = 0.0  # the recorded span
    wall_seconds: float = 0.0  # the replay's
    statements: int = 0  # in the capture
    replayed: int = 0
    skipped_writes: int = 0
    skipped_other: int = 0  # COPY and empty statements
    differences: int = 0
    errors: int = 0
    sessions: int = 0  # replayed (those with statements to run)
    sessions_failed: int = 0  # could not connect
    max_active: int = 0  # sessions open at once, at most
    lag_p95: float | None = None  # how late statements started against the scaled recorded timeline
    lag_max: float | None = None
    fingerprints: dict[str, FingerprintResult] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    _lags: list[float] = field(default_factory=list, repr=False)

    def fingerprint(self, st: Statement, normalized: str) -> FingerprintResult:
        fp = self.fingerprints.get(st.fingerprint)
        if fp is None:
            fp = self.fingerprints[st.fingerprint] = FingerprintResult(st.fingerprint, normalized, st.kind, st.write)
        return fp

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target, "speed": self.speed, "concurrency": self.concurrency, "writes": self.writes,
            "capture_seconds": round(self.capture_seconds, 3), "wall_seconds": round(self.wall_seconds, 3),
            "statements": self.statements, "replayed": self.replayed, "skipped_writes": self.skipped_writes,
            "skipped_other": self.skipped_other, "differences": self.differences, "errors": self.errors,
            "sessions": self.sessions, "sessions_failed": self.sessions_failed, "max_active": self.max_active,
            "lag_p95_ms": _ms(self.lag_p95), "lag_max_ms": _ms(self.lag_max), "warnings": list(self.warnings),
            "fingerprints": [f.to_dict() for f in self.ordered()],
        }

    def ordered(self) -> list[FingerprintResult]:
        """Fingerprints by replayed time spent, most first (skipped ones last)."""
        return sorted(self.fingerprints.values(),
                      key=lambda f: (-sum(f.replayed_seconds), -f.skipped, f.fingerprint))


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _outcome(rows: int, digest: str | None, sqlstate: str | None, message: str = "") -> str:
    if sqlstate is not None:
        return f"error {sqlstate}" + (f": {message}" if message else "")
    return _n(rows, "row") + (f", digest {digest}" if digest else "")


def compare(st: Statement, res: ShadowResult) -> tuple[str | None, bool]:
    """(how the replayed result differs from the recorded one or None, whether the rows were verified)."""
    if st.sqlstate != res.sqlstate:
        return "error", True
    if st.sqlstate is not None:
        return None, True  # failed as it did when recorded
    if st.rows != res.rows:
        return "rows", True
    verdict = same(st.digest, res.digest)
    if verdict is False:
        return "digest", True
    return None, verdict is True


# ---- the replay -----------------------------------------------------------------------------------

@dataclass(slots=True)
class _Plan:
    session: Session
    statements: list[Statement]


async def replay(capture: Capture, target: str, *, speed: float = 1.0, concurrency: int = 50,
                 writes: bool = False, timeout: float | None = 600.0, connect_timeout: float = 10.0,
                 progress: Callable[[int, int], None] | None = None) -> ReplayReport:
    """Replay `capture` against the `target` URL (its database and user, when it names them, replace each
    session's own).

    Sessions start at their recorded offset from the capture's start divided by `speed` (0 or inf: as
    fast as possible), at most `concurrency` at once (a session waiting for a slot starts late); each
    session runs its statements in order on one connection, each no earlier than its scaled recorded
    start. Writes are skipped unless `writes` (replay against a copy). A statement slower than `timeout`
    seconds is cancelled (None: no limit). `progress(done, total)` is called after each statement.

    Raises TargetError when the target cannot be connected to at all; a session failing to connect later
    (another user, say) counts its statements as errors.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    fast = not speed or math.isinf(speed)
    report = ReplayReport(safe_target(target), 0.0 if fast else speed, concurrency, writes,
                          capture_seconds=capture.seconds, statements=capture.statements)
    _warn_capture(capture, report, writes)
    plans: list[_Plan] = []
    for s in capture.sessions:
        run: list[Statement] = []
        for st in s.statements:
            normalized = capture.normalized.get(st.fingerprint, "")
            if st.kind in SKIPPED_KINDS:
                report.skipped_other += 1
                report.fingerprint(st, normalized).skipped += 1
            elif st.write and not writes:
                report.skipped_writes += 1
                report.fingerprint(st, normalized).skipped += 1
            else:
                run.append(st)
        if run:
            plans.append(_Plan(s, run))
    total = sum(len(p.statements) for p in plans)
    report.sessions = len(plans)
    if not plans:
        return report
    # one connection first: an unreachable target is one clear error, not one per session
    probe = await ReplayConnection.open(session_conninfo(target, plans[0].session), None, connect_timeout)
    await probe.close()

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    origin = capture.started
    done = 0
    active = 0
    slots = asyncio.Semaphore(concurrency)

    def due(at: float) -> float:
        return t0 if fast else t0 + (at - origin) / speed

    async def wait_until(when: float) -> None:
        delay = when - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)

    async def connect(plan: _Plan, rest: list[Statement]) -> ReplayConnection | None:
        """The session's connection, with its recorded startup settings; None (its remaining statements
        counted as errors) when refused."""
        nonlocal done
        try:
            conn = await ReplayConnection.open(session_conninfo(target, plan.session), timeout, connect_timeout)
        except TargetError as e:
            report.sessions_failed += 1
            for st in rest:
                _record(report, capture, st, ShadowResult(sqlstate=e.sqlstate, message=str(e)), ran=False)
            done += len(rest)
            if progress:
                progress(done, total)
            return None
        if plan.session.settings:
            try:
                await conn.apply(plan.session.settings)
            except (psycopg.Error, OSError):
                await conn.close()  # its statements find it broken and reconnect, or fail, one by one
        return conn

    async def run_session(plan: _Plan) -> None:
        nonlocal active, done
        active += 1
        report.max_active = max(report.max_active, active)
        conn: ReplayConnection | None = None
        try:
            conn = await connect(plan, plan.statements)  # when the session began, as its client did
            for i, st in enumerate(plan.statements):
                if conn is None:
                    return
                await wait_until(due(st.started))
                if not fast:
                    report._lags.append(max(0.0, loop.time() - due(st.started)))
                if conn.broken:  # lost, or given up after a timeout: a new one, as a client would
                    conn = await connect(plan, plan.statements[i:])
                    if conn is None:
                        return
                elif not st.in_transaction and conn.in_transaction:
                    # recorded outside a transaction, but the one before it here never ended: its COMMIT
                    # or ROLLBACK was not sampled
                    await conn.end_transaction(commit=writes)
                res = await conn.execute(st)
                _record(report, capture, st, res)
                done += 1
                if progress:
                    progress(done, total)
        finally:
            if conn is not None:
                await conn.close()
            active -= 1
            slots.release()

    tasks: list[asyncio.Task[None]] = []
    try:
        for plan in plans:
            await wait_until(due(plan.session.started))
            await slots.acquire()
            tasks.append(asyncio.create_task(run_session(plan)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    report.wall_seconds = loop.time() - t0
    report.lag_p95 = percentile(report._lags, 0.95)
    report.lag_max = max(report._lags, default=None)
    if report.lag_p95 is not None and report.lag_p95 > 0.1:
        report.warnings.append(f"the replay fell behind the recorded timeline (p95 lag {report.lag_p95 * 1000:.0f} "
                               "ms): the target, this client or --concurrency could not keep the pace")
    return report


def _record(report: ReplayReport, capture: Capture, st: Statement, res: ShadowResult, ran: bool = True) -> None:
    """One replayed statement's outcome; `ran` False when it never reached the server (no connection):
    an error, but no latency to count."""
    fp = report.fingerprint(st, capture.normalized.get(st.fingerprint, ""))
    report.replayed += 1
    fp.calls += 1
    if ran:  # both sides over the same statements, so the percentiles compare
        fp.recorded_seconds.append(st.seconds)
        fp.replayed_seconds.append(res.seconds)
    if res.sqlstate is not None:
        report.errors += 1
        fp.errors[res.sqlstate] = fp.errors.get(res.sqlstate, 0) + 1
        fp.error_messages.setdefault(res.sqlstate, res.message)
    kind, verified = compare(st, res)
    if not verified:
        fp.unverified += 1
    if kind is not None:
        report.differences += 1
        fp.differences += 1
        if fp.example is None:
            fp.example = Difference(kind, st.fingerprint, st.sql, encode_params(st.params, st.param_formats),
                                    _outcome(st.rows, st.digest, st.sqlstate),
                                    _outcome(res.rows, res.digest, res.sqlstate, res.message))


def _warn_capture(capture: Capture, report: ReplayReport, writes: bool) -> None:
    if capture.truncated or capture.dropped:
        report.warnings.append(f"the capture reached its max_size: {capture.dropped or 'some'} later statements "
                               "were not captured")
    if capture.bad_lines:
        report.warnings.append(f"{capture.bad_lines} unreadable capture lines were skipped")
    if capture.share < 1.0:
        report.warnings.append(f"the capture holds a sample ({capture.share:.0%}) of the statements: "
                               "transactions and session settings may be partial")
    if not writes and any(st.write for s in capture.sessions for st in s.statements):
        report.warnings.append("writes were skipped (replay against a copy with --writes): reads after them may "
                               "return other rows than recorded")


# ---- pgfront replay -------------------------------------------------------------------------------

def render_text(report: ReplayReport, width: int = 60) -> str:
    """The report as a table per fingerprint, then the examples of differences and errors."""
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.1f}"

    speed = "max" if not report.speed else f"{report.speed:g}x"
    lines = [
        f"replayed {report.replayed} of {_n(report.statements, 'statement')} ({_n(report.sessions, 'session')}) against "
        f"{report.target} at speed {speed}, concurrency {report.concurrency}: {report.wall_seconds:.1f} s "
        f"(recorded span {report.capture_seconds:.1f} s)",
        f"differences: {report.differences}   errors: {report.errors}   skipped writes: {report.skipped_writes}"
        + (f"   skipped (COPY): {report.skipped_other}" if report.skipped_other else "")
        + (f"   sessions that could not connect: {report.sessions_failed}" if report.sessions_failed else ""),
        "",
    ]
    header = ("fingerprint", "calls", "rec p50", "rec p95", "rep p50", "rep p95", "diffs", "errors", "statement")
    rows = []
    for f in report.ordered():
        text = " ".join(f.normalized.split())
        text = text if len(text) <= width else text[:width - 1] + "…"
        if not f.calls and f.skipped:
            text = f"(skipped {f.skipped}) {text}"
        rows.append((f.fingerprint, str(f.calls), ms(f.recorded_p50), ms(f.recorded_p95), ms(f.replayed_p50),
                     ms(f.replayed_p95), str(f.differences), str(sum(f.errors.values())), text))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:-1], widths[1:], strict=True)]
        lines.append("  ".join([*cells, r[-1]]).rstrip())
    lines.append("(latencies in ms; rec = recorded through pgfront, rep = replayed)")
    examples = [f for f in report.ordered() if f.example is not None]
    if examples:
        lines += ["", "differences (first example per fingerprint):"]
        for f in examples:
            ex = f.example
            assert ex is not None
            lines.append(f"  {f.fingerprint} [{ex.kind}] {f.differences} of {f.calls}: {' '.join(ex.sql.split())[:200]}")
            if ex.params:
                lines.append(f"    params: {orjson.dumps(ex.params).decode()[:200]}")
            lines.append(f"    recorded: {ex.recorded}")
            lines.append(f"    replayed: {ex.replayed}")
    failing = [f for f in report.ordered() if f.errors]
    if failing:
        lines += ["", "errors:"]
        for f in failing:
            for state, count in sorted(f.errors.items()):
                lines.append(f"  {f.fingerprint} {state} x{count}: {f.error_messages.get(state, '')}")
    if report.warnings:
        lines += [""] + [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines) + "\n"


def parse_speed(value: str) -> float:
    """--speed: a factor (2 = twice as fast as recorded), or max / 0 for as fast as possible."""
    if value.strip().lower() in ("max", "0", "inf"):
        return 0.0
    speed = float(value)
    if not speed > 0 or math.isinf(speed):
        raise ValueError(value)
    return speed


def pacing(args: Any) -> float:
    """The speed of --speed and a checked --concurrency, as replay and advisor verify take them;
    ValueError with the message for the user."""
    try:
        speed = parse_speed(args.speed)
    except ValueError:
        raise ValueError(f"--speed: expected a positive number or max, got {args.speed!r}") from None
    if args.concurrency < 1:
        raise ValueError("--concurrency: must be at least 1")
    return speed


class _Progress:
    """Statements done / total on stderr: a bar on a terminal, a line every few seconds otherwise."""

    def __init__(self, enabled: bool, every: float = 5.0) -> None:
        import sys

        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.every = every
        self.last = time.monotonic()
        self.bar: Any = None
        self.task: Any = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.tty:
            if self.bar is None:
                from rich.console import Console
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeElapsedColumn,
                )

                self.bar = Progress(TextColumn("replaying"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                    console=Console(stderr=True), transient=True)
                self.bar.start()
                self.task = self.bar.add_task("replaying", total=total)
            self.bar.update(self.task, completed=done)
        elif time.monotonic() - self.last >= self.every or done == total:
            import sys

            self.last = time.monotonic()
            print(f"pgfront replay: {done}/{total} statements", file=sys.stderr, flush=True)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def run_cli(args: Any) -> int:
    """`pgfront replay CAPTURE... --target URL ...`: 0 when replayed (differences are reported, not
    failures), 2 for a missing or unreadable capture, an unreachable target or a bad argument."""
    import sys

    def fail(message: str) -> int:
        print(f"pgfront replay: {message}", file=sys.stderr)
        return 2

    try:
        speed = pacing(args)
    except ValueError as e:
        return fail(str(e))
    try:
        conninfo_to_dict(args.target)
    except psycopg.Error as e:
        return fail(f"--target: not a PostgreSQL URL or conninfo: {e}")
    try:
        capture = load(args.capture)
    except CaptureError as e:
        return fail(str(e))
    if not capture.statements:
        print(f"pgfront replay: the capture ({_n(len(capture.files), 'file')}) holds no statements: nothing to replay",
              file=sys.stderr)
        return 0
    print(f"pgfront replay: {_n(capture.statements, 'statement')} in {_n(len(capture.sessions), 'session')} over "
          f"{capture.seconds:.1f} s from {_n(len(capture.files), 'file')}", file=sys.stderr)
    progress = _Progress(not args.quiet)
    try:
        import uvloop  # a quarter more statements per second than asyncio's loop

        report = uvloop.run(replay(capture, args.target, speed=speed, concurrency=args.concurrency,
                                    writes=args.writes, timeout=args.timeout or None, progress=progress))
    except TargetError as e:
        return fail(f"cannot connect to {safe_target(args.target)}: {e}")
    finally:
        progress.stop()
    if args.json:
        try:
            Path(args.json).write_bytes(orjson.dumps(report.to_dict(), option=orjson.OPT_INDENT_2) + b"\n")
        except OSError as e:
            return fail(f"--json: cannot write {args.json}: {e.strerror or e}")
    sys.stdout.write(render_text(report))
    return 0
