"""Where a client's stream waits: for a cache look-up before a cached read goes on, or for a rule's
throttle to admit a statement (the client's later bytes wait, in order), and for an invalidation
before a commit reaches the client (the server's later bytes wait). A mixin of `ClientConnection`,
whose state it uses.
"""

from __future__ import annotations

import asyncio
import time

from proxy.log import log
from proxy.relay.pooling import rename_bind
from proxy.relay.records import _B, _E, _LOCAL, _Q, READY, special
from proxy.throttle.spec import THROTTLE_SQLSTATE
from proxy.throttle.throttler import Grant, Refusal
from proxy.wire import protocol as pq


class StreamWaits:
    """The waits of a ClientConnection (see `proxy.net.client`)."""

    def _suspend_server(self) -> None:
        frames, data, i, effect = self.server_suspend
        self.server_suspend = None
        self.server_paused = True
        if self.server is not None:
            self.server.pause("cache")
        # not tied to the client: a commit's invalidation must run even if the client is gone
        asyncio.ensure_future(self._invalidate_then_resume(frames, data, i, effect))

    async def _invalidate_then_resume(self, frames: list, data: bytes, i: int, effect) -> None:
        try:
            await self.app.cache.invalidate(self.cstate, effect)
        except Exception as e:  # noqa: BLE001 - the cache must never fail a client's write
            log.warning("cache invalidation failed", extra={"client": self.id, "reason": str(e)})
        if self.phase is not READY:
            return
        if self._deliver(self.server_frames(frames, data, i, hooked=True)):
            return
        self.server_paused = False
        if self.server is not None:
            self.server.resume("cache")
        backlog, self.server_backlog = self.server_backlog, b""
        if backlog:
            self.server_data(backlog)
        elif self.pool is not None and self.server is not None:
            self._maybe_release()

    def _suspend_client(self, frames: list, data: bytes, i: int) -> None:
        self.client_suspended = True  # later bytes wait in client_backlog (reading pauses if it grows)
        if self.throttle_job is not None:
            self.admission_wait = True
            if self.pool is not None and self.server is not None:
                self._maybe_release()  # transaction pooling: nothing open on the server, others may use it
            self._task(self._admit_then_resume(frames, data, i))  # cancelled (slots given back) if the client goes
        else:
            asyncio.ensure_future(self._lookup_then_resume(frames, data, i))  # a flight others may share: not cancelled

    async def _admit_then_resume(self, frames: list, data: bytes, i: int) -> None:
        """The statement at frames[i] waits for its rule limits; then the relay takes it up again, with
        the grant (or the refusal) in `admitted`."""
        limits, grant = self.throttle_job
        self.throttle_job = None
        throttler = self.app.throttler
        start = time.monotonic()
        try:
            outcome = await throttler.admit(limits, grant, start)
            if self.server is None and self.pool is not None and isinstance(outcome, Grant):
                if not await self._borrow_server(grant):
                    return
                self.admission_wait = False  # from here the statement goes on to this server
                if grant.released:  # no server was free: the slots again, now that one is held
                    grant = Grant(throttler)
                    grant.since = outcome.since
                    outcome = await throttler.admit(limits, grant, start, slots_only=True)
        except BaseException:
            grant.release()
            raise
        finally:
            self.admission_wait = False
        if self.phase is not READY:
            grant.release()
            return
        if isinstance(outcome, Refusal):
            log.info("statement throttled", extra={"client": self.id, "rule": outcome.rule, "reason": outcome.why})
            outcome = pq.error_response(THROTTLE_SQLSTATE, outcome.message)
        self.admitted = outcome
        self.client_suspended = False
        self._relay_client(frames, data, i)
        self._resume_client()

    async def _borrow_server(self, grant: Grant) -> bool:
        """Transaction pooling: the statement waited without a server and is admitted; borrow one.

        A statement holds its slots only while it holds a server. One that held a slot while it waited
        for a server, which clients inside transactions hold while they wait for that slot, would stall
        them all until their queue time ran out. So with no server free at once the slots go back
        (`grant` released) and the server comes first; the caller then takes the slots again (the rate
        is not charged twice, and the queue time still runs from the statement's arrival). False: the
        client is gone, or no server came (the client was told)."""
        from proxy.pool import PoolTimeout

        link = self.pool.lend_idle()
        if link is None:
            grant.release()
            try:
                link = await self.pool.acquire()
            except (PoolTimeout, ConnectionError, OSError, TimeoutError) as e:
                self._pool_failed(e)
                return False
        if self.phase is not READY:
            self.pool.give_back(link)
            grant.release()  # a no-op when already given back above
            return False
        self._attach(link)
        return True

    async def _lookup_then_resume(self, frames: list, data: bytes, i: int) -> None:
        kind, p, sql, info, decision, raw = self.lookup_job
        self.lookup_job = None
        cache = self.app.cache
        replica = self.on_replica
        # A replica's rows may fill the cache only if it had replayed the writes behind the versions the fill
        # is stored under: the position it had surely replayed before the read is sent (docs/cache.md)
        replayed = None if replica is None else replica.replayed_for(self.server.logged_in)
        try:
            if kind == _Q:
                key = cache.query_key(self.cstate, sql)
            else:
                _stmt, ba, bb, bdata = p.bind
                _, _, pformats, values, rformats = pq.parse_bind(bdata[ba + 5:bb])
                key = cache.key(self.cstate, sql, values, pformats, rformats, p.stmt.oids, extended=True)
            res = await cache.lookup(key, info, self.cstate, allow_rls=decision.cache_allow_rls,
                                     allow_catalog=decision.cache_allow_catalog, replayed=replayed)
        except Exception as e:  # noqa: BLE001 - a cache problem means: ask the server
            log.warning("cache lookup failed", extra={"client": self.id, "reason": str(e)})
            res = None
        if res is not None and res.event == "miss" and (self.phase is not READY or self.on_replica is not replica):
            cache.abandon(res)  # the client left, or its read no longer goes where the look-up was told
            res = None
        if self.phase is not READY:
            return
        event = res.event if res is not None else "bypass"
        if event == "hit":
            self._serve_hit(p, kind, res.reply)
            if kind == _E:
                self._remember_batch(frames, data, i, p, decision, key, res.reply)
        else:
            self._cache_event(info, event)
            if event == "miss":
                if not special(p):
                    self.special += 1
                p.fill = res
                p.ttl = decision.cache_ttl
                if kind == _E:
                    self._describe_into(p, frames, data, i)
                    # The client's Bind reached the server before the versions were read, and a portal
                    # takes its snapshot at Bind: a write committed in between would be stored under
                    # the new versions. Bind the portal again now (its BindComplete swallowed), so the
                    # rows stored are at least as new as the versions they are stored under.
                    _stmt, ba, bb, bdata = p.bind
                    if self.pooled_tx and p.stmt.name:
                        rebind = rename_bind(bdata[ba + 5:bb], "", p.stmt.server_name)
                    else:
                        rebind = bdata[ba:bb]
                    self._swallowed(_B)
                    raw = rebind + raw
            self.expect.append(p)
            self.cstate.sent(info)
            self.to_server(raw)
        self.client_suspended = False
        self._relay_client(frames, data, i + 1)
        self._resume_client()

    def _resume_client(self) -> None:
        """After a wait: local replies queued meanwhile go out, and the client's later bytes go on."""
        if self.phase is READY and not self.client_suspended:
            if self.expect and self.expect[0].kind == _LOCAL:
                replies: list = []
                self._flush_local(replies)
                self.to_client(b"".join(replies))
            if "cache" in self.paused:
                self.resume_client_reading("cache")
            backlog, self.client_backlog = self.client_backlog, b""
            if backlog:
                self._client_bytes(backlog)
