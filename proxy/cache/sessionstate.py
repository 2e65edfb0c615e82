"""What the cache needs to know about one client session, kept up to date by four cheap hooks.

The session calls:
  server_parameter(name, value)  for every ParameterStatus from the server (authoritative for the
                                 settings the server reports: DateStyle, TimeZone, IntervalStyle, ...)
  sent(info)                     when a statement is forwarded upstream (Execute / simple Query), so a
                                 later read in the same transaction or pipeline knows it may see writes
  done(info) -> WriteEffect|None at the statement's CommandComplete; a non-empty result (COMMIT) must be
                                 `await cache.invalidate(state, effect)`-ed before CommandComplete is forwarded
  ready(status) -> WriteEffect|None at ReadyForQuery; same, before ReadyForQuery is forwarded

Writes become visible to other sessions at commit: for a single-statement simple Query just before its
CommandComplete, for an implicit transaction (multi-statement Query, extended protocol) at Sync, for an
explicit one at COMMIT. So pending writes are flushed at COMMIT's CommandComplete and at every
ReadyForQuery with status 'I', never earlier (a bump before the commit would let a reader cache the
old rows under the new version).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from typing import Any

from proxy.cache.keys import session_prefix
from proxy.cache.writes import NO_WRITES, WriteEffect, relname, write_effect

_ISOLATION = re.compile(r"isolation\s+level\s+(read\s+committed|read\s+uncommitted|repeatable\s+read|serializable)",
                        re.I)
_TEMP = re.compile(r"^\s*create\s+(?:(?:global|local)\s+)?(?:temp|temporary)\b", re.I)
_STARTUP_NOT_SETTINGS = {"user", "database", "options", "replication"}
_ROLE_SETTINGS = {"role", "session_authorization"}


def _isolation(text: str) -> str | None:
    m = _ISOLATION.search(text)
    return " ".join(m.group(1).lower().split()) if m else None


def _options(options: str) -> dict[str, str]:
    """Startup `options` ('-c a=b --c=d') -> {'a': 'b', 'c': 'd'}."""
    out = {}
    words = shlex.split(options.replace("\\ ", "\0"))
    for i, w in enumerate(words):
        w = w.replace("\0", " ")
        arg = None
        if w == "-c" and i + 1 < len(words):
            arg = words[i + 1].replace("\0", " ")
        elif w.startswith("-c") and len(w) > 2:
            arg = w[2:]
        elif w.startswith("--"):
            arg = w[2:]
        if arg and "=" in arg:
            k, v = arg.split("=", 1)
            out[k.strip().lower().replace("-", "_")] = v
    return out


# kinds _done_one acts on: any other statement's CommandComplete changes nothing here
_DONE_KINDS = frozenset(("set", "transaction", "utility", "unknown"))

# what a sent statement does to the session besides writing (_marks), memoized by text like write_effect
_UNTRACKED, _ROLE, _TEMP_TABLES = 1, 2, 4
_marks_memo: dict[str, int] = {}
_MARKS_MAX = 10_000


def _marks(info: Any) -> int:
    marks = _marks_memo.get(info.text)
    if marks is None:
        marks = 0
        if "set_config" in info.functions:  # sets a setting behind our back
            marks |= _UNTRACKED
        if any(sub.kind == "set" and sub.set_name in _ROLE_SETTINGS for sub in (info, *info.statements)):
            marks |= _ROLE
        if info.temp_objects or (info.kind == "ddl" and _TEMP.match(info.text)):
            marks |= _TEMP_TABLES
        if len(_marks_memo) >= _MARKS_MAX:
            _marks_memo.clear()
        _marks_memo[info.text] = marks
    return marks


class SessionCacheState:
    """Per-client facts that shape keys and decide cacheability; see the module docstring for the hooks."""

    def __init__(self, database: str, role: str, startup_params: Mapping[str, str] | None = None,
                 function_facts: Any = None) -> None:
        self.database = database
        self.role = role
        self._function_facts = function_facts  # callable(database, name) -> FunctionFacts | None
        self.reported: dict[str, str] = {}     # ParameterStatus values, authoritative
        self.explicit: dict[str, str] = {}     # SET outside a transaction block, and startup parameters
        self.staged: dict[str, str | None] = {}  # SET since the last commit point (None = RESET)
        self.local: dict[str, str | None] = {}   # SET LOCAL in the open (explicit or implicit) block
        self.in_transaction = False              # explicit block open (ReadyForQuery 'T' or 'E')
        self.isolation = "read committed"        # of the open block
        self.default_isolation = "read committed"
        self.pending: WriteEffect = NO_WRITES    # writes sent since the last commit point
        self.role_changed = False                # SET ROLE / SESSION AUTHORIZATION: stop caching
        self.untracked = False                   # settings changed in ways we cannot follow (set_config, ...)
        self.temp_tables = False                 # the session created temporary tables
        self._reset_all = False                  # RESET ALL inside the open block
        self._failed = False                     # an error since the last commit point
        self._prefix: bytes | None = None
        for k, v in (startup_params or {}).items():
            k = k.lower()
            if k == "options":
                self.explicit.update(_options(v))
            elif k not in _STARTUP_NOT_SETTINGS:
                self.explicit[k] = v
        self._check_role_settings(self.explicit)

    # -- key ----------------------------------------------------------------------------------------------
    @property
    def prefix(self) -> bytes:
        """Session part of every key: database, role, result-shaping settings (cached until they change)."""
        if self._prefix is None:
            self._prefix = session_prefix(self.database, self.role, self.settings())
        return self._prefix

    def settings(self) -> dict[str, str]:
        merged: dict[str, str | None] = {} if self._reset_all else dict(self.explicit)
        merged.update(self.staged)
        merged.update(self.local)
        merged.update(self.reported)
        return {k: v for k, v in merged.items() if v is not None}

    # -- hooks ----------------------------------------------------------------------------------------------
    def server_parameter(self, name: str, value: str) -> None:
        name = name.lower()
        if name == "session_authorization" and value != self.role:
            self.role_changed = True
        if self.reported.get(name) != value:
            self.reported[name] = value
            self._prefix = None

    def sent(self, info: Any) -> None:
        effect = write_effect(info)
        if effect:
            if effect.functions:
                effect = self._resolve_functions(effect)
            self.pending = self.pending.merge(effect)
        marks = _marks(info)
        if marks:
            if marks & _UNTRACKED:
                self.untracked = True
            if marks & _ROLE:
                self.role_changed = True
            if marks & _TEMP_TABLES:
                self.temp_tables = True

    def done(self, info: Any, more: bool = False) -> WriteEffect | None:
        """At the CommandComplete of `info` (for a multi-statement Query, of its i-th statement; passing the
        whole Query once applies all of them). `more`: statements sent after this one are still to run
        (a pipeline), so the writes sent so far are not all committed yet (see _take_pending)."""
        if not info.statements and info.kind not in _DONE_KINDS:
            return None  # the common case: a statement that changes no session state
        flush = NO_WRITES
        for sub in info.statements or (info,):
            flush = flush.merge(self._done_one(sub, more) or NO_WRITES)
        return flush or None

    def error(self) -> None:
        """At an ErrorResponse: the transaction (implicit or explicit) will not commit its SETs."""
        self._failed = True

    def ready(self, status: int | bytes | str, more: bool = False) -> WriteEffect | None:
        """At ReadyForQuery; `more`: batches sent after this one are still to run (a pipeline)."""
        if isinstance(status, bytes | bytearray):
            status = status[0]
        if isinstance(status, int):
            status = chr(status)
        self.in_transaction = status != "I"
        if status != "I":
            return None
        self._end_block()  # an implicit block (pipeline, multi-statement Query) ends here
        return self._take_pending(more)

    # -- helpers -----------------------------------------------------------------------------------------------
    def _take_pending(self, more: bool = False) -> WriteEffect | None:
        """The writes to invalidate at a commit point. `pending` holds every write *sent*, and with a
        pipeline some of them have not run yet: invalidating them now is harmless, but forgetting them
        would be wrong (a reader could cache the old rows under the version this early bump made, and
        no bump would follow their commit). So while more is in flight they stay pending, to be
        invalidated again at the next commit point; reads keep bypassing meanwhile."""
        effect = self.pending
        if not more:
            self.pending = NO_WRITES
        return effect or None

    def _resolve_functions(self, effect: WriteEffect) -> WriteEffect:
        """Calls of functions known not to write are not writes; known writers flush the database; the
        unknown stay in `functions` (a write for now; invalidate() looks them up before deciding)."""
        facts_of = self._function_facts
        unknown, writing = set(), False
        for f in effect.functions:
            facts = facts_of(self.database, relname(f)) if facts_of else None
            if facts is None:
                unknown.add(relname(f))
            elif facts.may_write:
                writing = True
        return WriteEffect(effect.tables, frozenset(unknown), effect.flush_database or writing, effect.flush_all,
                           effect.ddl)

    def _done_one(self, info: Any, more: bool = False) -> WriteEffect | None:
        kind = info.kind
        if kind == "set":
            self._apply_set(info)
        elif kind == "transaction":
            return self._apply_transaction(info, more)
        elif kind in ("utility", "unknown") and info.text.lstrip()[:7].lower() == "discard":
            if "temp" in info.text.lower() or " all" in info.text.lower():
                self.temp_tables = False
            if " all" in info.text.lower():  # DISCARD ALL = RESET ALL + SET SESSION AUTHORIZATION DEFAULT
                self.explicit.clear()
                self.role_changed = False
                self._prefix = None
        return None

    def _apply_set(self, info: Any) -> None:
        """SETs take effect for this block at once and for the session only when the block commits."""
        name, value, text = info.set_name, info.set_value, info.text.lower()
        iso = _isolation(text) if "isolation" in text else None
        if iso and (name in (None, "transaction_isolation", "transaction") or "transaction" in text):
            if "session characteristics" in text:
                self.default_isolation = iso
            else:
                self.isolation = iso
            return
        if name is None:
            self.untracked = True  # a SET we could not read
            return
        if name == "default_transaction_isolation":
            self.default_isolation = " ".join((value or "read committed").strip("'").lower().split())
        elif name == "transaction_isolation":
            self.isolation = " ".join((value or self.default_isolation).strip("'").lower().split())
            return
        if name == "all":
            self._reset_all = True
            self.staged.clear()
            self.local.clear()
        elif info.set_local:
            self.local[name] = value
        else:
            self.staged[name] = value
        self._prefix = None

    def _apply_transaction(self, info: Any, more: bool = False) -> WriteEffect | None:
        tx = info.tx
        if tx == "begin":
            self.in_transaction = True
            self.isolation = _isolation(info.text) or self.default_isolation
        elif tx in ("commit", "end"):
            self._end_block()
            return self._take_pending(more)
        elif tx in ("rollback", "abort"):
            self._failed = True
            self._end_block()
            if not more:  # writes sent after the ROLLBACK are not rolled back by it: keep them all
                self.pending = self.pending.without_tables()
        elif tx == "rollback_to":
            if self.staged or self.local or self._reset_all:
                self.untracked = True  # which SETs survive depends on the savepoint: give up on this session
            self._failed = False
        elif tx == "commit_prepared":
            return self._take_pending(more)
        return None

    def _end_block(self) -> None:
        """Commit (or, after an error, drop) the block's SETs; forget SET LOCAL and the block's isolation."""
        if not self._failed:
            if self._reset_all:
                self.explicit.clear()
            for k, v in self.staged.items():
                if v is None:
                    self.explicit.pop(k, None)
                else:
                    self.explicit[k] = v
        if self.staged or self.local or self._reset_all:
            self._prefix = None
        self.staged.clear()
        self.local.clear()
        self._reset_all = self._failed = False
        self.in_transaction = False
        self.isolation = self.default_isolation

    def _check_role_settings(self, settings: Mapping[str, str]) -> None:
        if any(k in _ROLE_SETTINGS for k in settings):
            self.role_changed = True
