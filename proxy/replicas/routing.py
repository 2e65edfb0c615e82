"""Which upstream a client's next transaction goes to: a replica only when pgfront can prove every
statement in it read-only, the primary otherwise.

The decision is made once per transaction, in transaction pooling, when the client has no server
lent and its bytes wait for one (`net.bytepath`, `choice.Routing.choose_for`): the messages waiting are
read (`classify`), and a replica is chosen only if every complete message is a provable read (a
SELECT, VALUES or SHOW with no locking clause, no data-modifying WITH, calling only functions known
not to write), or a `BEGIN READ ONLY` (Postgres itself refuses writes in it, on either side).
Anything else, or anything pgfront cannot read, goes to the primary, which is always correct.

Read-your-writes: a transaction that went to the primary for any reason but a routing preference is
taken to have written. Once it ends, that client's reads go only to replicas whose replay position
has passed the primary's WAL insert position read after the commit (`ReplicaSet.primary_lsn_after`,
one query shared by every client that needs it), waiting up to `[routing] max_wait`, else to the
primary.
"""

from __future__ import annotations

import re
import time
from typing import Any

from proxy.cache.writes import relname
from proxy.log import log
from proxy.replicas.choice import (  # noqa: F401 - re-exported: the statement part of routing
    MARK,
    NO_MESSAGE,
    PRIMARY,
    READ,
    READ_OPEN,
    REPLICA,
    WAIT,
    Classified,
    Reasons,
    Routing,
    classify,
    functions_reason,
    read_only_reason,
    statement_reason,
    statement_reasons,
)
from proxy.wire import protocol as pq

# Built-ins that write, take locks, assign a transaction id, touch session state, or answer
# differently on a standby: a read calling one of them stays on the primary.
PRIMARY_ONLY_FUNCTIONS = frozenset({
    "nextval", "setval", "currval", "lastval", "set_config", "txid_current", "pg_current_xact_id",
    "txid_current_if_assigned", "pg_current_xact_id_if_assigned", "pg_notify", "pg_is_in_recovery",
    "pg_current_wal_lsn", "pg_current_wal_insert_lsn", "pg_current_wal_flush_lsn", "pg_switch_wal",
    "pg_create_restore_point", "pg_logical_emit_message", "pg_terminate_backend", "pg_cancel_backend",
    "pg_reload_conf", "pg_rotate_logfile", "pg_promote", "pg_stat_reset", "pg_stat_reset_shared",
    "pg_stat_reset_single_table_counters", "pg_stat_reset_single_function_counters", "pg_stat_reset_slru",
    "pg_wal_replay_pause", "pg_wal_replay_resume", "pg_create_physical_replication_slot",
    "pg_create_logical_replication_slot", "pg_drop_replication_slot", "pg_replication_origin_create",
    "pg_replication_origin_drop", "lo_create", "lo_creat", "lo_import", "lo_unlink", "lo_open", "lo_put",
    "lo_from_bytea", "lo_truncate", "lowrite", "dblink_exec", "dblink", "pg_import_system_collations",
    "pg_advisory_lock", "pg_advisory_lock_shared", "pg_advisory_unlock", "pg_advisory_unlock_shared",
    "pg_advisory_unlock_all", "pg_advisory_xact_lock", "pg_advisory_xact_lock_shared",
    "pg_try_advisory_lock", "pg_try_advisory_lock_shared", "pg_try_advisory_xact_lock",
    "pg_try_advisory_xact_lock_shared", "pg_backend_pid",
})

_SET_ROUTE = re.compile(r"\s*(?:(set)\s+(?:session\s+)?pgfront\.route\s*(?:=|\bto\b)\s*'?(\w+)'?|(reset)\s+pgfront\.route)"
                        r"\s*;?\s*", re.I)


def route_setting(sql: str) -> str | None:
    """`SET pgfront.route = primary|auto|default` (or RESET): the value set ("auto" for RESET or default),
    the value as written if it is not one of those, else None (not this setting)."""
    m = _SET_ROUTE.fullmatch(sql)
    if m is None:
        return None
    value = "auto" if m.group(3) else m.group(2).lower()
    return "auto" if value == "default" else value


def route_reply(client: Any, value: str) -> bytes:
    """pgfront's own answer to SET pgfront.route (a Query's whole reply)."""
    if value not in (PRIMARY, "auto"):
        return (pq.error_response("22023", f'invalid value for parameter "pgfront.route": "{value}" '
                                           "(expected primary or auto)")
                + pq.ready_for_query(client.tx_status))
    if value != PRIMARY and client.route_pref == PRIMARY:
        # its transactions meanwhile were not classified: any may have written, so reads wait for replay
        client.ryw_since, client.ryw_lsn = time.monotonic(), 0
    client.route_pref = value
    return pq.command_complete("SET") + pq.ready_for_query(client.tx_status)


class FunctionFacts:
    """Which functions a replica may run: PostgreSQL's built-ins minus PRIMARY_ONLY_FUNCTIONS, the
    [routing] read_only_functions, and whatever the catalog says is STABLE or IMMUTABLE."""

    def __init__(self, catalog: Any, declared: list[str]) -> None:
        self.catalog = catalog
        self.declared = frozenset(relname(f) for f in declared)

    def checker(self, database: str) -> Any:
        def ok(name: str) -> bool | None:
            name = relname(name)
            bare = name.rpartition(".")[2]
            if name in self.declared or bare in self.declared:
                return True
            if bare in PRIMARY_ONLY_FUNCTIONS and (name == bare or name.startswith("pg_catalog.")):
                return False
            if self.catalog is None:
                return False
            facts = self.catalog.function(database, name)
            return None if facts is None else not facts.may_write
        return ok


