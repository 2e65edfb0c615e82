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
from proxy.sql.info import EMPTY
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


@dataclass(frozen=True, slots=True)
class Classified:
    """What the messages waiting for a server ask of it."""

    read_only: bool  # every complete message is a provable read (or needs no statement)
    why: str  # when not: the first reason, for `rules explain` and the logs
    # the bytes end on a message boundary, and any batch left open (no Sync yet: asyncpg prepares with
    # Parse, Describe, Flush) parsed no unnamed statement, which could not follow the client elsewhere
    complete: bool


# the answers for reads, shared: classifying a read allocates nothing
READ = Classified(True, "", True)
READ_OPEN = Classified(True, "", False)
NO_MESSAGE = Classified(False, "no complete message", False)


def statement_reason(info: Any) -> tuple[str, frozenset[str]]:
    """The part of read_only_reason that depends on the statement alone: ("", the functions whose facts
    decide) for a read, else (why not, no functions)."""
    if not info.parsed:
        return "not parsed", EMPTY
    if info.statements:
        return "several statements", EMPTY
    if info.kind == "utility" and info.text.lstrip()[:4].lower() == "show":
        return "", EMPTY
    if info.kind == "transaction" and info.tx == "begin" and _READ_ONLY_BEGIN.search(info.text):
        return "", EMPTY  # BEGIN READ ONLY: Postgres refuses any write in it, on either side
    if info.kind != "select":
        return f"a {info.kind} statement", EMPTY
    return select_side_effect(info), info.functions


def functions_reason(functions: frozenset[str], function_ok: Any) -> str:
    for f in functions:
        ok = function_ok(f)
        if not ok:
            return f"function {f}" + (" (not known yet)" if ok is None else "")
    return ""


def read_only_reason(info: Any, function_ok: Any) -> str:
    """"" when the statement is a provable read that a replica can answer as the primary would, else why
    not. `function_ok(name)` -> True, False, or None (not known yet: a read must not wait for it)."""
    why, functions = statement_reason(info)
    return why or functions_reason(functions, function_ok)


REASONS_MAX = 20_000  # StatementInfos a database's reasons remember (kept alive: an id is never reused meanwhile)


def statement_reasons(function_ok: Any) -> Any:
    """read_only_reason for one database's function facts, its statement part worked out once per
    StatementInfo.

    The ShapeCache gives every text of one shape (texts differing only in constants) one StatementInfo,
    and read_only_reason reads nothing else: remembering its statement part by that object gives the
    same answer without the work, at each execution of a repeated read. Function facts are asked each
    time (the catalog's expire and are read again); most reads call none. A closure: the cheapest call.
    """
    memo: dict[int, tuple[Any, str, frozenset[str]]] = {}

    def reason(info: Any) -> str:
        got = memo.get(id(info))
        if got is None:
            if len(memo) >= REASONS_MAX:
                memo.clear()
            got = memo[id(info)] = (info, *statement_reason(info))
        if got[1] or not got[2]:
            return got[1]
        return functions_reason(got[2], function_ok)

    return reason


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


_PASSING = b"DEHC"  # Describe, Execute, Flush, Close: nothing in them to read
PARSES_MAX = 20_000  # Parse messages remembered per router (`classify`'s `parses`)


