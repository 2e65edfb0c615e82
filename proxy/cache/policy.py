"""What may be cached: provable reads only, deny by default.

`CachePolicy.check(info, state, ...)` is called per execution of a statement a cache rule selected. The
statement-only part is decided once per statement text; the catalog part (function volatility, relation
persistence / kind / RLS, what the rows depend on) is memoized per (text, database) until the catalog
facts change, so the per-execution cost is a few attribute reads and one dict look-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from proxy.cache.catalog import Catalog
from proxy.cache.sessionstate import SessionCacheState
from proxy.cache.writes import relname

_MEMO_MAX = 20_000
PENDING = "catalog facts pending"


@dataclass(frozen=True, slots=True)
class Decision:
    ok: bool
    reason: str                       # why not ("" when ok)
    tags: tuple[str, ...] = ()        # relation names whose versions guard the result (sorted)
    rls: bool = False                 # reads a relation with row-level security
    catalog: bool = False             # reads a system catalog


def _statement_refusal(info: Any) -> str:
    """Reasons that depend on the statement text alone."""
    if not info.parsed:
        return "not parsed"
    if info.statements:
        return "multiple statements"
    if info.kind != "select":
        return "not a read"
    if info.volatile and not info.tables_written and not info.locking:
        return "volatile function"
    return select_side_effect(info)


def select_side_effect(info: Any) -> str:
    """Why a SELECT is more than a read (a data-modifying WITH, a locking clause, a temporary table,
    SELECT INTO), or "": shared by the cache policy and read routing."""
    if info.tables_written:
        return "writes (data-modifying WITH)"
    if info.locking:
        return "locking clause"
    if info.temp_objects:
        return "temporary table"
    if "into" in info.text.lower() and _select_into(info.text):
        return "SELECT INTO"
    return ""


_SELECT_INTO = re.compile(r"^\s*select\b(?:(?!\bfrom\b).)*\binto\b", re.I | re.S)


def _select_into(text: str) -> bool:
    return _SELECT_INTO.search(text) is not None


class CachePolicy:
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self._memo: dict[tuple[str, str], tuple[int, Decision]] = {}

    def check(self, info: Any, state: SessionCacheState, *, allow_rls: bool = False,
              allow_catalog: bool = False) -> Decision:
        """May this execution be served from / stored in the cache? (ok, reason, tags)."""
        why = self._session_refusal(state)
        if why:
            return Decision(False, why)
        decision = self._statement(info, state.database)
        if decision.ok:
            if decision.rls and not allow_rls:
                return Decision(False, "row-level security")
            if decision.catalog and not allow_catalog:
                return Decision(False, "system catalog")
        return decision

    @staticmethod
    def _session_refusal(state: SessionCacheState) -> str:
        if state.role_changed:
            return "role changed (SET ROLE / SESSION AUTHORIZATION)"
        if state.untracked:
            return "settings changed untracked"
        if state.temp_tables:
            return "session has temporary tables"
        if state.pending:
            return "transaction has written"
        if state.in_transaction and state.isolation not in ("read committed", "read uncommitted"):
            return "snapshot isolation"  # the snapshot may be older than the cached result (or newer)
        return ""

    def _statement(self, info: Any, database: str) -> Decision:
        memo_key = (info.text, database)
        gen = self.catalog.generation
        got = self._memo.get(memo_key)
        if got is not None and got[0] == gen:
            return got[1]
        decision = self._decide(info, database)
        if decision.reason != PENDING:
            if len(self._memo) >= _MEMO_MAX:
                self._memo.clear()
            self._memo[memo_key] = (gen, decision)
        return decision

    def _decide(self, info: Any, database: str) -> Decision:
        why = _statement_refusal(info)
        if why:
            return Decision(False, why)
        pending = False
        tags: set[str] = set()
        functions = {relname(f) for f in info.functions}
        rls, catalog = False, bool(info.catalog)
        for t in info.tables_read:
            facts = self.catalog.relation(database, relname(t))
            if facts is None:
                pending = True
                continue
            if facts.reason:
                return Decision(False, f"{facts.reason} {t}")
            tags |= facts.tags
            functions |= facts.functions
            rls = rls or facts.rls
            catalog = catalog or facts.catalog
        for f in sorted(functions):
            facts = self.catalog.function(database, f)
            if facts is None:
                pending = True
            elif not facts.immutable:
                return Decision(False, f"non-immutable function {f}")
        if pending:
            return Decision(False, PENDING)
        return Decision(True, "", tuple(sorted(tags)), rls, catalog)
