"""Pagination enforcement: cap a top-level SELECT's LIMIT and refuse deep OFFSETs.

The LIMIT is spliced into the client's own text (see sqltree) at the clause level of the top-level
query, so ORDER BY, UNION (the limit covers the whole union), CTEs, locking clauses (the LIMIT goes
before FOR UPDATE), comments and trailing semicolons are all handled by position, not by pattern.

  no LIMIT / LIMIT ALL / LIMIT NULL    -> LIMIT max_rows
  LIMIT n with n > max_rows            -> LIMIT max_rows (a smaller n is left alone)
  LIMIT $n or any other expression     -> LIMIT LEAST($n::bigint, max_rows)
  FETCH FIRST n ROWS                   -> the same, on n
  OFFSET n with n > max_offset         -> refused (the caller turns it into an error)
  OFFSET $n                            -> reported, so the session can check the bound value
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from proxy.rules.sqltree import CLOSE, COMMENTS, OPEN, SEMI, Tree, node, parse, splice

_CLAUSES = frozenset({"LIMIT", "OFFSET", "FETCH", "FOR"})


@dataclass(frozen=True, slots=True)
class LimitResult:
    sql: str | None = None  # the text with the LIMIT enforced; None when unchanged
    change: str | None = None  # "added", "lowered" or "capped" (LEAST around an expression)
    offset: int | None = None  # a constant OFFSET above max_offset: refuse the statement
    offset_param: int | None = None  # OFFSET $n: the session checks the bound value


UNCHANGED = LimitResult()


@lru_cache(maxsize=1024)
def enforce_limit(text: str, max_rows: int | None, max_offset: int | None, one_row: bool = False) -> LimitResult:
    """Apply a limit rule to one statement's text. one_row: the statement returns one row anyway."""
    tree = parse(text)
    if tree is None or len(tree.stmts) != 1:
        return UNCHANGED
    kind, sel = node(tree.stmts[0].get("stmt"))
    if kind != "SelectStmt" or sel.get("intoClause"):  # SELECT INTO creates a table
        return UNCHANGED
    offset_param = None
    if max_offset is not None and sel.get("limitOffset"):
        okind, obody = node(sel["limitOffset"])
        value = _const_int(okind, obody)
        if value is not None and value > max_offset:
            return LimitResult(offset=value)
        if okind == "ParamRef":
            offset_param = obody.get("number")
    sql = change = None
    if max_rows is not None and not one_row:
        sql, change = _limit(tree, sel, max_rows)
    if sql is None and offset_param is None:
        return UNCHANGED
    return LimitResult(sql=sql, change=change, offset_param=offset_param)


def _const_int(kind: str | None, body: dict[str, Any] | None) -> int | None:
    if kind != "A_Const" or body is None:
        return None
    if "ival" in body:
        return body["ival"].get("ival", 0)
    if "fval" in body:  # integers beyond int4 come as "float" strings
        try:
            return int(body["fval"]["fval"])
        except ValueError:
            return None
    return None


class _Clauses:
    """The top-level clause keywords of one statement, found by paren depth over its tokens."""

    def __init__(self, tree: Tree) -> None:
        toks = tree.tokens
        idx = [i for i, t in enumerate(toks) if t.name not in COMMENTS]
        while idx and toks[idx[-1]].name == SEMI:
            idx.pop()
        depth, stack, match = [], [], {}
        d = 0
        for p, i in enumerate(idx):
            if toks[i].name == OPEN:
                depth.append(d)
                stack.append(p)
                d += 1
            elif toks[i].name == CLOSE:
                d -= 1
                depth.append(d)
                if stack:
                    match[stack.pop()] = p
            else:
                depth.append(d)
        # "(SELECT ... LIMIT 5)": the clauses live inside the parens that wrap the whole statement
        k = 0
        while k < len(idx) // 2 and toks[idx[k]].name == OPEN and match.get(k) == len(idx) - 1 - k:
            k += 1
        self.toks, self.idx, self.depth, self.base = toks, idx, depth, k
        self.first, self.last = k, len(idx) - 1 - k  # positions of the body's first and last tokens
        self.at = {}
        for p in range(self.first, self.last + 1):
            name = toks[idx[p]].name
            if depth[p] == k and name in _CLAUSES and name not in self.at:
                self.at[name] = p

    def tok(self, p: int):
        return self.toks[self.idx[p]]

    def span(self, first: int, last: int) -> tuple[int, int]:
        return self.tok(first).start, self.tok(last).end

    def value_after(self, p: int, stop: frozenset[str]) -> tuple[int, int] | None:
        """Positions of the expression after keyword position p, up to a top-level stop keyword."""
        q = p + 1
        while q <= self.last and not (self.depth[q] == self.base and self.tok(q).name in stop):
            q += 1
        return (p + 1, q - 1) if q - 1 >= p + 1 else None


def _limit(tree: Tree, sel: dict[str, Any], max_rows: int) -> tuple[str | None, str | None]:
    text = tree.text
    cl = _Clauses(tree)
    if not cl.idx:
        return None, None
    count = sel.get("limitCount") if sel.get("limitOption") != "LIMIT_OPTION_DEFAULT" else None
    if count is None:
        if sel.get("lockingClause") and "FOR" in cl.at:
            pos = cl.tok(cl.at["FOR"]).start
            return splice(text, [(pos, pos, f"LIMIT {max_rows} ")]), "added"
        pos = cl.tok(cl.last).end
        return splice(text, [(pos, pos, f" LIMIT {max_rows}")]), "added"

    if "LIMIT" in cl.at:
        value = cl.value_after(cl.at["LIMIT"], frozenset({"OFFSET", "FOR", "FETCH"}))
    elif "FETCH" in cl.at:  # FETCH FIRST|NEXT [n] ROW|ROWS ONLY|WITH TIES
        value = cl.value_after(cl.at["FETCH"] + 1, frozenset({"ROW", "ROWS"}))
    else:
        return None, None
    if value is None:  # FETCH FIRST ROW ONLY: one row
        return None, None
    start, end = cl.span(*value)
    ckind, cbody = node(count)
    if ckind == "A_Const" and cbody.get("isnull"):  # LIMIT ALL / LIMIT NULL
        return splice(text, [(start, end, str(max_rows))]), "added"
    n = _const_int(ckind, cbody)
    if n is not None:
        if n <= max_rows:
            return None, None
        return splice(text, [(start, end, str(max_rows))]), "lowered"
    if ckind == "ParamRef":
        # the cast keeps the parameter's inferred type int8, as in a bare LIMIT $n
        repl = f"LEAST({text[start:end]}::bigint, {max_rows})"
    else:
        repl = f"LEAST(({text[start:end]}), {max_rows})"
    return splice(text, [(start, end, repl)]), "capped"
