"""One client's conversation: startup, pass-through authentication, and the relay with tracking.

The relay forwards bytes as they come, but walks every message boundary in both directions, so the
session always knows the transaction status, the prepared statements and portals, and which reply
belongs to which request. That last part is an ordered queue of `Pending` entries, one per client
message that the server answers (Query, Parse, Bind, Describe, Execute, Close, Sync, FunctionCall).
Replies the proxy produces itself (blocked statements, cache hits, the admin console) take their
place in the same queue, so they reach the client in exactly the order Postgres would have used.

Flow control: each side's transport pauses reading from the other when its write buffer is full,
so a client that stops reading a huge result back-pressures the server instead of growing memory.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import ssl
import struct
import time
from collections import deque
from itertools import islice
from typing import TYPE_CHECKING

from proxy.log import log
from proxy.net.serverlink import ServerLink, UpstreamRefused
from proxy.sql import analyze
from proxy.upstream import open_connection, send_cancel
from proxy.wire import protocol as pq
from proxy.wire.framer import FrameError, Framer, read_startup

if TYPE_CHECKING:
    from proxy.app import App
    from proxy.rules import Decision
    from proxy.sql import StatementInfo
    from proxy.stats import QueryStats

# message type bytes as ints (frames carry ints)
_Q, _P, _B, _D, _E, _C, _S, _H, _F, _X = b"QPBDECSHFX"
_d, _c, _f = b"dcf"
_Z, _T, _n, _t, _I, _s, _G, _W, _N, _A, _K, _R, _V = b"ZTntIsGWNAKRV"
_CMD_C = b"C"[0]
_ERR = b"E"[0]
_FATAL = ("FATAL", "PANIC")  # severities after which the server closes the connection
_PARSE_OK, _BIND_OK, _CLOSE_OK = b"123"
_LOCAL = 0  # Pending kind for replies pgfront produces itself

_HIGH_WATER = 512 * 1024
_ids = itertools.count(1)

# A statement the server must reject at Parse time: used to make a blocked statement fail *on the
# server*, so that transaction and pipeline state (failed block, skip-to-Sync, implicit rollback)
# are exactly Postgres's own; the server's syntax error is then replaced by the rule's error.
_BLOCKED_SQL = "pgfront blocked statement"
_SUSPEND = b"suspend for a cache look-up"  # compared by identity

# A rule's timeout runs the statement under that statement_timeout, then puts the client's own back.
# Both are swallowed Query messages placed at a Sync boundary, so they never split an implicit
# transaction; set_config() calls made inside a transaction that fails are undone by its rollback.
_SAVE_AND_SET_TIMEOUT = ("SELECT set_config('pgfront.saved_statement_timeout', current_setting('statement_timeout'), "
                         "false), set_config('statement_timeout', '{ms}', false)")
_RESTORE_TIMEOUT = pq.query("SELECT set_config('statement_timeout', "
                            "current_setting('pgfront.saved_statement_timeout'), false)")


class Stmt:
    """A prepared statement (named or unnamed) as the client knows it."""

    __slots__ = ("name", "sql", "info", "notices", "sent_sql", "decision", "oids", "server_name")

    def __init__(self, name: str, sql: str, info: StatementInfo | None, sent_sql: str,
                 notices: tuple[bytes, ...] = ()) -> None:
        self.name = name
        self.sql = sql
        self.info = info
        self.sent_sql = sent_sql
        self.notices = notices
        self.decision: Decision | None = None
        self.oids: list[int] = []
        self.server_name = name


class Pending:
    """One expected reply (or a reply of our own, kind _LOCAL) in client order."""

    __slots__ = ("kind", "forward", "info", "t0", "rows", "sqlstate", "error", "local", "notices",
                 "copy_ends", "stmt", "bind", "prep", "show_errors", "fill", "ttl", "part", "whole", "text")

    def __init__(self, kind: int, info: StatementInfo | None = None, t0: float = 0.0) -> None:
        self.kind = kind
        self.forward = True
        self.info = info
        self.t0 = t0
        self.rows = 0
        self.sqlstate: str | None = None
        self.error: bytes | None = None  # our ErrorResponse replacing the server's
        self.local: bytes | None = None
        self.notices: tuple[bytes, ...] = ()
        self.copy_ends = 0
        self.stmt: Stmt | None = None
        self.bind: tuple | None = None  # (stmt, start, end, data) of the Bind that made the portal
        self.prep: str | None = None  # server-side statement name this Parse creates (transaction pooling)
        self.show_errors = False  # a swallowed entry whose errors the client must still see
        self.fill = None  # cache.Fill: this reply is being captured for the cache
        self.ttl: float | None = None
        self.part = 0  # statements of a multi-statement Query completed so far
        self.whole = False  # a local reply to a simple Query: ReadyForQuery follows it
        self.text: str | None = None  # a Query whose shape is looked up only for its statistics


def _special(p: Pending) -> bool:
    """Replies that are not relayed verbatim: they keep the relay in its per-message mode."""
    return p.kind == _LOCAL or p.error is not None or bool(p.notices) or not p.forward or p.ttl is not None


# replies that need no per-message state share one entry each (saves an allocation per message)
_PLAIN_P = Pending(_P)
_PLAIN_B = Pending(_B)
_PLAIN_D = Pending(_D)
_PLAIN_C = Pending(_C)
_PLAIN_S = Pending(_S)
_Z_KINDS = (_S, _Q, _F)
_STATEMENT_KINDS = (_Q, _E, _F)  # entries whose statement may write
_SKIP_KINDS = (_P, _B, _D, _E, _C)


_HOT_QUERIES = 64  # per session: Query messages remembered for _hot_hit

# settings a client may give at startup that a pooled server connection must be given for it
_POOLED_SETTINGS = ("application_name", "client_encoding", "datestyle", "timezone", "intervalstyle",
                    "extra_float_digits", "search_path", "standard_conforming_strings", "bytea_output")
_REPORTED = {"application_name", "client_encoding", "datestyle", "timezone", "intervalstyle",
             "standard_conforming_strings"}
_CANONICAL = {"datestyle": "DateStyle", "timezone": "TimeZone", "intervalstyle": "IntervalStyle"}


def wanted_settings(params: dict[str, str]) -> dict[str, str]:
    """Startup parameters and `options=-c k=v` that a pooled server connection must carry."""
    out: dict[str, str] = {}
    for k, v in params.items():
        if k.lower() in _POOLED_SETTINGS:
            out[_CANONICAL.get(k.lower(), k.lower())] = v
    opts = params.get("options", "").replace("--", "-c ").split()
    for i, word in enumerate(opts):
        if word == "-c" and i + 1 < len(opts) and "=" in opts[i + 1]:
            k, _, v = opts[i + 1].partition("=")
            k = k.replace("-", "_").lower()
            if k in _POOLED_SETTINGS:
                out[_CANONICAL.get(k, k)] = v
    return out


_SESSION_LOCKS = frozenset({"pg_advisory_lock", "pg_advisory_lock_shared", "pg_try_advisory_lock",
                            "pg_try_advisory_lock_shared"})
_SESSION_UTILITY = re.compile(r"\s*(?:(LISTEN)\b|(PREPARE)\b|DECLARE\b.*\b(WITH\s+HOLD)\b)", re.I | re.S)
_features: dict[str, str] = {}


def session_feature(info: StatementInfo) -> str:
    """The session state a statement creates ("" for none): what transaction pooling cannot lend."""
    text = info.text
    found = _features.get(text)
    if found is not None:
        return found
    found = ""
    if info.kind == "set" and not info.set_local and info.set_name != "transaction":
        found = "SET" if info.set_name != "all" else "RESET ALL"
    elif info.functions & _SESSION_LOCKS:
        found = "a session advisory lock"
    elif info.temp_objects and info.kind == "ddl":
        found = "a temporary table"
    elif info.kind == "utility":
        m = _SESSION_UTILITY.match(text)
        if m:
            found = (m.group(1) or m.group(2) or "DECLARE ... " + m.group(3)).upper()
    if len(_features) > 10_000:
        _features.clear()
    _features[text] = found
    return found


def _rename_bind(body: bytes, portal: str, statement: str) -> bytes:
    """The client's Bind with its statement name replaced."""
    pos = body.index(0) + 1
    pos = body.index(0, pos) + 1
    return pq.msg(b"B", pq.cstr(portal) + pq.cstr(statement) + body[pos:])


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Session(asyncio.Protocol):
    """The client side; owns the conversation."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.id = next(_ids)
        self.transport: asyncio.Transport | None = None
        self.server: ServerLink | None = None
        self.phase = "startup"  # startup, connecting, auth, ready, admin, closed
        self.startup_buf = b""
        self.params: dict[str, str] = {}
        self.user = ""
        self.database = ""
        self.application_name = ""
        self.peer = ""
        self.connected_at = time.time()
        cfg = app.cfg
        self.cframer = Framer(cfg.server.max_message_size, stream_types=b"d")
        self.expect: deque[Pending] = deque()
        self.tx_status = pq.IDLE
        self.statements: dict[str, Stmt] = {}
        self.portals: dict[str, Stmt] = {}
        self.server_params: dict[str, str] = {}
        self.backend_pid = 0
        self.backend_secret = b""
        self.pending_to_server: list[bytes] = []
        self.skip_until_sync = False
        self.special = 0  # queued entries whose replies are not relayed verbatim
        self.last_bind: tuple | None = None
        self.admin = False
        self.tls = False
        self.cstate = None  # cache.SessionCacheState when the read cache is on
        self.server_suspend: tuple | None = None
        self.server_paused = False
        self.server_backlog = b""
        self.client_suspended = False
        self.client_backlog = b""
        self.lookup_job: tuple | None = None
        self.pool = None  # pool.Pool when server connections are pooled
        self.pooled_tx = False  # transaction pooling: the server is lent per transaction
        self.pinned = False  # session state seen in transaction mode: keep the server
        self.held = b""  # client bytes waiting for a server connection (transaction mode)
        self.acquiring = False
        self.wanted: dict[str, str] = {}  # settings a pooled server connection must have for this client
        self.upstream_params: dict[str, str] = {}
        self.upstream_login = None  # an auth.UpstreamLogin when pgfront logs in for the client
        self.scram = None
        self.scram_client = None
        self.secret = None
        self.secret_known = False
        self.md5_salt = b""
        self.in_batch = False  # extended-protocol messages sent since the last Sync
        self.last_parse: tuple | None = None  # (body, stmt) of the last Parse forwarded unchanged
        self.hot_queries: dict[bytes, tuple] = {}  # Query message -> what _hot_hit needs to answer it again
        self.finished: list[Pending] = []  # statements whose reply is being relayed: accounted after it
        self.restore_at_sync = False
        self.admin_queue: deque = deque()
        self.admin_busy = False
        self.copies_started = 0
        self.copy_ends_sent = 0
        self.copy_failed = False
        self.server_in_copy = False
        self.server_fatal = False  # the server sent a FATAL: it is closing the connection
        self.paused: set[str] = set()
        self.client_slow = False  # the client's socket is over its high-water mark
        self.tasks: set[asyncio.Task] = set()  # work for this client only: cancelled when it goes
        self.bytes_in = 0
        self.bytes_out = 0
        self.queries = 0
        self.startup_timer: asyncio.TimerHandle | None = None
        self.last_active = time.perf_counter()

    # -- connection lifecycle -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=_HIGH_WATER)  # type: ignore[attr-defined]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "unix")
        if not self.app.admit(self):
            return
        timeout = self.app.cfg.server.startup_timeout
        if timeout > 0:
            self.startup_timer = asyncio.get_running_loop().call_later(timeout, self._startup_timeout)

    def _startup_timeout(self) -> None:
        if self.phase in ("startup", "tls", "local_auth", "connecting", "auth"):
            log.info("startup timeout", extra={"client": self.id, "peer": self.peer})
            self.fatal("08006", "startup timeout: the client did not complete the startup in time")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase == "closed":
            return
        busy = bool(self.expect) or self.tx_status != pq.IDLE
        self.phase = "closed"
        for task in list(self.tasks):
            task.cancel()
        self.app.forget(self)
        if self.startup_timer:
            self.startup_timer.cancel()
        self.app.drop_cancel_key(self)
        for p in self.expect:
            if p.fill is not None:
                self.app.cache.abandon(p.fill)
                p.fill = None
        if self.pool is not None:
            if self.server is not None:
                self._leave_pool()
            return
        if self.server and self.server.transport:
            st = self.server.transport
            if busy and self.backend_pid:
                # the backend may be running a long query: cancel it rather than leave it running
                asyncio.ensure_future(send_cancel(self.app.upstream, self.backend_pid, self.backend_secret))
            if not st.is_closing():
                st.write(pq.TERMINATE)
                st.close()

    def _task(self, coro) -> None:
        """Work for this client only (connecting, authenticating, waiting, looking up): cancelled when
        the client goes, so none of it runs on for a client that is no longer there."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def close(self) -> None:
        if self.transport and not self.transport.is_closing():
            self.transport.close()
        self.connection_lost(None)

    def fatal(self, code: str, message: str) -> None:
        """Send a FATAL error and close the client (and its server connection)."""
        if self.transport and not self.transport.is_closing():
            self.transport.write(pq.error_response(code, message, severity="FATAL"))
        self.close()

    # -- flow control ---------------------------------------------------------------------------
    def pause_writing(self) -> None:  # the client is slow to read: stop reading from the server
        if self.server is not None:
            self.server.pause("client-read")
        self.client_slow = True

    def resume_writing(self) -> None:
        self.client_slow = False
        if self.server is not None:
            self.server.resume("client-read")

    def pause_client_reading(self, why: str) -> None:
        if not self.paused and self.transport:
            self.transport.pause_reading()
        self.paused.add(why)

    def resume_client_reading(self, why: str) -> None:
        self.paused.discard(why)
        if not self.paused and self.transport and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- client bytes ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self._client_bytes(data)

    def _client_bytes(self, data: bytes) -> None:
        """Bytes from the client, arriving now or replayed after a wait (counted once, on arrival)."""
        phase = self.phase
        if self.client_suspended:
            self.client_backlog += data  # a cache look-up is under way: keep the order
            if len(self.client_backlog) > _HIGH_WATER:
                self.pause_client_reading("cache")  # a pipelining client: stop reading meanwhile
            return
        if self.hot_queries:
            memo = self.hot_queries.get(data)
            if memo is not None and self._hot_hit(memo):
                return
        if phase == "ready" and self.server is None and self.pool is not None:
            self._without_server(data)  # transaction pooling, nothing lent right now
            return
        if phase == "ready" or phase == "admin" or phase == "auth" or phase == "local_auth":
            framer = self.cframer
            frames = framer.single(data) if data[:1] == b"Q" else None  # one whole Query: the most common read
            if frames is None:
                try:
                    frames = framer.feed(data)
                except FrameError as e:
                    self.fatal(e.code, str(e))
                    return
            if phase == "ready":
                self._relay_client(frames, framer.data)
            elif phase == "admin":
                self.admin_frames(frames, framer.data)
            elif phase == "local_auth":
                self.local_auth_frames(frames, framer.data)
            else:
                self.auth_client_frames(frames, framer.data)
        elif phase == "startup":
            self.startup_buf += data
            self._startup()
        elif phase == "connecting" or phase == "tls":
            self.startup_buf += data  # keep it in order until the connection is ready for it
            if len(self.startup_buf) > _HIGH_WATER:
                self.pause_client_reading("startup")  # a client pipelining ahead of its login: wait

    def _relay_client(self, frames: list, data: bytes, start: int = 0) -> None:
        try:
            self.client_frames(frames, data, start)
        except pq.MALFORMED as e:
            # a message of valid length whose body does not parse (a Parse without its terminators, an
            # empty Execute...): a relay cannot follow what it cannot read
            log.info("malformed client message", extra={"client": self.id, "reason": repr(e)})
            self.fatal("08P01", "invalid message format")

    def auth_client_frames(self, frames: list, data: bytes) -> None:
        out = []
        for t, a, b in frames:
            if t == _X:
                self.close()
                return
            out.append(data[a:b])
        self.to_server(b"".join(out))

    def _startup(self) -> None:
        while self.phase == "startup":
            try:
                body, rest = read_startup(self.startup_buf)
            except FrameError as e:
                self.fatal(e.code, str(e))
                return
            if body is None:
                if self.startup_buf[:1] == b"\x16":
                    # a TLS ClientHello straight away (sslnegotiation=direct): no TLS configured
                    self.close()
                return
            self.startup_buf = rest
            try:
                code, params = pq.parse_startup(body)
            except pq.MALFORMED:
                self.fatal("08P01", "invalid startup packet layout")
                return
            if code in (pq.SSL_REQUEST, pq.GSSENC_REQUEST):
                if rest:
                    # bytes pipelined behind the request could be injected before encryption
                    # (CVE-2021-23214): refuse
                    self.fatal("08P01", "received unencrypted data after SSL request")
                    return
                if code == pq.SSL_REQUEST and self.app.tls_server is not None and not self.tls:
                    self.transport.write(b"S")
                    self.phase = "tls"
                    self._task(self._start_tls())
                    return
                self.transport.write(b"N")
                continue
            if code == pq.CANCEL_REQUEST:
                self._cancel_request(body)
                return
            if code >> 16 != 3:
                self.fatal("0A000", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                                    "server supports 3.0 to 3.0")
                return
            self._begin(code, params)
            return

    async def _start_tls(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport = await loop.start_tls(self.transport, self, self.app.tls_server, server_side=True,
                                             ssl_handshake_timeout=self.app.cfg.server.startup_timeout or None)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as e:
            log.info("client TLS handshake failed", extra={"client": self.id, "peer": self.peer, "reason": str(e)})
            self.close()
            return
        if transport is None or self.phase == "closed":
            return
        self.transport = transport
        self.tls = True
        self.phase = "startup"
        if self.startup_buf:
            self._startup()

    def _cancel_request(self, body: bytes) -> None:
        if len(body) < 12:
            self.close()
            return
        (pid,) = struct.unpack_from("!i", body, 4)
        secret = bytes(body[8:])
        self.app.stats_inc("cancel_requests")
        if self.app.pools is not None:
            self.app.route_cancel(pid, secret)  # our own key: find the client, then its server
        else:
            # pass-through: the client holds the upstream backend's own key; any worker can deliver it
            asyncio.ensure_future(send_cancel(self.app.upstream, pid, secret))
        self.close()

    def _begin(self, code: int, params: dict[str, str]) -> None:
        minor = code & 0xFFFF
        unsupported = [k for k in params if k.startswith("_pq_.")]
        if minor > 0 or unsupported:
            self.transport.write(pq.negotiate_protocol_version(0, unsupported))
        params = {k: v for k, v in params.items() if not k.startswith("_pq_.")}
        if "user" not in params:
            self.fatal("28000", "no PostgreSQL user name specified in startup packet")
            return
        if self.app.cfg.tls.require_client_tls and not self.tls:
            self.fatal("28000", "pgfront requires TLS: connect with sslmode=require or stronger")
            return
        self.params = params
        self.user = params["user"]
        self.database = params.get("database") or self.user
        self.application_name = params.get("application_name", "")
        refusal = self.app.over_limit(self)
        if refusal:
            self.fatal("53300", refusal)
            return
        admin = self.database == "pgfront"
        if admin and self.user not in self.app.cfg.admin.users:
            self.fatal("42501", f'role "{self.user}" may not use the pgfront admin console '
                                "(not listed in [admin] users)")
            return
        upstream_params = dict(params)
        if admin:
            # authenticate admin users against the upstream itself: pgfront keeps no passwords
            upstream_params["database"] = "postgres"
        self.admin = admin
        self.upstream_params = upstream_params
        if self.app.credentials is not None:
            self.phase = "local_auth"
            self._task(self._local_auth_start())
            return
        self.phase = "connecting"
        self._task(self._connect(upstream_params))

    # -- authentication by pgfront itself ([auth] mode = userlist | query) ---------------------------
    async def _local_auth_start(self) -> None:
        from proxy.auth import ScramServer, Secret

        try:
            secret = await self.app.credentials.lookup(self.user)
        except Exception as e:  # noqa: BLE001 - any failure of the credential source refuses the login
            log.warning("auth lookup failed", extra={"client": self.id, "user": self.user, "reason": str(e)})
            self.fatal("08006", "pgfront could not look up the credentials for this role")
            return
        if self.phase != "local_auth":
            return
        self.secret_known = secret is not None
        if self.app.cfg.auth.method == "trust":
            if secret is None:
                self.fatal("28000", f'role "{self.user}" is not in the pgfront userlist')
                return
            self.secret = secret
            self._local_auth_ok(None)
            return
        if secret is None:  # go through the motions anyway, so user names cannot be probed
            secret = Secret("plain", os.urandom(16).hex())
        self.secret = secret
        if secret.kind == "md5":
            self.md5_salt = os.urandom(4)
            self.transport.write(pq.msg(b"R", struct.pack("!i", 5) + self.md5_salt))
        else:
            self.scram = ScramServer(secret)
            self.transport.write(pq.msg(b"R", struct.pack("!i", 10) + b"SCRAM-SHA-256\0\0"))

    def local_auth_frames(self, frames: list, data: bytes) -> None:
        from proxy.auth import AuthFailed, md5_response

        for t, a, b in frames:
            body = data[a + 5:b]
            if t != b"p"[0]:
                self.fatal("08P01", f"expected a password message, got message type {t}")
                return
            try:
                if self.scram is None:
                    answer = body.rstrip(b"\0").decode()
                    if answer != md5_response(self.secret, self.user, self.md5_salt) or not self.secret_known:
                        raise AuthFailed("password authentication failed")
                    self._local_auth_ok(None)
                elif not self.scram.server_first:
                    self.transport.write(pq.msg(b"R", struct.pack("!i", 11) + self.scram.first(body)))
                else:
                    final = self.scram.final(body)
                    if not self.secret_known:
                        raise AuthFailed("password authentication failed")
                    self.transport.write(pq.msg(b"R", struct.pack("!i", 12) + final))
                    self._local_auth_ok(self.scram.client_key)
            except (AuthFailed, ValueError) as e:
                log.info("client authentication failed", extra={"client": self.id, "user": self.user,
                                                                "reason": str(e)})
                self.fatal("28P01", f'password authentication failed for user "{self.user}"')
                return

    def _local_auth_ok(self, client_key: bytes | None) -> None:
        from proxy.auth import UpstreamLogin

        self.transport.write(pq.AUTH_OK)
        self.phase = "connecting"
        if self.app.pools is not None and not self.admin:
            if client_key is not None:
                self.app.pools.client_keys[self.user] = client_key
            self._task(self._pooled_start())
            return
        self.upstream_login = UpstreamLogin(self.user, self.secret, client_key)
        self._task(self._connect(self.upstream_params))

    # -- pooled server connections -------------------------------------------------------------------
    async def _pooled_start(self) -> None:
        """Finish the client's startup with a pooled server connection's parameters and our own key."""
        from proxy.pool import PoolTimeout

        pools = self.app.pools
        self.pool = pools.pool(self.database, self.user)
        self.pooled_tx = self.pool.mode == "transaction"
        self.wanted = wanted_settings(self.params)
        if not self.pool.params or not self.pooled_tx:
            # the first client of a pool (or any, in session mode) waits for a server connection;
            # later clients in transaction mode start with the parameters the pool already knows
            try:
                link = await self.pool.acquire()
            except (PoolTimeout, ConnectionError, OSError, TimeoutError) as e:
                self._pool_failed(e)
                return
            if self.phase == "closed":
                self.pool.give_back(link)
                return
            self._attach(link)
        out = [pq.parameter_status(k, v) for k, v in {**self.pool.params, **self._reported()}.items()]
        self.backend_pid, self.backend_secret = self.app.new_cancel_key(self)
        out.append(pq.backend_key_data(self.backend_pid, struct.unpack("!i", self.backend_secret)[0]))
        out.append(pq.ready_for_query(pq.IDLE))
        self.transport.write(b"".join(out))
        if self.startup_timer:
            self.startup_timer.cancel()
            self.startup_timer = None
        self.phase = "ready"
        self.app.session_ready(self)
        if self.server is not None:
            self._maybe_release()
        if self.startup_buf:
            data, self.startup_buf = self.startup_buf, b""
            self.resume_client_reading("startup")
            self._client_bytes(data)

    def _reported(self) -> dict[str, str]:
        """ParameterStatus values this client should see for the settings it asked for at startup."""
        return {k: v for k, v in self.wanted.items() if k.lower() in _REPORTED}

    def _attach(self, link: ServerLink) -> None:
        link.holder = self
        self.server = link
        state = link.state
        self.tx_status = state.tx
        if self.client_slow:
            link.pause("client-read")
        # the connection carries the settings pgfront applied for its previous client: give it this
        # client's, and put back the defaults of those this client did not ask for
        applied = state.applied
        changes = {k: v for k, v in self.wanted.items() if applied.get(k, link.params.get(k)) != v}
        stale = [k for k in applied if k not in self.wanted]
        if changes or stale:
            parts = [f"RESET {_ident(k)}" for k in stale]
            if changes:
                parts.append("SELECT " + ", ".join(f"set_config({_literal(k)}, {_literal(v)}, false)"
                                                   for k, v in changes.items()))
            sql = "; ".join(parts)
            link.write(self._swallowed_query(sql))
            for k in stale:
                del applied[k]
            applied.update(changes)

    def _maybe_release(self) -> None:
        """Transaction mode: hand the server back once nothing is open on it."""
        if (self.pooled_tx and not self.pinned and not self.expect and self.tx_status == pq.IDLE
                and not self.in_batch and not self.skip_until_sync and not self.server_in_copy and not self.held):
            link, self.server = self.server, None
            self.pool.give_back(link)

    def _without_server(self, data: bytes) -> None:
        """Transaction pooling with no server lent: answer what needs none, hold the rest for a server.

        Preparing a statement this pool has prepared before needs no server: the client gets its
        ParseComplete (and ReadyForQuery at Sync) at once, and the statement is prepared on whichever
        server runs it. This matters: libpq's PQprepare blocks, so a client that prepares while every
        server is lent to its own thread's open transactions would otherwise never get one.
        """
        if self.held or self.acquiring:
            self._wait_for_server(data)
            return
        try:
            frames = self.cframer.feed(data)
        except FrameError as e:
            self.fatal(e.code, str(e))
            return
        buf = self.cframer.data
        replies = []
        answered = 0
        for t, a, b in frames:
            if t == _P:
                name, sql, oids = pq.parse_parse(buf[a + 5:b])
                if not name or self.pool.server_name(sql, oids) not in self.pool.known:
                    break
                info = self.app.shapes.get(sql)
                if self.app.rules is not None and self.app.rules.decide_for(self, sql, info) is not None:
                    break  # rules may rewrite or block it: take the normal path
                stmt = Stmt(name, sql, info, sql)
                stmt.oids = oids
                stmt.server_name = self.pool.server_name(sql, oids)
                self.statements[name] = stmt
                replies.append(pq.PARSE_COMPLETE)
            elif t == _S:
                replies.append(pq.ready_for_query(pq.IDLE))
            elif t == _H:
                pass
            else:
                break
            answered += 1
        if replies:
            self.transport.write(b"".join(replies))
        if answered < len(frames):
            # hold the rest, from the first message that needs a server, with any partial message
            rest = buf[frames[answered][1]:] if isinstance(buf, bytes) else bytes(buf[frames[answered][1]:])
            self._wait_for_server(rest + self.cframer.take_partial())

    def _wait_for_server(self, data: bytes) -> None:
        """Transaction mode, no server lent: hold the client's bytes until one is."""
        if not self.held and data[:1] == b"X":
            self.close()  # a Terminate needs no server
            return
        if not self.held and not self.acquiring:
            link = self.pool.lend_idle()
            if link is not None:  # no wait: carry straight on with this chunk
                self._attach(link)
                self._client_bytes(data)
                return
        self.held += data
        if not self.acquiring:
            self.acquiring = True
            self.pause_client_reading("pool-wait")
            self._task(self._acquire_for_held())

    async def _acquire_for_held(self) -> None:
        from proxy.pool import PoolTimeout

        try:
            link = await self.pool.acquire()
        except (PoolTimeout, ConnectionError, OSError, TimeoutError) as e:
            self.acquiring = False
            self._pool_failed(e)
            return
        self.acquiring = False
        if self.phase == "closed":
            self.pool.give_back(link)
            return
        self._attach(link)
        data, self.held = self.held, b""
        self.resume_client_reading("pool-wait")
        self._client_bytes(data)

    def _pool_failed(self, e: Exception) -> None:
        """No server connection for this client: say why, with the upstream's own SQLSTATE if it refused."""
        from proxy.pool import PoolTimeout

        if isinstance(e, UpstreamRefused):
            self.fatal(e.code, str(e))
        else:
            self.fatal("53300" if isinstance(e, PoolTimeout) else "08006", f"pgfront: {e}")

    def _leave_pool(self) -> None:
        """The client is gone: the pool takes its server connection back (and resets or closes it)."""
        link, self.server = self.server, None
        pending = bool(self.expect) or self.server_in_copy or self.in_batch or self.server_paused
        if self.pinned:
            link.state.dirty.add("pinned")
        self.pool.give_back(link, pending=pending)

    def _upstream_login(self, raw: bytes) -> bytes | None:
        """Answer the upstream's authentication request for our client; None once it says OK."""
        from proxy.auth import AuthFailed

        try:
            return self.upstream_login.answer(raw[5:])
        except (AuthFailed, ValueError, KeyError) as e:
            log.warning("upstream login failed", extra={"client": self.id, "user": self.user, "reason": str(e)})
            self.fatal("08006", f"pgfront could not log in to the upstream as {self.user}: {e}")
            return b""

    async def _connect(self, params: dict[str, str]) -> None:
        app = self.app
        try:
            _, link = await open_connection(app.upstream, lambda: ServerLink(self), app.cfg.server.connect_timeout,
                                            app.upstream_sslmode, app.tls_upstream)
        except (TimeoutError, OSError, ssl.SSLError) as e:
            reason = "timeout" if isinstance(e, asyncio.TimeoutError) else str(e)
            log.warning("upstream connect failed", extra={"client": self.id, "reason": reason})
            self.fatal("08006", f"pgfront could not connect to the upstream server: {reason}")
            return
        if self.phase == "closed":
            link.transport.close()
            return
        self.server = link
        app.stats_inc("server_connections_opened")
        self.phase = "auth"
        link.transport.write(pq.startup_message(params))
        if self.startup_buf:
            data, self.startup_buf = self.startup_buf, b""
            self.resume_client_reading("startup")
            self._client_bytes(data)

    def to_server(self, data: bytes) -> None:
        if data and self.server and self.server.transport:
            self.server.transport.write(data)

    # -- server bytes ----------------------------------------------------------------------------
    def server_data(self, data: bytes) -> None:
        if self.server_paused:
            self.server_backlog += data  # waiting for a cache invalidation: keep the order
            return
        self.bytes_out += len(data)
        framer = self.server.framer
        frames = framer.feed(data)
        if self.phase == "ready":
            out = self.server_frames(frames, framer.data)
        elif self.phase == "auth":
            out = self.auth_frames(frames, framer.data)
        else:
            return
        if self._deliver(out):
            return
        if self.server_fatal:
            # the server closes after a FATAL: close the client with it, as Postgres would (and without
            # adding an error of our own), so that the error and the end of the connection arrive together
            self.close()
            return
        if not self.app.accepting and not self.expect and self.tx_status == pq.IDLE and self.phase == "ready":
            # shutting down, and this client's transaction is over: end the session now (the drain loop
            # polls, and never catches idle a client that starts its next transaction at once)
            self.fatal("57P01", "terminating connection due to pgfront shutdown")
            return
        if self.pool is not None and self.server is not None:
            self._maybe_release()

    def _deliver(self, out: bytes) -> bool:
        """Write what server_frames relayed, then account for the statements it finished (the client
        need not wait for our bookkeeping). True when the relay stopped at a commit point: the cache is
        invalidated first, and the rest follows (_invalidate_then_resume)."""
        if out and self.transport and not self.transport.is_closing():
            self.transport.write(out)
        if self.finished:
            self._account()
        if self.server_suspend is not None:
            self._suspend_server()
            return True
        return False

    def server_lost(self, exc: Exception | None) -> None:
        if self.phase == "closed":
            return
        self.app.stats_inc("server_connections_closed")
        if self.phase == "admin":
            return  # the upstream link only served to authenticate the admin user
        # the server went away without a FATAL of its own (crash, kill -9, network)
        self.fatal("08006", "server closed the connection unexpectedly (upstream connection lost)")

    def auth_frames(self, frames: list, data: bytes) -> bytes:
        out = []
        for t, a, b in frames:
            raw = data[a:b]
            if t == _K:
                (self.backend_pid,) = struct.unpack_from("!i", raw, 5)
                self.backend_secret = raw[9:]
                self.server.pid, self.server.secret = self.backend_pid, self.backend_secret
            elif t == 83:  # ParameterStatus
                name, value = pq.parse_parameter_status(raw[5:])
                self.server_params[name] = value
            elif t == _ERR:
                out.append(raw)
                self.transport.write(b"".join(out))
                self.close()
                return b""
            elif t == _R and self.upstream_login is not None:
                reply = self._upstream_login(raw)
                if reply:
                    self.server.transport.write(reply)
                if self.phase == "closed":
                    return b""
                continue
            elif t == _R and raw[5:9] == b"\x00\x00\x00\x0a":
                # AuthenticationSASL: channel binding ties SCRAM to one TLS connection, and the
                # client's TLS connection ends at pgfront, so -PLUS can never succeed end to end
                mechs = [m for m in raw[9:].split(b"\0") if m and not m.endswith(b"-PLUS")]
                raw = pq.msg(b"R", raw[5:9] + b"".join(m + b"\0" for m in mechs) + b"\0")
            elif t == _Z:
                self.tx_status = raw[5:6]
                if self.startup_timer:
                    self.startup_timer.cancel()
                    self.startup_timer = None
                out.append(raw)
                if self.admin:
                    self.phase = "admin"
                    self.server.transport.write(pq.TERMINATE)
                    self.server.transport.close()
                    self.app.stats_inc("admin_sessions")
                    return b"".join(out)
                self.phase = "ready"
                self.app.session_ready(self)
                # anything after the first ReadyForQuery is relayed normally
                rest = [f for f in frames if f[1] >= b]
                if rest:
                    out.append(self.server_frames(rest, data))
                return b"".join(out)
            out.append(raw)
        return b"".join(out)

    # -- the relay: client -> server ---------------------------------------------------------------
    def client_frames(self, frames: list, data: bytes, start: int = 0) -> None:
        """Track each client message; forward the chunk untouched unless a message was changed."""
        if start >= len(frames):
            return
        out: list | None = None  # becomes a list of pieces once something differs from the input
        expect = self.expect
        now = self.last_active = time.perf_counter()
        skipping = self.skip_until_sync
        first = frames[start][1]
        # the most frequent messages are tested first: Query, then a batch's Parse, Bind, Describe, Execute, Sync
        for t, a, b in islice(frames, start, None) if start else frames:
            sent: bytes | None = None  # replacement for this message, if any
            if skipping and t != _S and t != _c and t != _f:
                pass  # the server discards everything up to Sync after an error: so do we
            elif t == _Q:
                sent = self._query(data[a + 5:b - 1], now)
            elif t == _P:
                sent = self._parse(data[a + 5:b])
            elif t == _B:
                if data[a + 5] == 0:  # unnamed portal, the common case
                    name = data[a + 6:data.index(0, a + 6, b)].decode(pq.ENC, pq.ERRORS)
                    portal = ""
                    stmt = self.statements.get(name)
                    if stmt is not None:
                        self.last_bind = (stmt, a, b, data)
                else:
                    portal, name = pq.bind_names(data[a + 5:b])
                    stmt = self.statements.get(name)
                self.portals[portal] = stmt  # type: ignore[assignment]
                d = stmt.decision if stmt is not None else None
                if d is None and not (self.pooled_tx and name):
                    expect.append(_PLAIN_B)  # the common case: nothing to change
                else:
                    sent = self._bind(stmt, d, portal, name, data[a:b])
                self.in_batch = True
            elif t == _D:
                if self.pooled_tx and data[a + 5] == 83 and data[a + 6] != 0:  # Describe of a named statement
                    stmt = self.statements.get(pq.parse_describe_close(data[a + 5:b])[1])
                    if stmt is not None:
                        sent = self._on_server(stmt) + pq.msg(b"D", b"S" + pq.cstr(stmt.server_name))
                expect.append(_PLAIN_D)
                self.in_batch = True
            elif t == _E:
                portal, max_rows = pq.parse_execute(data[a + 5:b])
                stmt = self.portals.get(portal)
                if stmt is not None:
                    p = Pending(_E, stmt.info, now)
                    p.stmt = stmt
                    d = stmt.decision
                    if d is not None:
                        self.app.rules.executed(self, d, stmt.info)
                    if stmt.notices:
                        p.notices = stmt.notices
                        self.special += 1
                    lb = self.last_bind
                    if lb is not None and lb[0] is stmt and portal == "":
                        p.bind = lb
                    if self.cstate is None:
                        expect.append(p)
                    elif (d is not None and d.cache_ttl is not None and not d.timeout and p.bind is not None
                          and not self.skip_until_sync):
                        info = stmt.info if stmt.sent_sql == stmt.sql else analyze(stmt.sent_sql)
                        # a row limit (asyncpg's fetchval sends 1) is part of the key: only replies that
                        # complete within it are stored (a PortalSuspended abandons the fill)
                        keyed = stmt.sent_sql if not max_rows else f"{stmt.sent_sql}\0max_rows={max_rows}"
                        self.lookup_job = (_E, p, keyed, info, d, data[a:b])
                        sent = _SUSPEND
                    else:
                        expect.append(p)
                        self.cstate.sent(stmt.info)
                else:
                    expect.append(Pending(_E, None, now))
                self.queries += 1
                self.in_batch = True
            elif t == _S:
                skipping = self.skip_until_sync = False
                self.copy_failed = False
                self.in_batch = False
                if self.server_in_copy and self.copy_ends_sent < self.copies_started:
                    pass  # the server is in COPY IN mode and ignores this Sync
                elif self.copies_started or self.copy_ends_sent:
                    p = Pending(_S)
                    p.copy_ends = self.copy_ends_sent
                    expect.append(p)
                else:
                    expect.append(_PLAIN_S)
                if self.restore_at_sync:
                    self.restore_at_sync = False
                    sent = data[a:b] + self._swallowed_query(None)
            elif t == _d or t < 0:
                pass  # CopyData, or a piece of a large one
            elif t == _c or t == _f:
                if self.copy_failed:
                    self.copy_failed = False  # the end of a copy the server already failed
                else:
                    self.copy_ends_sent += 1
            elif t == _C:
                kind, name = pq.parse_describe_close(data[a + 5:b])
                if kind == b"S":
                    self.statements.pop(name, None)
                else:
                    self.portals.pop(name, None)
                if self.pooled_tx and kind == b"S" and name:
                    # the server-side statement is shared by name and content: keep it, answer here
                    self._local(pq.CLOSE_COMPLETE)
                    sent = b""
                else:
                    expect.append(_PLAIN_C)
            elif t == _H:
                pass
            elif t == _F:
                expect.append(Pending(_F, None, now))
            elif t == _X:
                self.to_server(data[first:a] if out is None else b"".join(out))
                if self.pool is None:
                    self.to_server(pq.TERMINATE)  # a pooled server connection outlives its client
                self.close()
                return
            else:
                self.to_server(data[first:a] if out is None else b"".join(out))
                self.fatal("08P01", f"invalid frontend message type {t}")
                return
            if sent is not None:
                if sent is _SUSPEND:  # a cache look-up first: forward what came before, then wait
                    self.to_server(data[first:a] if out is None else b"".join(out))
                    self._suspend_client(frames, data, frames.index((t, a, b), start))
                    return
                if out is None:
                    out = [data[first:a]]
                out.append(sent)
            elif out is not None:
                out.append(data[a:b])
        # the whole chunk is the very same object: slicing all of a bytes object copies nothing
        self.to_server(data[first:frames[-1][2]] if out is None else b"".join(out))
        if self.special and expect and expect[0].kind == _LOCAL:  # local replies always count as special
            replies: list = []
            self._flush_local(replies)
            self.transport.write(b"".join(replies))

    def _local(self, reply: bytes) -> None:
        """A reply pgfront gives itself, queued behind whatever the server still owes the client."""
        p = Pending(_LOCAL)
        p.local = reply
        self.special += 1
        self.expect.append(p)

    def _bind(self, stmt: Stmt | None, d: Decision | None, portal: str, name: str, raw: bytes) -> bytes:
        """A Bind that rules or transaction pooling change: what is sent instead (its reply is queued)."""
        prefix = b""
        bind = raw
        p = _PLAIN_B
        if self.pooled_tx and name and stmt is not None:
            prefix = self._on_server(stmt)
            bind = _rename_bind(raw[5:], portal, stmt.server_name)
            p = Pending(_B)
            p.stmt = stmt  # a refused cached plan is traced back to its statement
        if d is not None:
            if d.timeout and not self.in_batch:
                prefix = self._timeout_prefix(d) + prefix
            if d.offset_check is not None:
                error = self._check_offset(d, raw[5:])
                if error is not None:  # make this Bind fail on the server, and answer with our error
                    p = Pending(_B)
                    p.error = error
                    self.special += 1
                    bind = pq.build_bind(portal, _BLOCKED_SQL, [], [], [])
        self.expect.append(p)
        return prefix + bind

    def _on_server(self, stmt: Stmt) -> bytes:
        """Transaction pooling: make sure the lent server has this statement prepared (swallowed Parse)."""
        if stmt.server_name in self.server.state.prepared:
            return b""
        return self._prepare(stmt, False)

    def _prepare(self, stmt: Stmt, forward: bool) -> bytes:
        """Transaction pooling: prepare the statement under its server-side name on the lent server.
        The client sees the ParseComplete of its own Parse (`forward`), never that of ours, but always
        the error if it no longer parses."""
        state = self.server.state
        name = stmt.server_name
        state.prepared.add(name)
        out = b""
        if state.uncertain:  # after a DEALLOCATE of some name: the statement may still be there
            self._swallowed(_C)
            out = pq.msg(b"C", b"S" + pq.cstr(name))
        p = Pending(_P)
        p.prep = name
        if not forward:
            p.forward = False
            p.show_errors = True
            self.special += 1
        self.expect.append(p)
        return out + pq.parse_message(name, stmt.sent_sql, stmt.oids)

    def _query(self, sql_bytes: bytes, now: float) -> bytes | None:
        """A simple Query: track it, apply rules. Returns a replacement message or None."""
        sql = sql_bytes.decode(pq.ENC, pq.ERRORS)
        self.queries += 1
        if self.app.rules is None and self.cstate is None and not self.pooled_tx:
            # nothing decides on the statement before it is sent: its shape is looked up for the
            # statistics after the reply has gone out, off the path the client waits on
            p = Pending(_Q, None, now)
            p.text = sql
            self.expect.append(p)
            return None
        info = self.app.shapes.get(sql)
        p = Pending(_Q, info, now)
        if self.pooled_tx:
            feature = session_feature(info)
            if feature:
                refusal = self._session_feature(feature)
                if refusal is not None:
                    p.error = refusal
                    self.special += 1
                    self.expect.append(p)
                    return pq.query(_BLOCKED_SQL)
        rules = self.app.rules
        sent = None
        if rules is not None:
            decision = rules.decide_for(self, sql, info)
            if decision is not None:
                rules.executed(self, decision, info, sql)
                if decision.block:
                    code, message = decision.block
                    p.error = pq.error_response(code, message)
                    self.special += 1
                    sent = pq.query(_BLOCKED_SQL)
                else:
                    if decision.sql is not None:
                        sent = pq.query(decision.sql)
                    if decision.notices:
                        p.notices = tuple(pq.notice_response(n) for n in decision.notices)
                        self.special += 1
                    if decision.timeout:
                        before = self._swallowed_query(_SAVE_AND_SET_TIMEOUT.format(ms=int(decision.timeout * 1000)))
                        self.expect.append(p)
                        after = self._swallowed_query(None)
                        if self.cstate is not None:
                            self.cstate.sent(info)
                        return before + (sent or pq.query(sql)) + after
                    if decision.cache_ttl is not None and self.cstate is not None:
                        if decision.sql is None:  # the shape's facts serve the cache policy
                            cache = self.app.cache
                            key = cache.query_key(self.cstate, sql)
                            reply = cache.hit_now(key, info, self.cstate, allow_rls=decision.cache_allow_rls,
                                                  allow_catalog=decision.cache_allow_catalog)
                            if reply is not None:  # fresh in L1: answered without suspending the client
                                self._serve_hit(p, _Q, reply)
                                if not decision.notices and not decision.log:
                                    self._remember_hot(sql, info, decision, key)
                                return b""
                            self.lookup_job = (_Q, p, sql, info, decision, sent or pq.query(sql))
                        else:
                            self.lookup_job = (_Q, p, decision.sql, analyze(decision.sql), decision, sent)
                        return _SUSPEND
        if self.cstate is not None and p.error is None:
            self.cstate.sent(info)
        self.expect.append(p)
        return sent

    def _session_feature(self, feature: str) -> bytes | None:
        """Transaction mode met session state: pin the server to this client, or refuse (an error)."""
        if self.app.cfg.pool.session_state == "refuse":
            return pq.error_response("0A000", f"{feature} is not supported in transaction pooling mode "
                                              "(pgfront [pool] session_state = refuse)")
        if self.server is not None:
            self.server.state.dirty.add(feature)  # whatever happens next, it is reset before reuse
        if not self.pinned:
            self.pinned = True
            self.app.stats_inc("pinned_sessions")
            log.info("session pinned to its server connection", extra={"client": self.id, "reason": feature})
        return None

    def _swallowed(self, kind: int) -> None:
        """Expect a reply to a message of pgfront's own (e.g. a BindComplete) that the client must not see."""
        p = Pending(kind)
        p.forward = False
        self.special += 1
        self.expect.append(p)

    def _swallowed_query(self, sql: str | None) -> bytes:
        """A Query of pgfront's own whose whole reply the client never sees (None: restore timeout)."""
        self._swallowed(_Q)
        return pq.query(sql) if sql is not None else _RESTORE_TIMEOUT

    def _timeout_prefix(self, decision: Decision | None) -> bytes:
        """At the start of an extended batch, set a rule's statement_timeout until the batch's Sync."""
        if decision is None or not decision.timeout or self.in_batch:
            return b""
        self.restore_at_sync = True
        return self._swallowed_query(_SAVE_AND_SET_TIMEOUT.format(ms=int(decision.timeout * 1000)))

    def _parse(self, body: bytes) -> bytes | None:
        last = self.last_parse
        rules = self.app.rules
        if (last is not None and last[0] == body and self.statements.get(last[1].name) is last[1]
                and last[2] is (rules.holder.current if rules is not None else None)):
            # the same Parse again (drivers re-parse the unnamed statement every execution): nothing
            # about it can have changed, and it was forwarded unchanged last time
            self.expect.append(_PLAIN_P)
            self.in_batch = True
            return None
        name, sql, oids = pq.parse_parse(body)
        info = self.app.shapes.get(sql)
        stmt = Stmt(name, sql, info, sql)
        stmt.oids = oids
        p = _PLAIN_P
        sent = None  # the Parse sent instead of the client's
        prefix = b""  # pgfront's own messages sent before it (a rule's timeout)
        rules = self.app.rules
        if rules is not None:
            decision = rules.decide_for(self, sql, info)
            if decision is not None:
                if decision.block:
                    code, message = decision.block
                    p = Pending(_P, info)
                    p.error = pq.error_response(code, message)
                    self.special += 1
                    sent = pq.parse_message(name, _BLOCKED_SQL, oids)
                elif decision.sql is not None:
                    stmt.sent_sql = decision.sql
                    sent = pq.parse_message(name, decision.sql, oids)
                stmt.notices = tuple(pq.notice_response(n) for n in decision.notices)
                stmt.decision = decision
                if decision.timeout and not self.in_batch and not decision.block:
                    prefix = self._timeout_prefix(decision)
        self.statements[name] = stmt
        self.in_batch = True
        if self.pooled_tx:
            feature = session_feature(info)
            if feature:
                refusal = self._session_feature(feature)
                if refusal is not None:
                    p = Pending(_P, info)
                    p.error = refusal
                    self.special += 1
                    sent = pq.parse_message(name, _BLOCKED_SQL, oids)
            if name and p is _PLAIN_P:  # a named statement, not blocked: prepared under its server-side name
                self.last_parse = None
                stmt.server_name = self.pool.server_name(stmt.sent_sql, oids)
                if stmt.server_name in self.server.state.prepared:
                    self._local(pq.PARSE_COMPLETE)
                    return prefix
                return prefix + self._prepare(stmt, True)
        self.expect.append(p)
        if sent is None and not prefix and p is _PLAIN_P and not self.pooled_tx:
            self.last_parse = (body, stmt, rules.holder.current if rules is not None else None)
        else:
            self.last_parse = None
        if prefix:
            return prefix + (sent or pq.msg(b"P", body))
        return sent

    def _check_offset(self, decision: Decision, body: bytes) -> bytes | None:
        """The error for an OFFSET $n bound above a rule's max_offset, or None."""
        n = decision.offset_check[0]
        try:
            _, _, formats, values, _ = pq.parse_bind(body)
            fmt = formats[0] if len(formats) == 1 else (formats[n - 1] if len(formats) >= n else 0)
            error = decision.offset_error(values[n - 1], binary=fmt == 1) if len(values) >= n else None
        except (ValueError, IndexError, struct.error):
            error = None  # malformed: the server will say so
        return pq.error_response(*error) if error is not None else None

    @property
    def in_transaction(self) -> bool:
        return self.tx_status != pq.IDLE

    # -- the relay: server -> client ---------------------------------------------------------------
    def _pop(self) -> Pending:
        p = self.expect.popleft()
        if self.special and _special(p):  # with none queued (the common case) there is nothing to check
            self.special -= 1
        return p

    def server_frames(self, frames: list, data: bytes, start: int = 0, hooked: bool = False) -> bytes:
        """Track each server message. While no pending reply needs changing (no swallowed replies,
        replaced errors, notices or local replies queued), the chunk is forwarded as it came.

        With the cache on, a commit point that made writes stops the loop before its CommandComplete
        or ReadyForQuery (`self.server_suspend`), so the invalidation lands before the client hears of
        the commit; the loop then resumes at that message with `hooked` set.

        This is the loop for the common case, every reply relayed verbatim: it only tracks the messages
        of successful statements (and the cache's commit points); from any other message on (an error,
        COPY, a notice, a ParameterStatus...), or in any other case, `_server_frames` does the work."""
        if start >= len(frames):
            return b""
        if self.special:
            return self._server_frames(frames, data, start, hooked)
        expect = self.expect
        cstate = self.cstate
        first = frames[start][1]
        hooked_at = first if hooked else -1  # resuming after an invalidation: its commit point is done
        for t, a, b in islice(frames, start, None) if start else frames:
            if t == 68:  # DataRow
                continue
            if not expect:
                break
            p = expect[0]
            if cstate is not None and (t == _CMD_C or t == _Z) and a != hooked_at:
                effect = self._commit_point(t, data[a + 5:b])
                if effect:  # relay what precedes the commit's message; the rest after the invalidation
                    self.server_suspend = (frames, data, frames.index((t, a, b), start), effect)
                    return data[first:a]
            if t == _CMD_C:
                if data[a + 5] == 68:  # D...: DEALLOCATE and DISCARD drop prepared statements
                    self.server.state.command_tag(data[a + 5:b - 1])
                p.rows += pq.rows_from_tag(data[a + 5:b - 1])
                p.part += 1
                self.server_in_copy = False
                if p.kind == _E:
                    expect.popleft()
                    self.finished.append(p)  # accounted once the reply is written
            elif t == _Z:
                self._ready_for_query(data[a + 5:b])
            elif t == _T or t == _n:
                if p.kind == _D:
                    expect.popleft()
            elif (t == _PARSE_OK or t == _BIND_OK or t == _CLOSE_OK) and p.prep is None:
                expect.popleft()
            elif t >= 0:
                break
        else:
            return data[first:frames[-1][2]]  # all of it: the very same object, no copy
        self._server_frames(frames, data, frames.index((t, a, b), start), False)  # relays it verbatim too
        if self.server_suspend is not None:  # it stopped at a commit point: nothing from there on yet
            return data[first:frames[self.server_suspend[2]][1]]
        return data[first:frames[-1][2]]

    def _skipped(self) -> None:
        """The reply at the head will never come (an error, or the server skipped its message)."""
        p = self._pop()
        if p.prep is not None and self.server is not None:
            self.server.state.prepared.discard(p.prep)  # that Parse never prepared anything

    def _plan_changed(self, stmt: Stmt) -> None:
        """The server refused a statement's cached plan (its result type changed): the client will
        prepare it again, and that must prepare it anew on the server, not find the stale one."""
        self.pool.plan_changed(stmt.sent_sql, stmt.oids, stmt.server_name)
        stmt.server_name = self.pool.server_name(stmt.sent_sql, stmt.oids)

    def _ready_for_query(self, status: bytes) -> Pending | None:
        """ReadyForQuery with replies pending: the Sync or Query it answers is over (returned, or None
        if every entry was skipped by the server)."""
        self.tx_status = status
        self.server_in_copy = False
        self.server.state.ready(status)
        expect = self.expect
        # entries before the Sync/Query that never got a reply were skipped by the server
        while expect and expect[0].kind not in _Z_KINDS:
            self._skipped()
        if not expect:
            return None
        p = expect.popleft()
        if self.special and _special(p):  # _pop, inlined: this runs once per statement
            self.special -= 1
        if p.kind != _S:
            self.finished.append(p)  # accounted once the reply is written (server_data)
        elif p.copy_ends > self.copies_started:
            self._forget_stray_copy_ends(p.copy_ends - self.copies_started)
        return p

    def _server_frames(self, frames: list, data: bytes, start: int, hooked: bool) -> bytes:
        """The general loop of server_frames: any message, any queued reply."""
        plain = self.special == 0
        out: list = []
        expect = self.expect
        cstate = self.cstate
        first = last = frames[start][1]
        for i in range(start, len(frames)):
            t, a, b = frames[i]
            if t == 68 or t < 0:  # DataRow (or a piece of a large one / of CopyData)
                last = b
                if not plain and expect:
                    head = expect[0]
                    if head.fill is not None:
                        self._feed(head, data[a:b], t < 0)
                    if head.forward:
                        out.append(data[a:b])
                elif not plain:
                    out.append(data[a:b])
                continue
            if cstate is not None and (t == _Z or t == _CMD_C) and not (hooked and i == start) and expect:
                effect = self._commit_point(t, data[a + 5:b])
                if effect:
                    self.server_suspend = (frames, data, i, effect)
                    return data[first:a] if plain else b"".join(out)
            last = b
            if t == _N or t == _A or t == 100:  # notices, notifications, CopyData
                if not plain:
                    out.append(data[a:b])
                continue
            if t == 83:  # ParameterStatus (SET of a reported setting)
                name, value = pq.parse_parameter_status(data[a + 5:b])
                self.server_params[name] = value
                if cstate is not None:
                    cstate.server_parameter(name, value)
                if self.pool is not None and not (expect and not expect[0].forward):
                    self.server.state.dirty.add(name)  # the client changed it, not pgfront: undo before reuse
                if not plain:
                    out.append(data[a:b])
                continue
            if not expect:
                if t == _ERR and pq.parse_fields(data[a + 5:b]).get("V") in _FATAL:
                    self.server_fatal = True
                if not plain:
                    out.append(data[a:b])  # unsolicited, e.g. a FATAL before shutdown
                continue
            p = expect[0]
            kind = p.kind
            if t == _Z:
                p = self._ready_for_query(data[a + 5:b])
                if p is None:
                    if not plain:
                        out.append(data[a:b])
                elif not plain and p.forward:
                    if p.notices and p.kind == _Q and p.sqlstate is None:
                        out.extend(p.notices)
                    out.append(data[a:b])
                if not plain:
                    self._flush_local(out)
                continue
            if t == _CMD_C:
                if data[a + 5] == 68:  # D...: DEALLOCATE and DISCARD drop prepared statements
                    self.server.state.command_tag(data[a + 5:b - 1])
                p.rows += pq.rows_from_tag(data[a + 5:b - 1])
                p.part += 1
                self.server_in_copy = False
                if p.fill is not None:
                    self._feed(p, data[a:b], False)
                    if p.fill is not None:
                        asyncio.ensure_future(self.app.cache.fill(p.fill, p.ttl))
                        p.fill = None
                if kind == _E:
                    self._pop()
                    self._done(p)
                    if not plain:
                        if p.notices:
                            out.extend(p.notices)
                        if p.forward:
                            out.append(data[a:b])
                        self._flush_local(out)
                    continue
            elif t == _ERR:
                fields = pq.parse_fields(data[a + 5:b])
                if p.kind in _STATEMENT_KINDS:  # never on the shared entries
                    p.sqlstate = fields.get("C", "XX000")
                if cstate is not None:
                    cstate.error()
                if p.fill is not None:
                    self.app.cache.abandon(p.fill)
                    p.fill = None
                if fields.get("V") in _FATAL:
                    self.server_fatal = True
                if self.server_in_copy:
                    self.server_in_copy = False
                    if self.copy_ends_sent < self.copies_started:
                        self.copy_failed = True
                        self.copy_ends_sent = self.copies_started
                if not plain and (p.forward or p.show_errors):
                    out.append(p.error if p.error is not None else data[a:b])
                if p.stmt is not None and fields.get("R") == "RevalidateCachedQuery" and self.pooled_tx:
                    self._plan_changed(p.stmt)
                if kind in _SKIP_KINDS:
                    self._skipped()  # the prepare it made, if any, failed with it
                    if kind == _E:
                        self._done(p)
                    # the server now skips to the next Sync: drop what it will never answer
                    while expect and expect[0].kind != _S:
                        self._skipped()
                    if not expect:
                        self.skip_until_sync = True
                    if not plain:
                        self._flush_local(out)
                continue
            elif t == _PARSE_OK or t == _BIND_OK or t == _CLOSE_OK:
                self._pop()
                if p.prep is not None:
                    self.pool.known.add(p.prep)
            elif t == _T or t == _n:
                if kind == _D:
                    self._pop()
                elif p.fill is not None:
                    self._feed(p, data[a:b], False)
            elif t == _I or t == _s:
                if p.fill is not None:
                    self.app.cache.abandon(p.fill)  # a suspended portal is not a whole result
                    p.fill = None
                if kind == _E:
                    self._pop()
                    self._done(p)
            elif t == _G or t == _W:
                self.copies_started += 1
                self.server_in_copy = True
                # Syncs the client sent before its CopyDone are read in COPY mode and ignored
                keep = [e for e in expect if not (e.kind == _S and e.copy_ends < self.copies_started)]
                if len(keep) != len(expect):
                    expect.clear()
                    expect.extend(keep)
            if not plain:
                if p.forward:
                    out.append(data[a:b])
                self._flush_local(out)
        if plain:
            return data if first == 0 and last == len(data) else data[first:last]
        return b"".join(out)

    # -- the read cache ---------------------------------------------------------------------------
    def _feed(self, p: Pending, raw: bytes, partial: bool) -> None:
        """Capture one message of a reply being filled into the cache (a streamed piece: give up)."""
        if partial or not p.fill.feed(raw):
            self.app.cache.abandon(p.fill)
            p.fill = None

    def _commit_point(self, t: int, body: bytes):
        """Cache bookkeeping at a CommandComplete or ReadyForQuery: the writes to invalidate now, if any."""
        cstate = self.cstate
        expect = self.expect
        if t == _Z:
            # other batches (Queries, Syncs) sent after this one: their writes are not committed yet
            return cstate.ready(body, sum(e.kind in _Z_KINDS for e in expect) > 1)
        p = expect[0]
        info = p.info
        if info is None:
            return None
        more = len(expect) > 1 and any(e.kind in _STATEMENT_KINDS for e in islice(expect, 1, None))
        if p.kind == _Q and info.statements:
            if p.part >= len(info.statements):
                return None
            more = more or p.part + 1 < len(info.statements)
            info = info.statements[p.part]
        return cstate.done(info, more)

    def _suspend_server(self) -> None:
        frames, data, i, effect = self.server_suspend
        self.server_suspend = None
        self.server_paused = True
        if self.server is not None:
            self.server.pause("cache")
        # not tied to the client: a commit's invalidation must run even if the client is gone
        asyncio.ensure_future(self._invalidate_then_resume(frames, data, i, effect))

    async def _invalidate_then_resume(self, frames: list, data: bytes, i: int, effect) -> None:
        try:
            await self.app.cache.invalidate(self.cstate, effect)
        except Exception as e:  # noqa: BLE001 - the cache must never fail a client's write
            log.warning("cache invalidation failed", extra={"client": self.id, "reason": str(e)})
        if self.phase != "ready":
            return
        if self._deliver(self.server_frames(frames, data, i, hooked=True)):
            return
        self.server_paused = False
        if self.server is not None:
            self.server.resume("cache")
        backlog, self.server_backlog = self.server_backlog, b""
        if backlog:
            self.server_data(backlog)
        elif self.pool is not None and self.server is not None:
            self._maybe_release()

    def _suspend_client(self, frames: list, data: bytes, i: int) -> None:
        self.client_suspended = True  # later bytes wait in client_backlog (reading pauses if it grows)
        asyncio.ensure_future(self._lookup_then_resume(frames, data, i))  # a flight others may share: not cancelled

    async def _lookup_then_resume(self, frames: list, data: bytes, i: int) -> None:
        kind, p, sql, info, decision, raw = self.lookup_job
        self.lookup_job = None
        cache = self.app.cache
        try:
            if kind == _Q:
                key = cache.query_key(self.cstate, sql)
            else:
                _stmt, ba, bb, bdata = p.bind
                _, _, pformats, values, rformats = pq.parse_bind(bdata[ba + 5:bb])
                key = cache.key(self.cstate, sql, values, pformats, rformats, p.stmt.oids, extended=True)
            res = await cache.lookup(key, info, self.cstate, allow_rls=decision.cache_allow_rls,
                                     allow_catalog=decision.cache_allow_catalog)
        except Exception as e:  # noqa: BLE001 - a cache problem means: ask the server
            log.warning("cache lookup failed", extra={"client": self.id, "reason": str(e)})
            res = None
        if self.phase != "ready":
            if res is not None and res.event == "miss":
                cache.abandon(res)
            return
        event = res.event if res is not None else "bypass"
        if event == "hit":
            self._serve_hit(p, kind, res.reply)
        else:
            self._cache_event(info, event)
            if event == "miss":
                if not _special(p):
                    self.special += 1
                p.fill = res
                p.ttl = decision.cache_ttl
                if kind == _E:
                    # The client's Bind reached the server before the versions were read, and a portal
                    # takes its snapshot at Bind: a write committed in between would be stored under
                    # the new versions. Bind the portal again now (its BindComplete swallowed), so the
                    # rows stored are at least as new as the versions they are stored under.
                    _stmt, ba, bb, bdata = p.bind
                    if self.pooled_tx and p.stmt.name:
                        rebind = _rename_bind(bdata[ba + 5:bb], "", p.stmt.server_name)
                    else:
                        rebind = bdata[ba:bb]
                    self._swallowed(_B)
                    raw = rebind + raw
            self.expect.append(p)
            self.cstate.sent(info)
            self.to_server(raw)
        self.client_suspended = False
        self._relay_client(frames, data, i + 1)
        if self.phase == "ready" and not self.client_suspended:
            if self.expect and self.expect[0].kind == _LOCAL:
                replies: list = []
                self._flush_local(replies)
                self.transport.write(b"".join(replies))
            if "cache" in self.paused:
                self.resume_client_reading("cache")
            backlog, self.client_backlog = self.client_backlog, b""
            if backlog:
                self._client_bytes(backlog)

    def _remember_hot(self, sql: str, info: StatementInfo, decision: Decision, key: bytes) -> None:
        """Keep what answering this Query from the cache took, keyed by its exact message bytes."""
        hot = self.hot_queries
        if len(hot) >= _HOT_QUERIES:
            hot.clear()
        rules = self.app.rules.holder.current
        hot[pq.query(sql)] = (rules, rules.context_key(self), self.cstate.prefix, info, decision, key)

    def _hot_hit(self, memo: tuple) -> bool:
        """A repeat of a Query answered from the cache before, alone in its chunk, with nothing else in
        flight: answer it without framing, parsing or deciding again. False: take the general path.

        Valid only while nothing the memo stands for changed: the rules (a reload makes a new rule set),
        the context they match on (user, database, application_name, in a transaction), and the session
        settings in the key (a new prefix object when one changes); the cache policy is asked again."""
        t0 = time.perf_counter()
        ruleset, context, prefix, info, decision, key = memo
        cstate = self.cstate
        if (self.phase != "ready" or self.expect or self.skip_until_sync or self.in_batch or not self.cframer.idle
                or cstate is None or cstate.prefix is not prefix or self.app.rules is None
                or self.app.rules.holder.current is not ruleset or ruleset.context_key(self) != context):
            return False
        reply = self.app.cache.hit_now(key, info, cstate, allow_rls=decision.cache_allow_rls,
                                       allow_catalog=decision.cache_allow_catalog)
        if reply is None:
            return False
        self.transport.write(reply + pq.ready_for_query(self.tx_status))
        self.queries += 1
        self.last_active = t0  # a busy client is not an idle one (client_idle_timeout)
        q = self._record(info, t0)
        self.app.rules.executed(self, decision, info, q=q)
        self._cache_event(info, "hit", q)
        return True

    def _cache_event(self, info: StatementInfo, event: str, q: QueryStats | None = None) -> None:
        if self.app.stats is not None:
            self.app.stats.cache_event(info.fingerprint, event, q)

    def _serve_hit(self, p: Pending, kind: int, reply: bytes) -> None:
        """Answer `p` from the cache: its reply is queued as a local one, in client order."""
        if not _special(p):
            self.special += 1
        p.kind = _LOCAL
        p.local = b"".join(p.notices) + reply
        p.whole = kind == _Q
        self.expect.append(p)
        self._cache_event(p.info, "hit", self._done(p))  # statistics timed from the message's arrival

    def _forget_stray_copy_ends(self, strays: int) -> None:
        """CopyDone/CopyFail sent outside COPY, which the server ignored (all the client's ends before
        this Sync are read, and more than the COPYs started): they must not count as the end of a later
        COPY, or the Syncs sent during it would be expected to get a reply."""
        self.copy_ends_sent -= strays
        for e in self.expect:
            if e.kind == _S and e.copy_ends:  # never the shared _PLAIN_S, whose count is 0
                e.copy_ends -= strays

    def _flush_local(self, out: list) -> None:
        expect = self.expect
        while expect and expect[0].kind == _LOCAL:
            p = self._pop()
            out.append(p.local)
            if p.whole:  # a whole simple-query reply: it ends with ReadyForQuery
                out.append(pq.ready_for_query(self.tx_status))

    def _done(self, p: Pending) -> QueryStats | None:
        """A statement finished: statistics, slow log. Returns its statistics entry, if any."""
        info = p.info
        if info is None:
            if p.text is None:
                return None
            info = p.info = self.app.shapes.get(p.text)
        return self._record(info, p.t0, p.rows, p.sqlstate, p)

    def _account(self) -> None:
        """Statistics of the statements the reply just written finished (see server_frames)."""
        finished, self.finished = self.finished, []
        for p in finished:
            self._done(p)

    def _record(self, info: StatementInfo, t0: float, rows: int = 0, sqlstate: str | None = None,
                p: Pending | None = None) -> QueryStats | None:
        seconds = time.perf_counter() - t0
        app = self.app
        stats = app.stats
        q = None
        if stats is not None:
            q = stats.record(info.fingerprint, info.normalized, self.database, self.user, seconds, rows, sqlstate)
        if p is not None and app.slow_threshold is not None and seconds >= app.slow_threshold and app.slowlog is not None:
            app.slowlog_capture(self, p, info, seconds)
        return q

    # -- admin console -------------------------------------------------------------------------------
    def admin_frames(self, frames: list, data: bytes) -> None:
        for t, a, b in frames:
            self.admin_queue.append((t, data[a:b]))
        if not self.admin_busy:
            self.admin_busy = True
            asyncio.ensure_future(self._admin_run())

    async def _admin_run(self) -> None:
        """Answer admin messages one at a time, in order (some commands await, e.g. RELOAD)."""
        from proxy import admin

        try:
            while self.admin_queue and self.phase == "admin":
                t, raw = self.admin_queue.popleft()
                if t == _Q:
                    reply = await admin.handle(self.app, self, pq.parse_query(raw[5:]))
                elif t == _X:
                    self.close()
                    return
                elif t == _S:
                    reply = pq.ready_for_query(pq.IDLE)
                elif t in (_P, _B, _D, _E, _C, _H):
                    reply = pq.error_response("0A000", "the pgfront admin console supports the simple query "
                                                       "protocol only (psql, or prefer_simple_protocol)")
                else:
                    self.fatal("08P01", f"invalid frontend message type {t}")
                    return
                if self.transport and not self.transport.is_closing():
                    self.transport.write(reply)
        finally:
            self.admin_busy = False

    # -- introspection (SHOW CLIENTS) ------------------------------------------------------------------
    def describe(self) -> dict[str, object]:
        return {
            "id": self.id, "user": self.user, "database": self.database, "application_name": self.application_name,
            "peer": self.peer, "state": self.phase, "tx": self.tx_status.decode(), "queries": self.queries,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "backend_pid": self.backend_pid,
            "connected_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.connected_at)),
            "pending": len(self.expect),
        }
