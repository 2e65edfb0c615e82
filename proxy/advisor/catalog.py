"""What the advisor reads from the upstream catalog: tables, columns, column statistics, indexes."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import asyncpg

_TRUE = frozenset({"t", "true", "yes", "on", "1", "y"})
_FALSE = frozenset({"f", "false", "no", "off", "0", "n"})


def canonical(value: str, typname: str) -> str:
    """A parameter's text as pg_stats prints the same value (booleans and numbers differ in spelling)."""
    v = value.strip()
    if typname == "bool":
        low = v.lower()
        return "t" if low in _TRUE else "f" if low in _FALSE else v
    if typname in ("int2", "int4", "int8", "numeric", "float4", "float8", "oid"):
        try:
            d = Decimal(v)
        except InvalidOperation:
            return v
        return str(int(d)) if d.is_finite() and d == d.to_integral_value() else str(d)
    return value


@dataclass
class ColumnStats:
    null_frac: float
    n_distinct: float  # as pg_stats: negative = a fraction of the rows
    mcv: list[str]
    mcf: list[float]
    correlation: float | None
    typname: str = "text"

    def __post_init__(self) -> None:
        self.mcv = [canonical(v, self.typname) for v in self.mcv]

    def distinct(self, rows: float) -> float:
        return max(1.0, -self.n_distinct * rows if self.n_distinct < 0 else self.n_distinct)

    def eq_selectivity(self, value: str | None, rows: float) -> float:
        """Share of rows matching `col = value`, as the planner would guess it (value None: average)."""
        if value is not None:
            value = canonical(value, self.typname)
        if value is not None and value in self.mcv:
            return self.mcf[self.mcv.index(value)]
        rest = max(0.0, 1.0 - self.null_frac - sum(self.mcf))
        others = self.distinct(rows) - len(self.mcv)
        if value is None:
            # average over all values, weighting the common ones by how often they are asked for
            return sum(f * f for f in self.mcf) + (rest * rest / others if others >= 1 else 0.0)
        return rest / others if others >= 1 else rest


@dataclass
class Table:
    oid: int
    schema: str
    name: str
    reltuples: float
    relpages: int
    columns: list[str]
    stats: dict[str, Any] = field(default_factory=dict)  # pg_stat_user_tables row
    column_stats: dict[str, ColumnStats] = field(default_factory=dict)

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


@dataclass
class Index:
    oid: int
    name: str
    schema: str
    table_oid: int
    table: str  # schema.table
    keys: list[str]  # column names or expressions, as pg_get_indexdef prints them
    predicate: str | None
    unique: bool
    primary: bool
    constraint: str | None  # name of the constraint it backs
    method: str
    valid: bool
    size_bytes: int
    idx_scan: int
    definition: str


_TABLES_SQL = """
SELECT c.oid, n.nspname, c.relname, c.reltuples, c.relpages,
       array(SELECT attname FROM pg_attribute WHERE attrelid = c.oid AND attnum > 0 AND NOT attisdropped
             ORDER BY attnum) AS columns
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%'
"""

_TABLE_STATS_SQL = """
SELECT relid, n_live_tup, n_dead_tup, seq_scan, seq_tup_read, idx_scan, n_tup_ins, n_tup_upd, n_tup_del,
       n_mod_since_analyze, last_analyze, last_autoanalyze, last_vacuum, last_autovacuum
FROM pg_stat_user_tables
"""

_COLUMN_STATS_SQL = """
SELECT c.oid AS relid, s.attname, s.null_frac, s.n_distinct, s.most_common_vals::text::text[] AS mcv,
       s.most_common_freqs AS mcf, s.correlation, t.typname
FROM pg_stats s
JOIN pg_namespace n ON n.nspname = s.schemaname
JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = s.tablename
JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = s.attname
JOIN pg_type t ON t.oid = a.atttypid
WHERE NOT s.inherited AND s.schemaname NOT IN ('pg_catalog', 'information_schema')
"""

_INDEXES_SQL = """
SELECT i.indexrelid AS oid, ic.relname AS name, n.nspname AS schema, i.indrelid AS table_oid,
       quote_ident(n.nspname) || '.' || quote_ident(tc.relname) AS table,
       array(SELECT pg_get_indexdef(i.indexrelid, k, true) FROM generate_series(1, i.indnkeyatts) k) AS keys,
       pg_get_expr(i.indpred, i.indrelid, true) AS predicate,
       i.indisunique AS unique, i.indisprimary AS primary, con.conname AS constraint,
       am.amname AS method, i.indisvalid AS valid, pg_relation_size(i.indexrelid) AS size_bytes,
       coalesce(s.idx_scan, 0) AS idx_scan, pg_get_indexdef(i.indexrelid) AS definition
FROM pg_index i
JOIN pg_class ic ON ic.oid = i.indexrelid
JOIN pg_class tc ON tc.oid = i.indrelid
JOIN pg_namespace n ON n.oid = tc.relnamespace
JOIN pg_am am ON am.oid = ic.relam
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u', 'x', 'f')
LEFT JOIN pg_stat_user_indexes s ON s.indexrelid = i.indexrelid
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
ORDER BY i.indexrelid
"""


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


class Catalog:
    """A snapshot of the database's user tables and indexes."""

    def __init__(self) -> None:
        self.tables: dict[int, Table] = {}
        self.indexes: list[Index] = []
        self.collation: str = "C"
        self.by_name: dict[str, Table] = {}

    @classmethod
    async def load(cls, conn: asyncpg.Connection) -> Catalog:
        cat = cls()
        cat.collation = await conn.fetchval("SELECT datcollate FROM pg_database WHERE datname = current_database()")
        search_path = await conn.fetchval("SELECT current_schemas(false)")
        for r in await conn.fetch(_TABLES_SQL):
            cat.tables[r["oid"]] = Table(r["oid"], r["nspname"], r["relname"], max(0.0, r["reltuples"]),
                                         r["relpages"], list(r["columns"]))
        for r in await conn.fetch(_TABLE_STATS_SQL):
            if r["relid"] in cat.tables:
                cat.tables[r["relid"]].stats = {k: _plain(v) for k, v in r.items() if k != "relid"}
        for r in await conn.fetch(_COLUMN_STATS_SQL):
            t = cat.tables.get(r["relid"])
            if t is not None:
                t.column_stats[r["attname"]] = ColumnStats(
                    r["null_frac"], r["n_distinct"], list(r["mcv"] or []), list(r["mcf"] or []), r["correlation"],
                    r["typname"])
        cat.indexes = [Index(**dict(r)) for r in await conn.fetch(_INDEXES_SQL)]
        # names as a statement would write them: qualified always, bare when on the search path
        for t in sorted(cat.tables.values(), key=lambda t: _path_rank(t.schema, search_path)):
            cat.by_name.setdefault(t.qualified, t)
            if t.schema in search_path:
                cat.by_name.setdefault(t.name, t)
        return cat

    def table(self, written: str | None) -> Table | None:
        if written is None:
            return None
        return self.by_name.get(written) or self.by_name.get(written.lower())

    def table_with_column(self, candidates: list[Table], column: str) -> Table | None:
        owners = [t for t in candidates if column in t.columns]
        return owners[0] if len(owners) == 1 else None

    def indexes_on(self, table_oid: int) -> list[Index]:
        return [i for i in self.indexes if i.table_oid == table_oid]


def _path_rank(schema: str, search_path: list[str]) -> int:
    return search_path.index(schema) if schema in search_path else len(search_path)