def explain_route(info: Any, forced: str | None, in_transaction: bool, declared: list[str]) -> str:
    """`pgfront rules explain`'s routing line (the catalog's function facts are not at hand there)."""
    if forced is not None:
        return f"{forced} (a rule's route)"
    if in_transaction:
        return "where its transaction is: routing is decided at a transaction's first statement"
    checker = FunctionFacts(None, declared).checker("")
    unknown: list[str] = []

    def ok(name: str) -> bool | None:
        if checker(name):
            return True
        if relname(name).rpartition(".")[2] in PRIMARY_ONLY_FUNCTIONS:
            return False
        unknown.append(name)
        return True

    why = read_only_reason(info, ok)
    if why:
        return f"primary ({why})"
    if unknown:
        return (f"a replica if the catalog says {', '.join(sorted(unknown))} cannot write (STABLE or IMMUTABLE, "
                "or a built-in), else primary")
    return "a replica (a provable read), one that has replayed the client's last write"


class Router(Routing):
    """A worker's routing of transactions between the primary and its replicas (`health.ReplicaSet`):
    the choice per transaction is `choice.Routing`'s (compiled); the waits it may need are here."""

    def __init__(self, replicas: Any, catalog: Any, cfg: Any, own_catalog: bool = False) -> None:
        super().__init__(replicas, cfg.read_your_writes, cfg.max_wait)
        self.own_catalog = own_catalog
        self.functions = FunctionFacts(catalog, cfg.read_only_functions)

    def serve(self, app: Any) -> None:
        """Work for the worker `app`: read its statements' shapes, and count into its statistics (bans and
        retries at once, the transactions routed, C counters, whenever the statistics are read)."""
        self.shapes = app.shapes
        self.stats = app.stats
        app.stats.folds.append(self.fold_counts)

    async def close(self) -> None:
        if self.marks is not None:
            await self.marks.close()
        await self.replicas.close()
        if self.own_catalog:
            await self.functions.catalog.close()

    async def pick_later(self, client: Any) -> Any:
        """Read-your-writes: learn the primary's WAL position after the client's last write (once), and
        the one its scope's writes need (`marks`), then wait up to max_wait for a replica that has replayed
        it; None (the primary) if none does."""
        need = 0
        try:
            if client.ryw_since and not client.ryw_lsn:
                client.ryw_lsn = await self.replicas.primary_lsn_after(client.ryw_since)
            if client.ryw_since:
                need = client.ryw_lsn
            key = self.marks.key(client) if self.marks is not None else None
            if key is not None:
                scope = await self.marks.required(key)
                if scope is None:  # a write may be open and acknowledged at any time: the position now
                    scope = await self.replicas.primary_lsn_after(time.monotonic())
                need = max(need, scope)
        except Exception:  # noqa: BLE001 - no position known (the primary or Redis did not say): the primary answers
            return self._primary()
        if not need:
            replica = self.replicas.choose(client.database)
            return self._replica(replica) if replica is not None else self._primary()
        replica = await self.replicas.wait_replayed(client.database, need, self.max_wait)
        if replica is None:
            return self._primary()
        return self._replica(replica)

    async def mark_write(self, client: Any) -> None:
        """Before a possible write is sent: its scope's mark in Redis, kept alive until `settle`. If Redis
        cannot say, the write goes ahead (logged): refusing it would fail the client for our bookkeeping,
        and readers that cannot reach Redis read on the primary."""
        marks = self.marks
        key, field = marks.key(client), marks.field(client)
        try:
            mark = await marks.pending(key, field)
        except Exception as e:  # noqa: BLE001
            log.warning("read-your-writes mark not stored", extra={"client": client.id, "reason": str(e)})
            self.count("ryw_marks_failed")
            return
        marks.hold(key, field, mark)
        client.ryw_mark = (key, field, mark)

    async def settle(self, mark: tuple[str, str, str], since: float) -> None:
        """The marked write is over: its mark becomes the primary's position read after `since`."""
        key, field, value = mark
        try:
            lsn = await self.replicas.primary_lsn_after(since)
            await self.marks.settle(key, field, value, lsn)
        except Exception as e:  # noqa: BLE001 - the mark stays pending: readers use the position of their time
            log.info("read-your-writes mark not settled", extra={"reason": str(e)})
        finally:
            self.marks.release(key, field, value)

    def retry_elsewhere(self, replica: Any) -> None:
        self.count(f"replica_retries|replica|{replica.target.name}")

    def state_changed(self, replica: Any, old: str, new: str) -> None:
        if old == "ok":
            self.count(f"replica_bans|replica|{replica.target.name}")

    def publish(self, stats: Any) -> None:
        """The replicas' lag and usability as gauges (/metrics)."""
        for r in self.replicas.replicas:
            name = r.target.name
            stats.set_gauge(f"replica_lag_bytes|replica|{name}", r.lag_bytes)
            stats.set_gauge(f"replica_lag_seconds|replica|{name}", r.lag_seconds)
            stats.set_gauge(f"replica_usable|replica|{name}", 1 if r.usable else 0)
