"""What a client's waiting bytes ask of a server, for read routing (`routing`): whether every
statement in them is a provable read. Compiled with the relay core (choice.pxd): it runs once per
routed transaction, so its message loop reads the headers in C, and the statement part of each
answer is worked out once per StatementInfo (`Reasons`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from proxy.cache.policy import select_side_effect
from proxy.replicas.outcomes import MARK, WAIT
from proxy.sql.info import EMPTY
from proxy.wire import protocol as pq

_READ_ONLY_BEGIN = re.compile(r"\bread\s+only\b", re.I)


def _size(p: bytes, at: int) -> int:
    """The big-endian int32 at `at`: a message's length field."""
    return (p[at] << 24) | (p[at + 1] << 16) | (p[at + 2] << 8) | p[at + 3]


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


class Reasons:
    """read_only_reason for one database's function facts, its statement part worked out once per
    StatementInfo.

    The ShapeCache gives every text of one shape (texts differing only in constants) one StatementInfo,
    and read_only_reason reads nothing else: remembering its statement part by that object gives the
    same answer without the work, at each execution of a repeated read. Function facts are asked each
    time (the catalog's expire and are read again); most reads call none.
    """

    def __init__(self, function_ok: Any) -> None:
        self.function_ok = function_ok
        self.memo: dict[int, tuple[Any, str, frozenset[str]]] = {}

    def why(self, info: Any) -> str:
        got = self.memo.get(id(info))
        if got is None:
            if len(self.memo) >= REASONS_MAX:
                self.memo.clear()
            got = self.memo[id(info)] = (info, *statement_reason(info))
        if got[1] or not got[2]:
            return got[1]
        return functions_reason(got[2], self.function_ok)

    def __call__(self, info: Any) -> str:
        return self.why(info)


def statement_reasons(function_ok: Any) -> Reasons:
    return Reasons(function_ok)


PARSES_MAX = 20_000  # Parse messages remembered per router (`classify`'s `parses`)


def classify(data: bytes, statements: dict, info_of: Any, reason_of: Reasons, continuing: bool = False,
             parses: dict | None = None) -> Classified:
    """Read the client's waiting bytes message by message. `statements`: the client's prepared statements
    (name -> Stmt with .info); `info_of(sql)` -> StatementInfo; `reason_of`: the database's Reasons.
    `continuing`: the bytes follow others on the same server (its unnamed statement is the client's).
    `parses`: Parse bodies seen before -> (statement name, StatementInfo), filled here: a client that
    parses the same text at every execution (libpq's extended protocol) has it read once."""
    p = data  # compiled, the message headers are read in C from the bytes (choice.pxd)
    n = len(data)
    i = 0
    current = statements.get("") if continuing else None
    unnamed = current.info if current is not None else None  # the unnamed statement's StatementInfo
    open_unnamed = False  # an unnamed Parse since the last Sync
    while i + 5 <= n:
        t = p[i]
        end = i + 1 + _size(p, i + 1)
        if end < i + 5 or end > n:
            break
        if t == 68 or t == 69 or t == 72 or t == 67:
            pass  # Describe, Execute, Flush, Close: nothing in them to read
        elif t == 66:  # Bind
            if end - i >= 7 and p[i + 5] == 0 and p[i + 6] == 0:
                name = ""  # unnamed portal, unnamed statement: the usual Bind, read without a copy
            else:  # the portal's name, then the statement's, read in place
                j = i + 5
                while j < end and p[j] != 0:
                    j += 1
                k = j + 1
                while k < end and p[k] != 0:
                    k += 1
                if k >= end:
                    return Classified(False, "a malformed Bind", True)  # the primary's relay reports it
                name = data[j + 1:k].decode(pq.ENC, pq.ERRORS)
            if name:
                stmt = statements.get(name)
                if stmt is None:
                    return Classified(False, "unknown prepared statement", True)
                why = reason_of.why(stmt.info)
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
            why = reason_of.why(info)
            if why:
                return Classified(False, why, True)
            if not name:
                unnamed = info
                open_unnamed = True
        elif t == 81:  # Query
            info = info_of(data[i + 5:end - 1].decode(pq.ENC, pq.ERRORS))
            why = reason_of.why(info)
            if why:
                return Classified(False, why, True)
        else:  # COPY data, a function call, Terminate...
            return Classified(False, f"message {chr(t)!r}", True)
        i = end
    if i == 0:
        return NO_MESSAGE
    return READ if i == n and not open_unnamed else READ_OPEN


PRIMARY = "primary"
REPLICA = "replica"
ROUTED = "routed_transactions|upstream|"  # the statistics counter of transactions routed, by upstream
ROUTED_PRIMARY = ROUTED + PRIMARY


def fits(r: Any, database: str, min_lsn: int) -> bool:
    """Replica `r` (a `health.Replica`) is usable for a read of `database` that must see WAL position `min_lsn`."""
    target = r.target
    dbs = target.databases
    return r.state == "ok" and r.replay_lsn >= min_lsn and target.weight > 0 and (dbs is None or database in dbs)


def choose(replicas: list, database: str, min_lsn: int = 0) -> Any:
    """A usable replica serving `database` that has replayed up to `min_lsn`, at random by weight."""
    if len(replicas) == 1:  # the usual set-up, once per routed transaction: no list to build
        r = replicas[0]
        return r if fits(r, database, min_lsn) else None
    fit = [r for r in replicas if fits(r, database, min_lsn)]
    if len(fit) <= 1:
        return fit[0] if fit else None
    return random.choices(fit, weights=[r.target.weight for r in fit])[0]


