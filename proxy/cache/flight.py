"""Single flight: concurrent misses on one key (under one version stamp) run the query once per process.

The first miss leads: it runs the query and fills. Later misses that read the same version stamp wait for
the leader's reply (bounded by a timeout). A follower never joins a flight started under older versions:
the leader's result could predate a write acknowledged before the follower arrived.
"""

from __future__ import annotations

import asyncio


class Flights:
    def __init__(self) -> None:
        self._flights: dict[bytes, tuple[bytes, asyncio.Future[bytes | None]]] = {}

    def __len__(self) -> int:
        return len(self._flights)

    def lead(self, key: bytes, stamp: bytes) -> bool:
        """Start a flight for key under stamp; False when one under the same stamp is already running."""
        got = self._flights.get(key)
        if got is not None and got[0] == stamp and not got[1].done():
            return False
        self._flights[key] = (stamp, asyncio.get_running_loop().create_future())
        return True

    async def wait(self, key: bytes, stamp: bytes, timeout: float) -> bytes | None:
        """The leader's reply; None when the leader gave up, failed or took longer than timeout."""
        got = self._flights.get(key)
        if got is None or got[0] != stamp:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(got[1]), timeout)
        except TimeoutError:
            if self._flights.get(key) is got:  # a leader that never landed must not hold up later misses
                del self._flights[key]
            return None

    def land(self, key: bytes, stamp: bytes, reply: bytes | None) -> None:
        """The leader is done: hand `reply` (None = abandoned) to the followers."""
        got = self._flights.get(key)
        if got is not None and got[0] == stamp:
            del self._flights[key]
            if not got[1].done():
                got[1].set_result(reply)
