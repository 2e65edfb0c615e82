"""Rule files: TOML parsing, validation with file:line diagnostics, and the Rule objects.

A file holds `[[rule]]` tables; each has a name, a match table and one or more actions. Every
mistake in every file is collected and raised together as RuleError, each with the file, the
line (found by scanning the text, since tomllib keeps no positions) and the rule's name.
"""

from __future__ import annotations

import glob
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from proxy.config import parse_duration
from proxy.rules.match import Match, _suggest, compile_match
from proxy.rules.rewrite import RenameTables, TemplateError, TemplateRewrite
from proxy.stats import RuleCounter
from proxy.throttle.spec import THROTTLE_KEYS, Throttle, parse_throttle

RULE_KEYS = ("name", "description", "match", "mode", "final", "enabled")
ACTIONS = ("block", "limit", "cache", "rewrite", "timeout", "throttle", "mirror", "route", "log")
ACTION_KEYS = {
    "block": ("message", "sqlstate"),
    "limit": ("max_rows", "max_offset"),
    "cache": ("ttl", "stale_while_revalidate", "allow_rls", "allow_catalog"),
    "rewrite": ("from", "to", "rename_table"),
    "throttle": THROTTLE_KEYS,
    "mirror": ("to", "share", "writes"),
}
MODES = ("enforce", "observe")
DEFAULT_BLOCK_SQLSTATE = "42501"  # insufficient_privilege
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*")
_SQLSTATE = re.compile(r"[0-9A-Z]{5}")


@dataclass(frozen=True, slots=True)
class Problem:
    file: str
    line: int
    rule: str | None
    message: str

    def __str__(self) -> str:
        who = f"rule {self.rule!r}: " if self.rule else ""
        where = f"{self.file}:{self.line}" if self.line else self.file  # line 0: about the whole file
        return f"{where}: {who}{self.message}"


class RuleError(Exception):
    """Every problem found in a set of rule files; str() shows one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = sorted(problems, key=lambda p: (p.file, p.line))
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True, slots=True)
class Block:
    sqlstate: str
    message: str


@dataclass(frozen=True, slots=True)
class Limit:
    max_rows: int | None
    max_offset: int | None


@dataclass(frozen=True, slots=True)
class Cache:
    ttl: float
    stale_while_revalidate: float | None
    allow_rls: bool = False  # cache tables with row-level security (keys are per role anyway)
    allow_catalog: bool = False  # cache reads of system catalogs


@dataclass(frozen=True, slots=True)
class Rewrite:
    template: TemplateRewrite | None
    rename: RenameTables | None

    def apply(self, text: str, fingerprint: Callable[[str], str]) -> str | None:
        """The rewritten text, or None when this rewrite does not apply to text."""
        out = None
        if self.template is not None:
            out = self.template.apply(text, fingerprint(text))
        if self.rename is not None:
            out = self.rename.apply(out or text) or out
        return out


@dataclass(frozen=True, slots=True)
class Mirror:
    to: str  # a [mirror.NAME] target
    share: float  # of matching statements, sampled
    writes: bool  # mirror statements that write too (for a shadow holding a copy of the data)


@dataclass(frozen=True, eq=False)
class Rule:
    name: str
    file: str
    line: int
    match: Match
    description: str = ""
    observe: bool = False
    final: bool = False
    enabled: bool = True
    block: Block | None = None
    limit: Limit | None = None
    cache: Cache | None = None
    rewrite: Rewrite | None = None
    timeout: float | None = None
    throttle: Throttle | None = None
    mirror: Mirror | None = None
    route: str | None = None  # "primary" or "replica": overrides read routing ([[replica]])
    log: bool = False
    spec: dict[str, Any] = field(default_factory=dict)  # the actions as written, for describe()
    counter: RuleCounter = field(default_factory=RuleCounter)

    @property
    def actions(self) -> tuple[str, ...]:
        return tuple(a for a in ACTIONS if a in self.spec)

    @property
    def mode(self) -> str:
        return "observe" if self.observe else "enforce"


# --- locating lines -------------------------------------------------------------------------------

class _Lines:
    """Line numbers of rules and keys in one file's text."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers = [i for i, line in enumerate(self.lines) if re.match(r"\s*\[\[\s*rule\s*\]\]", line)]

    def _block(self, index: int) -> tuple[int, int]:
        if index >= len(self.headers):
            return 0, len(self.lines)
        end = self.headers[index + 1] if index + 1 < len(self.headers) else len(self.lines)
        return self.headers[index], end

    def find(self, index: int, *path: str) -> int:
        """1-based line of rule `index`'s key path (e.g. "match", "kind"), or of the closest enclosing key."""
        start, end = self._block(index)
        line = start
        for depth, key in enumerate(path):
            k = re.escape(key)
            pat = (re.compile(rf"^\s*(?:{k}|\"{k}\")\s*=|^\s*\[\s*rule\.{k}\s*\]") if depth == 0
                   else re.compile(rf"(?:^|[{{,\s]){k}\s*="))
            found = next((i for i in range(line, end) if pat.search(self.lines[i])), None)
            if found is None:
                break
            line = found
        return line + 1

    def top_level(self, key: str) -> int:
        pat = re.compile(rf"^\s*(?:\[\[?\s*)?{re.escape(key)}\b")
        return next((i + 1 for i, line in enumerate(self.lines) if pat.search(line)), 1)


