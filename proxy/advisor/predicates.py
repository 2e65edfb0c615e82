"""Which columns a statement filters, joins and sorts on, per table, read from the SQL with pglast.

The plan's Filter strings are deparsed expressions that lose the parameter numbers and need a
second parser; the statement's own parse tree has everything: each WHERE/ON conjunct becomes a
`ColumnUse` with an operator class (eq, in, null, range, like, join, sort), the table it belongs to
(alias resolved; unqualified columns are resolved later against the catalog), and for expressions
(`lower(email)`) their text with table qualifiers stripped, ready for CREATE INDEX.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache

from pglast import ast, parse_sql
from pglast.enums import A_Expr_Kind, BoolExprType, NullTestType, SortByDir
from pglast.stream import RawStream
from pglast.visitors import Visitor

EQ_OPS = frozenset({"eq", "in", "null"})
_RANGE_OPERATORS = frozenset({"<", "<=", ">", ">="})
_SKIP_SCHEMAS = frozenset({"pg_catalog", "information_schema"})


@dataclass(frozen=True)
class ColumnUse:
    table: str | None  # relation as written ("orders", "public.orders"); None = unqualified column
    column: str | None  # a plain column
    expression: str | None  # or an expression over one table's columns, qualifiers stripped
    op: str  # eq | in | null | range | like | join | sort
    constant: str | None = None  # literal compared with (eq), for partial-index candidates
    param: int | None = None  # $n compared with (eq), to look its value up in captured parameters
    predicate: str | None = None  # the conjunct as SQL, qualifiers stripped (eq with a constant)
    position: int = 0  # sort key position
    descending: bool = False

    @property
    def key(self) -> str:
        return self.column if self.column is not None else f"({self.expression})"


@dataclass(frozen=True)
class StatementShape:
    parsed: bool
    kind: str  # select | update | delete | insert | other
    tables: tuple[str, ...]  # relations referenced, as written
    uses: tuple[ColumnUse, ...]
    has_limit: bool
    catalog: bool  # touches pg_catalog / information_schema


class _StripQualifiers(Visitor):
    def visit_ColumnRef(self, ancestors, node):  # noqa: N802 (pglast visitor naming)
        return ast.ColumnRef(fields=(node.fields[-1],))


def _unqualified_sql(node: ast.Node) -> str:
    clone = copy.deepcopy(node)
    _StripQualifiers()(clone)
    return RawStream()(clone)


def _relname(rv: ast.RangeVar) -> str:
    return f"{rv.schemaname}.{rv.relname}" if rv.schemaname else rv.relname


class _Scope:
    """FROM-list of one query level: alias or name -> relation as written."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.tables: list[str] = []
        self.conjuncts: list[ast.Node] = []  # JOIN ... ON quals

    def add_from(self, item: ast.Node | None) -> None:
        if isinstance(item, ast.RangeVar):
            rel = _relname(item)
            self.tables.append(rel)
            self.names[item.alias.aliasname if item.alias else item.relname] = rel
        elif isinstance(item, ast.JoinExpr):
            self.add_from(item.larg)
            self.add_from(item.rarg)
            if item.quals is not None:
                self.conjuncts.append(item.quals)

    def table_of(self, qualifier: str | None) -> str | None:
        if qualifier is None:
            return self.tables[0] if len(self.tables) == 1 else None
        return self.names.get(qualifier, qualifier)


def _column_refs(node: ast.Node) -> list[ast.ColumnRef]:
    refs: list[ast.ColumnRef] = []

    class Collect(Visitor):
        def visit_ColumnRef(self, ancestors, n):  # noqa: N802
            refs.append(n)

        def visit_SubLink(self, ancestors, n):  # noqa: N802
            refs.append(None)  # a subquery makes the expression unindexable here

    Collect()(node)
    return refs


def _ref_parts(ref: ast.ColumnRef) -> tuple[str | None, str] | None:
    names = [f.sval for f in ref.fields if isinstance(f, ast.String)]
    if not names or len(names) != len(ref.fields):
        return None  # t.* and the like
    return (".".join(names[:-1]) or None), names[-1]


