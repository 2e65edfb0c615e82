"""Read routing's memos change no decision: the statement part of read_only_reason remembered per
StatementInfo, Parse messages remembered by their bytes, and the relay's check of the bytes a replica
was just lent for answered from the router's choice. No servers: the routing path of a pooled session
is driven in-process (`benchmarks.hotroute`), the rest are plain calls."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks.hotpath import drive
from benchmarks.hotroute import pooled_session
from proxy.relay.records import Stmt
from proxy.replicas.choice import Recent
from proxy.replicas.routing import READ, Classified, classify, read_only_reason, statement_reasons
from proxy.shapes import ShapeCache
from proxy.wire import protocol as pq

STATEMENTS = [
    "SELECT abalance FROM pgbench_accounts WHERE aid = 1", "SELECT abalance FROM pgbench_accounts WHERE aid = 2",
    "SELECT * FROM t WHERE id = $1", "SELECT * FROM t FOR UPDATE", "SELECT nextval('s')", "SELECT f(1)",
    "SELECT g(x) FROM t", "SHOW work_mem", "BEGIN READ ONLY", "BEGIN", "INSERT INTO t VALUES (1)",
    "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "SELECT 1 INTO tmp", "SELECT 1; SELECT 2",
    "SELEC oops", "VALUES (1)", "TABLE t", "SELECT pg_catalog.set_config('a', 'b', false)",
]


def test_statement_reasons_match_read_only_reason_as_function_facts_change() -> None:
    shapes = ShapeCache()
    facts: dict[str, bool | None] = {"f": None, "g": False}  # f not known yet, g may write

    def ok(name: str) -> bool | None:
        return facts.get(name, name != "nextval")

    reason = statement_reasons(ok)
    for _ in range(3):
        for sql in STATEMENTS:
            info = shapes.get(sql)
            assert reason(info) == read_only_reason(info, ok), sql
        facts["f"], facts["g"] = True, not facts["g"]  # the catalog learns f, g changes: no answer is frozen
    assert reason(shapes.get("SELECT f(1)")) == ""
    assert reason(shapes.get("SELECT nextval('s')")).startswith("function")


def _batches() -> list[bytes]:
    bind = pq.build_bind("", "", [], [b"1"], [0]) + pq.msg(b"D", b"P\0") + pq.msg(b"E", b"\0\0\0\0\0")
    named = pq.build_bind("", "s1", [], [b"1"], [0]) + pq.msg(b"E", b"\0\0\0\0\0")
    out = []
    for sql in STATEMENTS:
        out += [pq.query(sql), pq.parse_message("", sql) + bind + pq.SYNC, pq.parse_message("", sql) + pq.FLUSH,
                pq.parse_message("s9", sql) + pq.msg(b"D", b"Ss9\0") + pq.FLUSH, pq.query(sql) + pq.query(sql)]
    return out + [bind + pq.SYNC, named + pq.SYNC, pq.build_bind("", "nope", [], [], []) + pq.SYNC, pq.SYNC,
                  pq.msg(b"F", b"\0\0"), pq.query("SELECT 1")[:-3], b""]


def _classify_before(data: bytes, statements: dict, info_of, reason_of, continuing: bool = False) -> Classified:
    """classify as it was before its memos and fast paths (the oracle)."""
    n, i = len(data), 0
    current = statements.get("") if continuing else None
    unnamed = current.info if current is not None else None
    open_unnamed = False
    while i + 5 <= n:
        t = data[i]
        size = int.from_bytes(data[i + 1:i + 5], "big", signed=True)
        end = i + 1 + size
        if size < 4 or end > n:
            break
        body = data[i + 5:end]
        if t == 81:
            why = reason_of(info_of(body[:-1].decode(pq.ENC, pq.ERRORS)))
            if why:
                return Classified(False, why, True)
        elif t == 80:
            name, sql, _oids = pq.parse_parse(body)
            info = info_of(sql)
            why = reason_of(info)
            if why:
                return Classified(False, why, True)
            if not name:
                unnamed, open_unnamed = info, True
        elif t == 66:
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
        elif t == 83:
            open_unnamed = False
        elif t not in (68, 69, 72, 67):
            return Classified(False, f"message {chr(t)!r}", True)
        i = end
    if i == 0:
        return Classified(False, "no complete message", False)
    return Classified(True, "", i == n and not open_unnamed)


def test_classify_with_its_memos_answers_as_before() -> None:
    shapes = ShapeCache()
    facts = {"f": None, "g": False}

    def ok(name: str) -> bool | None:
        return facts.get(name, name != "nextval")

    reason = statement_reasons(ok)
    statements = {"s1": Stmt("s1", "SELECT 1", shapes.get("SELECT 1"), "SELECT 1"),
                  "": Stmt("", "SELECT 2", shapes.get("SELECT 2"), "SELECT 2")}
    parses: dict = {}
    recent = Recent(reason)
    for _ in range(2):  # the second time, every Parse and statement is remembered
        for data in _batches():
            for continuing in (False, True):
                before = _classify_before(data, statements, shapes.get, lambda i: read_only_reason(i, ok), continuing)
                for memo in (None, recent, recent):  # the client's last Parse and Bind: the second time, these
                    now = classify(data, statements, shapes, reason, continuing, parses, memo)
                    assert now == before, (data, continuing)
                    assert (now == READ) is (now is READ)  # every complete read is the shared READ
        facts["f"] = True  # the catalog learnt f meanwhile
    assert parses


def test_a_statement_bound_again_is_read_again_once_the_clients_statements_change() -> None:
    """The Bind memo holds while the client's stmt_epoch does: a statement closed and prepared again
    under the same name (now a write) is looked up afresh."""
    shapes = ShapeCache()
    reason = statement_reasons(lambda name: True)
    read, write = "SELECT abalance FROM pgbench_accounts WHERE aid = $1", "UPDATE t SET a = 1 WHERE id = $1"
    statements = {"s1": Stmt("s1", read, shapes.get(read), read)}
    bind = pq.build_bind("", "s1", [], [b"1"], [0]) + pq.msg(b"E", b"\0\0\0\0\0") + pq.SYNC
    recent = Recent(reason)
    assert classify(bind, statements, shapes, reason, recent=recent, epoch=0) is READ
    assert classify(bind, statements, shapes, reason, recent=recent, epoch=0) is READ  # from the memo
    statements["s1"] = Stmt("s1", write, shapes.get(write), write)  # Close and Parse: the epoch moves on
    assert not classify(bind, statements, shapes, reason, recent=recent, epoch=2).read_only


@pytest.fixture
def session(tmp_path: Path):
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield pooled_session(True, tmp_path)
    loop.close()


def test_the_relays_check_of_the_lent_bytes_is_answered_once(session, monkeypatch) -> None:
    from proxy.replicas.routing import Router

    router = session.app.router
    replica = router.replicas.replicas[0]
    link = session.app.pools.pool("postgres", "postgres", replica).idle[0]
    link.transport = wire = _Recorder()
    asked: list[bytes] = []
    real = Router.still_read_only
    monkeypatch.setattr(Router, "still_read_only",
                        lambda self, client, data, continuing=True: asked.append(data) or real(self, client, data, continuing))
    data = pq.query("SELECT abalance FROM pgbench_accounts WHERE aid = 7")
    session.data_received(data)
    assert session.on_replica is replica and wire.data.endswith(data)
    assert asked == []  # the bytes it was lent for: the choice read them, the relay does not again
    assert session.route_lent is None  # once only
    assert router.still_read_only(session, data) is True
    write = pq.query("UPDATE pgbench_accounts SET abalance = 1 WHERE aid = 7")
    assert router.still_read_only(session, write) is False
    assert router.pick(session, data) is not None
    session.route_pref = "primary"  # what SET pgfront.route = primary does meanwhile
    assert router.still_read_only(session, data) is False
    session.route_pref = "auto"
    assert router.pick(session, write) is None and session.route_wrote


@pytest.mark.parametrize("mode", ["pool-simple", "route-simple", "pool-extended", "route-extended"])
def test_the_pooled_harness_routes_every_read(mode: str) -> None:
    drive(mode, 200)  # route_driver checks that every read of its warm-up went to the replica


class _NoDecision:
    def decide_for(self, client: object, sql: str, info: object) -> None:
        return None


class _Recorder:
    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return False


def test_a_rules_replica_route_reaches_the_replica(session, monkeypatch) -> None:
    """`route = "replica"` on a statement pgfront cannot prove read-only: the replica lent gets it (it
    used to be held back for the primary, with the replica still lent: the client waited forever)."""
    from proxy.replicas.routing import Router

    monkeypatch.setattr(Router, "_rule_route", staticmethod(lambda client, data: "replica"))
    session.app.rules = _NoDecision()  # rules whose only say is the route above
    replica = session.app.router.replicas.replicas[0]
    link = session.app.pools.pool("postgres", "postgres", replica).idle[0]
    link.transport = wire = _Recorder()
    data = pq.query("SELECT my_volatile_function()")
    session.data_received(data)
    assert session.on_replica is replica and not session.replica_held
    assert wire.data.endswith(data)


@pytest.mark.parametrize(("sql", "pref"), [
    ("SET pgfront.route = primary", "primary"), ("  set PGFRONT.ROUTE to 'primary';", "primary"),
    ("\tReset pgfront.route", "auto"), ("SET SESSION pgfront.route = default", "auto"),
])
def test_pgfronts_own_setting_is_answered_without_a_server(session, sql: str, pref: str) -> None:
    """A whole Query takes the byte path's quick way to a server unless it starts with SET or RESET:
    pgfront's own setting, in any spelling, must still be answered by pgfront, with no server lent."""
    session.transport = wire = _Recorder()
    session.route_pref = "primary" if pref == "auto" else "auto"
    session.data_received(pq.query(sql))
    assert session.server is None and session.route_pref == pref
    assert wire.data == pq.command_complete("SET") + pq.ready_for_query(b"I")


def test_a_select_mentioning_the_setting_is_routed(session) -> None:
    replica = session.app.router.replicas.replicas[0]
    link = session.app.pools.pool("postgres", "postgres", replica).idle[0]
    link.transport = wire = _Recorder()
    data = pq.query("SELECT 'set pgfront.route = primary'")
    session.data_received(data)
    assert session.on_replica is replica and wire.data.endswith(data) and session.route_pref == "auto"
