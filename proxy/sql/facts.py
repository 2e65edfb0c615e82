"""Statement facts read from libpg_query's JSON parse tree (parse_sql_json + a JSON decoder).

The JSON tree is much cheaper to get than pglast's Python AST. Its shape: a node is a one-key dict
{"NodeType": {fields}}; fields typed as a specific struct (RangeVar *relation, WithClause *withClause,
...) are written without the wrapper, and default values (0, false, empty) are left out.

One walk over the statement collects tables, functions, parameters and flags; the top-level fields
(kind, WHERE, LIMIT, SET, transaction command) are read straight off the statement node.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.sql.vocabulary import (
    AGGREGATE_FUNCTIONS,
    CATALOG_SCHEMAS,
    DROPPED_RELATION_TYPES,
    SET_RETURNING_FUNCTIONS,
    STATEMENT_KINDS,
    VOLATILE_FUNCTIONS,
)

Node = dict[str, Any]
NO_CTES: frozenset[str] = frozenset()


def _relation_name(rv: Node) -> str:
    """schema.table as written; the parser already lower-cased unquoted names."""
    schema = rv.get("schemaname")
    if schema is None:
        return rv["relname"]
    catalog = rv.get("catalogname")
    return f"{catalog}.{schema}.{rv['relname']}" if catalog else f"{schema}.{rv['relname']}"


def _unwrap(node: Node, node_type: str) -> Node:
    """A struct-typed field comes bare, a Node field wrapped: accept both."""
    return node.get(node_type) or node


def _function_name(call: Node) -> tuple[str, str | None]:
    """(name as written, schema or None) of a FuncCall body."""
    parts = [p["String"]["sval"] for p in call["funcname"]]
    # EXTRACT(...), OVERLAPS, ... are written as SQL syntax but parsed as pg_catalog.f()
    if len(parts) > 1 and parts[0] == "pg_catalog" and call.get("funcformat") == "COERCE_SQL_SYNTAX":
        parts = parts[1:]
    return ".".join(parts), (parts[0] if len(parts) > 1 else None)


class _Collector:
    """Walks a statement once, collecting what it reads, writes and calls."""

    __slots__ = ("read", "written", "functions", "volatile", "locking", "catalog", "temp", "max_param")

    def __init__(self) -> None:
        self.read: set[str] = set()
        self.written: set[str] = set()
        self.functions: set[str] = set()
        self.volatile = False
        self.locking = False
        self.catalog = False
        self.temp = False
        self.max_param = 0

    def walk(self, node: Node, ctes: frozenset[str], skip: str = "") -> None:
        """Visit a node or a bare struct's fields, dispatching on keys; `skip` names one handled key."""
        for key, val in node.items():
            handler = _HANDLERS.get(key, _DESCEND)
            if handler is _DESCEND:
                t = type(val)
                if t is dict:
                    self.walk(val, ctes)
                elif t is list:
                    for item in val:
                        if type(item) is dict:
                            self.walk(item, ctes)
            elif handler is not None and key != skip:
                handler(self, val, ctes)

    # -- relations -------------------------------------------------------------------------------
    def _note(self, rv: Node) -> str:
        schema = rv.get("schemaname")
        if schema in CATALOG_SCHEMAS or (schema is None and rv["relname"].startswith("pg_")):
            self.catalog = True
        if rv.get("relpersistence") == "t" or (schema or "").startswith("pg_temp"):
            self.temp = True
        return _relation_name(rv)

    def read_relation(self, val: Node | list[Node], ctes: frozenset[str]) -> None:
        for item in val if type(val) is list else (val,):
            rv = _unwrap(item, "RangeVar")
            if "schemaname" not in rv and rv["relname"] in ctes:
                continue  # a CTE reference, not a table
            self.read.add(self._note(rv))

    def write_relation(self, val: Node | list[Node]) -> None:
        for item in val if type(val) is list else (val,):
            rv = _unwrap(item, "RangeVar")
            rv = rv.get("rel", rv)  # IntoClause (SELECT INTO, CREATE TABLE AS)
            self.written.add(self._note(rv))

    # -- statements ------------------------------------------------------------------------------
    def with_clause(self, body: Node, ctes: frozenset[str]) -> frozenset[str]:
        """Walk the CTE bodies; return the names visible to the rest of the statement."""
        wc = body.get("withClause")
        if wc is None:
            return ctes
        items = [c["CommonTableExpr"] for c in wc.get("ctes", ())]
        every = ctes | {c["ctename"] for c in items}
        visible = ctes
        for cte in items:
            # a recursive WITH sees all its names; otherwise each CTE sees the ones before it
            self.walk(cte["ctequery"], every if wc.get("recursive") else visible)
            visible = visible | {cte["ctename"]}
        return every

    def statement(self, body: Node, ctes: frozenset[str], target: str) -> None:
        """A statement that writes the relation(s) in its `target` field."""
        ctes = self.with_clause(body, ctes)
        if target in body:
            self.write_relation(body[target])
        self.walk(body, ctes, target)

    def select(self, body: Node, ctes: frozenset[str]) -> None:
        if "lockingClause" in body:
            self.locking = True  # its relation list names aliases: not walked
        ctes = self.with_clause(body, ctes)
        if "intoClause" in body:
            self.write_relation(body["intoClause"])
        self.walk(body, ctes)

    def copy(self, body: Node, ctes: frozenset[str]) -> None:
        if "relation" in body and body.get("is_from"):
            self.write_relation(body["relation"])
            return
        self.walk(body, ctes)

    def grant(self, body: Node, ctes: frozenset[str]) -> None:
        # GRANT/REVOKE on tables changes what a role may read: count the tables as written
        if body.get("objtype") == "OBJECT_TABLE" and body.get("targtype") == "ACL_TARGET_OBJECT":
            self.write_relation(body.get("objects", []))

    def drop(self, body: Node, ctes: frozenset[str]) -> None:
        if body.get("removeType") not in DROPPED_RELATION_TYPES:
            return
        for obj in body.get("objects", ()):
            parts = [p["String"]["sval"] for p in obj["List"]["items"]]
            rv = {"relname": parts[-1]}
            if len(parts) > 1:
                rv["schemaname"] = parts[-2]
            self.written.add(self._note(rv))

    # -- expressions -----------------------------------------------------------------------------
    def func_call(self, val: Node, ctes: frozenset[str]) -> None:
        call = _unwrap(val, "FuncCall")
        name, schema = _function_name(call)
        self.functions.add(name)
        if (schema is None or schema == "pg_catalog") and name.rpartition(".")[2] in VOLATILE_FUNCTIONS:
            self.volatile = True
        self.walk(call, ctes)

    def sql_value_function(self, val: Node, ctes: frozenset[str]) -> None:
        # CURRENT_TIMESTAMP, CURRENT_USER, LOCALTIME(3), ...: all depend on time or session
        self.functions.add(val.get("op", "SVFOP_CURRENT_DATE").removeprefix("SVFOP_").removesuffix("_N").lower())
        self.volatile = True

    def param_ref(self, val: Node, ctes: frozenset[str]) -> None:
        self.max_param = max(self.max_param, val.get("number", 0))


