"""Facts from the upstream's catalogs that decide cacheability: relation persistence, kind, row-level
security, what a relation's rows depend on, and function volatility.

Looked up once per (database, name) on a separate asyncpg connection per database, kept locally for
`ttl` seconds (then refreshed in the background while the old facts keep serving) and dropped at once
when DDL passes through pgfront. The hot path only reads dicts: an unknown name schedules a look-up and
the caller bypasses the cache until the facts arrive.

Names are unqualified and lower-cased (see writes.relname) and facts are the union over every relation
of that name in every schema: so they do not depend on the session's search_path, at the price of
refusing `orders` everywhere when one schema has an unlogged `orders`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import asyncpg

from proxy.cache.writes import relname
from proxy.sql import analyze

log = logging.getLogger("pgfront.cache.catalog")

_SYSTEM_SCHEMAS = ("pg_catalog", "information_schema", "pg_toast")

_RELATIONS_SQL = """
SELECT c.oid, lower(c.relname) AS name, c.relkind::text AS relkind, c.relpersistence::text AS relpersistence,
       c.relrowsecurity OR c.relforcerowsecurity AS rls, n.nspname,
       EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = c.oid AND NOT t.tgisinternal)
         OR EXISTS (SELECT 1 FROM pg_rewrite r WHERE r.ev_class = c.oid AND r.ev_type <> '1') AS side_effects,
       CASE WHEN c.relkind = 'v' THEN pg_get_viewdef(c.oid) END AS viewdef
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND {where}
"""

# rows of relation b can change when relation a (one of $1) is read: inheritance both ways, the tables
# under a view, and tables whose writes cascade into a through a foreign key
_EDGES_SQL = """
SELECT inhrelid AS a, inhparent AS b, 'tree' AS kind FROM pg_inherits WHERE inhrelid = ANY($1::oid[])
UNION ALL SELECT inhparent, inhrelid, 'tree' FROM pg_inherits WHERE inhparent = ANY($1::oid[])
UNION ALL SELECT DISTINCT r.ev_class, d.refobjid, 'view' FROM pg_rewrite r
  JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
                   AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.ev_class
  WHERE r.ev_class = ANY($1::oid[])
UNION ALL SELECT conrelid, confrelid, 'cascade' FROM pg_constraint
  WHERE contype = 'f' AND conrelid = ANY($1::oid[])
    AND (confdeltype IN ('c', 'n', 'd') OR confupdtype IN ('c', 'n', 'd'))
