"""The start of a client connection: SSLRequest and GSSENCRequest (answered 'S' with TLS configured,
else 'N'), CancelRequest, protocol version negotiation, the StartupMessage, and the choice between
pgfront's own authentication and the upstream's. A mixin of `ClientConnection`, whose state it uses.
"""

from __future__ import annotations

import asyncio
import ssl
import struct

from proxy.log import log
from proxy.relay.records import CLOSED, CONNECTING, LOCAL_AUTH, STARTUP, TLS
from proxy.upstream import send_cancel
from proxy.wire import protocol as pq
from proxy.wire.framer import FrameError, read_startup


class StartupSteps:
    """Startup steps of a ClientConnection (see `proxy.net.client`)."""

    def _startup(self) -> None:
        while self.phase is STARTUP:
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
                    self.to_client(b"S")
                    self.phase = TLS
                    self._task(self._start_tls())
                    return
                self.to_client(b"N")
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
        if transport is None or self.phase is CLOSED:
            return
        self.transport = transport
        self.tls = True
        self.phase = STARTUP
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
            self.to_client(pq.negotiate_protocol_version(0, unsupported))
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
            self.phase = LOCAL_AUTH
            self._task(self._local_auth_start())
            return
        self.phase = CONNECTING
        self._task(self._connect(upstream_params))