_DESCEND = object()  # no handler: walk into the value
Handler = Callable[[_Collector, Any, frozenset[str]], None]


def _writes(target: str) -> Handler:
    return lambda c, body, ctes: c.statement(body, ctes, target)


# Keys of the walk: node types (the wrapper key) and bare struct-typed fields. None: never descend,
# because the value holds nothing we collect or its statement's handler deals with it.
_HANDLERS: dict[str, Handler | None] = {
    "RangeVar": _Collector.read_relation,
    # bare RangeVar fields: reads, unless the statement's handler took them as its write target
    **dict.fromkeys(("relation", "relations", "pktable", "constrrel", "view", "table", "sequence"),
                    _Collector.read_relation),
    "FuncCall": _Collector.func_call,
    "funccall": _Collector.func_call,  # CALL p(...)
    "SQLValueFunction": _Collector.sql_value_function,
    "ParamRef": _Collector.param_ref,
    "SelectStmt": _Collector.select,
    "larg": _Collector.select,  # set operations: bare SelectStmt arms
    "rarg": _Collector.select,
    "CopyStmt": _Collector.copy,
    "GrantStmt": _Collector.grant,
    "DropStmt": _Collector.drop,
    **{
        stmt: _writes(target)
        for stmt, target in {
            "InsertStmt": "relation", "UpdateStmt": "relation", "DeleteStmt": "relation",
            "MergeStmt": "relation", "TruncateStmt": "relations", "CreateStmt": "relation",
            "AlterTableStmt": "relation", "IndexStmt": "relation", "RenameStmt": "relation",
            "RefreshMatViewStmt": "relation", "ViewStmt": "view", "CreateTableAsStmt": "into",
            "CreateTrigStmt": "relation", "RuleStmt": "relation", "CreatePolicyStmt": "table",
            "AlterPolicyStmt": "table", "AlterObjectSchemaStmt": "relation", "CreateSeqStmt": "sequence",
            "AlterSeqStmt": "sequence",
        }.items()
    },
    **dict.fromkeys(("ColumnRef", "A_Const", "String", "A_Star", "typeName", "TypeName", "withClause",
                     "intoClause", "into", "lockingClause", "location"), None),
}


# -- top-level facts --------------------------------------------------------------------------------
def _int_value(node: Node) -> int | None:
    """The integer of a constant (LIMIT 10), else None (LIMIT $1, LIMIT ALL, expressions)."""
    const = node.get("A_Const")
    if const is None:
        return None
    if "ival" in const:
        return const["ival"].get("ival", 0)
    if "fval" in const:  # beyond 32 bits
        try:
            return int(const["fval"]["fval"])
        except ValueError:
            return None
    return None


