"""Statement rewrites: templates keyed on a normalized statement, and table renames.

Template: `from` is matched by fingerprint, then confirmed node by node against the client's parse
tree (the fingerprint alone sorts select lists and AND operands, so it cannot say which constant
fills which $n). Each $n of `from` picks up the client's constant (simple protocol) or parameter
(extended protocol) at the same place, and `to` is emitted with them put in.

Rename: every reference to a table (FROM, JOIN, INSERT INTO, UPDATE, DELETE, and column qualifiers
naming an un-aliased table) is replaced in the client's text; CTE names are left alone.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from proxy.rules.sqltree import Tree, literal_span, name_span, node, parse, splice, walk

_IGNORED = frozenset({"location", "stmt_location", "stmt_len"})
_PART = r'(?:[A-Za-z_][A-Za-z0-9_$]*|"(?:[^"]|"")+")'  # an identifier, plain or quoted
_IDENT = re.compile(rf"^{_PART}(?:\.{_PART}){{0,2}}$")


class TemplateError(ValueError):
    pass


def param_numbers(tree: Tree) -> set[int]:
    return {int(tree.text[t.start + 1:t.end]) for t in tree.tokens if t.name == "PARAM"}


class TemplateRewrite:
    """rewrite = { from = "...", to = "..." }."""

    def __init__(self, from_sql: str, to_sql: str, fingerprint: Callable[[str], str]) -> None:
        src, dst = parse(from_sql), parse(to_sql)
        if src is None:
            raise TemplateError(f"rewrite.from does not parse: {from_sql!r}")
        if dst is None:
            raise TemplateError(f"rewrite.to does not parse: {to_sql!r}")
        if len(src.stmts) != 1 or len(dst.stmts) != 1:
            raise TemplateError("rewrite.from and rewrite.to must each be exactly one statement")
        have, use = param_numbers(src), param_numbers(dst)
        if have != use:
            # With the extended protocol the client binds one value per $n of `from`: `to` must take them all.
            raise TemplateError(
                f"rewrite.to must use the same parameters as rewrite.from ({_plist(have)}), not {_plist(use)}")
        self.from_sql, self.to_sql = from_sql, to_sql
        self.fingerprint = fingerprint(from_sql)
        self._pattern = src.stmts[0]["stmt"]
        self._to = dst
        self.apply = lru_cache(maxsize=1024)(self._apply)

    def _apply(self, text: str, fingerprint: str) -> str | None:
        """The rewritten text, or None when text is not an instance of `from`."""
        if fingerprint != self.fingerprint:
            return None
        tree = parse(text)
        if tree is None or len(tree.stmts) != 1:
            return None
        binding: dict[int, str] = {}
        if not _align(self._pattern, tree.stmts[0]["stmt"], tree, binding):
            return None
        edits = [(t.start, t.end, binding[int(self._to.text[t.start + 1:t.end])])
                 for t in self._to.tokens if t.name == "PARAM"]
        return splice(self.to_sql, edits)


def _plist(nums: set[int]) -> str:
    return ", ".join(f"${n}" for n in sorted(nums)) or "none"


def _align(pat: Any, got: Any, tree: Tree, binding: dict[int, str]) -> bool:
    """Does got have pat's shape? Binds each ParamRef of pat to the client's text at that place."""
    if isinstance(pat, dict):
        kind, body = node(pat)
        if kind == "ParamRef":
            gkind, gbody = node(got)
            if gkind == "ParamRef":
                value = f"${gbody.get('number', 0)}"
            elif gkind == "A_Const":
                start, end = literal_span(tree, gbody.get("location", -1))
                value = tree.text[start:end]
                if value[:1] == "-":  # "x - $1" must not become "x --5"
                    value = f"({value})"
            else:
                return False
            return binding.setdefault(body.get("number", 0), value) == value
        if not isinstance(got, dict):
            return False
        keys = pat.keys() - _IGNORED
        if keys != got.keys() - _IGNORED:
            return False
        return all(_align(pat[k], got[k], tree, binding) for k in keys)
    if isinstance(pat, list):
        return (isinstance(got, list) and len(pat) == len(got)
                and all(_align(p, g, tree, binding) for p, g in zip(pat, got, strict=True)))
    return pat == got


def _split_name(name: str) -> tuple[str | None, str]:
    schema, _, rel = name.rpartition(".")
    return (schema or None), rel


class RenameTables:
    """rewrite = { rename_table = { old = "new", ... } }."""

    def __init__(self, mapping: dict[str, str]) -> None:
        for old, new in mapping.items():
            for name in (old, new):
                if not _IDENT.match(name):
                    raise TemplateError(f"rename_table: {name!r} is not a table name")
        self.mapping = dict(mapping)
        self._old = {_split_name(_unquote(k)): v for k, v in mapping.items()}
        self._needles = tuple({rel.lower() for _, rel in self._old})  # cheap pre-check on the text
        self.apply = lru_cache(maxsize=1024)(self._apply)

    def _target(self, schema: str | None, rel: str) -> str | None:
        """"old" renames old in any schema; "s.old" renames s.old and an unqualified old."""
        if (schema, rel) in self._old:
            return self._old[(schema, rel)]
        if schema is None:
            return next((new for (s, r), new in self._old.items() if r == rel), None)
        return self._old.get((None, rel))

    def _apply(self, text: str) -> str | None:
        lowered = text.lower()
        if not any(n in lowered for n in self._needles):
            return None
        tree = parse(text)
        if tree is None:
            return None
        nodes = [n for raw in tree.stmts for n in walk(raw.get("stmt"))]
        ctes = {body.get("ctename") for kind, body in nodes if kind == "CommonTableExpr"}
        edits: list[tuple[int, int, str]] = []
        renamed_bare: dict[str, str] = {}  # un-aliased tables: their name also qualifies columns
        for kind, body in nodes:
            if kind != "RangeVar":
                continue
            schema, rel = body.get("schemaname"), body.get("relname", "")
            if schema is None and rel in ctes:
                continue
            new = self._target(schema, rel)
            if new is None or body.get("location", -1) < 0:
                continue
            parts = 1 + (schema is not None) + (body.get("catalogname") is not None)
            start, end = name_span(tree, body["location"], parts)
            repl = new if "." in new or schema is None else f"{_quote(schema)}.{new}"
            edits.append((start, end, repl))
            if not body.get("alias"):
                renamed_bare[rel] = _split_name(new)[1]
        for kind, body in nodes:
            fields = body.get("fields", []) if kind == "ColumnRef" else []
            if len(fields) == 2 and node(fields[0])[0] == "String":
                qual = fields[0]["String"].get("sval")
                if qual in renamed_bare and body.get("location", -1) >= 0:
                    edits.append((*name_span(tree, body["location"], 1), renamed_bare[qual]))
        return splice(text, edits) if edits else None


def _unquote(name: str) -> str:
    return ".".join(p[1:-1].replace('""', '"') if p.startswith('"') else p.lower() for p in name.split("."))


def _quote(ident: str) -> str:
    return ident if re.fullmatch(r"[a-z_][a-z0-9_$]*", ident) else '"' + ident.replace('"', '""') + '"'