def _side(node: ast.Node, scope: _Scope) -> tuple[str, str | None, str | None, str | None]:
    """Classify one operand: ("col", table, column, None), ("expr", table, None, text),
    ("const", None, None, literal), ("param", None, None, "n"), ("value", ...) for other table-free
    values, ("other", ...)."""
    inner = node.arg if isinstance(node, ast.TypeCast) else node
    if isinstance(inner, ast.ParamRef):
        return ("param", None, None, str(inner.number))
    if isinstance(inner, ast.ColumnRef):
        parts = _ref_parts(inner)
        if parts is None:
            return ("other", None, None, None)
        return ("col", scope.table_of(parts[0]), parts[1], None)
    if isinstance(inner, ast.A_Const):
        val = inner.val
        literal = None if inner.isnull else str(getattr(val, "sval", getattr(val, "ival", getattr(val, "fval", getattr(val, "boolval", "")))))
        return ("const", None, None, literal)
    refs = _column_refs(node)
    if not refs:
        return ("value", None, None, None)
    if None in refs:
        return ("other", None, None, None)
    quals = {(_ref_parts(r) or (None, ""))[0] for r in refs}
    if len(quals) != 1:
        return ("other", None, None, None)
    return ("expr", scope.table_of(quals.pop()), None, _unqualified_sql(node))


def _use_from_side(side: tuple, op: str, constant: str | None = None, predicate: str | None = None,
                   param: int | None = None) -> ColumnUse:
    kind, table, column, expr = side
    return ColumnUse(table, column, expr if kind == "expr" else None, op, constant, param, predicate)


def _conjuncts(node: ast.Node | None) -> list[ast.Node]:
    if node is None:
        return []
    if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.AND_EXPR:
        return [c for arg in node.args for c in _conjuncts(arg)]
    return [node]


def _classify(node: ast.Node, scope: _Scope) -> list[ColumnUse]:
    if isinstance(node, ast.A_Expr):
        return _classify_a_expr(node, scope)
    if isinstance(node, ast.NullTest) and node.nulltesttype == NullTestType.IS_NULL:
        side = _side(node.arg, scope)
        return [_use_from_side(side, "null")] if side[0] in ("col", "expr") else []
    if isinstance(node, ast.ColumnRef):  # WHERE active
        side = _side(node, scope)
        if side[0] == "col":
            return [_use_from_side(side, "eq", "true", side[2])]
    if isinstance(node, ast.BoolExpr) and node.boolop == BoolExprType.OR_EXPR:
        # a = 1 OR a = 2 on one column behaves like IN
        uses = [u for arg in node.args for u in _classify(arg, scope)]
        if uses and len(uses) == len(node.args) and len({(u.table, u.key) for u in uses}) == 1 \
                and all(u.op == "eq" for u in uses):
            u = uses[0]
            return [ColumnUse(u.table, u.column, u.expression, "in")]
    return []


def _classify_a_expr(node: ast.A_Expr, scope: _Scope) -> list[ColumnUse]:
    opname = node.name[-1].sval if node.name else ""
    kind = node.kind
    if kind == A_Expr_Kind.AEXPR_OP and opname in ("=", *_RANGE_OPERATORS):
        left, right = _side(node.lexpr, scope), _side(node.rexpr, scope)
        if left[0] in ("col", "expr") and right[0] in ("col", "expr"):
            if opname == "=" and left[1] != right[1]:
                return [_use_from_side(left, "join"), _use_from_side(right, "join")]
            return []
        if right[0] in ("col", "expr"):
            left, right = right, left
        if left[0] not in ("col", "expr") or right[0] not in ("const", "param", "value"):
            return []
        if opname == "=":
            constant = right[3] if right[0] == "const" else None
            predicate = _unqualified_sql(node) if constant is not None else None
            param = int(right[3]) if right[0] == "param" else None
            return [_use_from_side(left, "eq", constant, predicate, param)]
        return [_use_from_side(left, "range")]
    if kind == A_Expr_Kind.AEXPR_IN and opname == "=":
        side = _side(node.lexpr, scope)
        return [_use_from_side(side, "in")] if side[0] in ("col", "expr") else []
    if kind in (A_Expr_Kind.AEXPR_BETWEEN, A_Expr_Kind.AEXPR_BETWEEN_SYM):
        side = _side(node.lexpr, scope)
        return [_use_from_side(side, "range")] if side[0] in ("col", "expr") else []
    if kind == A_Expr_Kind.AEXPR_LIKE and opname == "~~":
        side, pattern = _side(node.lexpr, scope), _side(node.rexpr, scope)
        if side[0] != "col":
            return []
        if pattern[0] == "const" and (not pattern[3] or pattern[3][0] in "%_"):
            return []  # a leading wildcard cannot use a btree
        return [_use_from_side(side, "like")] if pattern[0] in ("const", "param", "value") else []
    return []


