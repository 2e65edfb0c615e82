"""RuleSet: the loaded rules, and decide() — the per-execution entry point of the session.

How matching rules combine (docs/rules.md has the long form):
  * rules are tried in load order (files by name, rules in file order); every enforced rule that
    matches applies, until one with `final = true` matches or a block applies;
  * block wins over everything: the statement is refused and other actions are dropped;
  * the first matching cache and the first timeout win; log is on if any matching rule logs;
  * rewrites chain in rule order, each on the previous one's output; the limit is applied last,
    with the smallest max_rows and the smallest max_offset of all matching limit rules;
  * observe-mode rules never change anything and never stop evaluation: they are counted in
    observed_hits and logged once per statement shape as "would have".
For a multi-statement string each statement is matched and transformed on its own; any block
refuses the whole string, and results of such strings are never cached.

decide() is cached per (statement text, the context fields some rule reads) in a bounded dict, so a
shape seen before costs one look-up. It does not count: call count(decision) once per execution.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any

from proxy.rules.decision import PASS, Decision, MatchContext, blocked, limit_notice, offset_refusal
from proxy.rules.match import CONTEXT_KEYS
from proxy.rules.model import Cache, Rewrite, Rule, RuleCounter, parse_rule_files
from proxy.rules.paginate import LimitResult, enforce_limit
from proxy.rules.sqltree import parse, splice

log = logging.getLogger("pgfront.rules")

DEFAULT_CACHE_SIZE = 10_000


def _analyze(text: str) -> Any:
    from proxy.sql import analyze

    return analyze(text)


@dataclass
class _Plan:
    """What the matching rules ask for, for one statement."""

    matched: list[tuple[str, str, bool]] = field(default_factory=list)
    hits: list[RuleCounter] = field(default_factory=list)
    observed: list[RuleCounter] = field(default_factory=list)
    block: tuple[str, str] | None = None
    cache: Cache | None = None
    timeout: float | None = None
    log: bool = False
    rewrites: list[Rewrite] = field(default_factory=list)
    rows: tuple[int, str] | None = None  # (max_rows, rule)
    offset: tuple[int, str] | None = None  # (max_offset, rule)

    def add(self, rule: Rule) -> bool:
        """Take rule's actions; True when evaluation must stop here."""
        self.matched.extend((rule.name, a, rule.observe) for a in rule.actions)
        if rule.observe:
            self.observed.append(rule.counter)
            return False
        self.hits.append(rule.counter)
        self.log = self.log or rule.log
        if rule.block is not None:
            self.block = (rule.block.sqlstate, blocked(rule.block.message, rule.name))
            return True
        if self.cache is None:
            self.cache = rule.cache
        if self.timeout is None:
            self.timeout = rule.timeout
        if rule.rewrite is not None:
            self.rewrites.append(rule.rewrite)
        if rule.limit is not None:
            if rule.limit.max_rows is not None and (self.rows is None or rule.limit.max_rows < self.rows[0]):
                self.rows = (rule.limit.max_rows, rule.name)
            if rule.limit.max_offset is not None and (self.offset is None or rule.limit.max_offset < self.offset[0]):
                self.offset = (rule.limit.max_offset, rule.name)
        return rule.final


