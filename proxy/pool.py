"""Server connection pools, one per (database, user), PgBouncer-style.

`session` mode gives a client one server connection for its whole session; `transaction` mode lends
one only while a transaction (or an extended-protocol batch) is open. Pools open connections on
demand up to `default_pool_size` (plus `reserve_pool_size` for clients that waited
`reserve_pool_timeout`), never more than `max_db_connections` for a database, keep `min_pool_size`
open, and close connections idle longer than `server_idle_timeout` or older than `server_lifetime`.
A client that waits longer than `query_wait_timeout` gets an error.

The invariant: every lent connection comes back through `give_back`, and it goes on the idle list
(or straight to a waiter) only when its own state says it is clean: its last ReadyForQuery said
idle, no reply or COPY is pending, it is reading, and no client left session state on it. Anything
else is reset (ROLLBACK, then `server_reset_query`) and checked again, or closed. Whichever way a
connection leaves a client, one waiter is woken: with the connection, or to open a new one.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from proxy.log import log
from proxy.net.serverlink import ServerLink
from proxy.upstream import Upstream, open_connection, parse_upstream, send_cancel
from proxy.wire import protocol as pq

if TYPE_CHECKING:
    from proxy.app import App


class PoolTimeout(Exception):
    """No server connection became free within query_wait_timeout."""


_WOKEN = object()  # a waiter's wake-up without a connection: room to open one may have freed up


class Pool:
    def __init__(self, manager: PoolManager, database: str, user: str, mode: str, upstream: Upstream | None = None,
                 replica: str = "") -> None:
        self.manager = manager
        self.database = database
        self.user = user
        self.mode = mode
        self.upstream = upstream or manager.app.upstream
        self.replica = replica  # the [[replica]] it connects to; "" = the primary ([server] upstream)
        self.idle: deque[ServerLink] = deque()
        self.busy: set[ServerLink] = set()  # lent, resetting, or on its way to a waiter
        self.opening = 0
        self.waiters: deque[asyncio.Future] = deque()
        self.params: dict[str, str] = {}  # the server's ParameterStatus values, for new clients
        self.known: set[str] = set()  # server-side statement names that prepared fine here before
        self.generation: dict[str, int] = {}  # statement key -> times its cached plan went stale
        self.max_wait = 0.0
        self.total_wait = 0.0
        self.acquired = 0
        self.resets = 0
        self.closed_dirty = 0

    @property
    def size(self) -> int:
        return len(self.idle) + len(self.busy) + self.opening

    # -- lending ------------------------------------------------------------------------------------
    async def acquire(self) -> ServerLink:
        """A server connection for one client, opening or waiting as the limits allow."""
        cfg = self.manager.cfg
        t0 = time.monotonic()
        loop = asyncio.get_running_loop()
        while True:
            link = self._take_idle()
            if link is not None:
                return self._lend(link, t0)
            waited = time.monotonic() - t0
            limit = cfg.default_pool_size + (cfg.reserve_pool_size if waited >= cfg.reserve_pool_timeout else 0)
            if self.size < limit and self.manager.db_room(self):
                self.opening += 1
                try:
                    link = await self.manager.open(self)
                finally:
                    self.opening -= 1
                return self._lend(link, t0)
            remaining = cfg.query_wait_timeout - waited
            if remaining <= 0:
                raise PoolTimeout(f"no server connection for {self.user}@{self.database} became free within "
                                  f"query_wait_timeout ({cfg.query_wait_timeout:g}s)")
            # wake up for the reserve pool too, not only when a connection comes back
            wait = min(remaining, max(cfg.reserve_pool_timeout - waited, 0.05)) if cfg.reserve_pool_size else remaining
            fut = loop.create_future()
            self.waiters.append(fut)
            # our own timer rather than wait_for: a connection handed over in the same loop turn as the
            # timeout must never be lost (it is counted busy on its way to us)
            timer = loop.call_later(wait, _wake, fut, _WOKEN)
            try:
                got = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and isinstance(fut.result(), ServerLink):
                    self.give_back(fut.result())  # the client went away: the connection is not lost
                raise
            finally:
                timer.cancel()
                if fut in self.waiters:
                    self.waiters.remove(fut)
            if isinstance(got, ServerLink):
                return self._lend(got, t0, counted=True)

    def lend_idle(self) -> ServerLink | None:
        """An idle connection right now, without waiting (the common case in transaction mode)."""
        link = self._take_idle()
        return self._lend(link, time.monotonic()) if link is not None else None

    def _take_idle(self) -> ServerLink | None:
        """The most recently used idle connection that is still open (its caches are warm)."""
        while self.idle:
            link = self.idle.pop()
            if link.usable:
                return link
        return None

    def _lend(self, link: ServerLink, t0: float, counted: bool = False) -> ServerLink:
        waited = time.monotonic() - t0
        self.total_wait += waited
        self.max_wait = max(self.max_wait, waited)
        self.acquired += 1
        if not counted:
            self.busy.add(link)
        link.last_used = time.monotonic()
        return link

    # -- coming back ----------------------------------------------------------------------------------
    def give_back(self, link: ServerLink, pending: bool = False, fresh: bool = False) -> None:
        """Every lent connection comes back here: when its client's transaction is over (transaction
        mode), when its client leaves, and after a reset (`fresh`). `pending`: its client still awaited
        replies (or was inside a batch or COPY) when it let go."""
        link.holder = None
        link.resume_all()  # pauses belonged to the client that held it
        if not link.usable:
            self.link_closed(link)
            return
        if pending:
            self._close(link, "client left with replies pending", cancel=True)
            return
        state = link.state
        why = state.unclean()
        reset = self.manager.cfg.server_reset_query
        if not why and (fresh or self.mode != "session" or not reset):
            self._check_in(link)
            return
        if fresh or state.fatal or state.broken or state.in_copy or (state.dirty and not reset):
            # still unclean after a reset, or nothing pgfront can undo: a new connection is cheaper
            self._close(link, why)
            return
        queries = ["ROLLBACK"] if state.tx != pq.IDLE else []
        full = bool(reset) and (self.mode == "session" or bool(state.dirty))
        if full:
            queries.append(reset)
        self.resets += 1
        link.reset(queries, full)

    def reset_done(self, link: ServerLink, ok: bool) -> None:
        if ok:
            self.give_back(link, fresh=True)
        else:
            self._close(link, "reset failed")

    def _check_in(self, link: ServerLink) -> None:
        """A clean connection: straight to a waiter, or onto the idle list."""
        if not link.usable:
            self.link_closed(link)
            return
        if link.cancels or time.monotonic() - link.created > self.manager.cfg.server_lifetime:
            if link.cancels:
                # a cancel is on its way to this backend: let it land before anyone else uses it
                asyncio.get_running_loop().call_later(0.5, self._check_in, link)
                return
            self._close(link, "server_lifetime")
            return
        link.last_used = time.monotonic()
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(link)  # stays counted as busy on its way to the waiter
                return
        self.busy.discard(link)
        self.idle.append(link)
        self.manager.wake_db(self)

    def _close(self, link: ServerLink, why: str, cancel: bool = False) -> None:
        if why not in ("server_lifetime", "server_idle_timeout"):
            self.closed_dirty += 1
            log.info("server connection closed, not returned to the pool",
                     extra={"database": self.database, "user": self.user, "reason": why, "pid": link.pid})
        if cancel and link.pid:
            asyncio.ensure_future(send_cancel(self.upstream, link.pid, link.secret))
        link.close()
        self.link_closed(link)

    def link_closed(self, link: ServerLink) -> None:
        """A connection of this pool is gone (closed by us or by the server): wake a waiter to open one."""
        was_ours = link in self.busy
        self.busy.discard(link)
        try:
            self.idle.remove(link)
            was_ours = True
        except ValueError:
            pass
        if was_ours:
            self._wake_one()

    def _wake_one(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(_WOKEN)
                return
        self.manager.wake_db(self)

    # -- server-side names of prepared statements (transaction mode) ------------------------------------
    def server_name(self, sql: str, oids: list[int]) -> str:
        """By content, so every client preparing the same statement shares one server-side statement
        per connection; a new generation once the server refused its cached plan (the result type
        changed), so that every connection prepares it afresh."""
        key = sql + "\0" + ",".join(map(str, oids))
        gen = self.generation.get(key)
        if gen:
            key += f"\0{gen}"
        return "pgf_" + hashlib.blake2b(key.encode(pq.ENC, pq.ERRORS), digest_size=10).hexdigest()

    def plan_changed(self, sql: str, oids: list[int], server_name: str) -> None:
        key = sql + "\0" + ",".join(map(str, oids))
        if self.server_name(sql, oids) == server_name:
            self.generation[key] = self.generation.get(key, 0) + 1
            self.known.discard(server_name)

    # -- housekeeping -------------------------------------------------------------------------------------
    def maintain(self, now: float) -> None:
        cfg = self.manager.cfg
        keep = []
        for link in self.idle:
            too_old = now - link.created > cfg.server_lifetime
            too_idle = now - link.last_used > cfg.server_idle_timeout
            if (too_old or too_idle) and len(keep) + len(self.busy) >= cfg.min_pool_size:
                link.owner = None
                link.close()
            else:
                keep.append(link)
        closed = len(self.idle) - len(keep)
        self.idle = deque(keep)
        if closed:
            self.manager.wake_db(self)  # max_db_connections: another role's waiter may open one now
        missing = cfg.min_pool_size - self.size
        if missing > 0 and self.manager.can_open_unattended(self):
            for _ in range(missing):
                asyncio.ensure_future(self._prefill())

    async def _prefill(self) -> None:
        self.opening += 1
        try:
            link = await self.manager.open(self)
        except Exception as e:  # noqa: BLE001 - a failed prefill is retried at the next maintenance
            log.info("pool prefill failed", extra={"database": self.database, "user": self.user, "reason": str(e)})
            return
        finally:
            self.opening -= 1
        self.busy.add(link)
        self.give_back(link, fresh=True)

    def describe(self) -> dict[str, Any]:
        return {
            "database": self.database, "user": self.user, "pool_mode": self.mode,
            "cl_waiting": len(self.waiters), "sv_active": len(self.busy), "sv_idle": len(self.idle),
            "sv_opening": self.opening, "acquired": self.acquired,
            "avg_wait_ms": round(self.total_wait / self.acquired * 1000, 3) if self.acquired else 0.0,
            "max_wait_ms": round(self.max_wait * 1000, 3), "resets": self.resets, "closed_dirty": self.closed_dirty,
            "upstream": self.replica or "primary",
        }


def _wake(fut: asyncio.Future, value: object) -> None:
    if not fut.done():
        fut.set_result(value)


class PoolManager:
    def __init__(self, app: App) -> None:
        self.app = app
        self.cfg = app.cfg.pool
        self.pools: dict[tuple[str, str], Pool] = {}
        # the pools of each database on each upstream ("" the primary): what max_db_connections counts
        self.same_db: dict[tuple[str, str], list[Pool]] = {}
        self.client_keys: dict[str, bytes] = {}  # SCRAM ClientKeys learnt from clients, by role

    def mode_for(self, database: str, user: str) -> str:
        return self.cfg.users.get(user) or self.cfg.databases.get(database) or self.cfg.mode

    def pool(self, database: str, user: str, replica: Any = None) -> Pool:
        """The pool of (database, user) on the primary, or on `replica` (a `replicas.health.Replica`):
        replica pools lend per transaction, whatever the mode, since only reads go there."""
        key = (database, user, replica.target.name if replica is not None else "")
        p = self.pools.get(key)
        if p is None:
            if replica is None:
                p = Pool(self, database, user, self.mode_for(database, user))
            else:
                p = Pool(self, database, user, "transaction", parse_upstream(replica.target.url), key[2])
            self.pools[key] = p
            self.same_db.setdefault((database, p.replica), []).append(p)
        return p

    def db_room(self, pool: Pool) -> bool:
        """max_db_connections holds per database on each upstream."""
        limit = self.cfg.max_db_connections
        return not limit or sum(p.size for p in self.same_db[(pool.database, pool.replica)]) < limit

    def wake_db(self, pool: Pool) -> None:
        """A connection of `pool` came back: with max_db_connections, another user's waiter for its database
        on the same upstream may now open one (once per transaction: only those pools are looked at)."""
        if not self.cfg.max_db_connections:
            return
        for p in self.same_db[(pool.database, pool.replica)]:
            if p.waiters and not p.idle:
                for fut in p.waiters:
                    if not fut.done():
                        fut.set_result(_WOKEN)
                        break

    def can_open_unattended(self, pool: Pool) -> bool:
        return self.db_room(pool)

    async def open(self, pool: Pool) -> ServerLink:
        """A new, logged-in server connection for the pool's role."""
        from proxy.auth import UpstreamLogin

        app = self.app
        secret = await app.credentials.lookup(pool.user)
        if secret is None:
            raise ConnectionError(f"no credentials for role {pool.user!r}")
        login = UpstreamLogin(pool.user, secret, self.client_keys.get(pool.user))
        _, link = await open_connection(pool.upstream, lambda: ServerLink(None, pool),
                                        app.cfg.server.connect_timeout, app.upstream_sslmode, app.tls_upstream)
        params = {"user": pool.user, "database": pool.database, "application_name": "pgfront"}
        try:
            await asyncio.wait_for(link.start_login(params, login), app.cfg.server.connect_timeout)
        except BaseException:
            link.owner = None
            link.close()
            raise
        if not pool.params:
            pool.params = dict(link.params)
        if pool.replica:
            app.stats_inc("replica_connections_opened")
        app.stats_inc("server_connections_opened")
        return link

    def maintain(self) -> None:
        now = time.monotonic()
        for p in list(self.pools.values()):
            p.maintain(now)

    def describe(self) -> list[dict[str, Any]]:
        return [p.describe() for p in self.pools.values()]

    def close_all(self) -> None:
        for p in self.pools.values():
            for link in list(p.idle) + list(p.busy):
                link.owner = None
                link.close()
