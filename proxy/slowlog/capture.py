"""SlowLog: the session reports slow statements here; plans are captured in the background.

`maybe_capture` runs on the proxy's hot path, so it only updates a per-fingerprint counter and,
at most once per `per_fingerprint_interval`, puts a job on a bounded queue (dropped and counted
when full). A single worker task drains the queue: it EXPLAINs the statement on a separate
upstream connection (a small asyncpg pool per database and login role), snapshots the statistics
of the tables in the plan and appends one JSON record to the store.

Every record also carries the slow executions of its fingerprint since the previous record
(count, total time and a sample of durations), so the advisor can weigh fingerprints by calls x
mean time although only one plan per interval is kept.

Credentials: the proxy passes client authentication through and knows no passwords, so captures
log in with `[slowlog] dsn` (a monitoring role) when set, then `SET ROLE` to the statement's user
when that role may, so the plan sees what the user sees (silently skipped otherwise). Without a
monitoring DSN they log in to the upstream as the statement's user, which works with trust, peer,
PGPASSWORD or a .pgpass file.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg

from proxy.slowlog.explain import explain_plan, plan_relations, table_snapshot
from proxy.slowlog.store import PlanStore

log = logging.getLogger("pgfront.slowlog")

_SAMPLE_LIMIT = 64  # durations kept per fingerprint between two records
_MAX_FINGERPRINTS = 10000  # pending counters kept; the least recently slow are forgotten
_MAX_POOLS = 32
_EXPLAINABLE = frozenset({"select", "insert", "update", "delete", "merge"})


def dsn_user(dsn: str) -> str | None:
    """The login role named in a URL or key=value DSN, if any."""
    if "://" in dsn:
        name = urlsplit(dsn).username
        return unquote(name) if name else None
    m = re.search(r"(?:^|\s)user\s*=\s*'?([^'\s]+)'?", dsn)
    return m.group(1) if m else None


@dataclass
class _Pending:
    last_capture: float = float("-inf")
    calls: int = 0
    total_ms: float = 0.0
    samples: list[float] = field(default_factory=list)


@dataclass
class _Job:
    fingerprint: str
    normalized: str
    sql: str
    params: list[str | None] | None
    duration_ms: float
    database: str
    user: str
    kind: str
    writes: bool
    calls: int
    total_ms: float
    samples: list[float]
    at: float


class SlowLog:
    def __init__(self, cfg: Any, upstream_dsn: str) -> None:
        s = cfg.slowlog
        self.dsn = getattr(s, "dsn", "") or upstream_dsn
        self.monitor_user = dsn_user(getattr(s, "dsn", "") or "")
        self.interval = float(s.per_fingerprint_interval)
        self.store_parameters = bool(s.store_parameters)
        self.explain_analyze = bool(s.explain_analyze)
        self.store = PlanStore(s.path, s.max_size, getattr(s, "keep", 5))
        self.queue_size = int(getattr(s, "queue_size", 100))
        self.counters = {"captured": 0, "dropped": 0, "rate_limited": 0, "failed": 0, "skipped": 0}
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._pools: OrderedDict[tuple[str, str], asyncpg.Pool] = OrderedDict()
        self._may_set_role: dict[tuple[str, str], bool] = {}

    # -- hot path ---------------------------------------------------------------------------------
    def maybe_capture(
        self,
        *,
        fingerprint: str,
        normalized: str,
        sql: str,
        params: list[str | None] | None,
        seconds: float,
        database: str,
        user: str,
        kind: str,
        writes: bool,
    ) -> None:
        """Count a slow execution and queue a plan capture when the fingerprint is due. Never blocks."""
        ms = seconds * 1000.0
        p = self._pending.get(fingerprint)
        if p is None:
            p = self._pending[fingerprint] = _Pending()
            if len(self._pending) > _MAX_FINGERPRINTS:
                self._pending.popitem(last=False)
        else:
            self._pending.move_to_end(fingerprint)
        p.calls += 1
        p.total_ms += ms
        if len(p.samples) < _SAMPLE_LIMIT:
            p.samples.append(round(ms, 3))
        now = time.monotonic()
        if now - p.last_capture < self.interval:
            self.counters["rate_limited"] += 1
            return
        if kind not in _EXPLAINABLE:
            self.counters["skipped"] += 1
            return
        queue = self._ensure_worker()
        if queue is None or queue.full():
            self.counters["dropped"] += 1
            return
        queue.put_nowait(_Job(fingerprint, normalized, sql, list(params) if params is not None else None,
                              ms, database, user, kind, writes, p.calls, p.total_ms, p.samples, time.time()))
        p.last_capture = now
        p.calls, p.total_ms, p.samples = 0, 0.0, []

    def _ensure_worker(self) -> asyncio.Queue[_Job] | None:
        if self._worker is not None and not self._worker.done():
            return self._queue
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        self._queue = asyncio.Queue(self.queue_size)
        self._worker = loop.create_task(self._run(self._queue), name="pgfront-slowlog")
        return self._queue

    # -- background -------------------------------------------------------------------------------
    async def _run(self, queue: asyncio.Queue[_Job]) -> None:
        while True:
            job = await queue.get()
            try:
                await self._capture(job)
                self.counters["captured"] += 1
            except Exception as e:  # a capture must never hurt the proxy
                self.counters["failed"] += 1
                log.debug("slow plan capture failed for %s: %s", job.fingerprint, e)
            finally:
                queue.task_done()

    async def _pool(self, database: str, user: str) -> asyncpg.Pool:
        login = self.monitor_user or user
        key = (database, login)
        pool = self._pools.get(key)
        if pool is None:
            pool = await asyncpg.create_pool(
                self.dsn, database=database, user=login, min_size=0, max_size=2, statement_cache_size=0,
                max_inactive_connection_lifetime=60.0, server_settings={"application_name": "pgfront-slowlog"},
            )
            self._pools[key] = pool
            while len(self._pools) > _MAX_POOLS:
                _, old = self._pools.popitem(last=False)
                await old.close()
        return pool

    async def _role_for(self, conn: asyncpg.Connection, database: str, user: str) -> str | None:
        """The role to SET for this user's plans, or None (same login, or not allowed)."""
        if not self.monitor_user or user == self.monitor_user:
            return None
        key = (database, user)
        if key not in self._may_set_role:
            self._may_set_role[key] = bool(await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AND pg_has_role($1, 'MEMBER')", user
            ))
        return user if self._may_set_role[key] else None

    async def _capture(self, job: _Job) -> None:
        pool = await self._pool(job.database, job.user)
        analyze = self.explain_analyze and job.kind == "select" and not job.writes
        async with pool.acquire() as conn:
            role = await self._role_for(conn, job.database, job.user)
            try:
                plan = await explain_plan(conn, job.sql, job.params, analyze=analyze, role=role)
            except asyncpg.InsufficientPrivilegeError:
                if role is None:
                    raise
                plan = await explain_plan(conn, job.sql, job.params, analyze=analyze)
            tables = await table_snapshot(conn, plan_relations(plan))
        record: dict[str, Any] = {
            "time": datetime.fromtimestamp(job.at, UTC).isoformat(timespec="milliseconds"),
            "fingerprint": job.fingerprint,
            "normalized": job.normalized,
            "sql": job.sql,
            "duration_ms": round(job.duration_ms, 3),
            "calls": job.calls,
            "total_ms": round(job.total_ms, 3),
            "durations_ms": job.samples,
            "database": job.database,
            "user": job.user,
            "kind": job.kind,
            "analyzed": analyze and job.params is not None and None not in job.params,
            "plan": plan,
            "tables": tables,
        }
        if self.store_parameters and job.params is not None:
            record["params"] = job.params
        await asyncio.to_thread(self.store.append, record)

    # -- lifecycle --------------------------------------------------------------------------------
    async def drain(self) -> None:
        """Wait until every queued capture is written (tests, shutdown)."""
        if self._queue is not None and self._worker is not None and not self._worker.done():
            await self._queue.join()

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        pools, self._pools = list(self._pools.values()), OrderedDict()
        for pool in pools:
            await pool.close()

    def stats(self) -> dict[str, int]:
        """Counters for the admin console / metrics: captured, dropped, rate_limited, failed, skipped, queued."""
        return {**self.counters, "queued": self._queue.qsize() if self._queue is not None else 0}
