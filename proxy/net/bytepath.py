"""The client connection's byte path: bytes from the client and from the server, in and out, compiled
with the relay core (bytepath.pxd) so that a relayed query crosses no interpreted frame of the shell.
It reads the session's phase to route each read; startup, authentication, pooling and the cache waits
are the shell's (`proxy.net.client` and its mixins), reached through the same object.
"""

from __future__ import annotations

import asyncio

from proxy.relay.hothits import HotHits
from proxy.relay.records import ADMIN, AUTH, CONNECTING, LOCAL_AUTH, READY, STARTUP, TLS
from proxy.wire import protocol as pq
from proxy.wire.framer import FrameError

_ASYNC = b"NSA"  # NoticeResponse, ParameterStatus, NotificationResponse
_PREAMBLE = b"12tTn"  # ParseComplete, BindComplete, ParameterDescription, RowDescription, NoData
_HIGH_WATER = 512 * 1024  # client bytes kept while a look-up or a login is under way, before pausing


_NOTICES, _REPLY, _CONFLICT = 0, 1, 2


def replica_reply(out: bytes) -> int:
    """What a replica's relayed bytes hold: _NOTICES (nothing but messages a server may send at any time,
    like the WARNING a shutting-down server sends before its FATAL), _CONFLICT (an ERROR saying recovery
    cancelled the statement, 40001, before any row: after a ParseComplete, BindComplete or description at
    most), or _REPLY (a reply the client now saw)."""
    at, end = 0, len(out)
    described = False
    while at < end:
        t = out[at]
        size = int.from_bytes(out[at + 1:at + 5], "big")
        if t == 69:  # ErrorResponse: a standby cancels a read that conflicts with replay with 40001
            return _CONFLICT if out.find(b"C40001\x00", at, at + 1 + size) > 0 else _REPLY
        if t in _PREAMBLE:
            described = True
        elif t not in _ASYNC:
            return _REPLY
        at += 1 + size
    return _REPLY if described else _NOTICES


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
            self._without_server(data)  # transaction pooling, nothing lent right now
            return
        if self.on_replica is not None and phase is READY and self._hold_for_primary(data):
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
