"""StatementInfo: the facts about one SQL text that rules, the cache, stats and the slow log act on."""

from __future__ import annotations

from dataclasses import dataclass, field

EMPTY: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class StatementInfo:
    text: str
    fingerprint: str  # 16 hex chars, the same for literal and $n forms and any IN-list length
    normalized: str  # constants replaced by $n, numbered in text order after the highest existing $n
    parsed: bool
    kind: str  # select|insert|update|delete|merge|ddl|copy|utility|transaction|set|empty|unknown
    # one entry per statement of a multi-statement string; empty for a single statement
    statements: tuple[StatementInfo, ...] = ()
    tables_read: frozenset[str] = EMPTY
    tables_written: frozenset[str] = EMPTY
    functions: frozenset[str] = EMPTY
    volatile: bool = False
    has_where: bool = False
    has_limit: bool = False
    limit_value: int | None = None
    has_offset: bool = False
    offset_value: int | None = None
    locking: bool = False
    returns_one_row: bool = False
    tx: str | None = None
    set_name: str | None = None
    set_value: str | None = None
    set_local: bool = False
    is_copy_from: bool = False
    temp_objects: bool = False
    catalog: bool = False
    max_param: int = 0  # highest $n already in the text (extended-protocol parameters)
    error: str | None = None  # the parser's message when parsed is False
    # read routing's answer for the statement, set once by replicas.choice.statement_why (a memo of a
    # function of the fields above, not part of the value)
    route_why: str | None = field(default=None, init=False, compare=False, repr=False)

    @property
    def tables(self) -> frozenset[str]:
        """Every relation the statement touches."""
        return self.tables_read | self.tables_written

    @property
    def is_write(self) -> bool:
        """Changes data or schema (what invalidates cached reads)."""
        return bool(self.tables_written) or self.kind in _WRITE_KINDS


_WRITE_KINDS = frozenset({"insert", "update", "delete", "merge", "ddl"})
