"""Catch writes that bypass pgfront (psql on the server, other apps) through logical decoding.

One task per database: it takes a session advisory lock so only one pgfront process (of any instance)
consumes the database's slot, creates the slot with the built-in `test_decoding` plugin when it is
missing, and every `interval` seconds reads the decoded changes, parses the table names of INSERT /
UPDATE / DELETE / TRUNCATE lines and bumps their versions. Changes are consumed by the read: when the
bump fails (Redis down) the version layer has recorded an outage and replaces the epoch on recovery,
which invalidates everything, so nothing is lost.

A logical slot retains WAL while nobody consumes it (pgfront stopped, listener disabled): drop it with
`SELECT pg_drop_replication_slot('<slot>')` when the listener is turned off for good. DDL is not in the
stream; only the TTL bounds results made stale by DDL run outside pgfront.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

import asyncpg

from proxy.cache.catalog import connect
from proxy.cache.writes import relname

log = logging.getLogger("pgfront.cache.replication")

_CHANGE = re.compile(r"^table (.+?): (?:INSERT|UPDATE|DELETE|TRUNCATE)\b")
_NAME = re.compile(r'((?:"(?:[^"]|"")*"|[^",\s])+)')
_GET_CHANGES = """SELECT data FROM pg_logical_slot_get_changes($1, NULL, $2,
                  'include-xids', '0', 'skip-empty-xacts', '1')"""


def slot_name(base: str, database: str) -> str:
    """One slot per database (slots are bound to one): '<base>_<database>' made a valid slot name."""
    return re.sub(r"[^a-z0-9_]", "_", f"{base}_{database}".lower())[:63]


def tables_in_changes(lines: list[str]) -> set[str]:
    """Relation names (writes.relname form) of the data changes in test_decoding output."""
    out = set()
    for line in lines:
        m = _CHANGE.match(line)
        if m:
            out.update(relname(n) for n in _NAME.findall(m.group(1)))
    return out


class ReplicationListener:
    def __init__(self, dsn: str, slot_base: str, on_writes: Callable[[str, set[str]], Awaitable[bool]],
                 *, interval: float = 0.2, batch: int = 10_000, retry_after: float = 1.0) -> None:
        self.dsn = dsn
        self.slot_base = slot_base
        self.on_writes = on_writes
        self.interval = interval
        self.batch = batch
        self.retry_after = retry_after
        self.active: set[str] = set()        # databases whose slot this process consumes right now
        self.changes = 0
        self._tasks: dict[str, asyncio.Task] = {}

    def follow(self, database: str) -> None:
        if database not in self._tasks:
            self._tasks[database] = asyncio.get_running_loop().create_task(self._run(database))

    async def close(self) -> None:
        for t in self._tasks.values():
            t.cancel()
        for t in self._tasks.values():
            try:
                await t
            except BaseException:
                pass
        self._tasks.clear()

    async def _run(self, database: str) -> None:
        slot = slot_name(self.slot_base, database)
        while True:
            conn = None
            try:
                conn = await connect(self.dsn, database, "pgfront-cache-replication", 5.0)
                if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", "pgfront:" + slot):
                    await asyncio.sleep(self.retry_after * 3)  # another process consumes the slot
                    continue
                await _ensure_slot(conn, slot)
                self.active.add(database)
                await self._consume(conn, database, slot)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                log.warning("replication listener for %s: %s", database, e)
                await asyncio.sleep(self.retry_after)
            finally:
                self.active.discard(database)
                if conn is not None:
                    conn.terminate()

    async def _consume(self, conn: asyncpg.Connection, database: str, slot: str) -> None:
        while True:
            rows = await conn.fetch(_GET_CHANGES, slot, self.batch)
            if rows:
                self.changes += len(rows)
                tables = tables_in_changes([r["data"] for r in rows])
                if tables:
                    await self.on_writes(database, tables)
            if len(rows) < self.batch:
                await asyncio.sleep(self.interval)


async def _ensure_slot(conn: asyncpg.Connection, slot: str) -> None:
    exists = await conn.fetchval("SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", slot)
    if not exists:
        await conn.execute("SELECT pg_create_logical_replication_slot($1, 'test_decoding')", slot)
        log.info("created logical replication slot %s", slot)
