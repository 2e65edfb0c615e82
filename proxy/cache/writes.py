"""What an executed statement invalidates: tables, a whole database or everything.

Computed once per statement text (memoized) from the StatementInfo contract. Deny by default: a
statement we cannot classify (CALL, DO, EXECUTE, a parse failure) flushes its database's entries.
Table names are reduced to their unqualified, lower-case relation name, so `public.orders`, `orders`
and `"Orders"` share one version counter: over-invalidation, never under-invalidation, and no need to
resolve search_path on the write path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

_MEMO_MAX = 10_000


def relname(name: str) -> str:
    """'public.orders' / '"S"."Orders"' / 'orders' -> 'orders' (last dotted component, unquoted, lower)."""
    if '"' not in name:
        return name.rsplit(".", 1)[-1].lower()
    parts = re.findall(r'"((?:[^"]|"")*)"|([^."]+)', name)
    quoted, plain = parts[-1]
    return (quoted.replace('""', '"') if quoted else plain).lower()


@dataclass(frozen=True, slots=True)
class WriteEffect:
    """What to invalidate once the statement's transaction commits."""

    tables: frozenset[str] = frozenset()      # relation names (relname())
    functions: frozenset[str] = frozenset()   # called functions; non-immutable user functions may write
    flush_database: bool = False
    flush_all: bool = False
    ddl: bool = False                         # catalog facts (persistence, RLS, volatility) may have changed

    def __bool__(self) -> bool:
        return bool(self.tables or self.functions or self.flush_database or self.flush_all or self.ddl)

    def merge(self, other: WriteEffect) -> WriteEffect:
        if not other:
            return self
        if not self:
            return other
        return WriteEffect(self.tables | other.tables, self.functions | other.functions,
                           self.flush_database or other.flush_database, self.flush_all or other.flush_all,
                           self.ddl or other.ddl)

    def without_tables(self) -> WriteEffect:
        """What survives a ROLLBACK: effects of functions (dblink-style autonomous writes) and flushes."""
        return WriteEffect(frozenset(), self.functions, self.flush_database, self.flush_all, False)


NO_WRITES = WriteEffect()

_WORD = re.compile(r"\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*([A-Za-z]+)(?:\s+([A-Za-z]+))?(?:\s+([A-Za-z]+))?", re.S)
# statements that change who may see what, or session defaults for new sessions: flush everything
_ROLE_CHANGES = {("alter", "role"), ("alter", "user"), ("alter", "group"), ("drop", "role"), ("drop", "user"),
                 ("drop", "group"), ("drop", "owned"), ("reassign", "owned"), ("alter", "database"),
                 ("alter", "system"), ("security", "label")}
_HARMLESS = {"vacuum", "analyze", "analyse", "show", "listen", "unlisten", "notify", "checkpoint", "load",
             "deallocate", "prepare", "discard", "fetch", "close", "declare", "lock", "reset", "set", "move",
             "explain", "begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release",
             "cluster", "reindex", "values", "select", "table", "with", "comment"}
_CASCADE = re.compile(r"\bcascade\b", re.I)

_memo: dict[str, WriteEffect] = {}


def _leading_words(text: str) -> tuple[str, str, str]:
    m = _WORD.match(text)
    if not m:
        return "", "", ""
    return tuple((w or "").lower() for w in m.groups())  # type: ignore[return-value]


def _names(names: Any) -> frozenset[str]:
    return frozenset(relname(n) for n in names)


def _classify(info: Any) -> WriteEffect:
    if info.statements:
        effect = NO_WRITES
        for sub in info.statements:
            effect = effect.merge(write_effect(sub))
        return effect
    kind = info.kind
    if kind == "transaction" and info.tx == "commit_prepared":
        return WriteEffect(flush_database=True)  # the prepared transaction's writes are unknown here
    if kind in ("transaction", "set", "empty"):
        return NO_WRITES
    if not info.parsed:
        return WriteEffect(flush_database=True, ddl=True)
    written = _names(info.tables_written)
    functions = frozenset(info.functions)
    if kind in ("select", "insert", "update", "delete", "merge"):
        return WriteEffect(written, functions) if (written or functions) else NO_WRITES
    if kind == "copy":
        return WriteEffect(written | _names(info.tables_read)) if info.is_copy_from else NO_WRITES
    first, second, third = _leading_words(info.text)
    if (first, second) in _ROLE_CHANGES:
        return WriteEffect(flush_all=True, ddl=True)
    if first in ("grant", "revoke"):
        touched = written | _names(info.tables_read)
        # GRANT/REVOKE on named tables touches those; role membership and ALL TABLES IN SCHEMA: everything
        return WriteEffect(touched, ddl=True) if touched else WriteEffect(flush_all=True, ddl=True)
    if kind == "ddl" or first in ("create", "alter", "drop", "truncate", "refresh", "import"):
        touched = written | _names(info.tables_read)
        cascades = bool(_CASCADE.search(info.text))  # DROP/TRUNCATE ... CASCADE reaches other tables
        return WriteEffect(touched, functions, flush_database=cascades or not touched, ddl=True)
    if first in _HARMLESS:
        if first == "explain" and written:  # EXPLAIN ANALYZE INSERT ... really writes
            return WriteEffect(written, functions)
        return NO_WRITES
    # CALL, DO, EXECUTE, COMMIT PREPARED, unknown utilities: may write anything in this database
    return WriteEffect(written, functions, flush_database=True)


def write_effect(info: Any) -> WriteEffect:
    """The WriteEffect of a StatementInfo, memoized by statement text."""
    effect = _memo.get(info.text)
    if effect is None:
        effect = _classify(info)
        if len(_memo) >= _MEMO_MAX:
            _memo.clear()
        _memo[info.text] = effect
    return effect
