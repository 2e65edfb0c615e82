"""RuleSet: the loaded rules, and decide() — the per-execution entry point of the session.

How matching rules combine (docs/rules.md has the long form):
  * rules are tried in load order (files by name, rules in file order); every enforced rule that
    matches applies, until one with `final = true` matches or a block applies;
  * block wins over everything: the statement is refused and other actions are dropped;
  * the first matching cache and the first timeout win; log is on if any matching rule logs;
  * rewrites chain in rule order, each on the previous one's output, and the rules after a rewrite
    are matched against the rewritten statement; the limit is applied last, with the smallest
    max_rows and the smallest max_offset of all matching limit rules;
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any

from proxy.rules.decision import PASS, Decision, MatchContext, blocked, limit_notice, offset_refusal
from proxy.rules.match import CONTEXT_KEYS
from proxy.rules.model import Cache, Rule, RuleCounter, parse_rule_files
from proxy.rules.paginate import LimitResult, enforce_limit
from proxy.rules.sqltree import MAX_CACHED_TEXT, parse, splice

log = logging.getLogger("pgfront.rules")

DEFAULT_CACHE_SIZE = 10_000
MAX_CACHED_CHARS = 32 * 1024 * 1024  # statement text held by the decision cache, all entries together


def _analyze(text: str) -> Any:
    from proxy.sql import analyze

    return analyze(text)


def _fingerprinter(info: Any) -> Callable[[str], str]:
    """Fingerprint of a statement's text: info's own, or analyzed (a multi-statement piece, a rewrite)."""
    return lambda text: info.fingerprint if text == info.text else _analyze(text).fingerprint


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
    rows: tuple[int, str] | None = None  # (max_rows, rule)
    offset: tuple[int, str] | None = None  # (max_offset, rule)
    text: str | None = None  # the statement after this plan's rewrites and limit; None = unchanged
    limited: LimitResult | None = None
    throttle: list[tuple[str, Any, bool, RuleCounter]] = field(default_factory=list)
    mirror: list[Any] = field(default_factory=list)
    route: str | None = None

    def add(self, rule: Rule) -> bool:
        """Take rule's actions; True when evaluation must stop here."""
        self.matched.extend((rule.name, a, rule.observe) for a in rule.actions)
        if rule.throttle is not None:  # observed too: it counts what it would have held back
            self.throttle.append((rule.name, rule.throttle, rule.observe, rule.counter))
        if rule.observe:
            self.observed.append(rule.counter)
            return False
        self.hits.append(rule.counter)
        self.log = self.log or rule.log
        if rule.mirror is not None:
            self.mirror.append(rule.mirror)
        if self.route is None:
            self.route = rule.route
        if rule.block is not None:
            self.block = (rule.block.sqlstate, blocked(rule.block.message, rule.name))
            return True
        if self.cache is None:
            self.cache = rule.cache
        if self.timeout is None:
            self.timeout = rule.timeout
        if rule.limit is not None:
            self.rows = _smaller(self.rows, rule.limit.max_rows, rule.name)
            self.offset = _smaller(self.offset, rule.limit.max_offset, rule.name)
        return rule.final


