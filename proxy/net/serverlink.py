"""One upstream server connection: the transport shell around its `ServerState`.

While a client holds it, every byte goes to the holder (`holder.server_data`), which tracks the
messages and reports what the connection carries to `link.state`. A pooled connection also lives on
its own: it logs itself in (answering the upstream's authentication with what pgfront knows of the
role), runs its reset between clients, and waits idle in its pool, where a FATAL or a closed socket
removes it.

Reading pauses for several reasons at once (the client is slow to read; the cache is invalidating
before a commit reaches the client), each kept on its own, so that lifting one never lifts
another, and a connection handed back to the pool drops the pauses of the client that held it.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import TYPE_CHECKING, Protocol

from proxy.log import log
from proxy.relay.serverstate import ServerState
from proxy.wire import protocol as pq
from proxy.wire.framer import Framer

if TYPE_CHECKING:
    from proxy.auth import UpstreamLogin

HIGH_WATER = 512 * 1024
_R, _S, _K, _E, _Z, _C = b"RSKEZC"


class LinkHolder(Protocol):
    """Who reads the connection while it is lent: the client conversation."""

    def server_data(self, data: bytes) -> None: ...

    def server_lost(self, exc: Exception | None) -> None: ...

    def pause_client_reading(self, why: str) -> None: ...

    def resume_client_reading(self, why: str) -> None: ...


class LinkOwner(Protocol):
    """Who the connection goes back to on its own: its pool."""

    def link_closed(self, link: ServerLink) -> None: ...

    def reset_done(self, link: ServerLink, ok: bool) -> None: ...


class UpstreamRefused(ConnectionError):
    """The upstream refused the login: carries its SQLSTATE for the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class ServerLink(asyncio.Protocol):
    # slots: the pool and the byte path read its attributes at every transaction, and a slot reads the
    # same, fast, for every connection (an instance dict can stop sharing its keys with the others)
    __slots__ = ("holder", "owner", "transport", "framer", "state", "pid", "secret", "params", "created", "logged_in",
                 "last_used", "login", "ready", "resets", "reset_full", "reset_discarded", "cancels", "paused", "closed")

    def __init__(self, holder: LinkHolder | None = None, owner: LinkOwner | None = None) -> None:
        self.holder = holder
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.framer = Framer(1 << 62, stream_types=b"Dd")
        self.state = ServerState()
        self.pid = 0
        self.secret = b""
        self.params: dict[str, str] = {}  # ParameterStatus at login
        self.created = time.monotonic()
        self.logged_in = float("inf")  # when its login's ReadyForQuery arrived (pooled connections)
        self.last_used = self.created
        self.login: UpstreamLogin | None = None
        self.ready: asyncio.Future | None = None
        self.resets = 0  # ReadyForQuery still owed to the reset queries pgfront sent
        self.reset_full = False  # the reset includes the configured reset query
        self.reset_discarded = False  # ...and it answered DISCARD ALL
        self.cancels = 0  # cancel requests in flight: never hand it to another client meanwhile
        self.paused: set[str] = set()  # why reading is paused: one flag per reason, lifted separately
        self.closed = False

    # -- asyncio.Protocol -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.set_write_buffer_limits(high=HIGH_WATER)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        holder = self.holder
        if holder is not None:
            holder.server_data(data)
        else:
            self._own_data(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError("the upstream closed the connection during login"))
        holder, self.holder = self.holder, None
        if self.owner is not None:
            self.owner.link_closed(self)
        if holder is not None:
            holder.server_lost(exc)

    def pause_writing(self) -> None:
        if self.holder is not None:
            self.holder.pause_client_reading("server-write")

    def resume_writing(self) -> None:
        if self.holder is not None:
            self.holder.resume_client_reading("server-write")

    # -- reading, paused for counted reasons --------------------------------------------------------
    def pause(self, why: str) -> None:
        if not self.paused and self.transport is not None:
            self.transport.pause_reading()
        self.paused.add(why)

    def resume(self, why: str) -> None:
        self.paused.discard(why)
        if not self.paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def resume_all(self) -> None:
        """The holder is gone: its reasons to pause went with it."""
        if self.paused:
            self.paused.clear()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    # -- on its own: login, reset, idle --------------------------------------------------------------
    def start_login(self, params: dict[str, str], login: UpstreamLogin) -> asyncio.Future:
        self.login = login
        self.ready = asyncio.get_running_loop().create_future()
        self.transport.write(pq.startup_message(params))
        return self.ready

    def reset(self, queries: list[str], full: bool) -> None:
        """Run these queries one by one (ROLLBACK, and the reset query when `full`); the owner hears
        how it went."""
        self.holder = None
        self.resets = len(queries)
        self.reset_full = full
        self.reset_discarded = False
        self.write(b"".join(pq.query(q) for q in queries))

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
        state = self.state
        for t, a, b in frames:
            if t == _R and self.login is not None:
                try:
                    reply = self.login.answer(buf[a + 5:b])
                except Exception as e:  # noqa: BLE001 - any login failure fails this connection
                    self._fail(ConnectionError(str(e)))
                    return
                if reply:
                    self.write(reply)
            elif t == _S:
                name, value = pq.parse_parameter_status(buf[a + 5:b])
                if self.ready is not None and not self.ready.done():
                    self.params[name] = value
            elif t == _K:
                (self.pid,) = struct.unpack_from("!i", buf, a + 5)
                self.secret = buf[a + 9:b]
            elif t == _E:
                fields = pq.parse_fields(buf[a + 5:b])
                if self.ready is not None and not self.ready.done():
                    self._fail(UpstreamRefused(fields.get("C", "08006"), fields.get("M", "login refused")))
                    return
                if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
                    log.info("pooled server connection closed by the server", extra={"reason": fields.get("M")})
                    state.fatal = True
                    self.close()
                    return
                state.broken = True  # a failed reset, or an error nobody asked for: not for a client
            elif t == _C:
                tag = buf[a + 5:b - 1]
                state.command_tag(tag)
                if self.resets and tag.startswith(b"DISCARD ALL"):
                    self.reset_discarded = True
            elif t == _Z:
                state.ready(buf[a + 5:b])
                if self.ready is not None and not self.ready.done():
                    self.login = None
                    self.logged_in = time.monotonic()
                    self.ready.set_result(self)
                elif self.resets:
                    self.resets -= 1
                    if not self.resets:
                        if not state.broken:
                            state.reset_done(self.reset_full, self.reset_discarded)
                        if self.owner is not None:
                            self.owner.reset_done(self, not state.broken)

    def _fail(self, error: Exception) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(error)
        self.close()
