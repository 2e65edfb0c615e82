"""Slow-plan capture: EXPLAIN slow statements off the hot path and keep the plans as JSON lines.

`SlowLog.maybe_capture` is what the session calls; `explain_plan` is shared with the index advisor,
which re-explains the captured statements with hypothetical indexes.
"""

from proxy.slowlog.capture import SlowLog
from proxy.slowlog.explain import explain_plan, plan_relations, quote_ident, quote_literal, table_snapshot
from proxy.slowlog.store import PlanStore, read_records, rotated_paths

__all__ = [
    "PlanStore",
    "SlowLog",
    "explain_plan",
    "plan_relations",
    "quote_ident",
    "quote_literal",
    "read_records",
    "rotated_paths",
    "table_snapshot",
]
