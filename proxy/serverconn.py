"""One upstream server connection.

While a session holds it, every byte goes to that session (`session.server_data`). A pooled
connection also lives on its own: it logs itself in (pgfront answers the upstream's authentication
with what it knows of the role), runs its reset query between clients, and waits idle in its pool,
where a FATAL or a closed socket removes it.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import TYPE_CHECKING

from proxy.log import log
from proxy.wire import protocol as pq
from proxy.wire.framer import Framer

if TYPE_CHECKING:
    from proxy.auth import UpstreamLogin
    from proxy.pool import Pool
    from proxy.session import Session

HIGH_WATER = 512 * 1024
_R, _S, _K, _E, _Z = b"RSKEZ"


class ServerLink(asyncio.Protocol):
    def __init__(self, session: Session | None = None, pool: Pool | None = None) -> None:
        self.session = session
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.framer = Framer(1 << 62, stream_types=b"Dd")
        self.pid = 0
        self.secret = b""
        self.params: dict[str, str] = {}
        self.applied: dict[str, str] = {}  # settings pgfront SET on it for its current clients
        self.prepared: set[str] = set()  # server-side names of statements prepared on it
        self.tx_status = pq.IDLE
        self.created = time.monotonic()
        self.last_used = self.created
        self.login: UpstreamLogin | None = None
        self.ready: asyncio.Future | None = None
        self.resetting = False
        self.cancels = 0  # cancel requests in flight: never hand it to another client meanwhile
        self.closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        session = self.session
        if session is not None:
            session.server_data(data)
        else:
            self._own_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError("the upstream closed the connection during login"))
        if self.pool is not None:
            self.pool.discard(self)
        if self.session is not None:
            self.session.server_lost(exc)

    def pause_writing(self) -> None:
        if self.session is not None:
            self.session.pause_client_reading("server-write")

    def resume_writing(self) -> None:
        if self.session is not None:
            self.session.resume_client_reading("server-write")

    # -- on its own: login, reset, idle --------------------------------------------------------------
    def start_login(self, params: dict[str, str], login: UpstreamLogin) -> asyncio.Future:
        self.login = login
        self.ready = asyncio.get_running_loop().create_future()
        self.transport.write(pq.startup_message(params))
        return self.ready

    def reset(self, query: str) -> None:
        """Run the reset query, then go back to the pool once its ReadyForQuery arrives."""
        self.session = None
        if not query:
            self.pool.release(self)
            return
        self.resetting = True
        if any(w in query.upper() for w in ("DISCARD ALL", "DEALLOCATE")):
            self.prepared.clear()  # the reset drops every prepared statement
        self.applied.clear()
        self.write(pq.query(query))

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(pq.TERMINATE)
            self.transport.close()

    def _own_data(self, data: bytes) -> None:
        frames = self.framer.feed(data)
        buf = self.framer.data
        for t, a, b in frames:
            if t == _R and self.login is not None:
                try:
                    reply = self.login.answer(buf[a + 5:b])
                except Exception as e:  # noqa: BLE001 - any login failure fails this connection
                    self._fail(str(e))
                    return
                if reply:
                    self.write(reply)
            elif t == _S:
                name, value = pq.parse_parameter_status(buf[a + 5:b])
                self.params[name] = value
            elif t == _K:
                (self.pid,) = struct.unpack_from("!i", buf, a + 5)
                self.secret = buf[a + 9:b]
            elif t == _E:
                fields = pq.parse_fields(buf[a + 5:b])
                if self.ready is not None and not self.ready.done():
                    self._fail(fields.get("M", "login refused"))
                    return
                if fields.get("S") in ("FATAL", "PANIC"):
                    log.info("pooled server connection closed by the server", extra={"reason": fields.get("M")})
                    self.close()
                    return
                if self.resetting:  # a failed reset: this connection cannot be trusted with a client
                    self.close()
                    return
            elif t == _Z:
                self.tx_status = buf[a + 5:b]
                if self.ready is not None and not self.ready.done():
                    self.login = None
                    self.ready.set_result(self)
                elif self.resetting:
                    self.resetting = False
                    if self.tx_status == pq.IDLE:
                        self.pool.release(self)
                    else:
                        self.close()

    def _fail(self, reason: str) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))
        self.close()
