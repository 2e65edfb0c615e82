"""The admin console: `psql dbname=pgfront`, PgBouncer-style commands answered by pgfront itself.

Only roles in `[admin] users` get in, and they authenticate against the upstream (pgfront keeps no
passwords). Commands (case-insensitive, `;`-separated):

  SHOW QUERIES [n] [BY total_time|calls|mean_time|p95|p99|rows|errors]   top fingerprints
  SHOW CLIENTS | SERVERS | STATS | RULES | CACHE | CONFIG | POOLS | VERSION | HELP
  SHOW REPLICAS               the primary and each replica: state, replay position, lag, reads routed
  SHOW MIRROR                 shadow results per target and fingerprint: compared, mismatches, p50/p95
  SHOW MIRRORS                per mirror target: queued, sent, dropped, compared, mismatched, errors
  RELOAD                      re-read rule files (all workers: the parent forwards SIGHUP)
  RESET STATS                 forget query statistics in every worker
  CACHE PURGE [ALL | TABLE name | FINGERPRINT fp]
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from collections import deque
from collections.abc import Awaitable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from proxy.wire import protocol as pq

if TYPE_CHECKING:
    from proxy.app import App


class AdminError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]], tag: str = "SHOW") -> bytes:
    """A text result set: RowDescription, DataRows, CommandComplete."""
    parts = [pq.row_description([(c, pq.TEXT_OID) for c in columns])]
    parts += [pq.data_row(_text(v) for v in r) for r in rows]
    parts.append(pq.command_complete(f"{tag} {len(rows)}" if tag == "SELECT" else tag))
    return b"".join(parts)


def _text(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        return "t" if v else "f"
    if isinstance(v, dict | list | tuple):
        return json.dumps(v, default=str)
    return str(v)


def _dict_rows(rows: list[dict[str, Any]], columns: Sequence[str] | None = None) -> bytes:
    cols = list(columns or (rows[0].keys() if rows else ["(empty)"]))
    return table(cols, [[r.get(c) for c in cols] for r in rows])


# -- commands ----------------------------------------------------------------------------------

_QUERY_COLUMNS = ["fingerprint", "calls", "total_ms", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms", "rows",
                  "errors", "cache_hits", "cache_misses", "rewrites", "blocks", "throttled", "database", "user",
                  "first_seen", "last_seen", "tags", "query"]


def show_queries(app: App, args: list[str]) -> bytes:
    n, order = 20, "total_time"
    rest = list(args)
    if rest and rest[0].isdigit():
        n = int(rest.pop(0))
    if len(rest) == 2 and rest[0] == "by":
        order = rest[1]
    elif rest:
        raise AdminError("42601", "usage: SHOW QUERIES [n] [BY total_time|calls|mean_time|p95|p99|rows|errors]")
    try:
        rows = app.merged_stats().top(n, order)
    except ValueError as e:
        raise AdminError("22023", str(e)) from None
    return _dict_rows(rows, _QUERY_COLUMNS)


def show_stats(app: App, _args: list[str]) -> bytes:
    merged = app.merged_stats()
    total = merged.everything()
    rows: list[tuple[str, Any]] = [
        ("workers", merged.workers), ("fingerprints", len(merged.queries)), ("folded_fingerprints", merged.folded),
        ("queries", total.calls), ("query_time_ms", round(total.total * 1000, 3)),
        ("errors", sum(total.errors.values())),
    ]
    rows += sorted(merged.counters.items())
    rows += sorted(merged.gauges.items())
    return table(["name", "value"], rows)


def show_clients(app: App, _args: list[str]) -> bytes:
    rows = [s.describe() for s in sorted(app.sessions, key=lambda s: s.id)]
    cols = ["id", "user", "database", "application_name", "peer", "state", "tx", "queries", "pending",
            "bytes_in", "bytes_out", "backend_pid", "connected_at"]
    return _dict_rows([{**r, "worker": app.worker_id} for r in rows], ["worker", *cols])


def show_servers(app: App, _args: list[str]) -> bytes:
    rows = []
    for s in sorted(app.sessions, key=lambda s: s.id):
        if not s.ready:
            continue
        d = s.describe()
        link = getattr(s, "server", None)
        pool = getattr(link, "owner", None)
        up = getattr(pool, "upstream", None) or app.upstream
        rows.append({"worker": app.worker_id, "backend_pid": d["backend_pid"], "client": d["id"], "user": d["user"],
                     "database": d["database"], "state": d["server_state"], "upstream": f"{up.host}:{up.port}",
                     "role": getattr(pool, "replica", "") or "primary"})
    return _dict_rows(rows, ["worker", "backend_pid", "client", "user", "database", "state", "upstream", "role"])


def show_replicas(app: App, _args: list[str]) -> bytes:
    """The primary and each [[replica]]: its state, replay position and lag, and the reads routed to it."""
    columns = ["name", "host", "state", "in_recovery", "replay_lsn", "lag_bytes", "lag_seconds", "weight", "routed",
               "bans", "last_error"]
    router = app.router
    if router is None:
        return _dict_rows([], columns)
    from proxy.replicas.health import format_lsn

    primary = {"name": "primary", "host": f"{app.upstream.host}:{app.upstream.port}", "state": "primary",
               "in_recovery": False, "replay_lsn": format_lsn(router.replicas.primary_lsn), "lag_bytes": 0,
               "lag_seconds": 0.0, "weight": "", "routed": router.primary_routed, "bans": 0, "last_error": ""}
    return _dict_rows([primary, *router.replicas.describe()], columns)


def _upstream_of(session: Any) -> str:
    """Where a session's statements go now: "primary", or the name of the replica lent to it."""
    replica = getattr(session, "on_replica", None)
    return replica.target.name if replica is not None else "primary"