def _smaller(current: tuple[int, str] | None, value: int | None, rule: str) -> tuple[int, str] | None:
    if value is None or (current is not None and current[0] <= value):
        return current
    return value, rule


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
        self._cached_chars = 0  # statement text held as keys of _decisions

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
            self._remember(key, len(info.text), decision)
        return decision

    def _remember(self, key: Any, size: int, decision: Decision) -> None:
        if size > MAX_CACHED_TEXT:
            return  # a huge one-off (bulk INSERT): deciding again is cheaper than holding its text
        decisions = self._decisions
        self._cached_chars += size
        decisions[key] = decision
        while len(decisions) > self._cache_size or self._cached_chars > MAX_CACHED_CHARS:
            old = next(iter(decisions))  # oldest first: cheap, good enough
            del decisions[old]
            self._cached_chars -= len(old if isinstance(old, str) else old[0])

    def context_key(self, ctx: Any) -> Any:
        """What of the context the rules look at (None when they look at none): equal keys, equal decisions."""
        return None if self._ctx_key is None else self._ctx_key(ctx)

    @staticmethod
    def count(decision: Decision) -> None:
        """Count one execution against the rules behind decision (enforced and observed)."""
        decision.tally.hit()

    # --- computing a decision (once per statement shape) ----------------------------------------

    def plan(self, text: str, info: Any, ctx: Any) -> _Plan:
        """Match the rules against one statement and apply what they ask for to its text."""
        plan = _Plan()
        original = text
        for rule in self._active:
            if not rule.match(info, ctx):
                continue
            stop = plan.add(rule)
            if rule.rewrite is not None and not rule.observe and plan.block is None:
                new = rule.rewrite.apply(text, _fingerprinter(info))
                if new is not None and new != text:
                    text, info = new, _analyze(new)  # later rules see the rewritten statement
            if stop:
                break
        if plan.block is None and (plan.rows is not None or plan.offset is not None):
            plan.limited = enforce_limit(text, plan.rows and plan.rows[0], plan.offset and plan.offset[0],
                                         info.returns_one_row)
            text = plan.limited.sql or text
        plan.text = text if text != original else None
        return plan

    def _decide(self, info: Any, ctx: Any) -> Decision:
        parts = info.statements or (info,)
        spans: list[tuple[int, int]] | None = [(0, len(info.text))]
        if info.statements:
            if not any(r.match(p, ctx) for p in parts for r in self._active):
                return PASS  # the common case for scripts: no need to locate the statements
            tree = parse(info.text)
            spans = [tree.segment(i) for i in range(len(tree.stmts))] if tree else None
            if spans is None or len(spans) != len(parts):
                return self._decide_unsplit(info, ctx)
        plans = [self.plan(info.text[start:end], part, ctx)
                 for part, (start, end) in zip(parts, spans, strict=True)]
        if not any(p.matched for p in plans):
            return PASS
        self._log_observed(info, plans)
        block = next((p.block for p in plans if p.block), None)
        if block is None:
            refused = next((p for p in plans if p.limited is not None and p.limited.offset is not None), None)
            if refused is not None:
                block = offset_refusal(refused.limited.offset, *refused.offset)  # type: ignore[misc, union-attr]
        notices = []
        row_limit = offset_check = None
        for plan in plans:
            res = plan.limited
            if res is not None and res.change is not None and plan.rows is not None:
                row_limit = plan.rows[0]
                notices.append(limit_notice(plan.rows[1], plan.rows[0], res.change))
            if res is not None and res.offset_param is not None and plan.offset is not None:
                offset_check = (res.offset_param, *plan.offset)
        edits = [(start, end, p.text) for p, (start, end) in zip(plans, spans, strict=True) if p.text is not None]
        return self._decision(plans, block, splice(info.text, edits) if edits else None, tuple(notices),
                              row_limit, offset_check, single=not info.statements)

    def _decide_unsplit(self, info: Any, ctx: Any) -> Decision:
        """Statements we cannot locate in the text: match them, but only block, time out or log."""
        plans = [self.plan(p.text, p, ctx) for p in info.statements]
        if not any(p.matched for p in plans):
            return PASS
        return self._decision(plans, next((p.block for p in plans if p.block), None), None, (), None, None,
                              single=False)

    @staticmethod
    def _decision(plans: list[_Plan], block: tuple[str, str] | None, sql: str | None, notices: tuple[str, ...],
                  row_limit: int | None, offset_check: tuple[int, int, str] | None, single: bool) -> Decision:
        cache = plans[0].cache if single and block is None else None
        return Decision(
            block=block,
            sql=None if block else sql,
            notices=() if block else notices,
            cache_ttl=cache.ttl if cache else None,
            stale_while_revalidate=cache.stale_while_revalidate if cache else None,
            cache_allow_rls=bool(cache and cache.allow_rls),
            cache_allow_catalog=bool(cache and cache.allow_catalog),
            timeout=None if block else next((p.timeout for p in plans if p.timeout is not None), None),
            log=any(p.log for p in plans),
            matched=(matched := tuple(dict.fromkeys(m for p in plans for m in p.matched))),
            by_text=any(not observed and action in ("limit", "rewrite") for _rule, action, observed in matched),
            row_limit=None if block else row_limit,
            offset_check=offset_check if single and not block else None,
            throttle=() if block else tuple(dict.fromkeys(t for p in plans for t in p.throttle)),
            mirror=() if block else tuple(dict.fromkeys(m for p in plans for m in p.mirror)),
            route=None if block else next((p.route for p in plans if p.route is not None), None),
            hit_counters=tuple(dict.fromkeys(c for p in plans for c in p.hits)),
            observed_counters=tuple(dict.fromkeys(c for p in plans for c in p.observed)),
        )

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
            "description": r.description,
            "hits": r.counter.hits,
            "observed_hits": r.counter.observed_hits,
            "queued": r.counter.queued,
            "throttled": r.counter.throttled,
        } for r in self.rules]

    def clear_cache(self) -> None:
        self._decisions.clear()
        self._cached_chars = 0


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
