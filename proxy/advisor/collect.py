"""The workload the advisor works on: fingerprints from the slow log and from pg_stat_statements.

The slow log has plans, real parameter values and durations of slow executions (each record
also counts the slow executions since the previous one). pg_stat_statements, when installed
upstream, counts every execution; its figures win for calls and mean time, and its statements that
never reached the slow log join the workload with generic plans (no parameter values known).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from proxy.advisor.predicates import statement_shape

_MAX_SAMPLES = 3  # distinct parameter sets re-explained per fingerprint
_MAX_DURATIONS = 2000


def fingerprint_of(sql: str) -> str:
    """pgfront's fingerprint of a statement text (the shared analyzer when present)."""
    try:
        from proxy.sql import analyze
    except ImportError:
        analyze = None
    if analyze is not None:
        return analyze(sql).fingerprint
    from pglast.parser import fingerprint

    try:
        return fingerprint(sql)
    except Exception:
        return ""


@dataclass
class Sample:
    sql: str
    params: list[str | None] | None


@dataclass
class Statement:
    fingerprint: str
    normalized: str
    samples: list[Sample] = field(default_factory=list)
    slow_calls: int = 0
    slow_total_ms: float = 0.0
    durations_ms: list[float] = field(default_factory=list)
    plan: dict[str, Any] | None = None  # latest captured
    tables: dict[str, Any] = field(default_factory=dict)  # latest table snapshot
    users: set[str] = field(default_factory=set)
    param_sets: set[tuple] = field(default_factory=set)  # distinct (sql, parameters) seen in records
    observed: int = 0  # records seen
    first_seen: str | None = None
    last_seen: str | None = None
    pgss_calls: int | None = None
    pgss_mean_ms: float | None = None
    pgss_stddev_ms: float | None = None
    pgss_rows: int | None = None

    @property
    def calls(self) -> int:
        return max(self.pgss_calls or 0, self.slow_calls)

    @property
    def mean_ms(self) -> float:
        if self.pgss_calls:
            return self.pgss_mean_ms or 0.0
        return self.slow_total_ms / self.slow_calls if self.slow_calls else 0.0

    @property
    def weight_ms(self) -> float:
        """calls x mean time: the time the workload spends on this fingerprint."""
        return self.calls * self.mean_ms

    @property
    def source(self) -> str:
        parts = [name for name, present in (("slowlog", self.slow_calls), ("pg_stat_statements", self.pgss_calls))
                 if present]
        return "+".join(parts) or "none"

    def distinct_keys(self) -> int:
        """Distinct cache keys the calls spread over: the observed set, or every call when no key repeated."""
        if not self.param_sets:
            return 1
        if len(self.param_sets) == self.observed and self.observed > 1:
            return max(self.calls, 1)
        return len(self.param_sets)

    @property
    def sql(self) -> str:
        return self.samples[0].sql if self.samples else self.normalized

    def p95_ms(self) -> float | None:
        if self.durations_ms:
            ordered = sorted(self.durations_ms)
            return ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
        if self.pgss_mean_ms is not None:
            return self.pgss_mean_ms + 1.645 * (self.pgss_stddev_ms or 0.0)  # normal approximation
        return None


class Workload:
    def __init__(self) -> None:
        self.statements: dict[str, Statement] = {}
        self.records = 0
        self.other_databases = 0
        self.pgss_available = False
        self.pgss_note = ""

    def add_record(self, rec: dict[str, Any], database: str | None) -> None:
        if database and rec.get("database") not in (None, database):
            self.other_databases += 1
            return
        fp = rec.get("fingerprint") or fingerprint_of(rec.get("sql", ""))
        if not fp or not rec.get("sql"):
            return
        self.records += 1
        st = self.statements.get(fp)
        if st is None:
            st = self.statements[fp] = Statement(fp, rec.get("normalized") or rec["sql"])
        calls = int(rec.get("calls") or 1)
        st.slow_calls += calls
        st.slow_total_ms += float(rec.get("total_ms") or rec.get("duration_ms") or 0.0)
        durations = rec.get("durations_ms") or [rec.get("duration_ms", 0.0)]
        room = _MAX_DURATIONS - len(st.durations_ms)
        st.durations_ms.extend(float(d) for d in durations[:max(0, room)])
        # latest first: the newest plan and parameters describe the present best
        sample = Sample(rec["sql"], rec.get("params"))
        st.observed += 1
        if len(st.param_sets) < _MAX_DURATIONS:
            st.param_sets.add((rec["sql"], tuple(rec.get("params") or ())))
        st.samples = [sample] + [s for s in st.samples if s != sample][:_MAX_SAMPLES - 1]
        if rec.get("plan"):
            st.plan = rec["plan"]
            st.tables = rec.get("tables") or {}
        if rec.get("user"):
            st.users.add(rec["user"])
        t = rec.get("time")
        if t:
            st.first_seen = min(st.first_seen or t, t)
            st.last_seen = max(st.last_seen or t, t)

    def add_records(self, records: Iterable[dict[str, Any]], database: str | None) -> None:
        for rec in records:
            self.add_record(rec, database)

    async def add_pg_stat_statements(self, conn: asyncpg.Connection,
                                     progress: Callable[[], None] | None = None) -> None:
        schema = await conn.fetchval(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
            "WHERE e.extname = 'pg_stat_statements'")
        if schema is None:
            self.pgss_note = "pg_stat_statements is not installed in this database"
            return
        try:
            rows = await conn.fetch(
                f'SELECT query, sum(calls)::bigint AS calls, sum(total_exec_time) AS total, '
                f'max(stddev_exec_time) AS stddev, sum(rows)::bigint AS rows '
                f'FROM "{schema}".pg_stat_statements '
                f'WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()) '
                f'GROUP BY query')
        except asyncpg.PostgresError as e:
            self.pgss_note = f"pg_stat_statements could not be read: {e}"
            return
        self.pgss_available = True
        for r in rows:
            shape = statement_shape(r["query"])
            if not shape.parsed or shape.kind not in ("select", "update", "delete") or shape.catalog \
                    or not shape.tables or "pgfront_explain_" in r["query"]:
                continue
            fp = fingerprint_of(r["query"])
            if not fp:
                continue
            st = self.statements.get(fp)
            if st is None:
                st = self.statements[fp] = Statement(fp, r["query"])
                st.samples.append(Sample(r["query"], None))  # values unknown: generic plan
            st.pgss_calls = (st.pgss_calls or 0) + r["calls"]
            total = (st.pgss_mean_ms or 0.0) * (st.pgss_calls - r["calls"]) + r["total"]
            st.pgss_mean_ms = total / st.pgss_calls if st.pgss_calls else 0.0
            st.pgss_stddev_ms = max(st.pgss_stddev_ms or 0.0, r["stddev"] or 0.0)
            st.pgss_rows = (st.pgss_rows or 0) + r["rows"]
            if progress:
                progress()

    def ranked(self) -> list[Statement]:
        return sorted(self.statements.values(), key=lambda s: s.weight_ms, reverse=True)