"""

_FUNCTIONS_SQL = """
SELECT lower(p.proname) AS name, p.provolatile::text AS provolatile, n.nspname
FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE lower(p.proname) = ANY($1::text[])
"""


async def connect(dsn: str, database: str, application_name: str, timeout: float) -> asyncpg.Connection:
    """A connection to `database` on the upstream; user from the DSN, else $PGUSER, else postgres."""
    user = None if urlsplit(dsn).username or os.environ.get("PGUSER") else "postgres"
    return await asyncpg.connect(dsn, database=database, user=user, timeout=timeout,
                                 server_settings={"application_name": application_name})


@dataclass(frozen=True, slots=True)
class RelationFacts:
    reason: str                  # "" = cacheable; else why not (RLS is reported separately)
    rls: bool                    # row-level security on this name or anything it depends on
    catalog: bool                # a system catalog relation
    tags: frozenset[str]         # relation names whose version counters guard a read of this name
    write_tags: frozenset[str]   # names to bump when this name is written (itself and the tables under a view)
    side_effects: bool           # user triggers or rules: a write may change any table
    functions: frozenset[str] = frozenset()  # functions called by the views read: their volatility counts too


@dataclass(frozen=True, slots=True)
class FunctionFacts:
    immutable: bool              # every overload is IMMUTABLE (or no such pg_proc entry: SQL constructs)
    may_write: bool              # some overload is VOLATILE and not a pg_catalog builtin


_NOT_FOUND_FUNCTION = FunctionFacts(True, False)


class _Database:
    """Facts and the look-up connection for one database."""

    def __init__(self) -> None:
        self.relations: dict[str, tuple[RelationFacts, float]] = {}
        self.functions: dict[str, tuple[FunctionFacts, float]] = {}
        self.want_relations: set[str] = set()
        self.want_functions: set[str] = set()
        self.task: asyncio.Task | None = None
        self.conn: asyncpg.Connection | None = None
        self.lock = asyncio.Lock()   # one query at a time on the connection
        self.failed_at = 0.0


class Catalog:
    def __init__(self, dsn: str, *, ttl: float = 60.0, timeout: float = 5.0, retry_after: float = 1.0) -> None:
        self.dsn = dsn
        self.ttl = ttl
        self.timeout = timeout
        self.retry_after = retry_after
        self.generation = 0          # bumped whenever facts change: memoized policy decisions re-check
        self.lookups = 0
        self.errors = 0
        self._dbs: dict[str, _Database] = {}
        self._closed = False

    # -- hot path: dict reads, schedule what is missing ---------------------------------------------
    def relation(self, database: str, name: str) -> RelationFacts | None:
        db = self._db(database)
        got = db.relations.get(name)
        if got is None or got[1] < time.monotonic():
            self._want(database, db, relations=(name,))
        return got[0] if got else None

    def function(self, database: str, name: str) -> FunctionFacts | None:
        db = self._db(database)
        got = db.functions.get(name)
        if got is None or got[1] < time.monotonic():
            self._want(database, db, functions=(name,))
        return got[0] if got else None

    # -- write path: wait for the facts --------------------------------------------------------------
    async def relations_now(self, database: str, names: Iterable[str]) -> dict[str, RelationFacts | None]:
        """Facts for `names`, looking up the missing ones now; None where the look-up failed."""
        db = self._db(database)
        await self._fetch_missing(database, db, [n for n in names if n not in db.relations], [])
        return {n: (db.relations[n][0] if n in db.relations else None) for n in names}

    async def functions_now(self, database: str, names: Iterable[str]) -> dict[str, FunctionFacts | None]:
        db = self._db(database)
        await self._fetch_missing(database, db, [], [n for n in names if n not in db.functions])
        return {n: (db.functions[n][0] if n in db.functions else None) for n in names}

    def forget(self, database: str | None = None, relations: Iterable[str] = ()) -> None:
        """Drop facts after DDL: with `relations`, the facts of those names and of every name depending
        on them (views, partitions); else all facts of `database` (or of every database)."""
        names = set(relations)
        for name, db in self._dbs.items():
            if database is not None and name != database:
                continue
            if names:
                for rel in [r for r, (facts, _) in db.relations.items() if facts.tags & names]:
                    del db.relations[rel]
            else:
                db.relations.clear()
                db.functions.clear()
        self.generation += 1

    async def close(self) -> None:
        self._closed = True
        for db in self._dbs.values():
            if db.task:
                db.task.cancel()
            if db.conn is not None:
                await _close_quietly(db.conn)
        self._dbs.clear()

    # -- look-ups --------------------------------------------------------------------------------------
    def _db(self, database: str) -> _Database:
        db = self._dbs.get(database)
        if db is None:
            db = self._dbs[database] = _Database()
        return db

    def _want(self, database: str, db: _Database, relations: Iterable[str] = (), functions: Iterable[str] = ()) -> None:
        db.want_relations.update(relations)
        db.want_functions.update(functions)
        if self._closed or (db.task and not db.task.done()):
            return
        if time.monotonic() - db.failed_at < self.retry_after:
            return
        db.task = asyncio.get_running_loop().create_task(self._drain(database, db))

    async def _drain(self, database: str, db: _Database) -> None:
        while db.want_relations or db.want_functions:
            rels, fns = sorted(db.want_relations), sorted(db.want_functions)
            db.want_relations.clear()
            db.want_functions.clear()
            try:
                await self._fetch(database, db, rels, fns)
            except Exception as e:
                self._failed(database, db, e)
                return

    async def _fetch_missing(self, database: str, db: _Database, rels: list[str], fns: list[str]) -> None:
        if rels or fns:
            try:
                await self._fetch(database, db, rels, fns)
            except Exception as e:  # the caller treats unknown facts conservatively
                self._failed(database, db, e)

    def _failed(self, database: str, db: _Database, e: BaseException) -> None:
        self.errors += 1
        db.failed_at = time.monotonic()
        log.warning("catalog look-up in %s failed: %s", database, e)
        if db.conn is not None and db.conn.is_closed():
            db.conn = None

    async def _connection(self, database: str, db: _Database) -> asyncpg.Connection:
        if db.conn is None or db.conn.is_closed():
            db.conn = await connect(self.dsn, database, "pgfront-cache-catalog", self.timeout)
        return db.conn

    async def _fetch(self, database: str, db: _Database, rels: list[str], fns: list[str]) -> None:
        async with db.lock, asyncio.timeout(self.timeout):
            conn = await self._connection(database, db)
            self.lookups += 1
            expires = time.monotonic() + self.ttl
            if rels:
                facts = await _relation_facts(conn, rels)
                for name in rels:
                    db.relations[name] = (facts[name], expires)
            if fns:
                rows = await conn.fetch(_FUNCTIONS_SQL, fns)
                for name in fns:
                    mine = [r for r in rows if r["name"] == name]
                    facts = FunctionFacts(
                        immutable=all(r["provolatile"] == "i" for r in mine),
                        may_write=any(r["provolatile"] == "v" and r["nspname"] != "pg_catalog" for r in mine),
                    ) if mine else _NOT_FOUND_FUNCTION
                    db.functions[name] = (facts, expires)
        self.generation += 1


async def _relation_facts(conn: asyncpg.Connection, names: list[str]) -> dict[str, RelationFacts]:
    """Facts for each name: walk inheritance, view and cascading-FK edges to everything the rows depend on."""
    rows = {r["oid"]: r for r in await conn.fetch(_RELATIONS_SQL.format(where="lower(c.relname) = ANY($1::text[])"), names)}
    edges: dict[int, list[tuple[int, str]]] = {}
    frontier = set(rows)
    while frontier:
        for e in await conn.fetch(_EDGES_SQL, list(frontier)):
            edges.setdefault(e["a"], []).append((e["b"], e["kind"]))
        known = {b for lst in edges.values() for b, _ in lst}
        new = known - rows.keys()
        frontier = set()
        if new:
            for r in await conn.fetch(_RELATIONS_SQL.format(where="c.oid = ANY($1::oid[])"), list(new)):
                rows[r["oid"]] = r
            frontier = {o for o in new if o in rows}
    out = {}
    for name in names:
        start = [oid for oid, r in rows.items() if r["name"] == name]
        out[name] = _combine(name, start, rows, edges)
    return out


def _walk(start: list[int], edges: dict[int, list[tuple[int, str]]], kinds: tuple[str, ...]) -> set[int]:
    seen = set(start)
    stack = list(start)
    while stack:
        for b, kind in edges.get(stack.pop(), ()):
            if kind in kinds and b not in seen:
                seen.add(b)
                stack.append(b)
    return seen


def _combine(name: str, start: list[int], rows: dict, edges: dict) -> RelationFacts:
    """Union of the facts of every relation `name` may denote and everything those depend on."""
    deps = _walk(start, edges, ("tree", "view", "cascade"))
    reason = ""
    rls = catalog = side_effects = False
    functions: set[str] = set()
    for oid in deps:
        r = rows.get(oid)
        if r is None:
            continue
        if r["nspname"] in _SYSTEM_SCHEMAS or r["nspname"].startswith("pg_toast"):
            catalog = True
        rls = rls or r["rls"]
        side_effects = side_effects or (oid in start and r["side_effects"])
        why = _refusal(r)
        if r["viewdef"]:
            view = analyze(r["viewdef"])  # Postgres records no dependency on built-ins such as now()
            functions |= {relname(f) for f in view.functions}
            why = why or ("view calls a volatile function" if view.volatile else "")
        if why and not reason:
            reason = why
    tags = frozenset({name} | {rows[o]["name"] for o in deps if o in rows})
    write_tags = frozenset({name} | {rows[o]["name"] for o in _walk(start, edges, ("view",)) if o in rows})
    return RelationFacts(reason, rls, catalog, tags, write_tags, side_effects, frozenset(functions))


def _refusal(r: asyncpg.Record) -> str:
    if r["relpersistence"] == "t":
        return "temporary table"
    if r["relpersistence"] == "u":
        return "unlogged table"
    if r["relkind"] == "f":
        return "foreign table"
    if r["relkind"] == "S":
        return "sequence"
    return ""


async def _close_quietly(conn: asyncpg.Connection) -> None:
    try:
        await asyncio.wait_for(conn.close(), 1.0)
    except Exception:
        conn.terminate()
