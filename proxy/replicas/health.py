"""Health and replay position of the read replicas, probed by each worker on its own.

Every `probe_interval` a round reads the primary's WAL insert position, then (after it, so that a
replica is never compared with a position newer than its own reading) each replica's recovery status
and replay position, each over its own persistent asyncpg connection. The router reads the results
as plain attributes on the hot path; `primary_lsn_after` and `wait_replayed` add on-demand queries for
read-your-writes, coalesced so that a burst of clients costs one query per server, not one per client.

Positions are byte offsets into the WAL (ints); `parse_lsn`/`format_lsn` convert the X/Y text form.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from proxy.cache.catalog import connect
from proxy.log import log
from proxy.replicas.choice import Upstream, choose

# pg_lsn - pg_lsn is numeric: cast to int8 so that asyncpg hands back ints; NULL (no such position) reads 0.
# The replay age is taken on the replica's own clock, which also stamped the replayed commit.
_REPLICA_SQL = """
SELECT pg_is_in_recovery() AS in_recovery,
       coalesce((pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8, 0) AS replay_lsn,
       coalesce((pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::int8, 0) AS receive_lsn,
       coalesce(extract(epoch FROM clock_timestamp() - pg_last_xact_replay_timestamp())::float8, 0) AS replay_age
"""
_PRIMARY_SQL = "SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8"

REPROBE_GAP = 0.005  # seconds between two on-demand probes of one replica while a read waits for its replay


def parse_lsn(text: str) -> int:
    """'16/B374D848' -> its byte position."""
    hi, sep, lo = text.strip().partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return int(hi, 16) << 32 | int(lo, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _host(url: str) -> str:
    """host:port of a postgresql:// URL, for display (a multi-host URL shows as written; a Unix socket
    directory comes from the query string: postgresql://user@/db?host=/run/postgresql&port=5433)."""
    parts = urlsplit(url)
    where = parts.netloc.rpartition("@")[2]
    if not where:
        query = parse_qs(parts.query)
        where = query.get("host", [""])[0]
        port = query.get("port", ["5432"])[0]
    elif ":" in where and not where.endswith("]"):
        return where
    else:
        port = "5432"
    return f"{where}:{port}" if where else ""


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".rstrip(": ") if str(e) else type(e).__name__


@dataclass(frozen=True, slots=True)
class ReplicaTarget:
    name: str                                  # e.g. "replica1"
    url: str                                   # postgresql:// URL of pgfront's own probe connection
    weight: float = 1.0                        # share of the reads; 0 takes none
    databases: frozenset[str] | None = None    # None: serves every database


class _Link:
    """A persistent probe connection: connected on first use, dropped after any failure, and so
    reconnected by the next query. Its owner runs one query at a time on it."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url = url
        self.database = unquote(urlsplit(url).path.lstrip("/")) or "postgres"  # any database will do
        self.timeout = timeout
        self.conn: asyncpg.Connection | None = None

    async def fetchrow(self, sql: str) -> asyncpg.Record:
        try:
            if self.conn is None or self.conn.is_closed():
                self.conn = await connect(self.url, self.database, "pgfront-replica-probe", self.timeout)
            return await self.conn.fetchrow(sql, timeout=self.timeout)
        except BaseException:
            self.drop()
            raise

    def drop(self) -> None:
        if self.conn is not None:
            self.conn.terminate()  # no goodbye: the server may be what failed
            self.conn = None

    async def close(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close(timeout=self.timeout)
            except Exception:
                self.drop()
            self.conn = None


class Replica(Upstream):
    """Live state of one replica, updated by its ReplicaSet's probes. What the router reads per
    transaction (state, replay position, weight) is `choice.Upstream`'s, compiled."""

    __slots__ = ("in_recovery", "replay_asked", "lag_bytes", "lag_seconds", "bans", "last_error", "probed_at",
                 "_link", "_probe", "_probe_end")

    def __init__(self, target: ReplicaTarget, link: _Link) -> None:
        super().__init__(target)
        self.in_recovery = False
        self.replay_asked = float("-inf")  # when the probe that read replay_lsn was sent (monotonic)
        self.lag_bytes = 0           # primary's insert position (latest probe) - replay_lsn, >= 0
        self.lag_seconds = 0.0       # age of the last replayed commit while replay is behind, else 0
        self.bans = 0                # times it went from usable to not usable
        self.last_error = ""         # the latest failed probe's error (kept after recovery, for the console)
        self.probed_at = 0.0         # time.monotonic() of the last successful probe
        self._link = link
        self._probe: asyncio.Task[None] | None = None   # the probe in flight (shared by whoever needs one)
        self._probe_end = 0.0

    @property
    def usable(self) -> bool:
        return self.ok

    def replayed_for(self, logged_in: float) -> int:
        """A WAL position this replica has certainly replayed, for a query sent from now on over a connection
        that logged in at monotonic time `logged_in`; 0 when none is known.

        It is the latest probe's replay position, provided the probe found the server in recovery and was
        sent after the connection had logged in. Then the server that answered the probe is the one the
        connection still talks to, in the same run: a restart (which may start replay again from an older
        point) or a crash closes every connection. And in one run of a standby the replay position only
        grows, a commit being visible to snapshots taken once its record is replayed."""
        if self.in_recovery and logged_in < self.replay_asked:
            return self.replay_lsn
        return 0

    def serves(self, database: str) -> bool:
        dbs = self.databases
        return dbs is None or database in dbs

    def __repr__(self) -> str:
        return f"<Replica {self.target.name} {self.state} replay={format_lsn(self.replay_lsn)} lag={self.lag_bytes}B>"


def _consume(task: asyncio.Task) -> None:
    """Mark a shared task's exception as seen: its callers may all have gone away."""
    if not task.cancelled():
        task.exception()


class ReplicaSet:
    """The replicas of one primary, as seen by this worker."""

    def __init__(self, targets: list[ReplicaTarget], primary_url: str, *, max_lag_bytes: int,
                 max_lag_seconds: float, probe_interval: float = 1.0, connect_timeout: float = 2.0) -> None:
        self.replicas = [Replica(t, _Link(t.url, connect_timeout)) for t in targets]
        self.max_lag_bytes = max_lag_bytes
        self.max_lag_seconds = max_lag_seconds
        self.probe_interval = probe_interval
        self.connect_timeout = connect_timeout
        self.on_change: Callable[[Replica, str, str], None] | None = None
        self.primary_lsn = 0             # latest pg_current_wal_insert_lsn() read from the primary
        self.primary_error = ""          # why the latest primary query failed; "" once one succeeds
        self.primary_lsn_queries = 0     # queries sent to the primary (probes and primary_lsn_after)
        self.replica_probes = 0          # probe queries sent to replicas (rounds and wait_replayed)
        self._primary = _Link(primary_url, connect_timeout)
        self._lsn_task: asyncio.Task[int] | None = None
        self._lsn_started = 0.0          # when the query of _lsn_task was started
        self._lsn_at = float("-inf")     # when the latest successful primary query was started
        self._loop: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start probing; returns after the first round, or after connect_timeout if that takes longer
        (the round goes on in the background and replicas stay "starting", without reads, until it ends)."""
        first = asyncio.Event()
        self._loop = asyncio.create_task(self._run(first), name="pgfront-replica-probes")
        try:
            await asyncio.wait_for(first.wait(), self.connect_timeout)
        except TimeoutError:
            pass

    async def close(self) -> None:
        self._closed = True
        tasks = [t for t in (self._loop, self._lsn_task, *(r._probe for r in self.replicas)) if t and not t.done()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(self._primary.close(), *(r._link.close() for r in self.replicas))

    async def _run(self, first: asyncio.Event) -> None:
        while True:
            began = time.monotonic()
            try:
                await self._round()
            except Exception:  # a bug, not a server failure (those are states): keep probing regardless
                log.exception("replica probe round failed")
            first.set()
            await asyncio.sleep(max(0.0, began + self.probe_interval - time.monotonic()))

    async def _round(self) -> None:
        try:
            await self.primary_lsn_after(time.monotonic())
        except Exception:
            pass  # in primary_error; replicas are still probed, their lag measured against the last position known
        if self.replicas:
            await asyncio.wait([self._probe(r) for r in self.replicas])

    # -- routing --------------------------------------------------------------------------------------
    def choose(self, database: str, min_lsn: int = 0) -> Replica | None:
        """A usable replica serving `database` that has replayed up to `min_lsn`, at random by weight."""
        return choose(self.replicas, database, min_lsn)

    async def primary_lsn_after(self, t: float) -> int:
        """The primary's WAL insert position, read by a query started after monotonic time `t` (so it covers
        every commit that had returned by then). Callers share queries: one that started after `t`, in flight
        or just finished, serves them all. Raises when the primary cannot be queried."""
        while True:
            if self._lsn_at >= t:
                return self.primary_lsn
            task = self._lsn_task
            if task is None or task.done():
                task = self._start_lsn_query()
            elif self._lsn_started < t:
                # sent before t, so it may have missed the caller's commit: wait for it and share the next
                await asyncio.wait([task])
                continue
            return await asyncio.shield(task)

    def _start_lsn_query(self) -> asyncio.Task[int]:
        self._lsn_started = time.monotonic()
        task = self._lsn_task = asyncio.create_task(self._query_primary(self._lsn_started))
        task.add_done_callback(_consume)
        return task

    async def _query_primary(self, started: float) -> int:
        self.primary_lsn_queries += 1
        try:
            lsn = (await self._primary.fetchrow(_PRIMARY_SQL))[0]
        except Exception as e:
            if not self.primary_error:
                log.warning("primary probe failed", extra={"reason": _reason(e)})
            self.primary_error = _reason(e)
            raise
        if self.primary_error:
            log.info("primary probe works again")
            self.primary_error = ""
        self.primary_lsn = max(self.primary_lsn, lsn)
        self._lsn_at = max(self._lsn_at, started)
        return lsn

    async def wait_replayed(self, database: str, lsn: int, timeout: float) -> Replica | None:
        """A usable replica serving `database` that has replayed `lsn`, waiting up to `timeout` seconds for
        one while re-probing the candidates' replay positions (each replica's probe shared by all waiters)."""
        found = self.choose(database, lsn)
        if found is not None or timeout <= 0 or self._closed:
            return found
        deadline = time.monotonic() + timeout
        while True:
            # down ones are left to the probe loop: reconnecting takes longer than a read should wait
            cands = [r for r in self.replicas if r.state in ("ok", "lagging") and r.serves(database)]
            remaining = deadline - time.monotonic()
            if not cands or remaining <= 0:
                return None
            await asyncio.wait([self._probe(r, REPROBE_GAP) for r in cands], timeout=remaining,
                               return_when=asyncio.FIRST_COMPLETED)
            found = self.choose(database, lsn)
            if found is not None:
                return found

    def suspect(self, r: Replica, why: str) -> None:
        """A client's connection to `r` failed: no reads go there until the next probe finds it well."""
        r.last_error = why
        self._set_state(r, "down")

    # -- probing a replica ----------------------------------------------------------------------------
    def _probe(self, r: Replica, gap: float = 0.0) -> asyncio.Task[None]:
        """The probe of `r` in flight, else a new one (started at least `gap` s after the previous one ended)."""
        task = r._probe
        if task is None or task.done():
            task = r._probe = asyncio.create_task(self._probe_once(r, gap))
        return task

    async def _probe_once(self, r: Replica, gap: float) -> None:
        delay = r._probe_end + gap - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        self.replica_probes += 1
        asked = time.monotonic()
        try:
            row = await r._link.fetchrow(_REPLICA_SQL)
        except Exception as e:
            r.last_error = _reason(e)
            self._set_state(r, "down")
        else:
            self._apply(r, row, asked)
        finally:
            r._probe_end = time.monotonic()

    def _apply(self, r: Replica, row: asyncpg.Record, asked: float = float("-inf")) -> None:
        r.in_recovery = row["in_recovery"]
        r.replay_lsn = row["replay_lsn"]
        r.replay_asked = asked
        r.probed_at = time.monotonic()
        if not r.in_recovery:
            r.lag_bytes, r.lag_seconds = 0, 0.0  # no longer following anything: lag means nothing
            self._set_state(r, "promoted")
            return
        primary = self.primary_lsn
        r.lag_bytes = max(0, primary - r.replay_lsn)
        # Caught up with what the primary had written before this probe, or with all the replica has received:
        # then the age of the last replayed commit is no lag (an idle primary commits nothing). A replica cut
        # off from its primary has replayed all it received too; lag_bytes shows that one.
        receive = row["receive_lsn"]
        caught_up = r.replay_lsn >= primary or (receive > 0 and r.replay_lsn >= receive)
        r.lag_seconds = 0.0 if caught_up else max(0.0, row["replay_age"])
        lagging = r.lag_bytes > self.max_lag_bytes or r.lag_seconds > self.max_lag_seconds
        self._set_state(r, "lagging" if lagging else "ok")

    def _set_state(self, r: Replica, new: str) -> None:
        old = r.state
        if new == old:
            return
        r.state = new
        if old == "ok":
            r.bans += 1
        extra = {"replica": r.target.name, "old_state": old, "new_state": new,
                 "replay_lsn": format_lsn(r.replay_lsn), "lag_bytes": r.lag_bytes,
                 "lag_seconds": round(r.lag_seconds, 3)}
        if new == "ok":
            log.info("replica usable", extra=extra)
        elif new == "promoted":
            # logged on the change only, so once for as long as it stays promoted
            log.warning("replica is out of recovery: no reads go to it (it is a primary now, and writes on it "
                        "would split the data)", extra=extra)
        elif new == "down":
            log.warning("replica down", extra={**extra, "reason": r.last_error})
        else:
            log.warning(f"replica {new}", extra=extra)
        if self.on_change is not None:
            try:
                self.on_change(r, old, new)
            except Exception:
                log.exception("replica on_change callback failed", extra={"replica": r.target.name})

    # -- admin ----------------------------------------------------------------------------------------
    def describe(self) -> list[dict[str, object]]:
        """SHOW REPLICAS' rows (`routed`: transactions this worker's router sent to it)."""
        return [
            {"name": r.target.name, "host": _host(r.target.url), "state": r.state, "in_recovery": r.in_recovery,
             "replay_lsn": format_lsn(r.replay_lsn), "lag_bytes": r.lag_bytes,
             "lag_seconds": round(r.lag_seconds, 3), "weight": r.target.weight,
             "routed": r.routed, "bans": r.bans, "last_error": r.last_error}
            for r in self.replicas
        ]
