"""What the conversation core asks of the layers around it, as small interfaces: the worker's
analysis, rules, cache and statistics (`RelayContext`), the pool's statement names (`StatementNames`),
and the server connection it holds (`HeldServer`). The core imports none of those layers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from proxy.relay.records import Pending
    from proxy.relay.serverstate import ServerState
    from proxy.sql import StatementInfo


class RelayContext(Protocol):
    cfg: Any
    shapes: Any  # ShapeCache: text -> StatementInfo
    rules: Any  # RulesAdapter, or None without rule files
    cache: Any  # ResultCache, or None with the cache off
    throttler: Any  # throttle.Throttler: admits statements under rule limits (with rule files loaded)
    tracing: Any  # tracing.Tracing, or None: spans for sampled statements
    observers: Any  # shadow.observe.ObservedSinks, or None: statements to mirror or capture
    stats: Any  # Stats, or None
    slowlog: Any
    slow_threshold: float | None

    def stats_inc(self, name: str, n: int = 1) -> None: ...

    def slowlog_capture(self, session: Any, p: Pending, info: StatementInfo, seconds: float) -> None: ...


class StatementNames(Protocol):
    """Transaction pooling: server-side names of the client's prepared statements."""

    known: set[str]

    def server_name(self, sql: str, oids: list[int]) -> str: ...

    def plan_changed(self, sql: str, oids: list[int], server_name: str) -> None: ...


class HeldServer(Protocol):
    state: ServerState
