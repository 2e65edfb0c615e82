"""The client side of pooling: borrowing a server connection from the pool, carrying the client's
startup settings onto it, and giving it back (after each transaction in transaction mode, when the
client leaves in both modes). A mixin of `ClientConnection`, whose state it uses; the pool itself
(`proxy.pool`) decides whether a connection that comes back is clean enough to lend again.

In transaction mode a client with no server lent gets what needs none at once (a Parse of a
statement the pool prepared before, a Sync), and its other bytes wait, in order, for a connection.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import TYPE_CHECKING

from proxy.log import log
from proxy.net.serverlink import UpstreamRefused
from proxy.relay.pooling import REPORTED, drops_statements, session_feature, settings_query, wanted_settings
from proxy.relay.records import _H, _P, _Q, _S, CLOSED, READY, Stmt
from proxy.replicas.routing import MARK, WAIT, route_reply, route_setting
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
        if not self.pooled_tx and self.app.router is not None:
            # session pooling with replicas: transactions are routed as in transaction pooling, and the
            # primary connection, once first needed, stays the client's for the session (`home`); any
            # session state pins the client to it (`_session_feature`)
            self.pooled_tx = self.session_home = True
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


    def _reapply_settings(self) -> None:
        """The client's RESET or DISCARD ALL put the connection back at pgfront's login defaults; a
        direct connection would be back at the client's startup options: set those again."""
        link = self.server
        link.state.reapply = False
        sql = settings_query(link.state.applied, link.params, self.wanted)
        if sql:
            link.write(self._swallowed_query(sql))

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
                self.stmt_epoch += 1  # the client's statements changed, as when the relay takes a Parse
                replies.append(pq.PARSE_COMPLETE)
            elif t == _Q and self.app.router is not None:
                value = route_setting(bytes(buf[a + 5:b - 1]).decode(pq.ENC, pq.ERRORS))
                if value is None:
                    break
                replies.append(route_reply(self, value))  # pgfront's own setting: no server needed
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


    async def _acquire_for_held(self, route: object = None) -> None:
        from proxy.pool import PoolTimeout

        router = self.app.router
        if route is WAIT:
            route = await router.pick_later(self)
        elif route is MARK:
            await router.mark_write(self)  # other sessions of its scope must know before it is acknowledged
            route = None
        while True:
            pool = self.pool if route is None else self._route_pool(route)
            try:
                link = (self._home_link() if route is None else None) or await pool.acquire()
            except (PoolTimeout, ConnectionError, OSError, TimeoutError) as e:
                if route is not None:  # the replica cannot take it: the primary can
                    log.info("replica unavailable, read goes to the primary",
                             extra={"client": self.id, "replica": route.target.name, "reason": str(e)})
                    router.retry_elsewhere(route)
                    router.replicas.suspect(route, str(e))
                    route = None
                    continue
                self.acquiring = False
                self._pool_failed(e)
                return
            if self.phase is CLOSED:
                pool.give_back(link)
                self.acquiring = False
                return
            if route is not None and not router.still_read_only(self, self.held, continuing=False):
                pool.give_back(link)  # more arrived meanwhile, and it is not all reads
                route = None
                continue
            break
        self.acquiring = False
        data, self.held = self.held, b""
        self._attach(link, route, data)
        self.resume_client_reading("pool-wait")
        self._client_bytes(data)

    def _home_link(self) -> ServerLink | None:
        """Session pooling with replicas: the client's own primary connection, if it keeps one and it did not
        close while kept (the pool then lends another: nothing but the startup settings lived on it, as
        the client is not pinned)."""
        link, self.home = self.home, None
        if link is None or link.usable:
            return link
        self.pool.give_back(link)  # the pool forgets a closed one
        return None

    def _replica_failed(self, lost: bool = True) -> bool:
        """The replica lent went away (its connection lost, or a FATAL: shut down, crashed), or, not
        `lost`, cancelled the read for a conflict with its replay, before any of its reply reached the
        client: the client's bytes since it was lent are routed afresh (to the primary, or another
        replica), as if nothing had happened. False when the client already saw part of the reply
        (`route_sent` is then None: it gets the error, as from any server)."""
        replica, sent = self.on_replica, self.route_sent
        if (sent is None or self.client_suspended
                or self.server_paused or self.cframer._skip or self.phase is not READY):
            return False
        if lost:
            log.info("replica lost mid-read, the read goes elsewhere", extra={"client": self.id,
                                                                              "replica": replica.target.name})
            self.app.router.replicas.suspect(replica, "a client's connection to it failed")
        else:  # the replica is fine; this read is not for it (the connection is closed: it owes a reply)
            log.info("a replica cancelled a read for a conflict with recovery, the primary answers it",
                     extra={"client": self.id, "replica": replica.target.name})
            self.route_retry_primary = True  # another replica could cancel it too
        self.app.router.retry_elsewhere(replica)
        for p in (*self.expect, *self.finished):
            if p.fill is not None:
                self.app.cache.abandon(p.fill)
                p.fill = None
            if p.permit is not None:
                p.permit.release()
                p.permit = None
        self.expect.clear()
        self.finished.clear()
        self.special = 0
        self.in_batch = self.skip_until_sync = self.server_fatal = self.restore_at_sync = False
        self.server_in_copy = self.copy_failed = False
        self.copies_started = self.copy_ends_sent = 0
        self.tx_status = pq.IDLE
        link, self.server = self.server, None
        self.on_replica = None
        self.route_sent = None
        if link is not None and link.holder is self:
            link.holder = None
            link.close()
        self.cframer.take_partial()  # its bytes are in `sent` too
        data = b"".join(sent) + self.replica_held
        self.replica_held = b""
        self.resume_client_reading("replica")
        self._wait_for_server(data)
        return True

    def _hold_for_primary(self, data: bytes) -> bool:
        """Bytes that arrive while a replica is lent, outside a transaction: those that are not all
        complete reads wait until the replica goes back, and then are routed afresh. True if held. (The
        bytes the replica was just lent for, whole, never come here: `BytePath.data_received`.)"""
        framer = self.cframer
        self.route_lent = None  # those bytes, if these are they, come after others held or partial: asked again
        if not framer._skip and (self.replica_held or (
                self.tx_status == pq.IDLE and not self.app.router.still_read_only(self, bytes(framer._buf) + data))):
            if not self.replica_held and self.in_batch:
                # a batch left open (Parse, Describe, Flush) and then not a read: end it on the replica with a
                # Sync of ours (its named statements are prepared again wherever the rest goes)
                self._swallowed(_S)
                self.in_batch = False
                self.to_server(pq.SYNC)
            self.replica_held += data
            self.pause_client_reading("replica")
            return True
        if self.route_sent is not None:
            self.route_sent.append(data)  # kept until the replica goes back: a retry sends it again
        return False


    def _pool_failed(self, e: Exception) -> None:
        """No server connection for this client: say why, with the upstream's own SQLSTATE if it refused."""
        from proxy.pool import PoolTimeout

        if isinstance(e, UpstreamRefused):
            self.fatal(e.code, str(e))
        else:
            self.fatal("53300" if isinstance(e, PoolTimeout) else "08006", f"pgfront: {e}")


    def _settle_mark(self) -> None:
        """The client's marked write is over (or the client is gone): not tied to the client, it must run."""
        mark, self.ryw_mark = self.ryw_mark, None
        asyncio.ensure_future(self.app.router.settle(mark, time.monotonic()))

    def _leave_pool(self) -> None:
        """The client is gone: the pool takes its server connection back (and resets or closes it)."""
        if self.ryw_mark is not None:  # a pinned session's, or a write cut short
            self._settle_mark()
        if self.home is not None:
            home, self.home = self.home, None
            self.pool.give_back(home)
        if self.server is None:
            return
        link, self.server = self.server, None
        pending = bool(self.expect) or self.server_in_copy or self.in_batch or self.server_paused
        if self.pinned:
            link.state.dirty.add("pinned")
        (link.owner or self.pool).give_back(link, pending=pending)
