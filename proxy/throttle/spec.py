"""The `throttle` rule action: what one rule limits, and how its rule file entry is checked.

    throttle = { qps = 50, concurrency = 4, queue = "2s", scope = "user", message = "..." }

qps is a rate (a GCRA schedule: `burst` statements may start at once, then one every 1/qps seconds);
concurrency is the number of statements of the rule's scope running at once. A statement over either
waits, in arrival order, at most `queue`; one that cannot start in time fails with SQLSTATE 53400.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from proxy.config import parse_duration

THROTTLE_KEYS = ("qps", "burst", "concurrency", "queue", "max_queue", "scope", "message")
SCOPES = ("rule", "user", "fingerprint", "application_name")
THROTTLE_SQLSTATE = "53400"  # configuration_limit_exceeded
DEFAULT_QUEUE = 1.0
DEFAULT_MAX_QUEUE = 1000


@dataclass(frozen=True, slots=True)
class Throttle:
    qps: float | None
    burst: float  # statements that may start at once before the rate applies
    concurrency: int | None
    queue: float  # seconds a statement may wait before it is refused
    max_queue: int  # statements waiting per limit and worker; more are refused at once
    scope: str  # what one limit is counted over: the rule, or each user / fingerprint / application_name
    message: str

    @property
    def interval(self) -> float:
        """Seconds between two statements at the limit rate (0: no rate limit)."""
        return 1.0 / self.qps if self.qps else 0.0

    def refusal(self, rule: str, why: str) -> str:
        return f"{self.message} (pgfront rule \"{rule}\": {why})"


def parse_throttle(value: Any, problem: Callable[..., None]) -> Throttle | None:
    """The Throttle of a rule file's `throttle` table; problem(message, *key_path) reports mistakes."""
    if not isinstance(value, dict) or not value.keys() & {"qps", "concurrency"}:
        problem("throttle must be a table with qps and/or concurrency, like "
                "{ qps = 100, concurrency = 10, queue = \"2s\" }", "throttle")
        return None
    ok = True

    def number(key: str, whole: bool, least: float) -> Any:
        nonlocal ok
        v = value.get(key)
        if v is None:
            return None
        kinds = int if whole else (int, float)
        if isinstance(v, bool) or not isinstance(v, kinds) or v < least:
            what = "a whole number" if whole else "a number"
            problem(f"throttle.{key} must be {what} of at least {least:g}, not {v!r}", "throttle", key)
            ok = False
            return None
        return v

    qps = number("qps", False, 0.001)
    burst = number("burst", False, 1)
    concurrency = number("concurrency", True, 1)
    max_queue = number("max_queue", True, 0)
    queue = DEFAULT_QUEUE
    if "queue" in value:
        try:
            queue = parse_duration(value["queue"]) if not isinstance(value["queue"], bool) else -1.0
        except ValueError:
            queue = -1.0
        if queue < 0:
            problem(f"throttle.queue must be a duration like \"2s\" or \"500ms\" (0: never wait), "
                    f"not {value['queue']!r}", "throttle", "queue")
            ok = False
    scope = value.get("scope", "rule")
    if scope not in SCOPES:
        problem(f"throttle.scope must be one of {', '.join(SCOPES)}, not {scope!r}", "throttle", "scope")
        ok = False
    message = value.get("message", "too many statements: throttled")
    if not isinstance(message, str) or not message:
        problem(f"throttle.message must be a non-empty string, not {message!r}", "throttle", "message")
        ok = False
    if burst is not None and qps is None:
        problem("throttle.burst needs qps", "throttle", "burst")
        ok = False
    if not ok:
        return None
    # default burst: a tenth of a second's worth, so a measured rate over a few seconds stays close
    # to qps, while a client that sends a handful at once is not made to wait for each
    return Throttle(qps=float(qps) if qps else None,
                    burst=float(burst) if burst is not None else max(1.0, (qps or 0) / 10),
                    concurrency=concurrency, queue=queue,
                    max_queue=DEFAULT_MAX_QUEUE if max_queue is None else max_queue,
                    scope=scope, message=message)
