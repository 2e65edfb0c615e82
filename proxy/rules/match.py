"""The `match` table of a rule: validation and the predicate over statement facts and session context.

Every key given must hold (AND); a key given a list holds when any element does (OR). Names (user,
database, application_name, tables) may use * and ? wildcards. Matching runs once per statement
text and context (the engine caches decisions), so clarity beats micro-speed here.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

KINDS = frozenset({"select", "insert", "update", "delete", "merge", "ddl", "copy", "utility",
                   "transaction", "set", "empty", "unknown"})
# session facts a decision may depend on; tag_key: the statement's sqlcommenter tags (match.tags)
CONTEXT_KEYS = ("user", "database", "application_name", "in_transaction", "tag_key")
_LIST_KEYS = ("kind", "tables", "fingerprint", "user", "database", "application_name")
_BOOL_KEYS = ("has_where", "has_limit", "in_transaction", "parsed")
MATCH_KEYS = (*_LIST_KEYS, "pattern", "tags", *_BOOL_KEYS)
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")

Problem = Callable[[str, str], None]  # (key, message)


class Names:
    """A set of names with optional * / ? wildcards."""

    __slots__ = ("exact", "globs", "given")

    def __init__(self, values: list[str]) -> None:
        self.given = tuple(values)
        self.exact = frozenset(v for v in values if not _is_glob(v))
        self.globs = tuple(v for v in values if _is_glob(v))

    def __contains__(self, value: object) -> bool:
        return value in self.exact or any(fnmatch.fnmatchcase(str(value), g) for g in self.globs)


def _is_glob(v: str) -> bool:
    return "*" in v or "?" in v


def _table_parts(name: str) -> tuple[str | None, str]:
    name = name.replace('"', "")
    schema, _, rel = name.rpartition(".")
    return (schema or None), rel


@dataclass(frozen=True, slots=True)
class Match:
    kinds: frozenset[str] | None = None
    tables: tuple[tuple[str | None, str], ...] | None = None  # (schema or None, relation), may be globs
    fingerprints: frozenset[str] | None = None
    pattern: re.Pattern[str] | None = None
    users: Names | None = None
    databases: Names | None = None
    application_names: Names | None = None
    has_where: bool | None = None
    has_limit: bool | None = None
    in_transaction: bool | None = None
    parsed: bool | None = None
    tags: tuple[tuple[str, Names], ...] | None = None  # sqlcommenter tag -> allowed values (globs)
    source: tuple[tuple[str, Any], ...] = ()  # the keys as written, for describe()

    @property
    def context_fields(self) -> tuple[str, ...]:
        """MatchContext attributes this match reads (they become part of the decision cache key)."""
        given = dict(self.source)
        if "tags" in given:
            given["tag_key"] = True
        return tuple(k for k in CONTEXT_KEYS if k in given)

    @property
    def needs_parse(self) -> bool:
        """Keys about the statement's structure: they never match a text the parser rejected (fail open)."""
        return (self.tables is not None or self.has_where is not None or self.has_limit is not None
                or (self.kinds is not None and "unknown" not in self.kinds))

    def __call__(self, info: Any, ctx: Any) -> bool:
        if self.parsed is not None and info.parsed != self.parsed:
            return False
        if not info.parsed and self.needs_parse:
            return False
        if self.kinds is not None and info.kind not in self.kinds:
            return False
        if self.has_where is not None and info.has_where != self.has_where:
            return False
        if self.has_limit is not None and info.has_limit != self.has_limit:
            return False
        if self.fingerprints is not None and info.fingerprint not in self.fingerprints:
            return False
        if self.tables is not None and not self._any_table(info.tables_read | info.tables_written):
            return False
        if self.pattern is not None and not self.pattern.search(info.normalized):
            return False
        if self.users is not None and ctx.user not in self.users:
            return False
        if self.databases is not None and ctx.database not in self.databases:
            return False
        if self.application_names is not None and ctx.application_name not in self.application_names:
            return False
        if self.tags is not None and not self._tags_match(getattr(ctx, "tags", None) or {}):
            return False
        return self.in_transaction is None or bool(ctx.in_transaction) == self.in_transaction

    def _tags_match(self, tags: dict[str, str]) -> bool:
        for key, names in self.tags or ():
            value = tags.get(key)
            if value is None or value not in names:
                return False
        return True

    def _any_table(self, names: frozenset[str]) -> bool:
        """"orders" matches orders in any schema; "public.orders" matches public.orders and an
        unqualified orders (the schema then depends on search_path, so the rule errs towards applying)."""
        for name in names:
            schema, rel = _table_parts(name)
            for want_schema, want_rel in self.tables or ():
                if not fnmatch.fnmatchcase(rel, want_rel):
                    continue
                if want_schema is None or schema is None or fnmatch.fnmatchcase(schema, want_schema):
                    return True
        return False

    def summary(self) -> str:
        if not self.source:
            return "every statement"
        return " ".join(f"{k}={_show(v)}" for k, v in self.source)