def show_pools(app: App, _args: list[str]) -> bytes:
    if app.pools is not None:
        rows = app.pools.describe()
        for r in rows:
            key = (r["database"], r["user"])
            r["cl_active"] = sum(1 for s in app.sessions if s.pool_key == key and _upstream_of(s) == r["upstream"])
        return _dict_rows(rows, ["database", "user", "pool_mode", "cl_active", "cl_waiting", "sv_active",
                                 "sv_idle", "sv_opening", "acquired", "avg_wait_ms", "max_wait_ms", "resets",
                                 "closed_dirty", "upstream"])
    pools: dict[tuple[str, str], dict[str, Any]] = {}
    for s in app.sessions:
        if not s.ready:
            continue
        p = pools.setdefault((s.database, s.user), {"database": s.database, "user": s.user, "pool_mode": "session",
                                                     "cl_active": 0, "sv_active": 0, "sv_idle": 0})
        p["cl_active"] += 1
        p["sv_active" if s.busy else "sv_idle"] += 1
    return _dict_rows(list(pools.values()), ["database", "user", "pool_mode", "cl_active", "sv_active", "sv_idle"])


_SECRET_KEYS = {("tracing", "headers")}  # shown with their values masked (exporter tokens)


def show_config(app: App, _args: list[str]) -> bytes:
    rows = []
    for section, values in app.cfg.as_dict().items():
        for key, value in values.items():
            if (section, key) in _SECRET_KEYS and value:
                value = {k: "********" for k in value} if isinstance(value, dict) else "********"
            rows.append((section, key, value))
    return table(["section", "key", "value"], rows)


def show_rules(app: App, _args: list[str]) -> bytes:
    if app.rules is None:
        return _dict_rows([], ["name", "file", "mode", "actions", "hits", "observed_hits", "queued", "throttled"])
    rows = app.rules.describe()
    cols = ["name", "file", "mode", "match", "actions", "hits", "observed_hits", "queued", "throttled"]
    return _dict_rows(rows, [c for c in cols if not rows or c in rows[0]])


def show_cache(app: App, _args: list[str]) -> bytes:
    if app.cache is None:
        return table(["name", "value"], [("enabled", False)])
    return table(["name", "value"], sorted((k, v) for k, v in app.cache.counters().items()))


_MIRROR_COLUMNS = ["target", "fingerprint", "query", "compared", "mismatches", "errors", "primary_p50_ms",
                   "primary_p95_ms", "shadow_p50_ms", "shadow_p95_ms", "example", "last_error"]
_MIRRORS_COLUMNS = ["target", "url", "workers", "connected", "queued", "sent", "dropped", "compared", "mismatched",
                    "errors", "last_error"]


def show_mirror(app: App, _args: list[str]) -> bytes:
    from proxy.shadow.mirror import merged_for  # brings psycopg in: only when asked


    return _dict_rows(merged_for(app).rows(), _MIRROR_COLUMNS)


def show_mirrors(app: App, _args: list[str]) -> bytes:
    from proxy.shadow.mirror import merged_for


    return _dict_rows(merged_for(app).target_rows(), _MIRRORS_COLUMNS)


def show_help(_app: App, _args: list[str]) -> bytes:
    lines = [line.strip() for line in (__doc__ or "").splitlines() if line.strip().startswith(("SHOW", "RELOAD",
                                                                                               "RESET", "CACHE"))]
    return table(["command"], [[line] for line in lines])


