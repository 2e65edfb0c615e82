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

import cython

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


ASK_FUNCTIONS = "(its functions decide)"  # statement_why: a read if every function it calls may run on a replica


def statement_why(info: Any) -> str:
    """statement_reason's answer, worked out once per StatementInfo and kept on it (`route_why`): "" for a
    read calling no function, ASK_FUNCTIONS for a read whose functions decide, else why not.

    The ShapeCache gives every text of one shape (texts differing only in constants) one StatementInfo,
    and statement_reason reads nothing else: a repeated read costs one attribute read."""
    why = info.route_why
    if why is None:
        why, functions = statement_reason(info)
        if not why and functions:
            why = ASK_FUNCTIONS
        object.__setattr__(info, "route_why", why)  # frozen for everything but this memo
    return why


class Reasons:
    """read_only_reason for one database's function facts, its statement part worked out once per
    StatementInfo (`statement_why`). Function facts are asked each time (the catalog's expire and are
    read again); most reads call none."""

    def __init__(self, function_ok: Any) -> None:
        self.function_ok = function_ok

    def why(self, info: Any) -> str:
        why = statement_why(info)
        if why is ASK_FUNCTIONS:
            return functions_reason(info.functions, self.function_ok)
        return why

    def __call__(self, info: Any) -> str:
        return self.why(info)


def statement_reasons(function_ok: Any) -> Reasons:
    return Reasons(function_ok)


PARSES_MAX = 20_000  # Parse messages remembered per router (`classify`'s `parses`)


class Recent:
    """What a client sent last, as `classify` read it, to be compared in place before any look-up: libpq
    and most drivers send the same Parse again at every execution of an unnamed statement, and bind the
    same prepared statement again and again. Owned by the client (`Conversation.route_recent`)."""

    __slots__ = ("reasons", "parse_body", "parse_name", "parse_info", "bind_name", "bind_epoch", "bind_info")

    def __init__(self, reasons: Reasons) -> None:
        self.reasons = reasons  # its database's (`Routing.reason`): a session keeps its database
        self.parse_body = b""  # the last Parse's body, and its statement name and StatementInfo
        self.parse_name = ""
        self.parse_info: Any = None
        self.bind_name = b""  # the last prepared statement bound by name, encoded, and its StatementInfo,
        self.bind_epoch = -1  # valid while the client's stmt_epoch is this (no Parse, Close or Query since)
        self.bind_info: Any = None


def _same(p: bytes, at: int, n: int, b: bytes) -> bool:
    """p[at:at + n] == b: compiled, compared in place (memcmp), without a copy."""
    if cython.compiled:
        return len(b) == n and memcmp(p + at, cython.cast(cython.p_const_char, b), n) == 0  # noqa: F821
    return len(b) == n and p[at:at + n] == b


