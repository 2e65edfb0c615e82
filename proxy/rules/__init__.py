"""The rules engine: TOML rule files that block, rewrite, paginate, cache, time out or log statements.

Session usage (hot path):
    decision = holder.current.decide(info, ctx)   # one dict look-up for a shape seen before
    holder.current.count(decision)                # once per execution
"""

from proxy.rules.decision import NOTICE_SQLSTATE, OFFSET_SQLSTATE, PASS, Decision, MatchContext
from proxy.rules.engine import RuleSet, load_rules
from proxy.rules.model import DEFAULT_BLOCK_SQLSTATE, Problem, Rule, RuleError
from proxy.rules.watch import RuleHolder, RuleWatcher

__all__ = [
    "DEFAULT_BLOCK_SQLSTATE", "NOTICE_SQLSTATE", "OFFSET_SQLSTATE", "PASS", "Decision", "MatchContext",
    "Problem", "Rule", "RuleError", "RuleHolder", "RuleSet", "RuleWatcher", "load_rules",
]