class Routing:
    """The choice of upstream for each transaction of a worker's clients, compiled: it runs once per
    transaction in transaction pooling with replicas, and reads the client's routing state (C fields of
    its `BytePath`) and its own in C. `routing.Router` adds what needs an await."""

    def __init__(self, replicas: Any, read_your_writes: bool, max_wait: float) -> None:
        self.replicas = replicas
        self.read_your_writes = read_your_writes
        self.max_wait = max_wait
        self.functions: Any = None  # routing.FunctionFacts
        self.stats: Any = None  # the worker's proxy.stats.Stats: routed transactions are counted there
        self._reasons: dict[str, Reasons] = {}  # by database
        self._parses: dict[bytes, tuple[str, Any]] = {}  # `classify`'s Parse bodies seen before
        self._routed_keys: dict[Any, str] = {}  # replica -> its routed_transactions counter's name
        self.marks: Any = None  # marks.WriteMarks: read-your-writes across the sessions of a user/application

    def reason(self, database: str) -> Reasons:
        """read_only_reason for this database's function facts."""
        reasons = self._reasons.get(database)
        if reasons is None:
            reasons = self._reasons[database] = Reasons(self.functions.checker(database))
        return reasons

    def _classify(self, client: Any, data: bytes, continuing: bool = False) -> Classified:
        p = data
        n = len(data)
        if n > 5 and p[0] == 81 and _size(p, 1) + 1 == n and type(data) is bytes:  # one whole Query: the usual read
            raw = data
            sql = raw[5:n - 1].decode("utf-8", "surrogateescape")  # pq.ENC, pq.ERRORS: compiled, decoded in place
            info = client.app.shapes.get(sql)
            client.routed_sql = sql  # the relay, about to look the same text up, takes its shape from here
            client.routed_info = info
            why = self.reason(client.database).why(info)
            return Classified(False, why, True) if why else READ
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
        if forced is None:
            if c is not READ:
                client.route_wrote = not c.read_only
                return self._write(client)
        elif forced == PRIMARY:
            client.route_wrote = not c.read_only  # a rule's `route = "primary"` does not stop it writing
            return self._write(client)
        elif forced == REPLICA and not c.complete:
            return self._primary()  # a rule cannot make half a batch safe to move
        if marks is not None and marks.key(client) is not None:
            return WAIT  # other sessions' writes: only Redis knows
        if self.read_your_writes and client.ryw_since:
            if not client.ryw_lsn:
                return WAIT
            replica = choose(self.replicas.replicas, client.database, client.ryw_lsn)
            if replica is None:
                return WAIT
        else:
            replica = choose(self.replicas.replicas, client.database)
            if replica is None:
                return self._primary()
        return self._replica(replica)

    def still_read_only(self, client: Any, data: bytes, continuing: bool = True) -> bool:
        """May these bytes go to the replica chosen? `continuing`: they arrived while it is lent, and only
        complete reads may. Else a replica is about to be lent for them, as `pick` would choose. (The
        bytes a replica was lent for are not asked about again: `BytePath.data_received`.)"""
        c = self._classify(client, data, continuing)
        if continuing:
            return c is READ and client.route_pref != PRIMARY
        # a replica is about to be lent for them (`pick_later`'s choice, or a wait for a connection): the
        # same test as `pick`'s, a rule's route included
        forced = self._rule_route(client, data) if client.app.rules is not None else None
        return (forced is None and c is READ or forced == REPLICA and c.complete) and client.route_pref != PRIMARY

    def _write(self, client: Any) -> Any:
        """The primary, for a transaction that may write: MARK when its scope's mark must be set first."""
        self._primary()
        if client.route_wrote and self.marks is not None and self.marks.key(client) is not None:
            return MARK
        return None

    def count(self, name: str) -> None:
        if self.stats is not None:
            self.stats.inc(name)

    def routed(self, upstream: str) -> int:
        """Transactions this worker routed to `upstream` ("primary", or a replica's name)."""
        return self.stats.counters.get(f"{ROUTED}{upstream}", 0) if self.stats is not None else 0

    def _primary(self) -> Any:
        if self.stats is not None:
            self.stats.inc(ROUTED_PRIMARY)
        return None

    def _replica(self, replica: Any) -> Any:
        if self.stats is not None:
            key = self._routed_keys.get(replica)
            if key is None:
                key = self._routed_keys[replica] = ROUTED + replica.target.name
            self.stats.inc(key)
        return replica

    def _rule_route(self, client: Any, data: bytes) -> str | None:
        """A rule's `route` for the first statement waiting (a Query's or a Parse's), if any rule says."""
        if len(data) < 6 or data[:1] not in (b"Q", b"P"):
            return None
        size = _size(data, 1)
        if size + 1 > len(data):
            return None
        body = data[5:1 + size]
        sql = body[:-1].decode(pq.ENC, pq.ERRORS) if data[:1] == b"Q" else pq.parse_parse(body)[1]
        decision = client.app.rules.decide_for(client, sql, client.app.shapes.get(sql))
        return getattr(decision, "route", None) if decision is not None else None
