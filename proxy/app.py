"""Per-worker application state shared by all sessions: config, upstream, analysis caches, and the
hooks into statistics, rules, cache and slow log."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from proxy.log import log
from proxy.shapes import ShapeCache
from proxy.upstream import Upstream

if TYPE_CHECKING:
    from proxy.admin import ConsolePeer
    from proxy.config import Config
    from proxy.registry import Console
    from proxy.registry import RegisteredClient as Session
    from proxy.relay.records import Pending
    from proxy.sql import StatementInfo


_BINARY_INTS = {21: 2, 23: 4, 20: 8}  # int2, int4, int8
_BINARY_TEXT = {25, 1043, 19, 1042}  # text, varchar, name, bpchar: binary form is the text itself


def param_text(value: bytes | None, fmt: int, oid: int) -> str | None:
    """A bound parameter as text for EXPLAIN; None when unknown (a generic plan is used then)."""
    if value is None:
        return None
    if fmt == 0 or oid in _BINARY_TEXT:
        return value.decode("utf-8", "replace")
    if oid in _BINARY_INTS and len(value) == _BINARY_INTS[oid]:
        return str(int.from_bytes(value, "big", signed=True))
    if oid == 16 and len(value) == 1:
        return "true" if value[0] else "false"
    if oid in (700, 701) and len(value) in (4, 8):
        import struct

        return repr(struct.unpack("!f" if len(value) == 4 else "!d", value)[0])
    return None


class App:
    def __init__(self, cfg: Config, upstream: Upstream, worker_id: int = 0) -> None:
        self.cfg = cfg
        self.upstream = upstream
        self.worker_id = worker_id
        self.started_at = time.time()
        self.shapes = ShapeCache()
        self.sessions: set[Session] = set()
        self.stats: Any = None  # proxy.stats.Stats when loaded
        self.rules: Any = None  # RulesAdapter when rule files are loaded
        self.cache: Any = None
        self.throttler: Any = None  # throttle.Throttler when rule files are loaded
        self.tracing: Any = None  # tracing.Tracing when [tracing] endpoint is set
        self.router: Any = None  # replicas.routing.Router with [[replica]] entries
        self.observers: Any = None  # shadow.observe.ObservedSinks with [mirror.NAME] targets or [capture] on
        self.slowlog: Any = None
        self.slow_threshold = cfg.slowlog.threshold_ms / 1000.0 if cfg.slowlog.threshold_ms > 0 else None
        self.accepting = True
        from proxy.upstream import client_ssl_context, server_ssl_context

        self.tls_server = server_ssl_context(cfg.tls.cert_file, cfg.tls.key_file)
        self.credentials: Any = None
        if cfg.auth.mode != "passthrough":
            from proxy.auth import Credentials

            self.credentials = Credentials(cfg.auth.mode, cfg.auth.file, cfg.auth.query,
                                           cfg.auth.query_dsn or upstream.dsn(user="postgres", database="postgres"))
        # [tls] upstream_sslmode, or else the upstream URL's own ?sslmode=
        mode = cfg.tls.upstream_sslmode if cfg.tls.upstream_sslmode != "disable" else upstream.sslmode
        self.upstream_sslmode = mode
        self.tls_upstream = client_ssl_context(mode, cfg.tls.upstream_ca_file)
        self.run_dir = ""
        self.publisher: Any = None
        self.metrics_server: Any = None
        self.closed_bytes = [0, 0]  # bytes in/out of sessions that have ended
        self.pools: Any = None  # pool.PoolManager when pgfront logs in to servers itself
        self.cancel_keys: dict[tuple[int, bytes], Session] = {}

    def merged_stats(self) -> Any:
        """Statistics of every worker of this instance (replaced by components.attach)."""
        raise RuntimeError("statistics are not attached")

    async def reload(self) -> tuple[bool, str]:
        """Re-read the rule files (and reloadable settings): (ok, message). Replaced by components.attach."""
        raise RuntimeError("components are not attached")

    # -- sessions --------------------------------------------------------------------------
    def admit(self, session: Session) -> bool:
        if not self.accepting:
            session.fatal("57P03", "pgfront is shutting down")
            return False
        self.sessions.add(session)
        self.stats_inc("client_connections_opened")
        return True

    # -- cancel keys of pooled sessions ------------------------------------------------------------
    # The key a pooled client holds is pgfront's own: the worker number sits in the top bits of the
    # pid, so whichever worker receives a CancelRequest can pass it to the worker holding the client.
    def new_cancel_key(self, session: Session) -> tuple[int, bytes]:
        import os

        self._key_counter = (getattr(self, "_key_counter", 0) + 1) & 0x3FFFFF
        pid = ((self.worker_id + 1) << 22) | self._key_counter
        secret = os.urandom(4)
        self.cancel_keys[(pid, secret)] = session
        return pid, secret

    def drop_cancel_key(self, session: Session) -> None:
        self.cancel_keys.pop((session.backend_pid, session.backend_secret), None)

    def route_cancel(self, pid: int, secret: bytes) -> None:
        import asyncio

        worker = (pid >> 22) - 1
        if worker == self.worker_id:
            self.cancel_local(pid, secret)
        elif 0 <= worker < self.cfg.server.workers:
            asyncio.ensure_future(self._forward_cancel(worker, pid, secret))

    async def _forward_cancel(self, worker: int, pid: int, secret: bytes) -> None:
        import asyncio
        import os
        import struct

        path = os.path.join(self.run_dir, f"cancel-{worker}.sock")
        try:
            _, writer = await asyncio.open_unix_connection(path)
            writer.write(struct.pack("!i", pid) + secret)
            await writer.drain()
            writer.close()
        except OSError as e:
            log.info("cancel forwarding failed", extra={"worker": worker, "reason": str(e)})

    def cancel_local(self, pid: int, secret: bytes) -> None:
        """Cancel what this client is running now, on the server it holds; never anyone else's query."""
        import asyncio

        from proxy.upstream import send_cancel

        session = self.cancel_keys.get((pid, secret))
        link = session.cancel_target() if session is not None else None
        if link is None:
            return  # nothing running: a late cancel must not land on the next query
        link.cancels += 1

        async def deliver() -> None:
            try:
                await send_cancel(self.upstream, link.pid, link.secret)
            finally:
                link.cancels -= 1

        asyncio.ensure_future(deliver())

    def over_limit(self, session: Session) -> str | None:
        """Why this client (user and database now known) may not connect, or None."""
        srv = self.cfg.server
        # checked once the startup packet is in (as Postgres does), so that the client reads the error
        # in plain text rather than in the middle of its SSL negotiation
        if len(self.sessions) > srv.max_client_conn:
            self.stats_inc("clients_refused")
            return "sorry, too many clients already (pgfront max_client_conn)"
        if srv.max_user_client_conn:
            n = sum(1 for s in self.sessions if s.user == session.user and s is not session)
            if n >= srv.max_user_client_conn:
                return f'too many connections for role "{session.user}" (pgfront max_user_client_conn)'
        if srv.max_db_client_conn:
            n = sum(1 for s in self.sessions if s.database == session.database and s is not session)
            if n >= srv.max_db_client_conn:
                return f'too many connections for database "{session.database}" (pgfront max_db_client_conn)'
        return None

    def forget(self, session: Session) -> None:
        if session in self.sessions:
            self.sessions.discard(session)
            self.closed_bytes[0] += session.bytes_in
            self.closed_bytes[1] += session.bytes_out

    def open_console(self, peer: ConsolePeer) -> Console:
        from proxy.admin import AdminConsole

        self.stats_inc("admin_sessions")
        return AdminConsole(self, peer)

    def session_ready(self, session: Session) -> None:
        log.debug("client ready", extra={"client": session.id, "user": session.user, "database": session.database})

    # -- counters and per-statement hooks ------------------------------------------------------
    def stats_inc(self, name: str, n: int = 1) -> None:
        if self.stats is not None:
            self.stats.inc(name, n)

    def slowlog_capture(self, session: Session, p: Pending, info: StatementInfo, seconds: float) -> None:
        params = None
        if p.stmt is not None and p.bind is not None:
            from proxy.wire.protocol import parse_bind

            _stmt, a, b, data = p.bind
            try:
                _, _, formats, values, _ = parse_bind(data[a + 5:b])
                params = [param_text(v, formats[min(i, len(formats) - 1)] if formats else 0,
                                     p.stmt.oids[i] if i < len(p.stmt.oids) else 0) for i, v in enumerate(values)]
            except Exception:  # noqa: BLE001 - slow log is best effort, never break the relay
                params = None
        sql = p.stmt.sent_sql if p.stmt is not None else info.text
        self.stats_inc("slow_queries")
        self.slowlog.maybe_capture(
            fingerprint=info.fingerprint, normalized=info.normalized, sql=sql, params=params, seconds=seconds,
            database=session.database, user=session.user, kind=info.kind,
            writes=bool(info.tables_written) or info.kind not in ("select", "utility"),
        )