def classify(data: bytes, statements: dict, shapes: Any, reason_of: Reasons, continuing: bool = False,
             parses: dict | None = None, recent: Recent | None = None, epoch: int = 0) -> Classified:
    """Read the client's waiting bytes message by message. `statements`: the client's prepared statements
    (name -> Stmt with .info); `shapes.get(sql)` -> StatementInfo; `reason_of`: the database's Reasons.
    `continuing`: the bytes follow others on the same server (its unnamed statement is the client's).
    `parses`: Parse bodies seen before -> (statement name, StatementInfo), filled here: a client that
    parses the same text at every execution (libpq's extended protocol) has it read once. `recent`: the
    client's last Parse and named Bind, compared in place first (and kept up to date); `epoch`: the
    client's stmt_epoch, which any change to its statements bumps."""
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
            if end - i >= 7 and p[i + 5] == 0 and p[i + 6] == 0:  # unnamed portal and statement: the usual Bind
                if unnamed is None:
                    return Classified(False, "unnamed statement of an earlier batch", True)
            else:  # the portal's name, then the statement's, read in place
                j = i + 5
                while j < end and p[j] != 0:
                    j += 1
                k = j + 1
                while k < end and p[k] != 0:
                    k += 1
                if k >= end:
                    return Classified(False, "a malformed Bind", True)  # the primary's relay reports it
                if k == j + 1:  # a named portal of the unnamed statement
                    if unnamed is None:
                        return Classified(False, "unnamed statement of an earlier batch", True)
                elif recent is not None and recent.bind_epoch == epoch and _same(p, j + 1, k - j - 1, recent.bind_name):
                    why = reason_of.why(recent.bind_info)  # the statement it bound last, unchanged since
                    if why:
                        return Classified(False, why, True)
                else:
                    name = p[j + 1:k].decode("utf-8", "surrogateescape")  # pq.ENC, pq.ERRORS: compiled, in place
                    stmt = statements.get(name)
                    if stmt is None:
                        return Classified(False, "unknown prepared statement", True)
                    if recent is not None:
                        recent.bind_name, recent.bind_epoch, recent.bind_info = data[j + 1:k], epoch, stmt.info
                    why = reason_of.why(stmt.info)
                    if why:
                        return Classified(False, why, True)
        elif t == 83:  # Sync
            open_unnamed = False
        elif t == 80:  # Parse
            if recent is not None and _same(p, i + 5, end - i - 5, recent.parse_body):
                name = recent.parse_name
                info = recent.parse_info
            else:
                body = data[i + 5:end]
                got = parses.get(body) if parses is not None else None
                if got is None:
                    name, sql, _oids = pq.parse_parse(body)
                    got = (name, shapes.get(sql))
                    if parses is not None:
                        if len(parses) >= PARSES_MAX:
                            parses.clear()
                        parses[body] = got
                name, info = got
                if recent is not None:
                    recent.parse_body, recent.parse_name, recent.parse_info = body, name, info
            why = reason_of.why(info)
            if why:
                return Classified(False, why, True)
            if not name:
                unnamed = info
                open_unnamed = True
        elif t == 81:  # Query
            info = shapes.get(p[i + 5:end - 1].decode("utf-8", "surrogateescape"))
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


class Upstream:
    """What the choice of a replica reads of it, as C fields when compiled (choice.pxd): `health.Replica`
    adds the probes' bookkeeping. Read once per routed transaction, so its usability is a flag kept with
    its state, its target's weight and databases are copied here, and the transactions routed to it are
    a C counter, folded into the worker's statistics when they are read (`Routing.fold_counts`)."""

    __slots__ = ("target", "weight", "databases", "counter", "ok", "_state", "replay_lsn", "routed")

    def __init__(self, target: Any) -> None:
        self.target = target
        self.weight = target.weight
        self.databases = target.databases  # None: serves every database
        self.counter = ROUTED + target.name  # its routed_transactions statistics counter
        self._state = "starting"  # no reads until the first probe says "ok"
        self.ok = False  # state == "ok"
        self.replay_lsn = 0  # pg_last_wal_replay_lsn() (0 unknown)
        self.routed = 0  # transactions this worker routed to it

    @property
    def state(self) -> str:
        """starting | ok | lagging | down | promoted: only "ok" takes reads."""
        return self._state

    @state.setter
    def state(self, value: str) -> None:
        self._state = value
        self.ok = value == "ok"


def fits(r: Upstream, database: str, min_lsn: int) -> bool:
    """Replica `r` is usable for a read of `database` that must see WAL position `min_lsn`."""
    dbs = r.databases
    return r.ok and r.replay_lsn >= min_lsn and r.weight > 0 and (dbs is None or database in dbs)


def choose(replicas: list, database: str, min_lsn: int = 0) -> Any:
    """A usable replica serving `database` that has replayed up to `min_lsn`, at random by weight."""
    if len(replicas) == 1:  # the usual set-up, once per routed transaction: no list to build
        r = replicas[0]
        return r if fits(r, database, min_lsn) else None
    fit = [r for r in replicas if fits(r, database, min_lsn)]
    if len(fit) <= 1:
        return fit[0] if fit else None
    return random.choices(fit, weights=[r.weight for r in fit])[0]


