"""EXPLAIN one statement with its own parameter values, on PostgreSQL 15 and later.

PG15 has no EXPLAIN (GENERIC_PLAN) and asyncpg wants typed Python values, while we only have the
parameters' text. So the statement is PREPAREd (the server infers the parameter types from the
statement, as it did for the client) and explained as `EXPLAIN EXECUTE name('v1', 'v2')`: quoted
literals are untyped, so the server coerces them to the inferred types exactly as it coerced the
client's text parameters. With a parameter unknown (NULL stands for "not known", e.g. a binary
value) the plan is forced generic, which does not depend on the values at all.

Everything runs in a READ ONLY transaction that is always rolled back, and PREPARE/EXPLAIN go
through the extended protocol, which refuses a second statement smuggled into the text.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
from pglast.keywords import RESERVED_KEYWORDS

_names = itertools.count(1)
_SIMPLE_IDENT = re.compile(r"[a-z_][a-z0-9_$]*")
_UNTYPED_PARAM = "could not determine data type of parameter"


def quote_ident(name: str) -> str:
    """Quote an identifier unless it is a plain lower-case non-keyword (readable CREATE INDEX text)."""
    if _SIMPLE_IDENT.fullmatch(name) and name not in RESERVED_KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str | None) -> str:
    if value is None:
        return "NULL"
    return "'" + value.replace("'", "''") + "'"


def _explain_options(analyze: bool) -> str:
    return "(ANALYZE, BUFFERS, FORMAT JSON)" if analyze else "(FORMAT JSON)"


async def _prepare(conn: asyncpg.Connection, name: str, sql: str) -> int:
    """PREPARE under a savepoint; returns the number of parameters the server inferred.

    An untyped parameter (`SELECT $1`) makes PREPARE fail; the retry declares every parameter text.
    """
    try:
        async with conn.transaction():
            await conn.fetch(f"PREPARE {name} AS {sql}")
    except asyncpg.PostgresError as e:
        if _UNTYPED_PARAM not in str(e):
            raise
        count = max((int(n) for n in re.findall(r"\$(\d+)", sql)), default=0)
        types = ", ".join(["text"] * count)
        await conn.fetch(f"PREPARE {name} ({types}) AS {sql}")
    return await conn.fetchval(
        "SELECT cardinality(parameter_types) FROM pg_prepared_statements WHERE name = $1", name
    )


async def explain_plan(
    conn: asyncpg.Connection,
    sql: str,
    params: Sequence[str | None] | None,
    *,
    analyze: bool = False,
    role: str | None = None,
    statement_timeout_ms: int = 30000,
) -> dict[str, Any]:
    """The first element of EXPLAIN (FORMAT JSON): {"Plan": {...}, "Planning Time": ...}.

    `params` None means "values not known": the plan is then generic. `analyze` is ignored for a
    generic plan (running it with NULLs would measure something else). Raises asyncpg errors and
    ValueError (parameter count mismatch).
    """
    name = f"pgfront_explain_{next(_names)}"
    generic = params is None or any(p is None for p in params)
    prepared = False
    tx = conn.transaction(readonly=True)
    await tx.start()
    try:
        if role:
            await conn.execute(f"SET LOCAL ROLE {quote_ident(role)}")
        await conn.execute(f"SET LOCAL statement_timeout = {int(statement_timeout_ms)}")
        await conn.execute(f"SET LOCAL plan_cache_mode = {'force_generic_plan' if generic else 'force_custom_plan'}")
        count = await _prepare(conn, name, sql)
        prepared = True
        values = [None] * count if params is None else list(params)
        if len(values) != count:
            raise ValueError(f"statement has {count} parameters, {len(values)} values given")
        args = "(" + ", ".join(quote_literal(v) for v in values) + ")" if count else ""
        opts = _explain_options(analyze and not generic)
        raw = await conn.fetchval(f"EXPLAIN {opts} EXECUTE {name}{args}")
    finally:
        await tx.rollback()
        if prepared:
            try:
                await conn.execute(f"DEALLOCATE {name}")
            except asyncpg.PostgresError:
                pass
    doc = json.loads(raw) if isinstance(raw, str) else raw
    return doc[0]


def walk_plan(node: dict[str, Any]):
    """Every plan node, depth first."""
    yield node
    for child in node.get("Plans", ()):
        yield from walk_plan(child)


def plan_relations(plan: dict[str, Any]) -> list[str]:
    """Relation names scanned anywhere in a plan (EXPLAIN without VERBOSE has no schema)."""
    root = plan.get("Plan", plan)
    seen: dict[str, None] = {}
    for node in walk_plan(root):
        rel = node.get("Relation Name")
        if rel:
            seen[rel] = None
    return list(seen)


_SNAPSHOT_SQL = """
SELECT c.oid::regclass::text AS "table", n.nspname AS schema, c.relname, c.relpages, c.reltuples,
       s.n_live_tup, s.n_dead_tup, s.seq_scan, s.idx_scan, s.n_tup_ins, s.n_tup_upd, s.n_tup_del,
       s.last_analyze, s.last_autoanalyze, s.last_vacuum, s.last_autovacuum
FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_stat_user_tables s ON s.relid = c.oid
WHERE c.relname = ANY($1::text[]) AND c.relkind IN ('r', 'p', 'm')
ORDER BY pg_table_is_visible(c.oid) DESC
"""


def _jsonable(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


async def table_snapshot(conn: asyncpg.Connection, relations: Sequence[str]) -> dict[str, dict[str, Any]]:
    """pg_stat_user_tables and pg_class figures for the named relations, keyed by relation name."""
    if not relations:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for row in await conn.fetch(_SNAPSHOT_SQL, list(relations)):
        out.setdefault(row["relname"], {k: _jsonable(v) for k, v in row.items()})
    return out
