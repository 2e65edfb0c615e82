"""Limits kept in this worker's memory: the rate schedule and the running-statement slots of one limit.

They serve a worker on its own (no Redis configured) and stand in for the shared limits while Redis is
unreachable: then each worker keeps within the limit by itself.
"""

from __future__ import annotations

import asyncio
from collections import deque


class LocalRate:
    """GCRA: `tat` is when the next statement would start were the rate exactly kept. A statement may
    start `tolerance` (= (burst - 1) x interval) before that; later than that it waits, in reservation
    order, so waiting statements start evenly spaced instead of all at once."""

    __slots__ = ("tat",)

    def __init__(self) -> None:
        self.tat = 0.0

    def reserve(self, now: float, interval: float, tolerance: float, max_wait: float) -> float | None:
        """Seconds to wait before starting (0: at once), or None when that would exceed max_wait (then
        nothing is reserved)."""
        tat = self.tat if self.tat > now else now
        wait = tat - tolerance - now
        if wait > max_wait:
            return None
        self.tat = tat + interval
        return wait if wait > 0 else 0.0

    def cancel(self, interval: float) -> None:
        """Take back the latest reservation (its statement was refused by another limit at once)."""
        self.tat -= interval


class LocalSlots:
    """Statements running under one concurrency limit, and those waiting for a slot, first come first
    served: a slot given back goes straight to the longest waiter, so a newcomer never overtakes it."""

    __slots__ = ("used", "waiters")

    def __init__(self) -> None:
        self.used = 0
        self.waiters: deque[asyncio.Future] = deque()

    def try_take(self, limit: int) -> bool:
        if self.used < limit and not self.waiters:
            self.used += 1
            return True
        return False

    async def take(self, limit: int, timeout: float) -> bool:
        """Wait for a slot at most timeout seconds; True when one was taken."""
        if self.try_take(limit):
            return True
        if timeout <= 0:
            return False
        fut = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                return await fut
        except BaseException as e:  # timed out, or the client's task was cancelled (it went away)
            if fut.done() and not fut.cancelled():
                self.give_back()  # a slot was handed over just as the wait ended: pass it on
            else:
                fut.cancel()
                try:
                    self.waiters.remove(fut)
                except ValueError:
                    pass
            if isinstance(e, TimeoutError):
                return False
            raise

    def give_back(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(True)  # the slot moves to the waiter: `used` stays the same
                return
        self.used -= 1

