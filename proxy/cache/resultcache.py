"""ResultCache: the API the session calls. See docs/cache.md for the design and its correctness argument.

Per cacheable execution the session does:
    res = await cache.lookup(key, info, state, allow_rls=rule.allow_rls)
    Hit  -> send res.reply (exact backend bytes), then its own ReadyForQuery
    Fill -> forward upstream, res.feed(raw server messages of the reply), then
            await cache.fill(res, ttl) after CommandComplete, or cache.abandon(res) on error / disconnect
    Bypass -> forward upstream as usual (res.reason says why)
and for writes the four SessionCacheState hooks plus `await cache.invalidate(state, effect)`.

A read that goes to a streaming replica passes `replayed=` (the replica's replay position known before
the read is sent): it may fill only when that position is past the WAL position recorded with the last
bump of every field guarding it (`lsn_source`, docs/cache.md "Fills from replicas").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.cache.capture import ResultCapture, has_description
from proxy.cache.catalog import Catalog
from proxy.cache.flight import Flights
from proxy.cache.keys import make_key, redis_key
from proxy.cache.policy import PENDING, CachePolicy
from proxy.cache.replication import ReplicationListener
from proxy.cache.sessionstate import SessionCacheState
from proxy.cache.store import L1Entry, L1Store, decode_entry, encode_entry
from proxy.cache.versions import (
    EPOCH,
    FLUSH_ALL,
    RedisDown,
    Versions,
    covered_position,
    db_field,
    fingerprint_field,
    lsn_field,
    needs_position,
    stamp_of,
    table_field,
)
from proxy.cache.writes import WriteEffect, relname

log = logging.getLogger("pgfront.cache")

_QUERY_KEYS = 10_000  # simple-Query keys remembered
COVER_RETRY = 0.2  # seconds before recording WAL positions again after a failure


@dataclass(slots=True)
class Hit:
    reply: bytes              # exact backend bytes: [RowDescription] DataRow... CommandComplete
    level: str                # "l1", "l2" or "flight" (handed over by a concurrent miss)
    event = "hit"


@dataclass(slots=True)
class Bypass:
    reason: str
    event = "bypass"


@dataclass(slots=True)
class Fill:
    """A miss: run the query upstream, feed the reply, then fill() or abandon()."""

    key: bytes
    stamp: bytes
    fields: tuple[str, ...]
    capture: ResultCapture
    leader: bool
    checked: float  # when the versions it is stamped with were asked for (monotonic)
    replica: bool = False  # the rows come from a replica that had replayed the writes behind the stamp
    event = "miss"

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        return self.capture.feed(data)


class ResultCache:
    def __init__(self, cfg: Any, upstream_dsn: str, *, catalog_ttl: float = 60.0, flight_timeout: float = 5.0,
                 retry_after: float = 1.0) -> None:
        c = cfg.cache
        self.enabled = c.enabled
        self.max_result_size = c.max_result_size
        self.default_ttl = c.default_ttl
        self.flight_timeout = flight_timeout
        self.facts_wait = 0.5  # seconds a first look-up may wait for catalog facts before bypassing
        self.l1 = L1Store(c.l1_size)
        self.catalog = Catalog(upstream_dsn, ttl=catalog_ttl)
        self.policy = CachePolicy(self.catalog)
        self.window = c.local_validity
        self.versions = Versions(c.redis_url, c.redis_timeout, retry_after, on_invalidate=self._invalidated,
                                 window=self.window)
        self.flights = Flights()
        self.replication = (ReplicationListener(upstream_dsn, c.replication_slot, self._replicated_writes)
                            if c.replication_listener else None)
        self.stats: Counter[str] = Counter()
        self.bypass_reasons: Counter[str] = Counter()
        self._databases: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._query_keys: dict[tuple[bytes, str], bytes] = {}
        self._refreshing: set[bytes] = set()  # keys whose window is being renewed
        # The primary's WAL insert position, read by a query started after the monotonic time given
        # (replicas.health.ReplicaSet.primary_lsn_after): set when reads go to replicas. With it, fields
        # bumped here, and fields a replica read found without a position, get one recorded (`_cover`).
        self.lsn_source: Callable[[float], Awaitable[int]] | None = None
        self._cover_pending: set[str] = set()
        self._covering: asyncio.Task | None = None

    # -- life cycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.versions.start()

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self.replication:
            await self.replication.close()
        await self.versions.close()
        await self.catalog.close()

    def session(self, database: str, role: str, startup_params: dict[str, str] | None = None) -> SessionCacheState:
        """State for a new client session (database and login role from its startup packet)."""
        if database not in self._databases:
            self._databases.add(database)
            self._background(self.versions.register_database(database))
            if self.replication:
                self.replication.follow(database)
        return SessionCacheState(database, role, startup_params, self.catalog.function)

    # -- reads ---------------------------------------------------------------------------------------------
    def query_key(self, state: SessionCacheState, sql: str) -> bytes:
        """The key of a simple Query, remembered per (session prefix, text): a hot statement is hashed once."""
        memo = self._query_keys
        k = (state.prefix, sql)
        key = memo.get(k)
        if key is None:
            if len(memo) >= _QUERY_KEYS:
                memo.clear()  # texts with inlined literals churn it; a rebuild costs one digest each
            key = memo[k] = make_key(state.prefix, sql)
        return key

    @staticmethod
    def key(state: SessionCacheState, sql: str, params: Sequence[bytes | None] = (),
            param_formats: Sequence[int] = (), result_formats: Sequence[int] = (),
            param_types: Sequence[int] = (), extended: bool = False) -> bytes:
        """The cache key of one execution (see keys.make_key); `extended` for an Execute's reply."""
        return make_key(state.prefix, sql, params, param_formats, result_formats, param_types, extended)

    async def lookup(self, key: bytes, info: Any, state: SessionCacheState, *, allow_rls: bool = False,
                     allow_catalog: bool = False, replayed: int | None = None) -> Hit | Fill | Bypass:
        """Hit (exact reply bytes), Fill (run the query and feed the reply) or Bypass (why not).

        `replayed`: the read goes to a replica, which had certainly replayed the WAL up to this position
        before the read is sent (0: not known). A miss then fills only if that is past the position
        recorded with the last bump of every field guarding the read; else it is a Bypass (hits are
        served as usual, and a flight under the same stamp led by a read elsewhere may answer it)."""
        if not self.enabled:
            return self._bypass("cache disabled")
        decision = self.policy.check(info, state, allow_rls=allow_rls, allow_catalog=allow_catalog)
        if not decision.ok and decision.reason == PENDING:
            # first sight of these relations: wait briefly for their facts rather than bypass
            try:
                await asyncio.wait_for(self.catalog.relations_now(state.database, [relname(t) for t in info.tables_read]),
                                       self.facts_wait)
            except (TimeoutError, OSError, Exception):  # noqa: BLE001 - fall back to the bypass below
                pass
            decision = self.policy.check(info, state, allow_rls=allow_rls, allow_catalog=allow_catalog)
        if not decision.ok:
            return self._bypass(decision.reason)
        local = self.l1.get(key)
        checked = time.monotonic()
        reply = self._fresh_reply(key, local, checked)
        if reply is not None:
            return self._hit(reply, "l1")
        db = state.database
        fields = (EPOCH, db_field(db), fingerprint_field(info.fingerprint),
                  *(table_field(db, t) for t in decision.tags))
        positioned = [f for f in fields if needs_position(f)] if replayed is not None else []
        try:
            values, entry = await self.versions.read(list(fields), None if local else redis_key(key),
                                                     [lsn_field(f) for f in positioned])
        except RedisDown:
            return self._bypass("redis unavailable")
        records = values[len(fields):]  # the `l:` records of `positioned`
        values = values[:len(fields)]
        if values[0] is None:  # Redis lost the versions (restart, eviction): start a new epoch first
            await self.versions.ensure_epoch()
            return self._bypass("versions reset")
        stamp = stamp_of(values)
        if local is not None:
            if local.stamp == stamp:
                local.fresh_until = checked + self.window
                return self._hit(local.reply, "l1")
            self.l1.discard(key)  # stale here; another process may have filled Redis under the new stamp
            try:
                entry = await self.versions.get(redis_key(key))
            except RedisDown:
                return self._bypass("redis unavailable")
        found = decode_entry(entry, stamp)
        if found is not None:
            self.l1.put(key, stamp, found[0], found[1], fields, checked + self.window)
            return self._hit(found[0], "l2")
        if replayed is not None:
            why = self._replica_refusal(positioned, [v for f, v in zip(fields, values, strict=True)
                                                     if needs_position(f)], records, replayed)
            if why:
                # a flight under this stamp (a read elsewhere) may still answer it; its own rows may not fill
                reply = await self.flights.wait(key, stamp, self.flight_timeout)
                if reply is not None:
                    return self._hit(reply, "flight")
                self.stats["replica_fills_refused"] += 1
                return self._bypass(why)
        if self.flights.lead(key, stamp):
            return self._miss(key, stamp, fields, True, checked, replayed is not None)
        reply = await self.flights.wait(key, stamp, self.flight_timeout)
        if reply is not None:
            return self._hit(reply, "flight")
        return self._miss(key, stamp, fields, False, checked, replayed is not None)

    def _replica_refusal(self, fields: list[str], values: list[bytes | None], records: list[bytes | None],
                         replayed: int) -> str:
        """Why a replica that had replayed up to `replayed` may not fill under these values ("" if it may).
        Fields whose position is not known yet get one recorded in the background."""
        need = 0
        unknown = []
        for f, v, rec in zip(fields, values, records, strict=True):
            lsn = covered_position(v, rec)
            if lsn is None:
                unknown.append(f)
            elif lsn > need:
                need = lsn
        if unknown:
            self._want_positions(unknown)
            return "replica: write position not known yet"
        if replayed < need or replayed <= 0:
            return "replica: not replayed past the last write"
        return ""

    def hit_now(self, key: bytes, info: Any, state: SessionCacheState, *, allow_rls: bool = False,
                allow_catalog: bool = False, described: bool = False) -> bytes | None:
        """The reply, when L1 holds it inside its freshness window and the policy allows it: a hit served
        within the client's own turn of the event loop, with no Redis round trip. None: use lookup().
        `described`: only an extended-protocol entry that starts with its Describe reply will do."""
        reply = self._fresh_reply(key, self.l1.get(key), time.monotonic())
        if (reply is None or (described and not has_description(reply))
                or not self.policy.check(info, state, allow_rls=allow_rls, allow_catalog=allow_catalog).ok):
            return None
        self._count_hit(reply, "hits_l1")
        return reply

    def _fresh_reply(self, key: bytes, local: L1Entry | None, now: float) -> bytes | None:
        """The L1 entry's reply while its freshness window is open (and Redis reachable), else None."""
        if local is None or not self.versions.available:
            return None
        left = local.fresh_until - now
        if left <= 0:
            return None
        if left < self.window / 2 and key not in self._refreshing:
            # refresh ahead: a hot entry's window is renewed before it closes, so its readers never
            # stall on a version check
            self._refreshing.add(key)
            self._background(self._refresh(key, local))
        return local.reply

    async def _refresh(self, key: bytes, local: L1Entry) -> None:
        checked = time.monotonic()
        try:
            values, _ = await self.versions.read(list(local.fields), None)
            if values[0] is not None and stamp_of(values) == local.stamp:
                local.fresh_until = checked + self.window
            else:
                self.l1.discard(key)
        except RedisDown:
            pass
        finally:
            self._refreshing.discard(key)

    async def fill(self, ticket: Fill, ttl: float | None = None) -> bool:
        """Store the captured reply (call after its CommandComplete); False when it was not storable."""
        reply = ticket.capture.result()
        if reply is None:
            self.abandon(ticket)
            return False
        ttl = self.default_ttl if ttl is None else ttl
        self.l1.put(ticket.key, ticket.stamp, reply, ttl, ticket.fields, ticket.checked + self.window)
        if ticket.leader:
            self.flights.land(ticket.key, ticket.stamp, reply)
        await self.versions.store(redis_key(ticket.key), encode_entry(ticket.stamp, reply, ttl), ttl)
        self.stats["fills"] += 1
        if ticket.replica:
            self.stats["replica_fills"] += 1
        self.stats["fill_bytes"] += len(reply)
        return True

    def abandon(self, ticket: Fill) -> None:
        """The query failed, was too large or the client left: release waiters, store nothing."""
        if ticket.capture.reason == "result too large":
            self.stats["too_large"] += 1
        self.stats["abandoned"] += 1
        if ticket.leader:
            self.flights.land(ticket.key, ticket.stamp, None)

    # -- writes --------------------------------------------------------------------------------------------
    async def invalidate(self, where: SessionCacheState | str, effect: WriteEffect) -> None:
        """Make every entry the committed writes in `effect` could change unreachable, in every process.

        Await it after the commit and before the client sees its acknowledgement (see SessionCacheState).
        """
        database = where if isinstance(where, str) else where.database
        fields = await self._fields_to_bump(database, effect)
        notes = []
        if effect.ddl:
            relations = () if effect.flush_database or effect.flush_all else effect.tables
            self.catalog.forget(database, relations)
            notes.append(f"ddl:{database}:" + ",".join(sorted(relations)))
        self._invalidated(sorted(fields))
        self.stats["invalidations"] += 1
        await self._bump_and_wait(fields, notes)

    async def _bump_and_wait(self, fields: Iterable[str], notes: Iterable[str] = ()) -> None:
        """Bump, then wait out the freshness windows still open over the fields (a whole window when the
        bump failed): only then may the write's commit be acknowledged."""
        fields = list(fields)
        wait = await self.versions.bump(fields, notes)
        if wait is None:
            self.stats["invalidation_failures"] += 1
            wait = self.window
        else:
            self._want_positions(fields)
        if wait > 0:
            self.stats["commit_waits"] += 1
            self.stats["commit_wait_ms"] += round(wait * 1000)
            await asyncio.sleep(wait)

    async def _fields_to_bump(self, database: str, effect: WriteEffect) -> set[str]:
        if effect.flush_all:
            return {FLUSH_ALL}
        flush_db = {db_field(database)}
        if effect.flush_database:
            return flush_db
        if effect.functions:  # called functions whose volatility was unknown when the statement was sent
            for facts in (await self.catalog.functions_now(database, effect.functions)).values():
                if facts is None or facts.may_write:
                    return flush_db
        if effect.ddl:
            return {table_field(database, t) for t in effect.tables}
        fields = set()
        for facts in (await self.catalog.relations_now(database, effect.tables)).values():
            if facts is None or facts.side_effects:  # triggers or rules may write anywhere
                return flush_db
            fields.update(table_field(database, t) for t in facts.write_tags)
        return fields

    async def purge_all(self) -> None:
        self.stats["purges"] += 1
        self._invalidated([FLUSH_ALL])
        await self._bump_and_wait([FLUSH_ALL])

    async def purge_table(self, name: str, database: str | None = None) -> None:
        rel = relname(name)
        dbs = [database] if database else sorted(self._databases | set(await self.versions.databases()))
        fields = [table_field(db, rel) for db in dbs]
        self.stats["purges"] += 1
        self._invalidated(fields)
        await self._bump_and_wait(fields)

    async def purge_fingerprint(self, fingerprint: str) -> None:
        fields = [fingerprint_field(fingerprint)]
        self.stats["purges"] += 1
        self._invalidated(fields)
        await self._bump_and_wait(fields)

    # -- numbers ------------------------------------------------------------------------------------------
    def counters(self) -> dict[str, Any]:
        """For SHOW CACHE and /metrics."""
        s = self.stats
        return {
            "enabled": self.enabled,
            "redis_available": self.versions.available,
            "hits": s["hits"], "hits_l1": s["hits_l1"], "hits_l2": s["hits_l2"], "hits_flight": s["hits_flight"],
            "misses": s["misses"], "fills": s["fills"], "fill_bytes": s["fill_bytes"],
            "hit_bytes": s["hit_bytes"], "too_large": s["too_large"], "abandoned": s["abandoned"],
            "bypasses": sum(self.bypass_reasons.values()), "bypass_reasons": dict(self.bypass_reasons),
            "invalidations": s["invalidations"], "invalidation_failures": s["invalidation_failures"],
            "purges": s["purges"], "replicated_invalidations": s["replicated_invalidations"],
            "commit_waits": s["commit_waits"], "commit_wait_ms": s["commit_wait_ms"],
            "replica_fills": s["replica_fills"], "replica_fills_refused": s["replica_fills_refused"],
            "positions_recorded": s["positions_recorded"],
            "errors": self.versions.errors + self.catalog.errors, "redis_outages": self.versions.outages,
            "epoch_changes": self.versions.epoch_changes, "l1_entries": len(self.l1), "l1_bytes": self.l1.bytes,
            "catalog_lookups": self.catalog.lookups,
        }

    # -- internals ------------------------------------------------------------------------------------------
    def _hit(self, reply: bytes, level: str) -> Hit:
        self._count_hit(reply, "hits_" + level)
        return Hit(reply, level)

    def _count_hit(self, reply: bytes, level_counter: str) -> None:
        stats = self.stats
        stats["hits"] += 1
        stats[level_counter] += 1
        stats["hit_bytes"] += len(reply)

    def _miss(self, key: bytes, stamp: bytes, fields: tuple[str, ...], leader: bool, checked: float,
              replica: bool = False) -> Fill:
        self.stats["misses"] += 1
        return Fill(key, stamp, fields, ResultCapture(self.max_result_size), leader, checked, replica)

    def _bypass(self, reason: str) -> Bypass:
        self.bypass_reasons[reason] += 1
        return Bypass(reason)

    def _invalidated(self, fields: list[str]) -> None:
        """Versions changed (here or, via pub/sub, elsewhere): free the L1 entries they guard; a DDL note
        ("ddl:<db>:<rel>,<rel>" or "ddl:<db>:") drops catalog facts."""
        for f in fields:
            if f.startswith("ddl:"):
                database, _, relations = f[4:].rpartition(":")
                self.catalog.forget(database, [r for r in relations.split(",") if r])
        if FLUSH_ALL in fields:
            self.l1.clear()
        else:
            self.l1.drop_fields([f for f in fields if not f.startswith("ddl:")])

    async def _replicated_writes(self, database: str, tables: set[str]) -> bool:
        """Writes seen in the replication stream (maybe by-passing pgfront): bump their versions."""
        fields = [table_field(database, relname(t)) for t in tables]
        self._invalidated(fields)
        self.stats["replicated_invalidations"] += 1
        if await self.versions.bump(fields) is None:
            return False
        self._want_positions(fields)
        return True

    # -- WAL positions of bumps, for fills from replicas ----------------------------------------------------
    def _want_positions(self, fields: Iterable[str]) -> None:
        """Record, in the background, a WAL position covering the current value of each field (FLUSH_ALL:
        the epoch): one task at a time, taking every field asked for meanwhile (see `_cover`)."""
        if self.lsn_source is None:
            return
        self._cover_pending.update(EPOCH if f == FLUSH_ALL else f for f in fields
                                   if f == FLUSH_ALL or needs_position(f))
        if self._cover_pending and (self._covering is None or self._covering.done()):
            self._covering = asyncio.get_running_loop().create_task(self._cover())
            self._tasks.add(self._covering)
            self._covering.add_done_callback(self._tasks.discard)

    async def _cover(self) -> None:
        """Read the fields' values, then the primary's WAL insert position with a query started after that
        read returned, then record the position for each field still at the value read (versions._COVER).

        Why that position is at or after the commit of every write whose bump a value includes: a write's
        bump comes after its commit (at its CommandComplete or ReadyForQuery, before the client hears of
        it), the value read includes only bumps done before the read, and the position is read after it."""
        while self._cover_pending:
            fields = sorted(self._cover_pending)
            self._cover_pending.clear()
            try:
                values = await self.versions.observe(fields)
                seen = time.monotonic()
                lsn = await self.lsn_source(seen)
                observed = [(f, v) for f, v in zip(fields, values, strict=True) if v is not None]
                if observed:
                    self.stats["positions_recorded"] += await self.versions.cover(lsn, observed)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - a replica read asks again; without a position it does not fill
                log.debug("recording WAL positions failed: %s", e)
                await asyncio.sleep(COVER_RETRY)

    def _background(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