class Routing:
    """The choice of upstream for each transaction of a worker's clients, compiled: it runs once per
    transaction in transaction pooling with replicas, and reads the client's routing state (C fields of
    its `BytePath`) and its own in C. `routing.Router` adds what needs an await."""

    def __init__(self, replicas: Any, read_your_writes: bool, max_wait: float) -> None:
        self.replicas = replicas
        self.upstreams: list[Upstream] = replicas.replicas  # the ReplicaSet's list, read per transaction
        self.read_your_writes = read_your_writes
        self.max_wait = max_wait
        self.functions: Any = None  # routing.FunctionFacts
        self.shapes: Any = None  # the worker's ShapeCache (`Router.serve`)
        self.stats: Any = None  # the worker's proxy.stats.Stats (`count`, `fold_counts`)
        self.primary_routed = 0  # transactions this worker sent to the primary (each replica counts its own)
        self._reasons: dict[str, Reasons] = {}  # by database
        self._parses: dict[bytes, tuple[str, Any]] = {}  # `classify`'s Parse bodies seen before
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
            info = self.shapes.get(sql)
            # the relay, about to decode and look up the same message, takes its text and shape from here
            client.routed_raw = raw
            client.routed_sql = sql
            client.routed_info = info
            why = statement_why(info)
            if why is ASK_FUNCTIONS:
                why = self.reason(client.database).why(info)
            return Classified(False, why, True) if why else READ
        recent = client.route_recent
        if recent is None:
            recent = client.route_recent = Recent(self.reason(client.database))
        return classify(data, client.statements, self.shapes, recent.reasons, continuing, self._parses, recent,
                        client.stmt_epoch)

    def pick(self, client: Any, data: bytes) -> Any:
        """The replica for the transaction waiting in `data`, None for the primary, or WAIT (`choose_for`)."""
        return self.choose_for(client, data)

    def choose_for(self, client: Any, data: bytes) -> Any:
        """The replica for the transaction waiting in `data`, None for the primary, or WAIT. Sets
        client.route_wrote when the transaction goes to the primary as a possible write. (The byte path's
        C call; `pick` for Python callers.)"""
        client.route_wrote = False
        marks = self.marks
        if client.route_pref == PRIMARY or client.pinned or client.route_retry_primary:
            client.route_retry_primary = False
            if marks is not None and client.route_pref == PRIMARY and not client.pinned:
                # its writes must be marked for the other sessions of its scope all the same
                client.route_wrote = not self._classify(client, data).read_only
                return self._write(client)
            return self._to_primary()
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
            return self._to_primary()  # a rule cannot make half a batch safe to move
        if marks is not None and marks.key(client) is not None:
            return WAIT  # other sessions' writes: only Redis knows
        if self.read_your_writes and client.ryw_since:
            if not client.ryw_lsn:
                return WAIT
            replica = choose(self.upstreams, client.database, client.ryw_lsn)
            if replica is None:
                return WAIT
        else:
            replica = choose(self.upstreams, client.database)
            if replica is None:
                return self._to_primary()
        return self._to_replica(replica)

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
        self._to_primary()
        if client.route_wrote and self.marks is not None and self.marks.key(client) is not None:
            return MARK
        return None

    def count(self, name: str) -> None:
        if self.stats is not None:
            self.stats.inc(name)

    def fold_counts(self, stats: Any) -> None:
        """The routed_transactions counters into `stats` (one of its `folds`: run before it is read)."""
        counters = stats.counters
        if counters.get(ROUTED_PRIMARY) != self.primary_routed:  # unchanged, it leaves the statistics unchanged
            stats.set_counter(ROUTED_PRIMARY, self.primary_routed)
        for r in self.upstreams:
            if counters.get(r.counter) != r.routed:
                stats.set_counter(r.counter, r.routed)

    def _primary(self) -> Any:
        """None (the primary), counted: for `routing.Router`'s waits."""
        return self._to_primary()

    def _replica(self, replica: Upstream) -> Any:
        """`replica`, counted: for `routing.Router`'s waits."""
        return self._to_replica(replica)

    def _to_primary(self) -> Any:
        self.primary_routed += 1
        return None

    def _to_replica(self, replica: Upstream) -> Any:
        replica.routed += 1
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
        decision = client.app.rules.decide_for(client, sql, self.shapes.get(sql))
        return getattr(decision, "route", None) if decision is not None else None