def classify(data: bytes, statements: dict, info_of: Any, reason_of: Any, continuing: bool = False,
             parses: dict | None = None) -> Classified:
    """Read the client's waiting bytes message by message. `statements`: the client's prepared statements
    (name -> Stmt with .info); `info_of(sql)` -> StatementInfo; `reason_of(info)` -> read_only_reason.
    `continuing`: the bytes follow others on the same server (its unnamed statement is the client's).
    `parses`: Parse bodies seen before -> (statement name, StatementInfo), filled here: a client that
    parses the same text at every execution (libpq's extended protocol) has it read once."""
    n = len(data)
    if n > 5 and data[0] == 81 and _I32.unpack_from(data, 1)[0] + 1 == n:  # one whole Query: the usual read
        why = reason_of(info_of(data[5:-1].decode(pq.ENC, pq.ERRORS)))
        return Classified(False, why, True) if why else READ
    i = 0
    current = statements.get("") if continuing else None
    unnamed = current.info if current is not None else None  # the unnamed statement's StatementInfo
    open_unnamed = False  # an unnamed Parse since the last Sync
    while i + 5 <= n:
        t = data[i]
        end = i + 1 + _I32.unpack_from(data, i + 1)[0]
        if end < i + 5 or end > n:
            break
        if t in _PASSING:
            pass
        elif t == 66:  # Bind
            if end - i >= 7 and data[i + 5] == 0 and data[i + 6] == 0:
                name = ""  # unnamed portal, unnamed statement: the usual Bind, read without a copy
            else:
                _portal, name = pq.bind_names(data[i + 5:end])
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
        elif t == 80:  # Parse
            body = data[i + 5:end]
            got = parses.get(body) if parses is not None else None
            if got is None:
                name, sql, _oids = pq.parse_parse(body)
                got = (name, info_of(sql))
                if parses is not None:
                    if len(parses) >= PARSES_MAX:
                        parses.clear()
                    parses[body] = got
            name, info = got
            why = reason_of(info)
            if why:
                return Classified(False, why, True)
            if not name:
                unnamed = info
                open_unnamed = True
        elif t == 81:  # Query
            info = info_of(data[i + 5:end - 1].decode(pq.ENC, pq.ERRORS))
            why = reason_of(info)
            if why:
                return Classified(False, why, True)
        else:  # COPY data, a function call, Terminate...
            return Classified(False, f"message {chr(t)!r}", True)
        i = end
    if i == 0:
        return NO_MESSAGE
    return READ if i == n and not open_unnamed else READ_OPEN


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
        self._reasons: dict[str, Any] = {}  # statement_reasons by database
        self._parses: dict[bytes, tuple[str, Any]] = {}  # `classify`'s Parse bodies seen before
        self._routed_keys: dict[Any, str] = {}  # replica -> its routed_transactions counter's name
        self.count: Any = lambda name, n=1: None  # the worker's statistics counter (App.stats_inc)
        self.marks: Any = None  # marks.WriteMarks: read-your-writes across the sessions of a user/application

    async def close(self) -> None:
        if self.marks is not None:
            await self.marks.close()
        await self.replicas.close()
        if self.own_catalog:
            await self.functions.catalog.close()

    def reason(self, database: str) -> Any:
        """read_only_reason for this database's function facts (`statement_reasons`)."""
        reasons = self._reasons.get(database)
        if reasons is None:
            reasons = self._reasons[database] = statement_reasons(self.functions.checker(database))
        return reasons

    def _classify(self, client: Any, data: bytes, continuing: bool = False) -> Classified:
        return classify(data, client.statements, client.app.shapes.get, self.reason(client.database), continuing,
                        self._parses)

    def pick(self, client: Any, data: bytes) -> Any:
        """The replica for the transaction waiting in `data`, None for the primary, or WAIT. Sets
        client.route_wrote when the transaction goes to the primary as a possible write."""
        client.route_wrote = False
        marks = self.marks
        if client.route_pref == PRIMARY or client.pinned or client.route_retry_primary:
            client.route_retry_primary = False
            if marks is not None and client.route_pref == PRIMARY and not client.pinned:
                # its writes must be marked for the other sessions of its scope all the same
                client.route_wrote = not self._classify(client, data).read_only
                return self._write(client)
            return self._primary()
        c = self._classify(client, data)
        forced = self._rule_route(client, data) if client.app.rules is not None else None
        if forced == PRIMARY or (forced is None and c is not READ):
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
            if replica is None:
                return WAIT
        else:
            replica = self.replicas.choose(client.database)
            if replica is None:
                return self._primary()
        return self._replica(replica)

    def still_read_only(self, client: Any, data: bytes, continuing: bool = True) -> bool:
        """May these bytes go to the replica chosen? `continuing`: they arrived while it is lent, and only
        complete reads may. Else a replica is about to be lent for them, as `pick` would choose. (The
        bytes a replica was lent for are not asked about again: `PooledClient._hold_for_primary`.)"""
        c = self._classify(client, data, continuing)
        if continuing:
            return c is READ and client.route_pref != PRIMARY
        # a replica is about to be lent for them (`pick_later`'s choice, or a wait for a connection): the
        # same test as `pick`'s, a rule's route included
        forced = self._rule_route(client, data) if client.app.rules is not None else None
        return (forced is None and c is READ or forced == REPLICA and c.complete) and client.route_pref != PRIMARY

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
        key = self._routed_keys.get(replica)
        if key is None:
            key = self._routed_keys[replica] = f"routed_transactions|upstream|{replica.target.name}"
        self.count(key)
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
