"""Candidate indexes from the workload's column uses, pruned by selectivity and existing indexes.

Key order follows what a btree can use: equality columns first (most selective first), then one
range column or the ORDER BY keys. Beside that composite, narrower variants (equality only, the
sort keys alone, join keys, expression keys) compete: the HypoPG step keeps whichever the planner
actually prefers. Equality columns whose predicate reads a large share of the table (pg_stats)
never become keys: an index on them would not be used and only cost writes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from proxy.advisor.catalog import Catalog, Index, Table
from proxy.advisor.collect import Statement
from proxy.advisor.predicates import EQ_OPS, ColumnUse, statement_shape
from proxy.slowlog.explain import quote_ident

MAX_SELECTIVITY = 0.3  # an equality key reading more than this share of the table is useless
PARTIAL_MAX_SELECTIVITY = 0.1  # a constant this rare is worth a partial index
_C_COLLATIONS = frozenset({"C", "POSIX", "C.UTF-8", "C.utf8"})


@dataclass
class Candidate:
    table: Table
    keys: tuple[str, ...]  # index key items as SQL: "customer_id", "(lower(email))", "name text_pattern_ops"
    predicate: str | None = None
    kind: str = "composite"  # single | composite | sort | join | expression | partial
    fingerprints: set[str] = field(default_factory=set)  # statements it was derived from
    reasons: list[str] = field(default_factory=list)
    primary: bool = False  # the first choice for some statement (not a narrower variant)

    @property
    def signature(self) -> tuple[int, tuple[str, ...], str | None]:
        return (self.table.oid, tuple(normalize_key(k) for k in self.keys), normalize_key(self.predicate or ""))

    def definition(self) -> str:
        """Key list and predicate: `ON schema.table (a, b) WHERE p`."""
        table = f"{quote_ident(self.table.schema)}.{quote_ident(self.table.name)}"
        where = f" WHERE {self.predicate}" if self.predicate else ""
        return f"ON {table} ({', '.join(self.keys)}){where}"


@dataclass
class Rejection:
    fingerprint: str
    table: str
    column: str
    selectivity: float
    reason: str


def normalize_key(key: str) -> str:
    """Comparable form of an index key or predicate: no outer parentheses, casts, quotes or spacing."""
    k = key.strip().lower()
    while k.startswith("(") and k.endswith(")") and _balanced(k[1:-1]):
        k = k[1:-1].strip()
    k = re.sub(r"::[a-z_ ]+(\[\])?", "", k)
    return re.sub(r"[\s\"]", "", k)


def _balanced(s: str) -> bool:
    depth = 0
    for ch in s:
        depth += (ch == "(") - (ch == ")")
        if depth < 0:
            return False
    return depth == 0


def _key_sql(use: ColumnUse) -> str:
    return quote_ident(use.column) if use.column is not None else f"({use.expression})"


class CandidateBuilder:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.candidates: dict[tuple, Candidate] = {}
        self.rejections: list[Rejection] = []
        self.covered: list[dict] = []  # candidates an existing index already serves

    # -- resolution -------------------------------------------------------------------------------
    def _resolve(self, use: ColumnUse, tables: list[Table]) -> Table | None:
        table = self.catalog.table(use.table) if use.table else None
        if table is None and use.table is None and use.column is not None:
            table = self.catalog.table_with_column(tables, use.column)
        if table is None or (use.column is not None and use.column not in table.columns):
            return None
        return table

    def _selectivity(self, table: Table, use: ColumnUse, st: Statement) -> float | None:
        """Estimated share of `table` an equality-like use reads; None when unknown (kept)."""
        stats = table.column_stats.get(use.column) if use.column else None
        if stats is None:
            return None
        if use.op == "null":
            return stats.null_frac
        values: list[str | None] = []
        for sample in st.samples:
            if use.constant is not None:
                values.append(use.constant)
            elif use.param is not None and sample.params and use.param <= len(sample.params):
                values.append(sample.params[use.param - 1])
            else:
                values.append(None)
        sels = [stats.eq_selectivity(v, table.reltuples) for v in values or [None]]
        sel = sum(sels) / len(sels)
        return min(1.0, sel * 3) if use.op == "in" else sel

    # -- generation -------------------------------------------------------------------------------
    def add_statement(self, st: Statement) -> None:
        shapes = [statement_shape(s.sql) for s in st.samples] or [statement_shape(st.normalized)]
        shape = shapes[0]
        if not shape.parsed:
            return
        tables = [t for t in (self.catalog.table(name) for name in shape.tables) if t is not None]
        per_table: dict[int, list[ColumnUse]] = {}
        for use in shape.uses:
            table = self._resolve(use, tables)
            if table is not None:
                per_table.setdefault(table.oid, []).append(use)
        # constants shared by every sample (literal text differs between executions otherwise)
        constants = set.intersection(*({(u.table, u.key, u.constant) for u in s.uses if u.constant is not None}
                                       for s in shapes))
        for oid, uses in per_table.items():
            self._table_candidates(st, self.catalog.tables[oid], uses, constants)

    def _table_candidates(self, st: Statement, table: Table, uses: list[ColumnUse],
                          constants: set[tuple]) -> None:
        eq: list[tuple[float, ColumnUse]] = []
        for use in (u for u in uses if u.op in EQ_OPS):
            sel = self._selectivity(table, use, st)
            if sel is not None and sel > MAX_SELECTIVITY:
                self.rejections.append(Rejection(
                    st.fingerprint, table.qualified, use.key, round(sel, 4),
                    f"{use.key} {use.op} reads about {sel:.0%} of {table.qualified}: an index would not be used"))
                continue
            eq.append((sel if sel is not None else 0.01, use))
        eq.sort(key=lambda pair: pair[0])
        ranges = [u for u in uses if u.op in ("range", "like")]
        sort = sorted((u for u in uses if u.op == "sort"), key=lambda u: u.position)
        fp = st.fingerprint

        eq_keys = list(dict.fromkeys(_key_sql(u) for _, u in eq))
        tail = self._tail(ranges, sort, table)
        self._add(table, eq_keys + [k for k in tail if k not in eq_keys], None, "composite", fp,
                  "equality, then range or sort columns", primary=True)
        if tail and eq_keys:
            self._add(table, eq_keys, None, "composite", fp, "equality columns")
            self._add(table, tail, None, "sort" if sort else "single", fp, "range or sort columns alone")
        if len(eq_keys) > 1:
            self._add(table, eq_keys[:1], None, "single", fp, "most selective equality column")
        for use in uses:
            if use.op == "join":
                self._add(table, [_key_sql(use)], None, "join", fp, "join key", primary=True)
            if use.expression is not None and use.op in EQ_OPS | {"range"}:
                self._add(table, [_key_sql(use)], None, "expression", fp, "expression predicate", primary=True)
        self._partial_candidates(st, table, eq, ranges, sort, constants)

    def _tail(self, ranges: list[ColumnUse], sort: list[ColumnUse], table: Table) -> list[str]:
        """Keys after the equality columns: the ORDER BY keys (when no other range column intervenes)
        or the first range column."""
        if sort and (not ranges or ranges[0].key == sort[0].key):
            mixed = len({u.descending for u in sort}) > 1
            return [_key_sql(u) + (" DESC" if mixed and u.descending else "") for u in sort]
        if ranges:
            use = ranges[0]
            key = _key_sql(use)
            if use.op == "like" and self.catalog.collation not in _C_COLLATIONS:
                key += " text_pattern_ops"
            return [key]
        return []

    def _partial_candidates(self, st: Statement, table: Table, eq: list[tuple[float, ColumnUse]],
                            ranges: list[ColumnUse], sort: list[ColumnUse], constants: set[tuple]) -> None:
        for sel, use in eq:
            if use.constant is None or use.predicate is None or sel > PARTIAL_MAX_SELECTIVITY \
                    or (use.table, use.key, use.constant) not in constants:
                continue
            stats = table.column_stats.get(use.column or "")
            if stats is None or use.constant not in stats.mcv and sel > 0.01:
                continue  # rarity must be known from the statistics
            rest = [_key_sql(u) for _, u in eq if u is not use]
            keys = list(dict.fromkeys(rest + self._tail(ranges, sort, table))) or [_key_sql(use)]
            self._add(table, keys, use.predicate, "partial", st.fingerprint,
                      f"rare constant {use.predicate} ({sel:.1%} of rows)", primary=True)

    def _add(self, table: Table, keys: list[str], predicate: str | None, kind: str, fp: str, reason: str,
             primary: bool = False) -> None:
        if not keys:
            return
        cand = Candidate(table, tuple(keys), predicate, kind)
        sig = cand.signature
        existing = self.candidates.get(sig)
        if existing is None:
            covering = self._covering_index(cand)
            if covering is not None:
                self.covered.append({"table": table.qualified, "keys": list(keys), "predicate": predicate,
                                     "fingerprint": fp, "covered_by": covering.name})
                return
            existing = self.candidates[sig] = cand
        existing.fingerprints.add(fp)
        existing.primary |= primary
        if reason not in existing.reasons:
            existing.reasons.append(reason)

    def _covering_index(self, cand: Candidate) -> Index | None:
        """An existing valid btree whose leading keys are the candidate's (and whose predicate is none
        or the same)."""
        _, keys, pred = cand.signature
        for idx in self.catalog.indexes_on(cand.table.oid):
            if not idx.valid or idx.method != "btree":
                continue
            have = tuple(normalize_key(k) for k in idx.keys)
            idx_pred = normalize_key(idx.predicate or "")
            if have[:len(keys)] == keys and idx_pred in ("", pred):
                return idx
        return None


def build_candidates(catalog: Catalog, statements: list[Statement]) -> CandidateBuilder:
    builder = CandidateBuilder(catalog)
    for st in statements:
        builder.add_statement(st)
    return builder
