"""The start of a client connection: SSLRequest and GSSENCRequest (answered 'S' with TLS configured,
else 'N'), CancelRequest, protocol version negotiation, the StartupMessage, and the choice between
pgfront's own authentication and the upstream's. A mixin of `ClientConnection`, whose state it uses.
"""

from __future__ import annotations

import asyncio
import ssl

from proxy.log import log
from proxy.relay.records import CLOSED, CONNECTING, LOCAL_AUTH, STARTUP, TLS
from proxy.relay.startup import Cancel, Encrypt, Startup, next_request
from proxy.upstream import send_cancel


class StartupSteps:
    """Startup steps of a ClientConnection (see `proxy.net.client`)."""

    def _startup(self) -> None:
        """Act on the client's startup-phase requests (read sans I/O by `proxy.relay.startup`)."""
        while self.phase is STARTUP:
            request, self.startup_buf = next_request(self.startup_buf, self.app.tls_server is not None
                                                     and not self.tls)
            if request is None:
                return
            if isinstance(request, Encrypt):
                if request.tls:
                    self.to_client(b"S")
                    self.phase = TLS
                    self._task(self._start_tls())
                    return
                self.to_client(b"N")
            elif isinstance(request, Startup):
                if request.negotiate:
                    self.to_client(request.negotiate)
                self._begin(request.params)
                return
            elif isinstance(request, Cancel):
                self._cancel_request(request)
                return
            else:
                if request.code:
                    self.fatal(request.code, request.message)
                else:
                    self.close()
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

    def _cancel_request(self, request: Cancel) -> None:
        self.app.stats_inc("cancel_requests")
        if self.app.pools is not None:
            self.app.route_cancel(request.pid, request.secret)  # our own key: find the client, then its server
        else:
            # pass-through: the client holds the upstream backend's own key; any worker can deliver it
            asyncio.ensure_future(send_cancel(self.app.upstream, request.pid, request.secret))
        self.close()

    def _begin(self, params: dict[str, str]) -> None:
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
        self.admin_db = admin
        self.upstream_params = upstream_params
        if self.app.credentials is not None:
            self.phase = LOCAL_AUTH
            self._task(self._local_auth_start())
            return
        self.phase = CONNECTING
        self._task(self._connect(upstream_params))
