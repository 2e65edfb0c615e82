"""A lean Redis connection for the per-commit paths: one pipelined RESP2 connection parsed by hiredis.

redis-py's asyncio client spends ~160 µs of CPU per command (pool, retry wrapper, event dispatch,
observability hooks, StreamReader, wait_for); this spends ~30 µs. Every commit pays one bump, and every
process pays one pub/sub message per commit anywhere, so both use this when the URL is a plain
`redis://host:port/db` (optionally with user and password). TLS, unix sockets, cluster and URL options
keep redis-py (`lean_params` returns None for them).

Replies are matched to commands in order. A command that misses its deadline aborts the connection:
its reply may still arrive and would be taken for the next command's. Every waiting command then fails
with ConnectionError, and the caller opens a new connection (`closed` is set).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis.asyncio.connection import parse_url

_LEAN_KEYS = {"host", "port", "db", "username", "password"}


def lean_params(url: str) -> dict[str, Any] | None:
    """host, port, db, username, password of a plain redis:// URL; None when anything else is asked for."""
    if not url.startswith("redis://"):
        return None
    try:
        params = parse_url(url)
    except ValueError:
        return None
    if not set(params) <= _LEAN_KEYS:
        return None
    return params


def _pack(args: tuple[Any, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(parts)


class RespConnection(asyncio.Protocol):
    """Commands in, replies out, in order. `on_push` receives replies nobody waits for (pub/sub messages)."""

    def __init__(self, on_push: Callable[[Any], None] | None = None) -> None:
        self._reader = hiredis.Reader()
        self._waiting: deque[tuple[asyncio.Future, asyncio.TimerHandle]] = deque()
        self._transport: asyncio.Transport | None = None
        self._on_push = on_push
        self.closed = False
        self.lost: asyncio.Future = asyncio.get_running_loop().create_future()  # set when the connection ends

    @classmethod
    async def open(cls, params: dict[str, Any], timeout: float,
                   on_push: Callable[[Any], None] | None = None) -> RespConnection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):  # once per connection: the context manager's cost is fine here
            _, conn = await loop.create_connection(lambda: cls(on_push), params.get("host", "localhost"),
                                                   params.get("port", 6379))
        try:
            if params.get("password") is not None:
                user = [params["username"]] if params.get("username") else []
                await conn.call(timeout, "AUTH", *user, params["password"])
            if params.get("db"):
                await conn.call(timeout, "SELECT", params["db"])
        except BaseException:
            conn.close()
            raise
        return conn

    def call(self, timeout: float, *args: Any) -> asyncio.Future:
        """Send one command; the future gets its reply (or ReplyError / ConnectionError / TimeoutError)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self.closed or self._transport is None:
            fut.set_exception(ConnectionError("redis connection closed"))
            return fut
        self._transport.write(_pack(args))
        # a timer handle instead of asyncio.timeout()/wait_for: no Task, no context manager per command
        self._waiting.append((fut, loop.call_later(timeout, self._expire, fut)))
        return fut

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()
        self._fail(ConnectionError("redis connection closed"))

    # -- asyncio.Protocol ------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not False:
                if self._waiting:
                    fut, timer = self._waiting.popleft()
                    timer.cancel()
                    if fut.done():
                        continue
                    if isinstance(reply, hiredis.ReplyError):
                        fut.set_exception(reply)
                    else:
                        fut.set_result(reply)
                elif self._on_push is not None:
                    self._on_push(reply)
        except hiredis.ProtocolError as e:
            self._fail(ConnectionError(f"redis protocol error: {e}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"redis connection lost: {exc}" if exc else "redis connection lost"))

    # -- internals -------------------------------------------------------------------------------------
    def _expire(self, fut: asyncio.Future) -> None:
        if fut.done():
            return
        fut.set_exception(TimeoutError("redis command timed out"))
        self.close()  # a late reply would be taken for the next command's: this connection is done

    def _fail(self, error: BaseException) -> None:
        self.closed = True
        waiting, self._waiting = self._waiting, deque()
        for fut, timer in waiting:
            timer.cancel()
            if not fut.done():
                fut.set_exception(error)
        if not self.lost.done():
            self.lost.set_result(None)