def _const_text(node: Node) -> str:
    """A SET argument as text: 'a' -> a, 5 -> 5, on -> on."""
    if "TypeCast" in node:  # SET TIME ZONE INTERVAL '+1' HOUR
        return _const_text(node["TypeCast"]["arg"])
    const = node.get("A_Const", {})
    for field in ("sval", "ival", "fval", "boolval", "bsval"):
        if field in const:
            return str(const[field].get(field, 0))
    return ""


def _top_functions(node: Any) -> list[Node]:
    """FuncCalls of an expression list, without descending into subqueries."""
    found: list[Node] = []
    stack = [node]
    while stack:
        item = stack.pop()
        if type(item) is list:
            stack.extend(item)
        elif type(item) is dict:
            for key, val in item.items():
                if key == "FuncCall":
                    found.append(val)
                if key not in ("SubLink", "SelectStmt") and (type(val) is dict or type(val) is list):
                    stack.append(val)
    return found


def _returns_one_row(sel: Node, functions: frozenset[str]) -> bool:
    """Exactly one row: one VALUES row, a plain aggregate, or a SELECT of expressions only."""
    if sel.get("op") != "SETOP_NONE" or "groupClause" in sel or "havingClause" in sel:
        return False
    if "limitOffset" in sel and _int_value(sel["limitOffset"]) != 0:
        return False
    if "limitCount" in sel:
        count = sel["limitCount"]
        if not (count.get("A_Const", {}).get("isnull") or (_int_value(count) or 0) >= 1):
            return False
    if "valuesLists" in sel:
        return len(sel["valuesLists"]) == 1
    if functions & SET_RETURNING_FUNCTIONS:  # anywhere: conservative, and no target-list walk
        return False
    if functions & AGGREGATE_FUNCTIONS and any(
        _function_name(call)[0] in AGGREGATE_FUNCTIONS and "over" not in call
        for call in _top_functions(sel.get("targetList", []))
    ):
        return True
    return "fromClause" not in sel and "whereClause" not in sel


def _select_has_where(sel: Node) -> bool:
    if sel.get("op", "SETOP_NONE") != "SETOP_NONE":
        return _select_has_where(sel["larg"]) and _select_has_where(sel["rarg"])
    return "whereClause" in sel


def _transaction_facts(body: Node) -> dict[str, Any]:
    tx = body.get("kind", "TRANS_STMT_BEGIN").removeprefix("TRANS_STMT_").lower()
    return {"tx": "begin" if tx == "start" else tx}


def _set_facts(body: Node) -> dict[str, Any]:
    kind = body.get("kind", "VAR_SET_VALUE")
    name = body.get("name", "all").lower()
    value: str | None = None
    if kind == "VAR_SET_VALUE":
        value = ", ".join(_const_text(a) for a in body.get("args", ()))
    elif kind == "VAR_SET_MULTI":  # SET TRANSACTION ISOLATION LEVEL ..., SET SESSION CHARACTERISTICS
        value = ", ".join(
            f"{d['DefElem']['defname']}={_const_text(d['DefElem'].get('arg', {}))}" for d in body.get("args", ())
        )
    return {"set_name": name, "set_value": value, "set_local": bool(body.get("is_local"))}


def statement_facts(stmt: Node) -> dict[str, Any]:
    """StatementInfo fields (less text/fingerprint/normalized) for one parsed statement node."""
    (node_type, body), = stmt.items()
    kind = STATEMENT_KINDS.get(node_type, "ddl")
    collector = _Collector()
    collector.walk(stmt, NO_CTES)
    facts: dict[str, Any] = {
        "kind": kind,
        "tables_read": frozenset(collector.read),
        "tables_written": frozenset(collector.written),
        "functions": frozenset(collector.functions),
        "volatile": collector.volatile,
        "locking": collector.locking,
        "catalog": collector.catalog,
        "temp_objects": collector.temp,
        "max_param": collector.max_param,
    }
    if kind == "select":
        if "intoClause" in body:  # SELECT INTO creates a table
            facts["kind"] = "ddl"
            return facts
        facts["has_where"] = _select_has_where(body)
        facts["returns_one_row"] = _returns_one_row(body, facts["functions"])
        if "limitCount" in body:
            facts["has_limit"] = True
            facts["limit_value"] = _int_value(body["limitCount"])
        if "limitOffset" in body:
            facts["has_offset"] = True
            facts["offset_value"] = _int_value(body["limitOffset"])
    elif kind in ("update", "delete"):
        facts["has_where"] = "whereClause" in body
    elif kind == "copy":
        facts["is_copy_from"] = bool(body.get("is_from"))
    elif kind == "transaction":
        facts.update(_transaction_facts(body))
    elif kind == "set":
        facts.update(_set_facts(body))
    return facts