def show_version(_app: App, _args: list[str]) -> bytes:
    from proxy import __version__
    from proxy.core import core

    return table(["version"], [[f"pgfront {__version__} ({core()} core)"]])


async def reload(app: App, _args: list[str]) -> bytes:
    ok, message = await app.reload()
    if app.cfg.server.workers > 1:
        os.kill(os.getppid(), signal.SIGHUP)  # the parent relays it to every worker
    if not ok:
        raise AdminError("F0000", f"reload failed, the running rules stay: {message}")
    return pq.notice_response(message) + pq.command_complete("RELOAD")


def reset_stats(app: App, _args: list[str]) -> bytes:
    app.merged_stats().reset()
    return pq.command_complete("RESET")


async def cache_purge(app: App, args: list[str]) -> bytes:
    if app.cache is None:
        raise AdminError("55000", "the cache is not enabled")
    what = args[0] if args else "all"
    if what == "all":
        await app.cache.purge_all()
    elif what == "table" and len(args) == 2:
        await app.cache.purge_table(args[1])
    elif what == "fingerprint" and len(args) == 2:
        await app.cache.purge_fingerprint(args[1])
    else:
        raise AdminError("42601", "usage: CACHE PURGE [ALL | TABLE name | FINGERPRINT fp]")
    return pq.notice_response(f"purged: {' '.join(args) or 'all'}") + pq.command_complete("PURGE")


_SHOW = {"queries": show_queries, "stats": show_stats, "clients": show_clients, "servers": show_servers,
         "replicas": show_replicas,
         "pools": show_pools, "config": show_config, "rules": show_rules, "cache": show_cache, "help": show_help,
         "version": show_version, "mirror": show_mirror, "mirrors": show_mirrors}


def execute(app: App, statement: str) -> bytes | Awaitable[bytes]:
    words = [w.lower() for w in re.split(r"\s+", statement.strip()) if w]
    if not words:
        return pq.EMPTY_QUERY
    head, args = words[0], words[1:]
    if head == "show" and args and args[0] in _SHOW:
        return _SHOW[args[0]](app, args[1:])
    if head == "reload" and not args:
        return reload(app, args)
    if head == "reset" and args == ["stats"]:
        return reset_stats(app, args)
    if head == "cache" and args[:1] == ["purge"]:
        return cache_purge(app, args[1:])
    raise AdminError("42601", f"unknown admin command {statement.strip()!r}: try SHOW HELP")


async def handle(app: App, sql: str) -> bytes:
    """Run every statement of one simple Query; the reply ends with ReadyForQuery."""
    out = []
    for statement in (s for s in sql.split(";")):
        if not statement.strip() and out:
            continue
        try:
            result = execute(app, statement)
            if not isinstance(result, bytes):
                result = await result
            out.append(result)
        except AdminError as e:
            out.append(pq.error_response(e.code, str(e)))
            break
    return b"".join(out) + pq.ready_for_query(pq.IDLE)


class ConsolePeer(Protocol):
    """The client connection an admin console answers: where its replies go."""

    def to_client(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def fatal(self, code: str, message: str) -> None: ...


_Q, _X, _S = b"QXS"
_EXTENDED = frozenset(b"PBDECH")


class AdminConsole:
    """One admin client's conversation: simple Query only, each answered in order (some commands await,
    e.g. RELOAD, so messages queue behind them)."""

    def __init__(self, app: App, peer: ConsolePeer) -> None:
        self.app = app
        self.peer = peer
        self.queue: deque[tuple[int, bytes]] = deque()
        self.running = False
        self.closed = False

    def feed(self, frames: list, data: bytes) -> None:
        for t, a, b in frames:
            self.queue.append((t, data[a:b]))
        if not self.running:
            self.running = True
            asyncio.ensure_future(self._run())

    def close(self) -> None:
        self.closed = True
        self.queue.clear()

    async def _run(self) -> None:
        try:
            while self.queue and not self.closed:
                t, raw = self.queue.popleft()
                if t == _Q:
                    reply = await handle(self.app, pq.parse_query(raw[5:]))
                elif t == _X:
                    self.peer.close()
                    return
                elif t == _S:
                    reply = pq.ready_for_query(pq.IDLE)
                elif t in _EXTENDED:
                    reply = pq.error_response("0A000", "the pgfront admin console supports the simple query "
                                                       "protocol only (psql, or prefer_simple_protocol)")
                else:
                    self.peer.fatal("08P01", f"invalid frontend message type {t}")
                    return
                if not self.closed:
                    self.peer.to_client(reply)
        finally:
            self.running = False