# --- validation -------------------------------------------------------------------------------------

class _Checker:
    """Validates one [[rule]] table, collecting problems."""

    def __init__(self, file: str, index: int, lines: _Lines, problems: list[Problem],
                 fingerprint: Callable[[str], str], default_ttl: float) -> None:
        self.file, self.index, self.lines, self.problems = file, index, lines, problems
        self.fingerprint, self.default_ttl = fingerprint, default_ttl
        self.name: str | None = None
        self.ok = True

    def problem(self, message: str, *path: str) -> None:
        self.ok = False
        self.problems.append(Problem(self.file, self.lines.find(self.index, *path), self.name, message))

    def build(self, raw: Any) -> Rule | None:
        if not isinstance(raw, dict):
            self.problem("a rule must be a table ([[rule]])")
            return None
        name = raw.get("name")
        if isinstance(name, str) and _NAME.fullmatch(name):
            self.name = name
        else:
            self.problem(f"every rule needs a name of letters, digits, _ . : - (got {name!r})", "name")
        for key in raw:
            if key not in RULE_KEYS and key not in ACTIONS:
                self.problem(f"unknown key {key!r}{_suggest(key, RULE_KEYS + ACTIONS)}", key)
        description = self._typed(raw, "description", str, "a string", "")
        mode = raw.get("mode", "enforce")
        if mode not in MODES:
            self.problem(f"mode must be \"enforce\" or \"observe\", not {mode!r}", "mode")
        final = self._typed(raw, "final", bool, "true or false", False)
        enabled = self._typed(raw, "enabled", bool, "true or false", True)
        match = None
        if "match" not in raw:
            self.problem("no match table (use match = {} to match every statement)")
        else:
            match = compile_match(raw["match"], lambda key, msg: self.problem(msg, "match", key))
        actions = {a: raw[a] for a in ACTIONS if a in raw}
        built = self._actions(actions, match)
        if not self.ok or match is None or self.name is None:
            return None
        rewrite = built.get("rewrite")
        if rewrite is not None and rewrite.template is not None:
            # a template is keyed on its statement: the rule only matches instances of `from`
            fp = rewrite.template.fingerprint
            match = replace(match, fingerprints=frozenset(match.fingerprints or {fp}) & {fp},
                            source=(*match.source, ("rewrite.from", fp)))
        return Rule(name=self.name, file=self.file, line=self.lines.find(self.index, "name"), match=match,
                    description=description, observe=mode == "observe", final=final, enabled=enabled,
                    spec={a: v for a, v in actions.items() if v is not False}, **built)

    def _typed(self, raw: dict[str, Any], key: str, typ: type, what: str, default: Any) -> Any:
        value = raw.get(key, default)
        if not isinstance(value, typ):
            self.problem(f"{key} must be {what}, not {value!r}", key)
            return default
        return value

    def _actions(self, actions: dict[str, Any], match: Match | None) -> dict[str, Any]:
        if not actions or actions == {"log": False}:
            self.problem(f"no action: give at least one of {', '.join(ACTIONS)}")
        if "block" in actions and set(actions) - {"block", "log"}:
            others = ", ".join(sorted(set(actions) - {"block", "log"}))
            self.problem(f"block cannot be combined with {others}: a blocked statement never runs "
                         "(only log may go with block)", "block")
        built: dict[str, Any] = {}
        for action, value in actions.items():
            if action in ACTION_KEYS and isinstance(value, dict):
                for key in value:
                    if key not in ACTION_KEYS[action]:
                        self.problem(f"unknown key {key!r} in {action}{_suggest(key, ACTION_KEYS[action])} "
                                     f"(known: {', '.join(ACTION_KEYS[action])})", action, key)
            built[action] = getattr(self, f"_{action}")(value)
        kinds = match.kinds if match is not None else None
        for action in ("limit", "cache"):
            if action in actions and kinds is not None and "select" not in kinds:
                self.problem(f"{action} only acts on SELECT statements, but match.kind is "
                             f"{', '.join(sorted(kinds))}", action)
        return built

    def _block(self, value: Any) -> Block | None:
        if value is True:
            value = {}
        if not isinstance(value, dict):
            self.problem(f"block must be a table like {{ message = \"...\" }}, not {value!r}", "block")
            return None
        message = value.get("message", "statement not allowed")
        sqlstate = value.get("sqlstate", DEFAULT_BLOCK_SQLSTATE)
        if not isinstance(message, str) or not message:
            self.problem(f"block.message must be a non-empty string, not {message!r}", "block", "message")
        if not isinstance(sqlstate, str) or not _SQLSTATE.fullmatch(sqlstate):
            self.problem(f"block.sqlstate must be 5 characters of digits and capitals, like \"42501\", "
                         f"not {sqlstate!r}", "block", "sqlstate")
        return Block(str(sqlstate), str(message))

    def _limit(self, value: Any) -> Limit | None:
        if not isinstance(value, dict) or not value.keys() & {"max_rows", "max_offset"}:
            self.problem("limit must be a table with max_rows and/or max_offset, like "
                         "{ max_rows = 1000, max_offset = 10000 }", "limit")
            return None
        rows = self._int(value, "max_rows", 1)
        offset = self._int(value, "max_offset", 0)
        return Limit(rows, offset)

    def _int(self, table: dict[str, Any], key: str, least: int) -> int | None:
        v = table.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            self.problem(f"limit.{key} must be a whole number of at least {least}, not {v!r}", "limit", key)
            return None
        return v

    def _duration(self, value: Any, what: str, *path: str, zero_ok: bool = False) -> float | None:
        if isinstance(value, bool):
            self.problem(f"{what} must be a duration like \"60s\" or \"250ms\", not {value!r}", *path)
            return None
        try:
            seconds = parse_duration(value)
        except ValueError as e:
            self.problem(f"{what}: {e}", *path)
            return None
        if seconds < 0 or (seconds == 0 and not zero_ok):
            self.problem(f"{what} must be {'at least 0' if zero_ok else 'more than 0'}, not {value!r}", *path)
            return None
        return seconds

    def _cache(self, value: Any) -> Cache | None:
        if value is True:
            value = {}
        if not isinstance(value, dict):
            self.problem(f"cache must be a table like {{ ttl = \"60s\" }}, not {value!r}", "cache")
            return None
        ttl = self.default_ttl
        if "ttl" in value:
            ttl = self._duration(value["ttl"], "cache.ttl", "cache", "ttl")
        swr = None
        if "stale_while_revalidate" in value:
            swr = self._duration(value["stale_while_revalidate"], "cache.stale_while_revalidate",
                                 "cache", "stale_while_revalidate", zero_ok=True)
        flags = {}
        for flag in ("allow_rls", "allow_catalog"):
            if flag in value:
                if not isinstance(value[flag], bool):
                    self.problem(f"cache.{flag} must be true or false, not {value[flag]!r}", "cache", flag)
                else:
                    flags[flag] = value[flag]
        return Cache(ttl or self.default_ttl, swr, **flags)

    def _timeout(self, value: Any) -> float | None:
        return self._duration(value, "timeout", "timeout")

    def _throttle(self, value: Any) -> Throttle | None:
        return parse_throttle(value, self.problem)

    def _mirror(self, value: Any) -> Mirror | None:
        if not isinstance(value, dict) or not isinstance(value.get("to"), str) or not value["to"]:
            self.problem("mirror must be a table naming a [mirror.NAME] target, like "
                         "{ to = \"shadow\", share = 0.1 }", "mirror")
            return None
        share = value.get("share", 1.0)
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            self.problem(f"mirror.share must be a number above 0 and at most 1, not {share!r}", "mirror", "share")
            return None
        writes = value.get("writes", False)
        if not isinstance(writes, bool):
            self.problem(f"mirror.writes must be true or false, not {writes!r}", "mirror", "writes")
            return None
        return Mirror(value["to"], float(share), writes)

    def _route(self, value: Any) -> str | None:
        if value not in ("primary", "replica"):
            self.problem(f"route must be \"primary\" or \"replica\", not {value!r}", "route")
            return None
        return value

    def _log(self, value: Any) -> bool:
        if not isinstance(value, bool):
            self.problem(f"log must be true or false, not {value!r}", "log")
            return False
        return value

    def _rewrite(self, value: Any) -> Rewrite | None:
        if not isinstance(value, dict) or not value.keys() & {"from", "to", "rename_table"}:
            self.problem("rewrite must be a table: { from = \"...\", to = \"...\" } or "
                         "{ rename_table = { old = \"new\" } }", "rewrite")
            return None
        template = rename = None
        if "from" in value or "to" in value:
            src, dst = value.get("from"), value.get("to")
            if not isinstance(src, str) or not isinstance(dst, str):
                self.problem("rewrite needs both from and to, as strings",
                             "rewrite", "from" if "from" in value else "to")
            else:
                try:
                    template = TemplateRewrite(src, dst, self.fingerprint)
                except TemplateError as e:
                    self.problem(str(e), "rewrite", "from")
        if "rename_table" in value:
            names = value["rename_table"]
            if (not isinstance(names, dict) or not names
                    or not all(isinstance(v, str) for v in names.values())):
                self.problem("rewrite.rename_table must be a table of old = \"new\" names",
                             "rewrite", "rename_table")
            else:
                try:
                    rename = RenameTables(names)
                except TemplateError as e:
                    self.problem(str(e), "rewrite", "rename_table")
        return Rewrite(template, rename)


