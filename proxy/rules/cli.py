"""`pgfront rules check FILES...` and `pgfront rules explain "SQL"`.

check: validates rule files; prints each problem as `file:line: rule 'name': message` and exits 1,
or prints a one-line summary and exits 0.
explain: shows the statement's fingerprint, normalized text and facts, which rules match and what
pgfront would send (or the error it would answer with).
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from typing import Any, TextIO

from proxy.rules.decision import MatchContext
from proxy.rules.engine import RuleSet, describe_actions, load_rules
from proxy.rules.model import RuleError, parse_rule_files

DEFAULT_RULES = ["rules/*.toml"]
_FACTS = ("kind", "parsed", "tables_read", "tables_written", "has_where", "has_limit", "limit_value",
          "has_offset", "offset_value", "locking", "returns_one_row", "volatile", "max_param")


def register(subparsers: argparse._SubParsersAction) -> None:
    rules = subparsers.add_parser("rules", help="check rule files, explain what rules do to a statement")
    sub = rules.add_subparsers(dest="rules_command", metavar="{check,explain}", required=True)

    check = sub.add_parser("check", help="validate rule files (exit status 1 on any problem)")
    check.add_argument("files", nargs="+", metavar="FILE", help="rule files or globs")
    check.set_defaults(func=check_main)

    explain = sub.add_parser("explain", help="show which rules match a statement and what would be sent")
    explain.add_argument("sql", help="the statement, as a client would send it")
    explain.add_argument("--rules", action="append", metavar="PATH",
                         help="rule file or glob (repeatable; default: [rules] files of the config file)")
    explain.add_argument("--config", help="config file whose [rules] files to use "
                                          "(default: ./config.toml if present, else rules/*.toml)")
    explain.add_argument("--user", default="", help="role the client connects as")
    explain.add_argument("--database", default="", help="database the client connects to")
    explain.add_argument("--application-name", default="", help="the client's application_name")
    explain.add_argument("--in-transaction", action="store_true", help="as if inside a transaction block")
    explain.add_argument("--enforce", action="store_true",
                         help="treat observe-mode rules as enforced, to see what they would do")
    explain.set_defaults(func=explain_main)


def check_main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    try:
        rules, files = parse_rule_files(args.files)
    except RuleError as e:
        for problem in e.problems:
            print(problem, file=out)
        print(f"{_plural(len(e.problems), 'problem')} found", file=out)
        return 1
    print(f"OK: {_plural(len(rules), 'rule')} in {_plural(len(files), 'file')}", file=out)
    return 0


def _rule_paths(args: argparse.Namespace) -> list[str]:
    if args.rules:
        return args.rules
    config = args.config or ("config.toml" if os.path.exists("config.toml") else None)
    if config:
        from proxy.config import load

        return list(load(config).rules.files)
    return DEFAULT_RULES


def explain_main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    from proxy.replicas.routing import explain_route
    from proxy.sql import analyze

    try:
        ruleset = load_rules(_rule_paths(args))
    except RuleError as e:
        print(e, file=out)
        return 1
    if args.enforce:
        ruleset = RuleSet([replace(r, observe=False) for r in ruleset.rules], ruleset.files)
    from proxy.sql.sqlcommenter import parse_tags, split_comment, tags_text

    text, comment = split_comment(args.sql)  # a sqlcommenter comment gives the tags rules match on
    tags = parse_tags(comment) if comment is not None else None
    ctx = MatchContext(args.user, args.database, args.application_name, args.in_transaction, tags,
                       tags_text(tags))
    info = analyze(text)
    decision = ruleset.decide(info, ctx)
    show = _Printer(out)
    show("statement", info.text)
    show("fingerprint", info.fingerprint)
    show("normalized", info.normalized)
    show("facts", " ".join(f"{k}={_fact(getattr(info, k))}" for k in _FACTS))
    if info.error:
        show("parse error", info.error)
    show("context", f"user={ctx.user!r} database={ctx.database!r} "
                    f"application_name={ctx.application_name!r} in_transaction={_fact(ctx.in_transaction)}"
                    + (f" tags: {ctx.tag_key}" if ctx.tag_key else ""))
    show("rules", f"{_plural(len(ruleset), 'rule')} from {_plural(len(ruleset.files), 'file')}")
    _explain_rules(ruleset, info, ctx, decision, out)
    if decision.block:
        show("result", f"ERROR {decision.block[0]}: {decision.block[1]}")
        return 0
    show("result", decision.sql if decision.sql is not None else "(sent unchanged)")
    for notice in decision.notices:
        show("notice", notice)
    if decision.cache_ttl is not None:
        swr = decision.stale_while_revalidate
        show("cache", f"ttl {decision.cache_ttl:g}s" + (f", stale while revalidate {swr:g}s" if swr else ""))
    if decision.timeout is not None:
        show("timeout", f"statement_timeout {decision.timeout * 1000:g}ms")
    if decision.offset_check is not None:
        n, limit, rule = decision.offset_check
        show("offset", f"${n} is checked at Bind against {limit} (rule {rule!r})")
    show("route", explain_route(info, decision.route, args.in_transaction, _read_only_functions(args)))
    if decision.log:
        show("log", "yes")
    return 0


def _read_only_functions(args: argparse.Namespace) -> list[str]:
    """[routing] read_only_functions of the config file, if one is given or here."""
    config = args.config or ("config.toml" if os.path.exists("config.toml") else None)
    if not config:
        return []
    from proxy.config import load

    return list(load(config).routing.read_only_functions)


def _explain_rules(ruleset: RuleSet, info: Any, ctx: MatchContext, decision: Any, out: TextIO) -> None:
    applied = {(name, observed) for name, _, observed in decision.matched}
    parts = info.statements or (info,)
    traces = [ruleset.trace(p, ctx) for p in parts]
    for i, rule in enumerate(ruleset.rules):
        matches = any(t[i][1] for t in traces)
        if (rule.name, True) in applied:
            state = "observed (would apply)"
        elif (rule.name, False) in applied:
            state = "APPLIES"
        elif matches:
            state = "matches, but an earlier final rule or block stopped evaluation"
        elif not rule.enabled:
            state = "disabled"
        else:
            state = "no match"
        print(f"  {'*' if (rule.name, False) in applied else '-'} {rule.name} [{rule.mode}] "
              f"{describe_actions(rule)}  ({rule.file}:{rule.line}): {state}", file=out)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _fact(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, frozenset):
        return ",".join(sorted(v)) or "-"
    return "-" if v is None else str(v)


class _Printer:
    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, label: str, value: str) -> None:
        print(f"{label + ':':<13}{value}", file=self.out)
