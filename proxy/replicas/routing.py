"""Which upstream a client's next transaction goes to: a replica only when pgfront can prove every
statement in it read-only, the primary otherwise.

The decision is made once per transaction, in transaction pooling, when the client has no server
lent and its bytes wait for one (`net.pooled`): the messages waiting are read (`classify`), and a
replica is chosen only if every complete message is a provable read (a SELECT, VALUES or SHOW with no
locking clause, no data-modifying WITH, calling only functions known not to write), or a `BEGIN READ
ONLY` (Postgres itself refuses writes in it, on either side). Anything else, or anything pgfront
cannot read, goes to the primary, which is always correct.

Read-your-writes: a transaction that went to the primary for any reason but a routing preference is
taken to have written. Once it ends, that client's reads go only to replicas whose replay position
has passed the primary's WAL insert position read after the commit (`ReplicaSet.primary_lsn_after`,
one query shared by every client that needs it), waiting up to `[routing] max_wait`, else to the
primary.
"""

from __future__ import annotations

import re
import struct
import time
from dataclasses import dataclass
from typing import Any

from proxy.cache.policy import select_side_effect
from proxy.cache.writes import relname
from proxy.log import log
from proxy.wire import protocol as pq

PRIMARY = "primary"
REPLICA = "replica"

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
_READ_ONLY_BEGIN = re.compile(r"\bread\s+only\b", re.I)
_I32 = struct.Struct("!i")


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


@dataclass(slots=True)
class Classified:
    """What the messages waiting for a server ask of it."""

    read_only: bool  # every complete message is a provable read (or needs no statement)
    why: str  # when not: the first reason, for `rules explain` and the logs
    # the bytes end on a message boundary, and any batch left open (no Sync yet: asyncpg prepares with
    # Parse, Describe, Flush) parsed no unnamed statement, which could not follow the client elsewhere
    complete: bool


def read_only_reason(info: Any, function_ok: Any) -> str:
    """"" when the statement is a provable read that a replica can answer as the primary would, else why
    not. `function_ok(name)` -> True, False, or None (not known yet: a read must not wait for it)."""
    if not info.parsed:
        return "not parsed"
    if info.statements:
        return "several statements"
    if info.kind == "utility" and info.text.lstrip()[:4].lower() == "show":
        return ""
    if info.kind == "transaction" and info.tx == "begin" and _READ_ONLY_BEGIN.search(info.text):
        return ""  # BEGIN READ ONLY: Postgres refuses any write in it, on either side
    if info.kind != "select":
        return f"a {info.kind} statement"
    why = select_side_effect(info)
    if why:
        return why
    for f in info.functions:
        ok = function_ok(f)
        if not ok:
            return f"function {f}" + (" (not known yet)" if ok is None else "")
    return ""


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


def classify(data: bytes, statements: dict, info_of: Any, reason_of: Any, continuing: bool = False) -> Classified:
    """Read the client's waiting bytes message by message. `statements`: the client's prepared statements
    (name -> Stmt with .info); `info_of(sql)` -> StatementInfo; `reason_of(info)` -> read_only_reason.
    `continuing`: the bytes follow others on the same server (its unnamed statement is the client's)."""
    n = len(data)
    i = 0
    current = statements.get("") if continuing else None
    unnamed = current.info if current is not None else None  # the unnamed statement's StatementInfo
    open_unnamed = False  # an unnamed Parse since the last Sync
    while i + 5 <= n:
        t = data[i]
        size = _I32.unpack_from(data, i + 1)[0]
        end = i + 1 + size
        if size < 4 or end > n:
            break
        body = data[i + 5:end]
        if t == 81:  # Query
            info = info_of(body[:-1].decode(pq.ENC, pq.ERRORS))
            why = reason_of(info)
            if why:
                return Classified(False, why, True)
        elif t == 80:  # Parse
            name, sql, _oids = pq.parse_parse(body)
            info = info_of(sql)
            why = reason_of(info)
            if why:
                return Classified(False, why, True)
            if not name:
                unnamed = info
                open_unnamed = True
        elif t == 66:  # Bind
            _portal, name = pq.bind_names(body)
            if name:
                stmt = statements.get(name)
                if stmt is None:
                    return Classified(False, "unknown prepared statement", True)
                why = reason_of(stmt.info)
                if why:
                    return Classified(False, why, True)
            elif unnamed is None:
                return Classified(False, "unnamed statement of an earlier batch", True)
        elif t == 83:  # Sync
            open_unnamed = False
        elif t in (68, 69, 72, 67):  # Describe, Execute, Flush, Close
            pass
        else:  # COPY data, a function call, Terminate...
            return Classified(False, f"message {chr(t)!r}", True)
        i = end
    if i == 0:
        return Classified(False, "no complete message", False)
    return Classified(True, "", i == n and not open_unnamed)


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


