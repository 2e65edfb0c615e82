"""One pipelined Redis connection per worker for small shared state (throttle limits, read-your-writes
marks): the lean RESP client when the URL allows it, else redis-py's (cluster, TLS, sentinel)."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.cache.resp import RespConnection, lean_params
from proxy.cache.versions import connect


class RedisCalls:
    """Every call raises ConnectionError, TimeoutError or a Redis error when Redis cannot answer in time."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.timeout = timeout
        self._lean = lean_params(url)
        self._conn: RespConnection | None = None
        self._opening: asyncio.Future | None = None
        self._client: Any = None if self._lean is not None else connect(url, timeout)

    async def _call(self, *args: Any) -> Any:
        if self._client is not None:
            return await self._client.execute_command(*args)
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._open()
        return await conn.call(self.timeout, *args)

    async def _open(self) -> RespConnection:
        # concurrent callers share the connection being opened
        if self._opening is None:
            self._opening = asyncio.ensure_future(RespConnection.open(self._lean or {}, self.timeout))
        opening = self._opening
        try:
            self._conn = await asyncio.shield(opening)
        finally:
            if self._opening is opening and opening.done():
                self._opening = None
        return self._conn

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._client is not None:
            await self._client.aclose()
