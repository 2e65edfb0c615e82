"""Read-your-writes across sessions and instances (`[routing] read_your_writes_scope = "user"` or
"application"): every session of one role (or one application_name) reads what any of them wrote.

One Redis hash per scope, `pgfront:ryw:<db>:<scope>:<name>`, holds a field per writing session
(`<instance>:<client>`). Before a transaction that may write is sent to the primary, its session's field
is set to "p<n>" (a write may be open, n counting the session's writes) and pgfront waits for Redis to
say so: the mark is there before the write can be acknowledged. Once the transaction is over, the field
becomes the primary's WAL insert position read after it ended (as for a session's own writes), unless
the session has started another write meanwhile (a Lua compare-and-set on "p<n>").

A read in the scope reads the hash (one HGETALL). Any "p" field: a write may have been acknowledged at
any position, so the read needs a replica that has replayed the primary's position read after the read
began; otherwise, a replica that has replayed the highest position recorded. Either wait is bounded by
`max_wait`, after which the primary answers. If Redis cannot answer, the primary answers too.

A pending mark is kept alive (the key's expiry, `read_your_writes_ttl`, renewed every third of it) for as
long as its write lasts, or its session if that is pinned to its primary connection; a field outlives its
session by the expiry at most.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

from proxy.redis_calls import RedisCalls

# KEYS[1]: the hash. ARGV: field, expected "p<n>", position. The position replaces the pending mark only
# if the session has not marked a newer write since.
_SETTLE = b"""
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  return 1
end
return 0
"""

_instance = f"{os.uname().nodename}.{os.getpid()}"


class WriteMarks(RedisCalls):
    """The Redis side of read-your-writes beyond one session."""

    def __init__(self, url: str, scope: str, ttl: float, timeout: float = 0.5) -> None:
        super().__init__(url, timeout)
        self.scope = scope  # "user" or "application"
        self.ttl_ms = int(ttl * 1000)
        self._serial = itertools.count(1)
        self.held: dict[str, dict[str, str]] = {}  # key -> {field: pending mark}, kept alive by `_refresh`
        self._refresher: asyncio.Task | None = None

    def key(self, client: Any) -> str | None:
        """The client's scope key; None when it has no name in the scope (no application_name)."""
        if self.scope == "user":
            return f"pgfront:ryw:{client.database}:u:{client.user}"
        name = client.application_name
        return f"pgfront:ryw:{client.database}:a:{name}" if name else None

    @staticmethod
    def field(client: Any) -> str:
        return f"{_instance}:{client.id}"

    async def pending(self, key: str, field: str) -> str:
        """Mark a write as possibly open (awaited before the write is sent); the mark's value."""
        mark = f"p{next(self._serial)}"
        await self._call("HSET", key, field, mark)
        await self._call("PEXPIRE", key, self.ttl_ms)
        return mark

    async def settle(self, key: str, field: str, mark: str, lsn: int) -> None:
        """The write marked `mark` is over, committed at or before `lsn`."""
        await self._call("EVAL", _SETTLE, 1, key, field, mark, lsn)

    async def required(self, key: str) -> int | None:
        """The WAL position reads in this scope must see: the highest settled one, or None when a write
        may be open (the position is then the primary's current one)."""
        reply = await self._call("HGETALL", key)
        highest = 0
        for v in reply.values() if isinstance(reply, dict) else reply[1::2]:  # redis-py's dict, or RESP's list
            if v[:1] == b"p":
                return None
            highest = max(highest, int(v))
        return highest

    def hold(self, key: str, field: str, mark: str) -> None:
        """A pending mark lives as long as its write (or its pinned session) does, however long."""
        self.held.setdefault(key, {})[field] = mark
        if self._refresher is None:
            self._refresher = asyncio.ensure_future(self._refresh())

    def release(self, key: str, field: str, mark: str) -> None:
        fields = self.held.get(key)
        if fields is not None and fields.get(field) == mark:  # not a newer write's
            del fields[field]
            if not fields:
                del self.held[key]

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(self.ttl_ms / 3000)
            for key in list(self.held):
                try:
                    await self._call("PEXPIRE", key, self.ttl_ms)
                except Exception:  # noqa: BLE001 - retried at the next turn, well within the expiry
                    pass

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        await super().close()