def _sort_uses(sort_clause, scope: _Scope) -> list[ColumnUse]:
    uses = []
    for pos, sb in enumerate(sort_clause or ()):
        side = _side(sb.node, scope)
        if side[0] not in ("col", "expr"):
            return []
        uses.append(ColumnUse(side[1], side[2], side[3] if side[0] == "expr" else None, "sort",
                              position=pos, descending=sb.sortby_dir == SortByDir.SORTBY_DESC))
    if len({u.table for u in uses}) > 1:
        return []  # keys from several tables: no single index yields that order
    return uses


class _Statements(Visitor):
    """Every query level (SELECT, UPDATE, DELETE) anywhere in the tree, with its own scope."""

    def __init__(self) -> None:
        self.levels: list[tuple[_Scope, ast.Node | None, tuple]] = []
        self.tables: list[str] = []
        self.catalog = False

    def _level(self, scope: _Scope, where: ast.Node | None, sort: tuple = ()) -> None:
        self.levels.append((scope, where, sort))
        self.tables.extend(scope.tables)

    def visit_SelectStmt(self, ancestors, node):  # noqa: N802
        if node.op is not None and node.op.value != 0:  # UNION etc.: the arms are visited on their own
            return
        scope = _Scope()
        for item in node.fromClause or ():
            scope.add_from(item)
        self._level(scope, node.whereClause, node.sortClause or ())

    def visit_UpdateStmt(self, ancestors, node):  # noqa: N802
        scope = _Scope()
        scope.add_from(node.relation)
        for item in node.fromClause or ():
            scope.add_from(item)
        self._level(scope, node.whereClause)

    def visit_DeleteStmt(self, ancestors, node):  # noqa: N802
        scope = _Scope()
        scope.add_from(node.relation)
        for item in node.usingClause or ():
            scope.add_from(item)
        self._level(scope, node.whereClause)

    def visit_RangeVar(self, ancestors, node):  # noqa: N802
        if node.schemaname in _SKIP_SCHEMAS or node.relname.startswith("pg_"):
            self.catalog = True


_KINDS = {ast.SelectStmt: "select", ast.UpdateStmt: "update", ast.DeleteStmt: "delete", ast.InsertStmt: "insert"}


@lru_cache(maxsize=4096)
def statement_shape(sql: str) -> StatementShape:
    """Column uses of one statement; never raises (unparsable -> parsed=False)."""
    try:
        stmts = parse_sql(sql)
    except Exception:
        return StatementShape(False, "other", (), (), False, False)
    if len(stmts) != 1:
        return StatementShape(False, "other", (), (), False, False)
    root = stmts[0].stmt
    kind = _KINDS.get(type(root), "other")
    visitor = _Statements()
    visitor(root)
    uses: list[ColumnUse] = []
    for scope, where, sort in visitor.levels:
        for conj in _conjuncts(where) + [c for q in scope.conjuncts for c in _conjuncts(q)]:
            uses.extend(_classify(conj, scope))
        uses.extend(_sort_uses(sort, scope))
    has_limit = isinstance(root, ast.SelectStmt) and root.limitCount is not None
    tables = tuple(dict.fromkeys(visitor.tables))
    return StatementShape(True, kind, tables, tuple(dict.fromkeys(uses)), has_limit, visitor.catalog)