# --- files ------------------------------------------------------------------------------------------

def expand(paths: Iterable[str],
           base_dir: str | os.PathLike[str] | None = None) -> tuple[list[str], list[Problem]]:
    """Rule files named by paths and globs, sorted by file name; a missing plain path is a problem."""
    files: set[str] = set()
    problems = []
    for pattern in paths:
        full = os.path.join(base_dir, pattern) if base_dir is not None else pattern
        if glob.has_magic(full):
            files.update(glob.glob(full))
        elif os.path.isfile(full):
            files.add(full)
        else:
            problems.append(Problem(full, 0, None, "no such rule file"))
    return sorted(files, key=lambda f: (Path(f).name, f)), problems


def parse_rule_files(paths: Iterable[str], *, base_dir: str | os.PathLike[str] | None = None,
                     default_ttl: float = 60.0, fingerprint: Callable[[str], str] | None = None,
                     ) -> tuple[list[Rule], list[str]]:
    """All rules of all files in load order, and the files read. Raises RuleError listing every problem."""
    if fingerprint is None:
        from proxy.sql import analyze

        def fingerprint(text: str) -> str:
            return analyze(text).fingerprint

    files, problems = expand(paths, base_dir)
    rules: list[Rule] = []
    seen: dict[str, tuple[str, int]] = {}  # name -> (file, line)
    for file in files:
        try:
            text = Path(file).read_text(encoding="utf-8")
            doc = tomllib.loads(text)
        except (OSError, UnicodeDecodeError) as e:
            problems.append(Problem(file, 0, None, f"cannot read: {e}"))
            continue
        except tomllib.TOMLDecodeError as e:
            m = re.search(r"line (\d+)", str(e))
            problems.append(Problem(file, int(m.group(1)) if m else 1, None, f"not valid TOML: {e}"))
            continue
        lines = _Lines(text)
        for key in doc:
            if key != "rule":
                problems.append(Problem(file, lines.top_level(key), None,
                                        f"unknown top-level key {key!r} (rules go in [[rule]] tables)"))
        raw_rules = doc.get("rule", [])
        if not isinstance(raw_rules, list):
            problems.append(Problem(file, lines.top_level("rule"), None, "rules go in [[rule]] tables"))
            continue
        for index, raw in enumerate(raw_rules):
            checker = _Checker(file, index, lines, problems, fingerprint, default_ttl)
            rule = checker.build(raw)
            if checker.name is None:
                continue
            line = lines.find(index, "name")
            if checker.name in seen:
                first_file, first_line = seen[checker.name]
                where = f"line {first_line}" if first_file == file else f"{first_file}:{first_line}"
                problems.append(Problem(file, line, checker.name,
                                        f"duplicate rule name (first defined at {where})"))
                continue
            seen[checker.name] = (file, line)
            if rule is not None:
                rules.append(rule)
    if problems:
        raise RuleError(problems)
    return rules, files
