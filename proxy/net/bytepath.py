"""The client connection's byte path: bytes from the client and from the server, in and out, compiled
with the relay core (bytepath.pxd) so that a relayed query crosses no interpreted frame of the shell.
It reads the session's phase to route each read; startup, authentication, pooling and the cache waits
are the shell's (`proxy.net.client` and its mixins), reached through the same object.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from proxy.relay.hothits import HotHits
from proxy.relay.pooling import settings_query
from proxy.relay.records import ADMIN, AUTH, CONNECTING, LOCAL_AUTH, READY, STARTUP, TLS
from proxy.replicas.outcomes import MARK, WAIT
from proxy.wire import protocol as pq
from proxy.wire.framer import FrameError

if TYPE_CHECKING:
    from proxy.net.serverlink import ServerLink

_HIGH_WATER = 512 * 1024  # client bytes kept while a look-up or a login is under way, before pausing


_NOTICES, _REPLY, _CONFLICT = 0, 1, 2


def replica_reply(out: bytes) -> int:
    """What a replica's relayed bytes hold: _NOTICES (nothing but messages a server may send at any time,
    like the WARNING a shutting-down server sends before its FATAL), _CONFLICT (an ERROR saying recovery
    cancelled the statement, 40001, before any row: after a ParseComplete, BindComplete or description at
    most), or _REPLY (a reply the client now saw). Once per routed transaction's reply: compiled, the
    message headers are read in C from the bytes (bytepath.pxd)."""
    if not isinstance(out, bytes):
        out = bytes(out)  # relayed from a bytearray buffer: rare (a reply split across reads)
    p = out
    end = len(out)
    at = 0
    described = False
    while at + 5 <= end:
        t = p[at]
        size = (p[at + 1] << 24) | (p[at + 2] << 16) | (p[at + 3] << 8) | p[at + 4]
        if t == 69:  # ErrorResponse: a standby cancels a read that conflicts with replay with 40001
            return _CONFLICT if out.find(b"C40001\x00", at, at + 1 + size) > 0 else _REPLY
        if t == 49 or t == 50 or t == 116 or t == 84 or t == 110:  # 1 2 t T n: a reply's preamble
            described = True
        elif t != 78 and t != 83 and t != 65:  # N S A: what a server may send at any time
            return _REPLY
        at += 1 + size
    return _REPLY if described else _NOTICES


def _maybe_route_setting(data: bytes) -> bool:
    """A Query whose text starts with SET or RESET: perhaps pgfront's own `SET pgfront.route`, which the
    slow path (`PooledClient._without_server`) answers without a server."""
    p = data
    n = len(data) - 1
    i = 5
    while i < n and (p[i] == 32 or 9 <= p[i] <= 13):
        i += 1
    if i < n and p[i] | 32 == 114:  # r
        i += 2
    return i + 3 < n and p[i] | 32 == 115 and p[i + 1] | 32 == 101 and p[i + 2] | 32 == 116  # s e t


class BytePath(HotHits):
    """The hot half of a ClientConnection: its transport, byte counts and what waits for the cache."""

    def __init__(self, app: object) -> None:
        super().__init__(app)
        self.transport: asyncio.Transport | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.client_suspended = False  # a cache look-up holds the client's stream (client_backlog)
        self.client_backlog = b""
        self.server_paused = False  # an invalidation holds the server's stream (server_backlog)
        self.server_backlog = b""
        self.on_replica = None  # the replicas.health.Replica whose connection is lent now, if any
        # transaction pooling: what waits for a server connection
        self.held = b""  # client bytes waiting for a server connection
        self.acquiring = False
        self.session_home = False  # session pooling with replicas: routed per transaction, primary kept
        self.home = None  # that primary connection (a ServerLink), between transactions
        # read routing (with [[replica]]s), besides what the choice reads (`Conversation`)
        self.ryw_mark = None  # (key, field, mark): a write marked in Redis (replicas.marks)
        self.replica_held = b""  # bytes that came while a replica was lent and must not go to it
        self.route_sent = None  # list[bytes]: the client's bytes since a replica was lent
        self.route_lent = None  # the bytes a replica was lent for, until relayed
        self.route_pools: dict = {}  # replica -> this client's pool on it (`_route_pool`)

    # -- client bytes ---------------------------------------------------------------------------
    def _client_bytes(self, data: bytes) -> None:
        """Bytes of the client's replayed after a wait: counted once, on arrival, so data_received's
        count is taken back (one call less on the hot path than a shared helper would cost)."""
        self.bytes_in -= len(data)
        self.data_received(data)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
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
        if phase is READY and self.server is None and self.pool is not None:
            # transaction pooling, nothing lent right now: one whole Query (that is not pgfront's own SET)
            # needs a server, anything else may be answered without one (`_without_server`)
            if (not self.held and not self.acquiring and self.cframer.single(data) is not None
                    and data[0] == 81 and (self.app.router is None or not _maybe_route_setting(data))):
                self._wait_for_server(data)
            else:
                self._without_server(data)
            return
        if self.on_replica is not None and phase is READY:
            if data is self.route_lent and not self.replica_held and not self.cframer._buf:
                # the very bytes the replica was chosen for (the choice read them, a rule's route included)
                self.route_lent = None
                if self.route_sent is not None:
                    self.route_sent.append(data)  # kept until it goes back: a retry sends them again
            elif self._hold_for_primary(data):
                return  # not all reads: they wait for the replica to go back, then are routed afresh
        if phase is READY or phase is ADMIN or phase is AUTH or phase is LOCAL_AUTH:
            framer = self.cframer
            frames = framer.single(data) if data[:1] == b"Q" else None  # one whole Query: the most common read
            if frames is None:
                try:
                    frames = framer.feed(data)
                except FrameError as e:
                    self.fatal(e.code, str(e))
                    return
            if phase is READY:
                if self.pool is not None and self.server.state.reapply:
                    self._reapply_settings()
                try:
                    self.client_frames(frames, framer.data)
                except pq.MALFORMED as e:
                    self._malformed(e)
            elif phase is ADMIN:
                self.console.feed(frames, framer.data)
            elif phase is LOCAL_AUTH:
                self.local_auth_frames(frames, framer.data)
            else:
                self.auth_client_frames(frames, framer.data)
        elif phase is STARTUP:
            self.startup_buf += data
            self._startup()
        elif phase is CONNECTING or phase is TLS:
            self.startup_buf += data  # keep it in order until the connection is ready for it
            if len(self.startup_buf) > _HIGH_WATER:
                self.pause_client_reading("startup")  # a client pipelining ahead of its login: wait

    def _wait_for_server(self, data: bytes) -> None:
        """Transaction mode, no server lent: the upstream for the transaction waiting in `data` (the
        router's choice, with replicas), and a connection of its pool, at once if one is idle; else the
        bytes are held until one is (`PooledClient._acquire_for_held`)."""
        if not self.held and data[:1] == b"X":
            self.close()  # a Terminate needs no server
            return
        route = None
        if not self.held and not self.acquiring:
            router = self.app.router
            if router is not None and self.pooled_tx:
                route = router.choose_for(self, data)
            if route is WAIT or route is MARK:
                link = None  # Redis, or a replica's replay, first
            elif route is None:
                link = (self.home is not None and self._home_link()) or self.pool.lend_idle()
            else:
                link = self._pool_on(route).lend_idle()
            if link is not None:  # no wait: carry straight on with this chunk
                self._attach(link, route, data)
                self._client_bytes(data)
                return
        self.held += data
        if not self.acquiring:
            self.acquiring = True
            self.pause_client_reading("pool-wait")
            self._task(self._acquire_for_held(route))

    # -- transaction pooling: lending a server connection for a transaction, and giving it back -------
    def _attach(self, link: ServerLink, replica: object = None, lent: bytes | None = None) -> None:
        """The connection `link` is this client's for now (of `replica`'s pool, if not None). `lent`: with
        a replica, the bytes it was chosen for, about to be relayed (`PooledClient._hold_for_primary`)."""
        link.holder = self
        self.server = link
        self.on_replica = replica
        if replica is not None:  # what it is sent is kept (`_hold_for_primary`), to go elsewhere if it fails
            self.route_sent = []
            self.route_lent = lent
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

    def _maybe_release(self) -> None:
        """Transaction mode: hand the server back once nothing is open on it."""
        if (self.pooled_tx and not self.pinned and not self.expect and self.tx_status == pq.IDLE
                and not self.in_batch and not self.skip_until_sync and not self.server_in_copy and not self.held
                and (not self.client_suspended or self.admission_wait)):
            # a cache look-up's miss goes on to this very server; a statement waiting for its rule's
            # admission can borrow another (`_admit_then_resume`), so it need not hold one meanwhile
            link, self.server = self.server, None
            if self.session_home and self.on_replica is None:
                link.holder = None  # kept for this client; meanwhile a FATAL closes it, as when idle
                self.home = link
            else:
                (link.owner or self.pool).give_back(link)  # its own pool: the primary's, or a replica's
            if self.on_replica is not None:
                self.on_replica = None
                self.route_sent = None
                if self.replica_held:  # what the client sent meanwhile that a replica must not see
                    data, self.replica_held = self.replica_held, b""
                    self.resume_client_reading("replica")
                    self._wait_for_server(data)
            elif self.route_wrote:  # read-your-writes: this client's reads wait for its write's replay
                self.route_wrote = False
                self.ryw_since = time.monotonic()
                self.ryw_lsn = 0
                if self.ryw_mark is not None:  # and those of its scope's other sessions (Redis)
                    self._settle_mark()

    def _route_pool(self, replica: object) -> object:
        """This client's pool on `replica` (pools live as long as the worker: remembered per client)."""
        return self._pool_on(replica)

    def _pool_on(self, replica: object) -> object:
        """`_route_pool`, the byte path's C call."""
        pool = self.route_pools.get(replica)
        if pool is None:
            pool = self.route_pools[replica] = self.app.pools.pool(self.database, self.user, replica)
        return pool

    def to_client(self, data: bytes) -> None:
        self.transport.write(data)

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
        if self.phase is READY:
            out = self.server_frames(frames, framer.data)
            if self.on_replica is not None:
                if self.server_fatal and self._replica_failed():
                    return  # the replica shut down or crashed before the client saw its reply: taken up elsewhere
                if out and self.route_sent is not None:
                    seen = replica_reply(out)
                    if seen == _CONFLICT and self._replica_failed(False):
                        return  # recovery cancelled the read before it answered: the primary answers instead
                    if seen != _NOTICES:
                        self.route_sent = None  # the client saw part of the replica's reply: a retry would repeat it
        elif self.phase is AUTH:
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
        if not self.app.accepting and not self.expect and self.tx_status == pq.IDLE and self.phase is READY:
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
        transport = self.transport
        if out and transport and not transport.is_closing():
            transport.write(out)  # to_client, inlined: once per server read
        if self.finished:
            self._account()
        if self.server_suspend is not None:
            self._suspend_server()
            return True
        return False
