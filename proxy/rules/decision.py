"""What the session gets back from the rules engine for one statement, and what it passes in."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy.stats import RuleCounter, RuleTally

OFFSET_SQLSTATE = "54000"  # program_limit_exceeded: an OFFSET deeper than a limit rule allows
NOTICE_SQLSTATE = "00000"  # NoticeResponse code for the engine's notices (severity NOTICE)


@dataclass(frozen=True, slots=True)
class MatchContext:
    """Session facts rules can match on. Any object with these attributes will do."""

    user: str = ""
    database: str = ""
    application_name: str = ""
    in_transaction: bool = False  # inside a transaction block (ReadyForQuery status T or E)
    tags: dict[str, str] | None = None  # the statement's sqlcommenter tags
    tag_key: str = ""  # the same, as text (without traceparent): what decisions are cached under


@dataclass(frozen=True, slots=True)
class Decision:
    """Shared and cached: never mutate. PASS (all defaults) means "forward unchanged"."""

    block: tuple[str, str] | None = None  # (sqlstate, message): answer with ErrorResponse, do not run
    sql: str | None = None  # text to send instead of the client's; None = unchanged
    notices: tuple[str, ...] = ()  # send each as a NoticeResponse (severity NOTICE, code 00000)
    cache_ttl: float | None = None  # seconds; None = do not serve from / store in the cache
    stale_while_revalidate: float | None = None
    cache_allow_rls: bool = False
    cache_allow_catalog: bool = False
    timeout: float | None = None  # seconds: run under this statement_timeout
    log: bool = False  # log this execution
    matched: tuple[tuple[str, str, bool], ...] = ()  # (rule name, action, observed)
    row_limit: int | None = None  # the LIMIT pgfront imposed, when it changed one
    # OFFSET $n: (n, max_offset, rule name); check the bound value with offset_error() at Bind
    offset_check: tuple[int, int, str] | None = None
    # (rule name, Throttle, observed, RuleCounter) of every matching throttle rule: admit before running
    throttle: tuple[tuple[str, Any, bool, RuleCounter], ...] = ()
    mirror: tuple[Any, ...] = ()  # model.Mirror of every matching enforced mirror rule
    route: str | None = None  # the first matching enforced route rule's: "primary" or "replica"
    # what an enforced rule does depends on the statement's own values (an enforced LIMIT: the client's
    # LIMIT/OFFSET numbers; a rewrite: literals carried into a template): decided again on its own text
    by_text: bool = False
    hit_counters: tuple[RuleCounter, ...] = field(default=(), repr=False, compare=False)
    observed_counters: tuple[RuleCounter, ...] = field(default=(), repr=False, compare=False)
    # what each execution counts (the counters above, the statistics' rule event keys of `matched`),
    # prepared here once: the relay counts an execution in C with it
    tally: RuleTally = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tally", RuleTally(self.hit_counters, self.observed_counters, self.matched))

    @property
    def passthrough(self) -> bool:
        """Nothing to do beyond counting."""
        return self is PASS

    def offset_error(self, value: bytes | None, binary: bool = False) -> tuple[str, str] | None:
        """(sqlstate, message) when the bound OFFSET parameter is above the rule's maximum.

        value: the parameter as sent in Bind (text, or a big-endian integer when binary).
        """
        if self.offset_check is None or value is None:
            return None
        try:
            offset = int.from_bytes(value, "big", signed=True) if binary else int(value)
        except ValueError:
            return None  # not a number: Postgres reports that itself
        param, limit, rule = self.offset_check
        return offset_refusal(offset, limit, rule) if offset > limit else None


def offset_refusal(offset: int, limit: int, rule: str) -> tuple[str, str]:
    return (OFFSET_SQLSTATE,
            f"OFFSET {offset} is beyond the maximum of {limit} set by pgfront rule \"{rule}\"; "
            "use keyset pagination instead (WHERE key > last_key ORDER BY key LIMIT n)")


def limit_notice(rule: str, rows: int, change: str) -> str:
    how = {"added": f"added LIMIT {rows}", "lowered": f"lowered the LIMIT to {rows}",
           "capped": f"capped the LIMIT at {rows}"}[change]
    return f"pgfront rule \"{rule}\" limited this query to {rows} rows ({how}); use keyset pagination to read more"


def blocked(message: str, rule: str) -> str:
    return f"{message} (pgfront rule \"{rule}\")"


PASS = Decision()
