"""The client side of pooling: borrowing a server connection from the pool, carrying the client's
startup settings onto it, and giving it back (after each transaction in transaction mode, when the
client leaves in both modes). A mixin of `ClientConnection`, whose state it uses; the pool itself
(`proxy.pool`) decides whether a connection that comes back is clean enough to lend again.

In transaction mode a client with no server lent gets what needs none at once (a Parse of a
statement the pool prepared before, a Sync), and its other bytes wait, in order, for a connection.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from proxy.net.serverlink import UpstreamRefused
from proxy.relay.pooling import REPORTED, drops_statements, session_feature, settings_query, wanted_settings
from proxy.relay.records import _H, _P, _S, CLOSED, Stmt
from proxy.wire import protocol as pq
from proxy.wire.framer import FrameError

if TYPE_CHECKING:
    from proxy.net.serverlink import ServerLink


class PooledClient:
    """Pooling methods of a ClientConnection (see `proxy.net.client`)."""

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
            if self.phase is CLOSED:
                self.pool.give_back(link)
                return
            self._attach(link)
        out = [pq.parameter_status(k, v) for k, v in {**self.pool.params, **self._reported()}.items()]
        self.backend_pid, self.backend_secret = self.app.new_cancel_key(self)
        out.append(pq.backend_key_data(self.backend_pid, struct.unpack("!i", self.backend_secret)[0]))
        out.append(pq.ready_for_query(pq.IDLE))
        self.to_client(b"".join(out))
        if self.startup_timer:
            self.startup_timer.cancel()
            self.startup_timer = None
        self._now_ready()
        if self.server is not None:
            self._maybe_release()
        if self.startup_buf:
            data, self.startup_buf = self.startup_buf, b""
            self.resume_client_reading("startup")
            self._client_bytes(data)


    def _reported(self) -> dict[str, str]:
        """ParameterStatus values this client should see for the settings it asked for at startup."""
        return {k: v for k, v in self.wanted.items() if k.lower() in REPORTED}


    def _attach(self, link: ServerLink) -> None:
        link.holder = self
        self.server = link
        state = link.state
        self.tx_status = state.tx
        if self.client_slow:
            link.pause("client-read")
        # the connection carries the settings pgfront applied for its previous client: give it this
        # client's, and put back the defaults of those this client did not ask for
        state.reapply = False
        sql = settings_query(state.applied, link.params, self.wanted)
        if sql:
            link.write(self._swallowed_query(sql))

    def _reapply_settings(self) -> None:
        """The client's RESET or DISCARD ALL put the connection back at pgfront's login defaults; a
        direct connection would be back at the client's startup options: set those again."""
        link = self.server
        link.state.reapply = False
        sql = settings_query(link.state.applied, link.params, self.wanted)
        if sql:
            link.write(self._swallowed_query(sql))

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
                if session_feature(info) or drops_statements(sql):
                    break  # it pins the client or empties the registry: that needs its server
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
            self.to_client(b"".join(replies))
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
        if self.phase is CLOSED:
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
