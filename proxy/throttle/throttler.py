"""A worker's throttle: admits statements under the limits of the rules that matched them.

The conversation asks `admit_now` first: with no Redis it usually answers at once (a grant, no
waiting). Otherwise the statement waits in `admit` (the client's stream is held at that message, as
for a cache look-up), and is either granted or refused with the reason. A grant holds the statement's
concurrency slots until the conversation releases it, when the statement's reply is complete.

With Redis, limits are shared by all workers and instances (`shared.SharedLimits`); when Redis cannot
answer, each worker falls back to keeping the limits on its own (`local`), retrying Redis every
`retry_after` seconds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any, NamedTuple

from proxy.throttle.local import LocalRate, LocalSlots
from proxy.throttle.shared import POLL, SharedLimits
from proxy.throttle.spec import Throttle

log = logging.getLogger("pgfront.throttle")

_RATE_PREFIX = "pgfront:throttle:r:"
_SLOTS_PREFIX = "pgfront:throttle:c:"


class Limit(NamedTuple):
    """One matching throttle rule, applied to one statement: `key` names the counted scope."""

    rule: str
    spec: Throttle
    observe: bool
    counter: Any  # the rule's RuleCounter
    key: str
    fingerprint: str


class Refusal(NamedTuple):
    rule: str
    spec: Throttle
    why: str

    @property
    def message(self) -> str:
        return self.spec.refusal(self.rule, self.why)


class Grant:
    """The concurrency slots one statement holds. release() gives them back, once; a slot an observing
    check takes after that (it runs in the background) goes straight back."""

    __slots__ = ("throttler", "local", "shared", "released", "since")

    def __init__(self, throttler: Throttler) -> None:
        self.throttler = throttler
        self.since = 0.0  # when its statement arrived (perf_counter), if it had to wait
        self.local: list[LocalSlots] = []
        self.shared: list[tuple[str, str]] = []  # (key, lease member)
        self.released = False

    def add_local(self, slots: LocalSlots) -> None:
        if self.released:
            slots.give_back()
        else:
            self.local.append(slots)

    def add_shared(self, key: str, member: str) -> None:
        if self.released:
            self.throttler._give_back_shared(key, member)
        else:
            self.shared.append((key, member))

    def release(self) -> None:
        self.released = True
        local, shared = self.local, self.shared
        self.local, self.shared = [], []
        for slots in local:
            slots.give_back()
        for key, member in shared:
            self.throttler._give_back_shared(key, member)


class Throttler:
    def __init__(self, shared: SharedLimits | None = None, lease: float = 30.0, retry_after: float = 1.0) -> None:
        self.shared = shared
        self.lease = lease
        self.retry_after = retry_after
        self._rates: dict[str, LocalRate] = {}
        self._slots: dict[str, LocalSlots] = {}
        self._waiting: dict[str, int] = {}  # limit key -> statements of this worker waiting on it
        self._nudges: dict[str, list[asyncio.Future]] = {}  # shared slot waiters to wake on a give-back
        self._held: dict[str, set[str]] = {}  # shared slots key -> lease members this worker holds
        self._ids = itertools.count()
        self._ident = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self._down_until = 0.0
        self._renewer: asyncio.Task | None = None
        self.waiting = 0  # statements waiting now (a gauge)
        self.redis_errors = 0
        self.fallbacks = 0  # admissions decided locally because Redis could not answer
        self.on_event: Any = None  # (fingerprint, rule, "queued" | "throttled", observe): the statistics

    # -- keys ----------------------------------------------------------------------------------------
    @staticmethod
    def limits(throttle: Sequence[tuple[str, Throttle, bool, Any]], user: str, application_name: str,
               fingerprint: str) -> list[Limit]:
        """The limits a decision's throttle rules put on one statement of this session."""
        out = []
        for rule, spec, observe, counter in throttle:
            scope = spec.scope
            if scope == "rule":
                key = rule
            else:
                value = user if scope == "user" else fingerprint if scope == "fingerprint" else application_name
                key = f"{rule}\x1f{value}"
            out.append(Limit(rule, spec, observe, counter, key, fingerprint))
        return out

    # -- admission -----------------------------------------------------------------------------------
    def admit_now(self, limits: list[Limit]) -> tuple[Grant, bool]:
        """The statement's grant, and whether every enforced limit admitted it at once, with no Redis to
        ask (each observed limit is checked in the background); if not, wait in `admit` with the grant."""
        grant = Grant(self)
        for lim in limits:
            if lim.observe:
                asyncio.ensure_future(self._observe(lim, grant))
        enforced = [lim for lim in limits if not lim.observe]
        if not enforced:
            return grant, True
        if self.shared is not None and time.monotonic() >= self._down_until:
            return grant, False
        now = time.monotonic()
        rated: list[Limit] = []
        taken = 0
        for lim in enforced:
            spec = lim.spec
            ok = True
            if spec.qps:
                if self._rate(lim.key).reserve(now, spec.interval, _tolerance(spec), 0.0) is None:
                    ok = False
                else:
                    rated.append(lim)
            if ok and spec.concurrency:
                slots = self._local_slots(lim.key)
                ok = slots.try_take(spec.concurrency)
                if ok:
                    grant.local.append(slots)
                    taken += 1
            if not ok:  # undo what this admission took: it is decided again in admit()
                for r in rated:
                    self._rates[r.key].cancel(r.spec.interval)
                for slots in grant.local[len(grant.local) - taken:]:
                    slots.give_back()
                del grant.local[len(grant.local) - taken:]
                return grant, False
        return grant, True

    async def admit(self, limits: list[Limit], grant: Grant, start: float | None = None,
                    slots_only: bool = False) -> Grant | Refusal:
        """Wait until every enforced limit admits the statement (granted slots go into grant), or the
        refusal of the first that cannot within its queue time (grant's slots are then given back).
        The queue time runs from `start` (time.monotonic(), default now); `slots_only` takes the
        concurrency slots again for a statement whose rate was already admitted."""
        if start is None:
            start = time.monotonic()
        for lim in limits:
            if lim.observe or (slots_only and not lim.spec.concurrency):
                continue
            refusal = await self._admit_one(lim, grant, start, slots_only)
            if refusal is not None:
                self._count(lim, "throttled")
                grant.release()
                return refusal
        return grant

    async def _admit_one(self, lim: Limit, grant: Grant, start: float, slots_only: bool = False) -> Refusal | None:
        spec, key = lim.spec, lim.key
        if self._waiting.get(key, 0) >= spec.max_queue:
            return Refusal(lim.rule, spec, f"{spec.max_queue} statements already waiting")
        queued = False
        self._waiting[key] = self._waiting.get(key, 0) + 1
        self.waiting += 1
        try:
            if spec.qps and not slots_only:
                wait = await self._reserve(key, spec, spec.queue - (time.monotonic() - start))
                if wait is None:
                    return Refusal(lim.rule, spec, f"over {spec.qps:g} statements per second, and it could not "
                                                   f"start within the queue time of {spec.queue:g}s")
                if wait > 0:
                    queued = True
                    await asyncio.sleep(wait)
            if spec.concurrency:
                remaining = spec.queue - (time.monotonic() - start)
                got = await self._take(key, spec, remaining, grant)
                if got is None:
                    queued = remaining > 0  # it waited out its queue time
                    return Refusal(lim.rule, spec, f"{spec.concurrency} statements already running, and none "
                                                   f"finished within the queue time of {spec.queue:g}s")
                queued = queued or got
        finally:
            self.waiting -= 1
            left = self._waiting[key] - 1
            if left:
                self._waiting[key] = left
            else:
                del self._waiting[key]
            if queued:
                self._count(lim, "queued")
        return None

    async def _observe(self, lim: Limit, grant: Grant) -> None:
        """Observe mode: take the limit as enforce mode would, without waiting, and count what would have
        waited (queued) or been refused (throttled). Slots taken are held until the statement ends."""
        spec, key = lim.spec, lim.key
        try:
            if spec.qps:
                wait = await self._reserve(key, spec, spec.queue)
                if wait is None:
                    self._count(lim, "throttled")
                    return
                if wait > 0:
                    self._count(lim, "queued")
                    return
            if spec.concurrency and await self._take(key, spec, 0.0, grant) is None:
                self._count(lim, "queued")
        except Exception as e:  # noqa: BLE001 - observing must never affect the statement
            log.debug("throttle observe failed: %s", e)

    def _count(self, lim: Limit, event: str) -> None:
        """A statement waited (queued) or was refused (throttled); in observe mode: would have been."""
        setattr(lim.counter, event, getattr(lim.counter, event) + 1)
        if self.on_event is not None:
            self.on_event(lim.fingerprint, lim.rule, event, lim.observe)

    # -- rate ------------------------------------------------------------------------------------------
    def _rate(self, key: str) -> LocalRate:
        rate = self._rates.get(key)
        if rate is None:
            rate = self._rates[key] = LocalRate()
        return rate

    async def _reserve(self, key: str, spec: Throttle, max_wait: float) -> float | None:
        if max_wait < 0:
            max_wait = 0.0
        if self._shared_up():
            try:
                return await self.shared.reserve(_RATE_PREFIX + key, spec.interval, _tolerance(spec), max_wait)
            except Exception as e:  # noqa: BLE001 - any Redis failure: keep the limit locally
                self._went_down(e)
        self.fallbacks += self.shared is not None
        return self._rate(key).reserve(time.monotonic(), spec.interval, _tolerance(spec), max_wait)

    # -- concurrency -------------------------------------------------------------------------------
    def _local_slots(self, key: str) -> LocalSlots:
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = LocalSlots()
        return slots

    async def _take(self, key: str, spec: Throttle, timeout: float, grant: Grant) -> bool | None:
        """A slot into grant: False when taken at once, True after waiting, None when none came in time."""
        limit = spec.concurrency or 0
        deadline = time.monotonic() + max(timeout, 0.0)
        waited = False
        while self._shared_up():
            member = f"{self._ident}:{next(self._ids)}"
            try:
                got = await self.shared.take(_SLOTS_PREFIX + key, limit, self.lease, member)
            except Exception as e:  # noqa: BLE001
                self._went_down(e)
                break
            if got:
                self._held.setdefault(key, set()).add(member)
                grant.add_shared(key, member)
                self._start_renewing()
                return waited
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            waited = True
            await self._nudged(key, min(POLL, remaining))
        if self.shared is not None:
            self.fallbacks += 1
        slots = self._local_slots(key)
        if slots.try_take(limit):
            grant.add_local(slots)
            return waited
        remaining = deadline - time.monotonic()
        if remaining > 0 and await slots.take(limit, remaining):
            grant.add_local(slots)
            return True
        return None

    async def _nudged(self, key: str, timeout: float) -> None:
        """Sleep until a slot of key is given back in this worker, or timeout."""
        fut = asyncio.get_running_loop().create_future()
        waiters = self._nudges.setdefault(key, [])
        waiters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            if fut in waiters:
                waiters.remove(fut)
            if not waiters:
                self._nudges.pop(key, None)

    def _give_back_shared(self, key: str, member: str) -> None:
        held = self._held.get(key)
        if held is not None:
            held.discard(member)
            if not held:
                del self._held[key]
        asyncio.ensure_future(self._zrem(key, member))

    async def _zrem(self, key: str, member: str) -> None:
        try:
            await self.shared.give_back(_SLOTS_PREFIX + key, member)
        except Exception as e:  # noqa: BLE001 - the lease runs out by itself
            self._went_down(e)
        for fut in self._nudges.get(key, ())[:1]:  # the longest waiter here asks Redis again at once
            if not fut.done():
                fut.set_result(None)

    def _start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.ensure_future(self._renew())

    async def _renew(self) -> None:
        """Keep this worker's leases alive while it holds any (a crashed worker's lapse by themselves)."""
        while self._held:
            await asyncio.sleep(self.lease / 3)
            for key, members in list(self._held.items()):
                if not members:
                    continue
                try:
                    await self.shared.renew(_SLOTS_PREFIX + key, self.lease, list(members))
                except Exception as e:  # noqa: BLE001
                    self._went_down(e)

    # -- Redis health ----------------------------------------------------------------------------------
    def _shared_up(self) -> bool:
        return self.shared is not None and time.monotonic() >= self._down_until

    def _went_down(self, error: BaseException) -> None:
        self.redis_errors += 1
        if time.monotonic() >= self._down_until:
            log.warning("throttle: Redis unavailable, keeping limits per worker for %.1fs: %s",
                        self.retry_after, error or type(error).__name__)
        self._down_until = time.monotonic() + self.retry_after

    def counters(self) -> dict[str, int]:
        return {"throttle_waiting": self.waiting, "throttle_redis_errors": self.redis_errors,
                "throttle_local_fallbacks": self.fallbacks}

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
        if self.shared is not None:
            await self.shared.close()


def _tolerance(spec: Throttle) -> float:
    return (spec.burst - 1.0) * spec.interval