class RuleSet:
    """An immutable set of rules plus its decision cache and hit counters."""

    def __init__(self, rules: Sequence[Rule] = (), files: Sequence[str] = (), *,
                 cache_size: int = DEFAULT_CACHE_SIZE, previous: RuleSet | None = None) -> None:
        if previous is not None:  # a reload keeps the hit counts of rules that kept their name
            old = {r.name: r.counter for r in previous.rules}
            rules = [replace(r, counter=old[r.name]) if r.name in old else r for r in rules]
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.files: tuple[str, ...] = tuple(files)
        self._active = tuple(r for r in self.rules if r.enabled)
        fields = [k for k in CONTEXT_KEYS if any(k in r.match.context_fields for r in self._active)]
        self._ctx_key = attrgetter(*fields) if fields else None
        self._cache_size = cache_size
        self._decisions: dict[Any, Decision] = {}

    def __len__(self) -> int:
        return len(self.rules)

    # --- hot path -------------------------------------------------------------------------------

    def decide(self, info: Any, ctx: Any) -> Decision:
        """The decision for one statement (a StatementInfo) in one context (a MatchContext)."""
        if not self._active:
            return PASS
        key = info.text if self._ctx_key is None else (info.text, self._ctx_key(ctx))
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(info, ctx)
            if len(self._decisions) >= self._cache_size:
                del self._decisions[next(iter(self._decisions))]  # oldest first: cheap, good enough
            self._decisions[key] = decision
        return decision

    @staticmethod
    def count(decision: Decision) -> None:
        """Count one execution against the rules behind decision (enforced and observed)."""
        for c in decision.hit_counters:
            c.hits += 1
        for c in decision.observed_counters:
            c.observed_hits += 1

    # --- computing a decision (once per statement shape) ----------------------------------------

    def plan(self, info: Any, ctx: Any) -> _Plan:
        plan = _Plan()
        for rule in self._active:
            if rule.match(info, ctx) and plan.add(rule):
                break
        return plan

    def _decide(self, info: Any, ctx: Any) -> Decision:
        parts = info.statements or (info,)
        spans: list[tuple[int, int]] | None = [(0, len(info.text))]
        if info.statements:
            tree = parse(info.text)
            spans = [tree.segment(i) for i in range(len(tree.stmts))] if tree else None
            if spans is not None and len(spans) != len(parts):
                spans = None
        plans = [self.plan(p, ctx) for p in parts]
        if not any(p.matched for p in plans):
            return PASS
        self._log_observed(info, plans)
        block = next((p.block for p in plans if p.block), None)
        edits: list[tuple[int, int, str]] = []
        notices: list[str] = []
        row_limit = offset_check = None
        for i, (part, plan) in enumerate(zip(parts, plans, strict=True)):
            if block is not None or spans is None:
                break
            start, end = spans[i]
            new, res = self._transform(info.text[start:end], part, plan)
            if res is not None and res.offset is not None:
                block = offset_refusal(res.offset, *plan.offset)  # type: ignore[misc]
                break
            if new is not None:
                edits.append((start, end, new))
            if res is not None and res.change is not None and plan.rows is not None:
                row_limit = plan.rows[0]
                notices.append(limit_notice(plan.rows[1], plan.rows[0], res.change))
            if res is not None and res.offset_param is not None and plan.offset is not None:
                offset_check = (res.offset_param, *plan.offset)
        single = not info.statements
        first = plans[0]
        return Decision(
            block=block,
            sql=None if block or not edits else splice(info.text, edits),
            notices=() if block else tuple(notices),
            cache_ttl=first.cache.ttl if single and first.cache and not block else None,
            stale_while_revalidate=first.cache.stale_while_revalidate if single and first.cache and not block else None,
            timeout=None if block else next((p.timeout for p in plans if p.timeout is not None), None),
            log=any(p.log for p in plans),
            matched=tuple(dict.fromkeys(m for p in plans for m in p.matched)),
            row_limit=None if block else row_limit,
            offset_check=offset_check if single and not block else None,
            hit_counters=tuple(dict.fromkeys(c for p in plans for c in p.hits)),
            observed_counters=tuple(dict.fromkeys(c for p in plans for c in p.observed)),
        )

    @staticmethod
    def _transform(text: str, info: Any, plan: _Plan) -> tuple[str | None, LimitResult | None]:
        """Apply plan's rewrites then its limit to one statement's text."""
        original = text

        def fingerprint(t: str) -> str:
            return info.fingerprint if t == original else _analyze(t).fingerprint

        for rewrite in plan.rewrites:
            text = rewrite.apply(text, fingerprint) or text
        res = None
        if plan.rows is not None or plan.offset is not None:
            one_row = info.returns_one_row if text == original else _analyze(text).returns_one_row
            res = enforce_limit(text, plan.rows and plan.rows[0], plan.offset and plan.offset[0], one_row)
            text = res.sql or text
        return (text if text != original else None), res

    @staticmethod
    def _log_observed(info: Any, plans: list[_Plan]) -> None:
        for plan in plans:
            for name, action, observed in plan.matched:
                if observed:
                    log.info("rule %r (observe mode) would have applied %s to: %s", name, action, info.normalized)

    # --- inspection -----------------------------------------------------------------------------

    def trace(self, info: Any, ctx: Any) -> list[tuple[Rule, bool]]:
        """Every rule and whether it matches info (ignoring final), for `rules explain`."""
        return [(r, r.enabled and r.match(info, ctx)) for r in self.rules]

    def describe(self) -> list[dict[str, Any]]:
        """One row per rule for SHOW RULES."""
        return [{
            "name": r.name,
            "file": os.path.basename(r.file),
            "line": r.line,
            "match": r.match.summary(),
            "actions": describe_actions(r),
            "mode": r.mode if r.enabled else "disabled",
            "final": r.final,
            "hits": r.counter.hits,
            "observed_hits": r.counter.observed_hits,
        } for r in self.rules]

    def clear_cache(self) -> None:
        self._decisions.clear()


def describe_actions(rule: Rule) -> str:
    parts = []
    for action, value in rule.spec.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{k}={_short(v)}" for k, v in value.items())
            parts.append(f"{action}({inner})")
        elif value is True:
            parts.append(action)
        else:
            parts.append(f"{action}={value}")
    return " ".join(parts)


def _short(v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={x}" for k, x in v.items()) + "}"
    if isinstance(v, str):
        return repr(v) if len(v) <= 60 else repr(v[:57] + "...")
    return str(v)


def load_rules(paths: Iterable[str], *, base_dir: str | os.PathLike[str] | None = None,
               default_ttl: float = 60.0, cache_size: int = DEFAULT_CACHE_SIZE,
               previous: RuleSet | None = None) -> RuleSet:
    """Load rule files and globs (relative to base_dir when given). Raises RuleError."""
    rules, files = parse_rule_files(paths, base_dir=base_dir, default_ttl=default_ttl)
    return RuleSet(rules, files, cache_size=cache_size, previous=previous)


__all__ = ["Decision", "MatchContext", "RuleSet", "load_rules"]
