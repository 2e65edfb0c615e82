"""The client connection: the asyncio shell around one client's conversation (`proxy.net.bytepath`).

It moves bytes (client socket in, server link out, and back), runs the timers, pauses reading for
counted reasons, and walks the startup: SSL/GSS negotiation, CancelRequest, pgfront's own
authentication (`proxy.relay.handshake`) or the upstream's, passed through. Then it relays through
the conversation core, waits for Redis where the cache needs it (holding the stream at exactly that
message), and, with pooling, borrows server connections from the pool and gives them back
(`proxy.net.pooled`).

Flow control: each side's transport pauses reading from the other when its write buffer is full,
so a client that stops reading a huge result back-pressures the server instead of growing memory.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import struct
import time
from typing import TYPE_CHECKING

from proxy.log import log
from proxy.net.bytepath import _HIGH_WATER, BytePath
from proxy.net.pooled import PooledClient
from proxy.net.serverlink import ServerLink
from proxy.net.startup import StartupSteps
from proxy.net.waits import StreamWaits
from proxy.relay.records import (
    _ERR,
    _K,
    _R,
    _X,
    _Z,
    ADMIN,
    AUTH,
    CLOSED,
    CONNECTING,
    HANDSHAKE,
    LOCAL_AUTH,
    READY,
)
from proxy.upstream import open_connection, send_cancel
from proxy.wire import protocol as pq

if TYPE_CHECKING:
    from proxy.app import App
    from proxy.registry import Console
    from proxy.relay.handshake import ClientAuth

_ids = itertools.count(1)


class ClientConnection(StartupSteps, PooledClient, StreamWaits, BytePath, asyncio.Protocol):
    """One client connection: transport, startup and authentication around its conversation."""

    def __init__(self, app: App) -> None:
        super().__init__(app)
        self.app = app
        self.id = next(_ids)
        self.server: ServerLink | None = None
        self.startup_buf = b""
        self.params: dict[str, str] = {}
        self.peer = ""
        self.connected_at = time.time()
        self.backend_pid = 0
        self.backend_secret = b""
        self.admin_db = False  # the client asked for the admin console's database
        self.console: Console | None = None  # the admin console's conversation (phase ADMIN)
        self.tls = False
        self.admission_wait = False  # a statement waits for its throttle rule (the server may go back)
        self.wanted: dict[str, str] = {}  # settings a pooled server connection must have for this client
        self.upstream_params: dict[str, str] = {}
        self.upstream_login = None  # an auth.UpstreamLogin when pgfront logs in for the client
        self.auth: ClientAuth | None = None  # pgfront's own authentication of the client
        self.paused: set[str] = set()
        self.client_slow = False  # the client's socket is over its high-water mark
        self.tasks: set[asyncio.Task] = set()  # work for this client only: cancelled when it goes
        self.startup_timer: asyncio.TimerHandle | None = None

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
        if self.phase in HANDSHAKE:
            log.info("startup timeout", extra={"client": self.id, "peer": self.peer})
            self.fatal("08006", "startup timeout: the client did not complete the startup in time")

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase is CLOSED:
            return
        busy = bool(self.expect) or self.tx_status != pq.IDLE
        was = self.phase
        self.phase = CLOSED
        for task in list(self.tasks):
            task.cancel()
        if self.console is not None:
            self.console.close()
        self.app.forget(self)
        if self.startup_timer:
            self.startup_timer.cancel()
        self.app.drop_cancel_key(self)
        if was is READY and self.observers is not None and self.observers.capture is not None:
            self.observers.capture.session_ended(self.id, time.time())
        for p in (*self.expect, *self.finished):
            if p.fill is not None:
                self.app.cache.abandon(p.fill)
                p.fill = None
            if p.permit is not None:  # throttle slots of statements that will never be answered
                p.permit.release()
                p.permit = None
        if self.admitted is not None and not isinstance(self.admitted, bytes):
            self.admitted.release()  # admitted while its server was borrowed again: never to run
            self.admitted = None
        if self.pool is not None:
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

    def _now_ready(self) -> None:
        """Startup is over: relay from now on (with the cache's view of this session, if caching)."""
        self.phase = READY
        if self.app.cache is not None:
            self.cstate = self.app.cache.session(self.database, self.user, self.params)
        if self.observers is not None and self.observers.capture is not None:
            self.observers.capture.session_started(self.id, self.database, self.user, self.application_name,
                                                   time.time())
        self.app.session_ready(self)

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
            self.to_client(pq.error_response(code, message, severity="FATAL"))
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

    def _relay_client(self, frames: list, data: bytes, start: int = 0) -> None:
        try:
            self.client_frames(frames, data, start)
        except pq.MALFORMED as e:
            self._malformed(e)

    def _malformed(self, e: Exception) -> None:
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

    # -- authentication by pgfront itself ([auth] mode = userlist | query) ---------------------------
    async def _local_auth_start(self) -> None:
        from proxy.auth import AuthFailed
        from proxy.relay.handshake import ClientAuth

        try:
            secret = await self.app.credentials.lookup(self.user)
        except Exception as e:  # noqa: BLE001 - any failure of the credential source refuses the login
            log.warning("auth lookup failed", extra={"client": self.id, "user": self.user, "reason": str(e)})
            self.fatal("08006", "pgfront could not look up the credentials for this role")
            return
        if self.phase is not LOCAL_AUTH:
            return
        self.auth = ClientAuth(self.user, secret, self.app.cfg.auth.method == "trust")
        try:
            first = self.auth.start()
        except AuthFailed as e:
            self.fatal("28000", str(e))
            return
        if self.auth.done:
            self._local_auth_ok()
        else:
            self.to_client(first)

    def local_auth_frames(self, frames: list, data: bytes) -> None:
        from proxy.auth import AuthFailed

        for t, a, b in frames:
            if t != b"p"[0]:
                self.fatal("08P01", f"expected a password message, got message type {t}")
                return
            try:
                reply = self.auth.receive(data[a + 5:b])
            except (AuthFailed, ValueError) as e:
                log.info("client authentication failed", extra={"client": self.id, "user": self.user,
                                                                "reason": str(e)})
                self.fatal("28P01", f'password authentication failed for user "{self.user}"')
                return
            if reply:
                self.to_client(reply)
            if self.auth.done:
                self._local_auth_ok()
                return

    def _local_auth_ok(self) -> None:
        from proxy.auth import UpstreamLogin

        auth, self.auth = self.auth, None
        self.to_client(pq.AUTH_OK)
        self.phase = CONNECTING
        if self.app.pools is not None and not self.admin_db:
            if auth.client_key is not None:
                self.app.pools.client_keys[self.user] = auth.client_key
            self._task(self._pooled_start())
            return
        self.upstream_login = UpstreamLogin(self.user, auth.secret, auth.client_key)
        self._task(self._connect(self.upstream_params))

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
        if self.phase is CLOSED:
            link.transport.close()
            return
        self.server = link
        app.stats_inc("server_connections_opened")
        self.phase = AUTH
        link.transport.write(pq.startup_message(params))
        if self.startup_buf:
            data, self.startup_buf = self.startup_buf, b""
            self.resume_client_reading("startup")
            self._client_bytes(data)

    def fill_reply(self, fill: object, ttl: float | None) -> None:
        asyncio.ensure_future(self.app.cache.fill(fill, ttl))

    def server_lost(self, exc: Exception | None) -> None:
        if self.phase is CLOSED:
            return
        self.app.stats_inc("server_connections_closed")
        if self.phase is ADMIN:
            return  # the upstream link only served to authenticate the admin user
        if self.on_replica is not None and self._replica_failed():
            return
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
                self.to_client(b"".join(out))
                self.close()
                return b""
            elif t == _R and self.upstream_login is not None:
                reply = self._upstream_login(raw)
                if reply:
                    self.server.transport.write(reply)
                if self.phase is CLOSED:
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
                if self.admin_db:
                    self.phase = ADMIN
                    self.console = self.app.open_console(self)
                    self.server.transport.write(pq.TERMINATE)
                    self.server.transport.close()
                    return b"".join(out)
                self._now_ready()
                # anything after the first ReadyForQuery is relayed normally
                rest = [f for f in frames if f[1] >= b]
                if rest:
                    out.append(self.server_frames(rest, data))
                return b"".join(out)
            out.append(raw)
        return b"".join(out)

    # -- what the registry of clients may read (admin console, metrics, housekeeping, shutdown) ---------
    @property
    def ready(self) -> bool:
        return self.phase is READY

    @property
    def busy(self) -> bool:
        """Inside a transaction, or awaiting replies: not to be interrupted."""
        return bool(self.expect) or self.tx_status != pq.IDLE

    @property
    def has_server(self) -> bool:
        return self.server is not None and self.phase is READY

    @property
    def on_console(self) -> bool:
        return self.phase is ADMIN

    @property
    def pool_key(self) -> tuple[str, str] | None:
        return (self.pool.database, self.pool.user) if self.pool is not None else None

    def cancel_target(self) -> ServerLink | None:
        """Only while replies are awaited: a late cancel must not land on the next query."""
        link = self.server
        return link if link is not None and self.expect and link.pid else None

    def idle_for(self, now: float) -> float:
        """Seconds since the client last sent anything, while it is ready and not busy (else 0)."""
        return now - self.last_active if self.phase is READY and not self.busy else 0.0

    # -- introspection (SHOW CLIENTS) ------------------------------------------------------------------
    def describe(self) -> dict[str, object]:
        return {
            "id": self.id, "user": self.user, "database": self.database, "application_name": self.application_name,
            "peer": self.peer, "state": self.phase.name.lower(), "tx": self.tx_status.decode(), "queries": self.queries,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "backend_pid": self.backend_pid,
            "connected_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.connected_at)),
            "pending": len(self.expect),
            "server_state": "active" if self.expect else ("idle in transaction" if self.tx_status != pq.IDLE
                                                          else "idle"),
        }