WAIT = object()  # `Router.pick`: the choice needs an await (`Router.pick_later`)
MARK = object()  # `Router.pick`: the primary, once the possible write is marked in Redis (`Router.mark_write`)


class Router:
    """A worker's routing of transactions between the primary and its replicas (`health.ReplicaSet`)."""

    def __init__(self, replicas: Any, catalog: Any, cfg: Any, own_catalog: bool = False) -> None:
        self.replicas = replicas
        self.own_catalog = own_catalog
        self.functions = FunctionFacts(catalog, cfg.read_only_functions)
        self.read_your_writes = cfg.read_your_writes
        self.max_wait = cfg.max_wait
        self.to_primary = 0  # transactions sent to the primary: writes, unprovable, or preferred
        self._checkers: dict[str, Any] = {}
        self.count: Any = lambda name, n=1: None  # the worker's statistics counter (App.stats_inc)
        self.marks: Any = None  # marks.WriteMarks: read-your-writes across the sessions of a user/application

    async def close(self) -> None:
        if self.marks is not None:
            await self.marks.close()
        await self.replicas.close()
        if self.own_catalog:
            await self.functions.catalog.close()

    def reason(self, database: str) -> Any:
        """read_only_reason for this database's function facts."""
        ok = self._checkers.get(database)
        if ok is None:
            ok = self._checkers[database] = self.functions.checker(database)
        return lambda info: read_only_reason(info, ok)

    def pick(self, client: Any, data: bytes) -> Any:
        """The replica for the transaction waiting in `data`, None for the primary, or WAIT. Sets
        client.route_wrote when the transaction goes to the primary as a possible write."""
        client.route_wrote = False
        marks = self.marks
        if client.route_pref == PRIMARY or client.pinned or client.route_retry_primary:
            client.route_retry_primary = False
            if marks is not None and client.route_pref == PRIMARY and not client.pinned:
                # its writes must be marked for the other sessions of its scope all the same
                c = classify(data, client.statements, client.app.shapes.get, self.reason(client.database))
                client.route_wrote = not c.read_only
                return self._write(client)
            return self._primary()
        c = classify(data, client.statements, client.app.shapes.get, self.reason(client.database))
        forced = self._rule_route(client, data) if client.app.rules is not None else None
        if forced == PRIMARY or (forced is None and not (c.read_only and c.complete)):
            client.route_wrote = not c.read_only  # a rule's `route = "primary"` does not stop it writing
            return self._write(client)
        if forced == REPLICA and not c.complete:
            return self._primary()  # a rule cannot make half a batch safe to move
        if marks is not None and marks.key(client) is not None:
            return WAIT  # other sessions' writes: only Redis knows
        if self.read_your_writes and client.ryw_since:
            if not client.ryw_lsn:
                return WAIT
            replica = self.replicas.choose(client.database, client.ryw_lsn)
            return replica if replica is not None else WAIT
        replica = self.replicas.choose(client.database)
        if replica is None:
            return self._primary()
        return self._replica(replica)

    def still_read_only(self, client: Any, data: bytes, continuing: bool = True) -> bool:
        """May these bytes, arrived after the choice, go to the replica chosen? Only complete reads."""
        c = classify(data, client.statements, client.app.shapes.get, self.reason(client.database), continuing)
        return c.read_only and c.complete and client.route_pref != PRIMARY

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

    def _write(self, client: Any) -> Any:
        """The primary, for a transaction that may write: MARK when its scope's mark must be set first."""
        self._primary()
        if client.route_wrote and self.marks is not None and self.marks.key(client) is not None:
            return MARK
        return None

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

    def _primary(self) -> None:
        self.to_primary += 1
        self.count("routed_transactions|upstream|primary")
        return None

    def _replica(self, replica: Any) -> Any:
        replica.routed += 1
        self.count(f"routed_transactions|upstream|{replica.target.name}")
        return replica

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

    @staticmethod
    def _rule_route(client: Any, data: bytes) -> str | None:
        """A rule's `route` for the first statement waiting (a Query's or a Parse's), if any rule says."""
        if len(data) < 6 or data[:1] not in (b"Q", b"P"):
            return None
        size = _I32.unpack_from(data, 1)[0]
        if size + 1 > len(data):
            return None
        body = data[5:1 + size]
        sql = body[:-1].decode(pq.ENC, pq.ERRORS) if data[:1] == b"Q" else pq.parse_parse(body)[1]
        decision = client.app.rules.decide_for(client, sql, client.app.shapes.get(sql))
        return getattr(decision, "route", None) if decision is not None else None