def _show(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v)
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


def compile_match(table: Any, problem: Problem) -> Match | None:
    """Validate a match table, reporting every mistake through problem(key, message)."""
    if not isinstance(table, dict):
        problem("match", f"match must be a table, like match = {{ kind = \"select\" }}, not {table!r}")
        return None
    ok = True
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in MATCH_KEYS:
            problem(key, f"unknown match key {key!r}{_suggest(key, MATCH_KEYS)}")
            ok = False
        elif key in _BOOL_KEYS:
            if not isinstance(value, bool):
                problem(key, f"match.{key} must be true or false, not {value!r}")
                ok = False
            values[key] = value
        elif key == "tags":
            tags = _check_tags(value, problem)
            ok = tags is not None and ok
            values[key] = tags
        elif key == "pattern":
            if not isinstance(value, str):
                problem(key, f"match.pattern must be a string (a regular expression), not {value!r}")
                ok = False
                continue
            try:
                values[key] = re.compile(value)
            except re.error as e:
                problem(key, f"match.pattern is not a valid regular expression: {e}")
                ok = False
        else:
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
                problem(key, f"match.{key} must be a string or a non-empty list of strings, not {value!r}")
                ok = False
                continue
            ok = _check_list(key, items, problem) and ok
            values[key] = items
    if not ok:
        return None
    return Match(
        kinds=frozenset(values["kind"]) if "kind" in values else None,
        tables=tuple(_table_parts(t.lower() if '"' not in t else t) for t in values["tables"])
        if "tables" in values else None,
        fingerprints=frozenset(f.lower() for f in values["fingerprint"]) if "fingerprint" in values else None,
        pattern=values.get("pattern"),
        users=Names(values["user"]) if "user" in values else None,
        databases=Names(values["database"]) if "database" in values else None,
        application_names=Names(values["application_name"]) if "application_name" in values else None,
        has_where=values.get("has_where"),
        has_limit=values.get("has_limit"),
        in_transaction=values.get("in_transaction"),
        parsed=values.get("parsed"),
        tags=values.get("tags"),
        source=tuple(table.items()),
    )


def _check_tags(value: Any, problem: Problem) -> tuple[tuple[str, Names], ...] | None:
    """match.tags: { controller = "orders", route = ["/api/*", "/v2/*"] } (sqlcommenter tags, AND)."""
    if not isinstance(value, dict) or not value:
        problem("tags", f"match.tags must be a table of sqlcommenter tags, like tags = {{ route = \"/api/*\" }}, "
                        f"not {value!r}")
        return None
    out = []
    for tag, want in value.items():
        items = [want] if isinstance(want, str) else want
        if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
            problem("tags", f"match.tags.{tag} must be a string or a non-empty list of strings, not {want!r}")
            return None
        out.append((tag, Names(items)))
    return tuple(out)


def _check_list(key: str, items: list[str], problem: Problem) -> bool:
    ok = True
    for v in items:
        if key == "kind" and v not in KINDS:
            problem(key, f"unknown statement kind {v!r}{_suggest(v, KINDS)} (kinds: {', '.join(sorted(KINDS))})")
            ok = False
        elif key == "fingerprint" and not _FINGERPRINT.fullmatch(v.lower()):
            problem(key, f"fingerprint {v!r} is not 16 hex digits (see `pgfront rules explain`)")
            ok = False
    return ok


def _suggest(word: str, choices: Any) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
