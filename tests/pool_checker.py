"""A model-based, differential concurrency checker for pgfront's connection pooling.

Many concurrent clients (asyncpg and psycopg 3, real drivers, no mocks) run seeded random scripts:
simple, extended and prepared queries, pipelines, transactions that commit, roll back, fail or are
abandoned by dropping the socket (idle, mid-query, mid-pipeline, after COMMIT was sent), session SETs
and startup options, temp tables, SQL and protocol prepared statements, DEALLOCATE / DISCARD ALL,
COPY in and out, LISTEN/NOTIFY. While they run, the checker keeps a model of what each client is
entitled to see, and probes the server for anything else; afterwards it reads PostgreSQL directly.

Every write is one row of `chk_writes(client, seq, token)`, and the model knows whether it was
ACKNOWLEDGED (COMMIT or an autocommit statement returned success), definitely NOT committed (rolled
back, failed, abandoned before COMMIT was sent) or UNKNOWN (the connection went away after COMMIT
was sent). The report counts:

  lost                acknowledged writes missing from the table
  phantom             writes that were never committed, present in the table
  isolation_leaks     a client saw another client's open transaction, rows, temp tables, prepared
                      statements or LISTEN channels, or a setting other than the one it has
  state_lost          a client's own temp table or LISTEN channel disappeared, or RESET ALL /
                      DISCARD ALL did not bring back the settings it gave at startup
  stale_reads         a client did not see its own acknowledged write
  unexpected_errors   errors (and warnings) a direct connection would not give: anything but the
                      failures the script causes on purpose or by dropping its own socket
  idle_in_transaction backends of the pool's role still idle in a transaction after the run
  hangs               scripts that did not finish within their deadline
  slow_waits          statements that waited long while, by the model's count, a pool connection
                      was free to serve them, and pool timeouts (53300)

Run against PostgreSQL directly it must score zeros: that validates the model itself (the
differential baseline). From the command line (the database must exist, owned by the user):

    python -m tests.pool_checker --port 5432                     # PostgreSQL itself
    python -m tests.pool_checker --port 6432 --pg-port 5432 --mode transaction --pool-size 3
        --user app --password ... --dbname chk --seed 42 --duration 20      (one line)

A seed replays the same scripts; the interleaving is up to the scheduler, so a failure may need a
few runs to come back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import socket
import struct
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg

FAILURES = ("lost", "phantom", "isolation_leaks", "state_lost", "stale_reads", "unexpected_errors",
            "idle_in_transaction", "hangs", "slow_waits")
ACK, NOT, UNKNOWN, PENDING = "ack", "not", "unknown", "pending"

INSERT = "INSERT INTO public.chk_writes (client, seq, token) VALUES ($1, $2, $3)"
SETUP = """
DROP TABLE IF EXISTS public.chk_writes;
CREATE TABLE public.chk_writes (client int, seq bigint, token text NOT NULL, PRIMARY KEY (client, seq));
CREATE SCHEMA IF NOT EXISTS s1; CREATE SCHEMA IF NOT EXISTS s2; CREATE SCHEMA IF NOT EXISTS s3;
"""
# One round trip that shows everything a client may only see of its own: the open transaction (its
# xid and the txn-local marker set at BEGIN), settings, prepared statements, temp tables, channels,
# and rows of other clients written by the transaction we are in (only possible in a handed-over one).
PROBE = """SELECT pg_current_xact_id_if_assigned()::text, current_setting('chk.owner', true),
  current_setting('search_path'), current_setting('TimeZone'), current_setting('statement_timeout'),
  current_setting('application_name'),
  ARRAY(SELECT name::text FROM pg_prepared_statements ORDER BY 1),
  ARRAY(SELECT relname::text FROM pg_class WHERE relnamespace = pg_my_temp_schema() AND relkind = 'r'
        ORDER BY 1),
  ARRAY(SELECT c FROM pg_listening_channels() c ORDER BY 1),
  ARRAY(SELECT client || ':' || seq FROM public.chk_writes WHERE pg_current_xact_id_if_assigned() IS NOT NULL
        AND client <> $1
        AND xmin::text = (pg_current_xact_id_if_assigned()::text::bigint % 4294967296)::text)"""
IDLE_IN_TRANSACTION = """SELECT pid, state, left(query, 80) AS query, now() - state_change AS age
  FROM pg_stat_activity WHERE datname = $1 AND usename = $2 AND state LIKE 'idle in transaction%'"""
SETTINGS = ("search_path", "TimeZone", "statement_timeout", "application_name")
SETTING_VALUES = {
    "search_path": ["public", "s1, public", "s2, public", "s3, public"],
    "TimeZone": ["UTC", "Asia/Tokyo", "America/New_York", "Europe/Paris"],
    "statement_timeout": ["40s", "50s", "55s"],  # longer than any sleep: never fires
}
# protocol-level prepared statements with distinct, checkable results: in transaction pooling
# pgfront shares one server-side statement per text between clients, so a mix-up shows
PREPARED = [("SELECT $1::int * 2", lambda x: x * 2), ("SELECT $1::int + 1000", lambda x: x + 1000),
            ("SELECT $1::int - 7", lambda x: x - 7), ("SELECT $1::int % 5", lambda x: x % 5)]
CONNECTION_STATES = ("08", "57P")  # SQLSTATE classes meaning the connection is gone


# -- configuration and report -------------------------------------------------------------------

@dataclass
class Target:
    """Where clients connect, and what is in front of PostgreSQL there."""

    port: int
    host: str = "127.0.0.1"
    user: str = "app"
    password: str | None = None
    dbname: str = "chk"
    pool_mode: str = "direct"  # direct, session or transaction: only sets the queueing model
    pool_size: int | None = None  # server connections clients share; None = one each (direct)


@dataclass
class Options:
    seed: int = 0
    clients: int = 16
    duration: float = 15.0  # seconds of new scripts; running ones finish (or hang) after
    max_scripts: int = 400  # per client: a hard cap so a run always stops
    script_deadline: float = 12.0  # a script (connect included) running longer is a hang
    slow_after: float = 3.0  # a statement waiting longer than this beyond its own sleeps ...
    free_for: float = 1.5  # ... while a pool connection was free this long is a slow wait
    settle: float = 8.0  # after the run, how long backends may take to leave a transaction
    # server-side statement names a transaction pooler shares between clients (by content): not leaks
    pooler_statements: str = "pgf_"


class Report:
    def __init__(self, label: str, seed: int) -> None:
        self.label = label
        self.seed = seed
        self.counts: Counter[str] = Counter()
        self.stats: Counter[str] = Counter()
        self.steps: Counter[str] = Counter()  # steps started, by kind (and outcome)
        self.examples: dict[str, list[str]] = defaultdict(list)
        self.kinds: dict[str, Counter[str]] = defaultdict(Counter)

    def fail(self, kind: str, example: str, sub: str = "") -> None:
        self.counts[kind] += 1
        if sub:
            self.kinds[kind][sub] += 1
        if len(self.examples[kind]) < 6:
            self.examples[kind].append(example[:300])

    def failures(self) -> dict[str, int]:
        return {k: self.counts[k] for k in FAILURES if self.counts[k]}

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "seed": self.seed, **{k: self.counts[k] for k in FAILURES},
                "by_kind": {k: dict(v) for k, v in self.kinds.items()}, "stats": dict(self.stats),
                "steps": dict(self.steps),
                "examples": dict(self.examples)}

    def summary(self) -> str:
        lines = [f"pool checker [{self.label}] seed={self.seed}: "
                 + ", ".join(f"{k}={self.counts[k]}" for k in FAILURES),
                 "  stats: " + ", ".join(f"{k}={v}" for k, v in sorted(self.stats.items())),
                 "  steps: " + ", ".join(f"{k}={v}" for k, v in sorted(self.steps.items()))]
        for k in [*FAILURES, *(k for k in self.examples if k not in FAILURES)]:
            if self.kinds.get(k):
                lines.append(f"  {k} by kind: {dict(self.kinds[k])}")
            for ex in self.examples.get(k, []):
                lines.append(f"  {k}: {ex}")
        return "\n".join(lines)


# -- scripts ------------------------------------------------------------------------------------

@dataclass
class Script:
    sid: str  # "client.n": also names the client's temp tables, statements and channels
    driver: str  # asyncpg or psycopg
    cache: int | None  # asyncpg statement_cache_size / psycopg prepare_threshold (None: never prepare)
    startup: dict[str, str]  # settings given at startup
    via_options: bool  # as `options=-c k=v` rather than as startup parameters
    steps: list[tuple[str, dict[str, Any]]]

    @property
    def tag(self) -> str:
        return self.sid.replace(".", "_")

    def describe(self) -> str:
        how = "options" if self.via_options else "params"
        return (f"script {self.sid} {self.driver} cache={self.cache} startup({how})={self.startup} "
                f"steps={[s for s, _ in self.steps]}")


TXN_OUTCOMES = {"commit": 40, "rollback": 10, "fail_rollback": 12, "fail_commit": 8, "abandon": 10,
                "abandon_query": 10, "abandon_commit": 10}
STEP_WEIGHTS = {"write": 14, "read_own": 5, "txn": 24, "pipeline": 10, "set": 8, "set_txn": 4, "reset_all": 2,
                "temp": 5, "prepare_sql": 4, "prepare_proto": 5, "discard": 3, "copy": 6, "listen": 3,
                "error_auto": 3, "auto_abandon": 3, "drop_idle": 2, "sleep": 3}
TERMINAL = {"auto_abandon", "drop_idle"}


def _pick(rng: random.Random, weights: dict[str, int]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def make_script(rng: random.Random, client: int, n: int) -> Script:
    """A random script; everything random is decided here, so a seed replays the same scripts."""
    sid = f"{client}.{n}"
    driver = rng.choice(["asyncpg", "psycopg"])
    cache = rng.choice([0, 100, 100]) if driver == "asyncpg" else rng.choice([None, 0, 2])
    startup: dict[str, str] = {}
    if rng.random() < 0.6:
        for name in ("search_path", "TimeZone"):
            if rng.random() < 0.6:
                startup[name] = rng.choice(SETTING_VALUES[name])
    if rng.random() < 0.5:
        startup["application_name"] = f"chk_{sid.replace('.', '_')}"
    via_options = driver == "psycopg" or rng.random() < 0.5
    steps: list[tuple[str, dict[str, Any]]] = [("probe", {})]
    for _ in range(rng.randint(2, 7)):
        kind = _pick(rng, STEP_WEIGHTS)
        p: dict[str, Any] = {"rst": rng.random() < 0.5, "drop_after": rng.uniform(0.03, 0.25)}
        if kind == "write":
            p.update(n=rng.randint(1, 3), proto=rng.choice(["simple", "extended", "prepared"]))
        elif kind == "txn":
            p.update(outcome=_pick(rng, TXN_OUTCOMES), n=rng.randint(1, 4),
                     proto=rng.choice(["simple", "extended", "prepared"]),
                     sleep=rng.choice([0.0, 0.0, rng.uniform(0.02, 0.15)]), probe=rng.random() < 0.6,
                     fail=rng.choice(["div", "dup"]))
        elif kind == "pipeline":
            p.update(outcome=rng.choice(["ok", "ok", "error", "abandon"]), n=rng.randint(2, 6),
                     txn=rng.random() < 0.5)
        elif kind in ("set", "set_txn"):
            name = rng.choice(SETTINGS)
            value = (f"chk_{sid.replace('.', '_')}_{rng.randint(0, 9)}" if name == "application_name"
                     else rng.choice(SETTING_VALUES[name]))
            p.update(name=name, value=value, local=rng.random() < 0.4, commit=rng.random() < 0.6)
        elif kind == "temp":
            p.update(drop=rng.random() < 0.3)
        elif kind == "prepare_sql":
            p.update(dealloc=rng.random() < 0.4)
        elif kind == "prepare_proto":
            p.update(stmt=rng.randrange(len(PREPARED)), named=rng.random() < 0.5, times=rng.randint(1, 3))
        elif kind == "discard":
            p.update(what=rng.choice(["DISCARD ALL", "DEALLOCATE ALL"]))
            if driver == "psycopg":
                # psycopg forgets its prepared statements on DISCARD/DEALLOCATE ALL only the first time
                # a connection runs that text (its cache then knows the text and skips the check), so a
                # second one leaves it using dropped statements, even on a direct connection: one each
                done = {q["what"] for k, q in steps if k == "discard"}
                if p["what"] in done:
                    p["what"] = "DEALLOCATE ALL" if p["what"] == "DISCARD ALL" else "DISCARD ALL"
                if p["what"] in done:
                    continue
        elif kind == "copy":
            p.update(what=rng.choice(["in", "in", "dup", "out"]), n=rng.randint(1, 20))
        elif kind == "error_auto":
            p.update(fail=rng.choice(["div", "dup"]))
        elif kind == "sleep":
            p.update(secs=rng.uniform(0.01, 0.12))
        steps.append((kind, p))
        if kind in TERMINAL or p.get("outcome", "").startswith("abandon"):
            break
        # asyncpg's statement cache cannot follow a DISCARD/DEALLOCATE ALL: keep it last
        if kind == "discard" and driver == "asyncpg" and cache:
            break
        if rng.random() < 0.5:
            steps.append(("probe", {}))
    else:
        steps.append(("probe", {}))
    return Script(sid, driver, cache, startup, via_options, steps)


# -- drivers ------------------------------------------------------------------------------------

def _pg_params(sql: str) -> str:
    return re.sub(r"\$\d+", "%s", sql.replace("%", "%%"))


def _options(settings: dict[str, str]) -> str:
    return " ".join(f"-c {k}={v.replace(' ', '')}" for k, v in settings.items())


class _TrackedConnection(asyncpg.Connection):
    """Remembers the statement names asyncpg generates, so the probe can tell its own from others'."""

    def _get_unique_id(self, prefix: str) -> str:
        name = super()._get_unique_id(prefix)
        self.__dict__.setdefault("chk_names", set()).add(name)
        return name


class Client:
    """One client connection through either driver, with a switch to drop it abruptly."""

    driver = ""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    async def execute(self, sql: str, *args: Any) -> str:
        raise NotImplementedError

    async def fetch(self, sql: str, *args: Any) -> list[tuple]:
        raise NotImplementedError

    def drop(self, rst: bool) -> None:
        """Close the socket under the driver: no Terminate, as when a client dies."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    def broken(self) -> bool:
        raise NotImplementedError

    def own_statement(self, name: str) -> bool:
        raise NotImplementedError


class AsyncpgClient(Client):
    driver = "asyncpg"

    def __init__(self, conn: asyncpg.Connection) -> None:
        super().__init__()
        self.conn = conn
        conn.add_log_listener(self._notice)

    @classmethod
    async def connect(cls, t: Target, s: Script) -> AsyncpgClient:
        settings = {"options": _options(s.startup)} if s.via_options and s.startup else dict(s.startup)
        conn = await asyncpg.connect(host=t.host, port=t.port, user=t.user, password=t.password,
                                     database=t.dbname, server_settings=settings or None,
                                     statement_cache_size=s.cache or 0, connection_class=_TrackedConnection,
                                     timeout=60)
        return cls(conn)

    def _notice(self, conn: Any, msg: Any) -> None:
        if getattr(msg, "severity", "") == "WARNING":
            self.warnings.append(f"{msg.sqlstate} {msg.message}")

    async def execute(self, sql: str, *args: Any) -> str:
        return await self.conn.execute(sql, *args)  # no args: the simple query protocol

    async def fetch(self, sql: str, *args: Any) -> list[tuple]:
        return [tuple(r) for r in await self.conn.fetch(sql, *args)]

    def drop(self, rst: bool) -> None:
        tr = self.conn._transport  # terminate() would write a Terminate first
        if tr is None:
            return
        if rst:
            sock = tr.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tr.abort()

    async def close(self) -> None:
        if self.conn.is_closed():
            self.conn.terminate()  # frees what asyncpg still holds
        else:
            await self.conn.close(timeout=5)

    def broken(self) -> bool:
        return self.conn.is_closed()

    def own_statement(self, name: str) -> bool:
        return name in self.conn.__dict__.get("chk_names", ())


class PsycopgClient(Client):
    driver = "psycopg"

    def __init__(self, conn: psycopg.AsyncConnection) -> None:
        super().__init__()
        self.conn = conn
        conn.add_notice_handler(self._notice)

    @classmethod
    async def connect(cls, t: Target, s: Script) -> PsycopgClient:
        kw: dict[str, Any] = {}
        settings = {k: v for k, v in s.startup.items() if k != "application_name"}
        if settings:
            kw["options"] = _options(settings)
        if "application_name" in s.startup:
            kw["application_name"] = s.startup["application_name"]
        conn = await psycopg.AsyncConnection.connect(
            host=t.host, port=t.port, user=t.user, password=t.password, dbname=t.dbname, autocommit=True,
            prepare_threshold=s.cache, connect_timeout=60, **kw)
        return cls(conn)

    def _notice(self, diag: Any) -> None:
        if diag.severity_nonlocalized == "WARNING":
            self.warnings.append(f"{diag.sqlstate} {diag.message_primary}")

    async def execute(self, sql: str, *args: Any, prepare: bool | None = None) -> str:
        # no args: psycopg sends a simple Query; with args, Parse/Bind/Execute
        cur = await self.conn.execute(_pg_params(sql) if args else sql, args or None, prepare=prepare)
        return cur.statusmessage or ""

    async def fetch(self, sql: str, *args: Any, prepare: bool | None = None) -> list[tuple]:
        cur = await self.conn.execute(_pg_params(sql) if args else sql, args or None, prepare=prepare)
        return await cur.fetchall()

    def drop(self, rst: bool) -> None:
        fd = self.conn.pgconn.socket
        s = socket.socket(fileno=os.dup(fd))  # a duplicate: libpq keeps (and later closes) its own fd
        try:
            if rst:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.shutdown(socket.SHUT_RDWR)
        finally:
            s.close()

    async def close(self) -> None:
        await self.conn.close()

    def broken(self) -> bool:
        return self.conn.closed or self.conn.broken

    def own_statement(self, name: str) -> bool:
        # psycopg numbers its statements per connection: _pg3_0, _pg3_1, ...; any name it could
        # have made is accepted (another connection's _pg3_N with a small N goes unnoticed)
        m = re.fullmatch(r"_pg3_(\d+)", name)
        return bool(m) and int(m.group(1)) < getattr(self.conn._prepared, "_prepared_idx", 1 << 30)


def error_info(exc: BaseException, client: Client | None) -> tuple[str | None, str, bool]:
    """(SQLSTATE, message, whether the connection is gone) for a driver exception."""
    state = getattr(exc, "sqlstate", None)
    msg = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
    gone = (state is None or state.startswith(CONNECTION_STATES)
            or (client is not None and client.broken()))
    if isinstance(exc, asyncpg.PostgresError | psycopg.Error) and state and not gone:
        return state, msg, False
    return state, msg, True


# -- the model ----------------------------------------------------------------------------------

@dataclass
class Write:
    client: int
    seq: int
    token: str
    where: str
    status: str = PENDING


@dataclass
class Op:
    session: str
    what: str
    start: float
    end: float
    sleep: float
    own_conn: bool  # the client already held a server connection when it sent this


@dataclass
class Txn:
    tag: str
    writes: list[Write] = field(default_factory=list)
    pending: dict[str, str] = field(default_factory=dict)  # session SETs, kept only at COMMIT
    local: dict[str, str] = field(default_factory=dict)  # SET LOCAL
    commit_sent: bool = False
    xid: str | None = None


class ExpectedError:
    def __init__(self, state: str) -> None:
        self.state = state


class _Bail(Exception):
    """An unexpected error was recorded: end the script."""

    def __init__(self, gone: bool) -> None:
        self.gone = gone


class _Dropped(Exception):
    """The script dropped its own connection on purpose: nothing more to run."""


class Worker:
    """One simulated client: scripts one after another, each on its own connection."""

    def __init__(self, checker: Checker, cid: int) -> None:
        self.checker = checker
        self.cid = cid
        self.rng = random.Random(f"{checker.opts.seed}/{cid}")
        self.seq = 0
        self.acked: set[int] = set()

    async def loop(self, end: float) -> None:
        for n in range(self.checker.opts.max_scripts):
            if time.monotonic() >= end:
                return
            await ScriptRun(self.checker, self, make_script(self.rng, self.cid, n)).run()


class ScriptRun:
    """Runs one script on one connection, keeping the model of what this client may see."""

    def __init__(self, checker: Checker, worker: Worker, script: Script) -> None:
        self.ck = checker
        self.report = checker.report
        self.w = worker
        self.s = script
        self.client: Client | None = None
        self.startup = dict(script.startup)
        self.session = dict(script.startup)  # session-level setting values in effect
        self.txn: Txn | None = None
        self.txns = 0
        self.inflight: list[Write] = []  # autocommit writes whose reply has not come
        self.temps: set[str] = set()
        self.channels: set[str] = set()
        self.names: set[str] = set()  # statement names this client chose itself
        self.holding: set[str] = set()
        self.hold_start = 0.0
        self.step = "connect"
        self.n = 0
        self.reset = False  # RESET ALL or DISCARD ALL ran: startup values must come back

    # -- bookkeeping ------------------------------------------------------------------------
    def where(self) -> str:
        done = ",".join(k for k, _ in self.s.steps[:max(self.n - 1, 0)])
        return f"seed={self.ck.opts.seed} {self.s.sid} {self.s.driver} after [{done}] in {self.step}"

    def new_write(self) -> Write:
        self.w.seq += 1
        w = Write(self.w.cid, self.w.seq, f"{self.s.sid}:{self.w.seq}", f"{self.s.sid}/{self.step}")
        self.ck.writes[(w.client, w.seq)] = w
        return w

    def resolve(self, writes: list[Write], status: str) -> None:
        for w in writes:
            if w.status == PENDING:
                w.status = status
                if status == ACK:
                    self.w.acked.add(w.seq)

    def hold(self, why: str) -> None:
        """The client now keeps a server connection (for the queueing model)."""
        if not self.holding:
            self.hold_start = time.monotonic()
        self.holding.add(why)

    def unhold(self, why: str | None = None, grace: float = 0.0) -> None:
        if why is None:
            self.holding.clear()
        else:
            self.holding.discard(why)
        if not self.holding and self.hold_start:
            self.ck.holds.append((self.s.sid, self.hold_start, time.monotonic() + grace))
            self.hold_start = 0.0

    def unexpected(self, what: str, state: str | None, msg: str, sub: str | None = None) -> None:
        if state == "53300":  # the pooler gave up waiting for a server connection: a queueing failure
            self.report.fail("slow_waits", f"{self.where()} {what}: {state} {msg}", "pool timeout 53300")
            return
        self.report.fail("unexpected_errors", f"{self.where()} {what}: {state} {msg}",
                         sub or f"{state} {_shape(msg)}")

    def leak(self, sub: str, detail: str) -> None:
        self.report.fail("isolation_leaks", f"{self.where()} {sub}: {detail}", sub)

    async def op(self, what: str, aw: Awaitable[Any], *, expect: tuple[str, ...] = (),
                 sleep: float = 0.0) -> Any:
        """Run one client call, timing it; an error outside `expect` is recorded and ends the script."""
        own = bool(self.holding)  # it needs no server connection from the pool
        t0 = time.monotonic()
        self.report.stats["statements"] += 1
        try:
            return await aw
        except Exception as e:  # noqa: BLE001 - every driver error is classified here
            state, msg, gone = error_info(e, self.client)
            if state in expect and not gone:
                self.report.stats["expected_errors"] += 1
                return ExpectedError(state)
            self.unexpected(what, state, msg)
            raise _Bail(gone) from None
        finally:
            t1 = time.monotonic()
            self.ck.ops.append(Op(self.s.sid, f"{self.s.sid}/{self.step}/{what}", t0, t1, sleep, own))
            key = "max_connect_ms" if what == "connect" else "max_statement_ms"
            self.report.stats[key] = max(self.report.stats[key], round((t1 - t0 - sleep) * 1000))
            self._warnings()

    def _warnings(self) -> None:
        if self.client and self.client.warnings:
            for text in self.client.warnings:
                self.unexpected("warning", None, text, sub="WARNING " + text[:60])
            self.client.warnings.clear()

    def expected_settings(self) -> dict[str, str | None]:
        merged = dict(self.session)
        if self.txn:
            merged.update({**self.txn.pending, **self.txn.local})
        return {k: merged.get(k, self.ck.defaults.get(k)) for k in SETTINGS}

    # -- running ----------------------------------------------------------------------------
    async def run(self) -> None:
        self.report.stats["scripts"] += 1
        gone = True
        try:
            async with asyncio.timeout(self.ck.opts.script_deadline) as deadline:
                try:
                    await self._body()
                    gone = False
                except _Dropped:
                    return
                except _Bail as b:
                    gone = b.gone
                except Exception as e:  # noqa: BLE001 - a client call outside op(): still a finding
                    self.unexpected("client", *error_info(e, self.client)[:2])
        except TimeoutError:
            if not deadline.expired():
                raise
            self.report.fail("hangs", f"{self.where()}: not done after {self.ck.opts.script_deadline:g}s; "
                                      f"{self.s.describe()}")
        finally:
            # whatever is still open: a COMMIT on its way may have landed, anything else did not
            self.resolve(self.inflight, UNKNOWN if gone else NOT)
            if self.txn:
                self.resolve(self.txn.writes, UNKNOWN if self.txn.commit_sent else NOT)
            await self._close(abort=gone)

    async def _close(self, abort: bool) -> None:
        c, self.client = self.client, None
        if c is not None:
            try:
                if abort and not c.broken():
                    c.drop(rst=False)
                await asyncio.wait_for(c.close(), 5)
            except Exception:  # noqa: BLE001 - closing a dead connection may fail in many ways
                pass
        self.unhold(grace=1.0 if abort else 0.0)

    async def _body(self) -> None:
        connect = AsyncpgClient.connect if self.s.driver == "asyncpg" else PsycopgClient.connect
        self.client = await self.op("connect", connect(self.ck.target, self.s))
        if self.ck.target.pool_mode == "session":
            self.hold("session")
        for kind, p in self.s.steps:
            self.step = kind
            self.n += 1
            self.report.steps[kind + (f":{p['outcome']}" if "outcome" in p else "")] += 1
            await getattr(self, "step_" + kind)(p)
        self.step = "close"
        t0 = time.monotonic()
        await asyncio.wait_for(self.client.close(), 5)
        self.ck.ops.append(Op(self.s.sid, f"{self.s.sid}/close", t0, time.monotonic(), 0.0, True))
        self.client = None
        self.unhold()

    def pin(self) -> None:
        """Session state: a transaction pooler keeps this client's server connection from now on."""
        if self.ck.target.pool_mode == "transaction":
            self.hold("pin")

    async def drop(self, p: dict[str, Any]) -> None:
        self.report.stats["drops"] += 1
        self.client.drop(p["rst"])
        raise _Dropped

    async def drop_during(self, what: str, aw: Awaitable[Any], p: dict[str, Any], sleep: float) -> None:
        """Send something slow, then drop the socket while it runs."""
        self.hold("long")  # until the proxy has cleaned up after the drop (see check_waits)
        task = asyncio.ensure_future(aw)
        await asyncio.sleep(p["drop_after"])
        self.report.stats["drops"] += 1
        if not task.done():
            self.client.drop(p["rst"])
        try:
            await asyncio.wait_for(task, 5)
        except Exception:  # noqa: BLE001 - the error of our own drop, or a late success
            pass
        raise _Dropped

    # -- writes ---------------------------------------------------------------------------------
    def _insert(self, w: Write, proto: str) -> Awaitable[str]:
        c = self.client
        if proto == "simple":
            return c.execute(f"INSERT INTO public.chk_writes (client, seq, token) VALUES "
                             f"({w.client}, {w.seq}, '{w.token}')")
        if proto == "extended":
            return c.execute(INSERT, w.client, w.seq, w.token)
        if isinstance(c, PsycopgClient):
            return c.execute(INSERT, w.client, w.seq, w.token, prepare=True)

        async def prepared() -> str:
            stmt = await c.conn.prepare(INSERT)
            await stmt.fetch(w.client, w.seq, w.token)
            return stmt.get_statusmsg()
        return prepared()

    async def write_auto(self, proto: str) -> None:
        w = self.new_write()
        self.inflight = [w]
        tag = await self.op(f"insert {proto}", self._insert(w, proto))
        self.inflight = []
        if tag != "INSERT 0 1":
            self.unexpected(f"insert {proto}", None, f"command tag {tag!r}")
            self.resolve([w], UNKNOWN)
            raise _Bail(False)
        self.resolve([w], ACK)

    async def fail_statement(self, how: str, txn: Txn | None) -> None:
        """A deliberate error: division by zero, or a duplicate key within one INSERT."""
        if how == "div":
            r = await self.op("1/0", self.client.execute("SELECT 1/0"), expect=("22012",))
        else:
            w = self.new_write()
            (txn.writes if txn else self.inflight).append(w)
            row = f"({w.client}, {w.seq}, '{w.token}')"
            r = await self.op("duplicate insert", self.client.execute(
                f"INSERT INTO public.chk_writes (client, seq, token) VALUES {row}, {row}"), expect=("23505",))
            if txn is None:
                self.resolve(self.inflight, NOT)
                self.inflight = []
        if not isinstance(r, ExpectedError):
            self.unexpected(f"deliberate {how} error", None, "the statement succeeded")
            raise _Bail(False)

    async def step_write(self, p: dict[str, Any]) -> None:
        for _ in range(p["n"]):
            await self.write_auto(p["proto"])

    async def step_error_auto(self, p: dict[str, Any]) -> None:
        await self.fail_statement(p["fail"], None)

    async def step_read_own(self, p: dict[str, Any]) -> None:
        acked = set(self.w.acked)
        rows = await self.op("read own", self.client.fetch(
            "SELECT seq FROM public.chk_writes WHERE client = $1", self.w.cid))
        self.check_own({r[0] for r in rows}, acked)

    def check_own(self, seen: set[int], acked: set[int]) -> None:
        missing = acked - seen
        if missing:
            self.report.fail("stale_reads", f"{self.where()}: acknowledged writes of client {self.w.cid} "
                                            f"not visible: seq {sorted(missing)[:5]}")

    # -- transactions -------------------------------------------------------------------------
    async def begin(self) -> Txn:
        self.hold("txn")
        self.txns += 1
        await self.op("BEGIN", self.client.execute("BEGIN"))
        self.txn = Txn(f"{self.s.sid}#{self.txns}")
        # a txn-local marker: whoever sees it outside this transaction was handed it
        await self.op("mark", self.client.fetch("SELECT set_config('chk.owner', $1, true)", self.txn.tag))
        return self.txn

    async def end(self, sql: str, expect_tag: str) -> None:
        txn = self.txn
        txn.commit_sent = sql == "COMMIT"
        tag = await self.op(sql, self.client.execute(sql))
        self.txn = None
        self.unhold("txn")
        if tag == "COMMIT":
            self.resolve(txn.writes, ACK)
            self.session.update(txn.pending)
        elif tag == "ROLLBACK":
            self.resolve(txn.writes, NOT)
        else:
            self.resolve(txn.writes, UNKNOWN)
        if tag != expect_tag:
            self.unexpected(sql, None, f"command tag {tag!r}, expected {expect_tag!r}")
            raise _Bail(False)

    async def step_txn(self, p: dict[str, Any]) -> None:
        txn = await self.begin()
        for _ in range(p["n"]):
            w = self.new_write()
            txn.writes.append(w)
            await self.op(f"insert {p['proto']}", self._insert(w, p["proto"]))
        if p["sleep"]:
            await self.op("pg_sleep", self.client.execute(f"SELECT pg_sleep({p['sleep']:.3f})"),
                          sleep=p["sleep"])
        if p["probe"]:
            await self.step_probe({})
        outcome = p["outcome"]
        if outcome == "commit":
            await self.end("COMMIT", "COMMIT")
        elif outcome == "rollback":
            await self.end("ROLLBACK", "ROLLBACK")
        elif outcome in ("fail_rollback", "fail_commit"):
            await self.fail_statement(p["fail"], txn)
            # COMMIT of a failed transaction rolls it back and says so
            await self.end("ROLLBACK" if outcome == "fail_rollback" else "COMMIT", "ROLLBACK")
        elif outcome == "abandon":
            await self.drop(p)
        elif outcome == "abandon_query":
            await self.drop_during("pg_sleep", self.client.execute("SELECT pg_sleep(1.5)"), p, 1.5)
        else:  # abandon_commit: the COMMIT is sent, then the socket dropped before its reply
            txn.commit_sent = True
            if isinstance(self.client, AsyncpgClient):
                aw = self.client.execute("SELECT pg_sleep(0.3); COMMIT")  # one simple Query message
            else:
                aw = self._pipeline_commit_after_sleep()
            await self.drop_during("sleep+COMMIT", aw, p, 0.3)

    async def _pipeline_commit_after_sleep(self) -> None:
        conn = self.client.conn
        async with conn.pipeline() as pipe:
            await conn.execute("SELECT pg_sleep(0.3)")
            await conn.execute("COMMIT")
            await pipe.sync()

    async def step_set_txn(self, p: dict[str, Any]) -> None:
        txn = await self.begin()
        local = "LOCAL " if p["local"] else ""
        await self.op(f"SET {local}{p['name']}", self.client.execute(f"SET {local}{self._set_sql(p)}"))
        (txn.local if p["local"] else txn.pending)[p["name"]] = p["value"]
        await self.step_probe({})
        await self.end(*(("COMMIT", "COMMIT") if p["commit"] else ("ROLLBACK", "ROLLBACK")))

    # -- pipelines ------------------------------------------------------------------------------
    async def step_pipeline(self, p: dict[str, Any]) -> None:
        if isinstance(self.client, AsyncpgClient):
            await self._executemany(p)
        else:
            await self._psycopg_pipeline(p)

    async def _executemany(self, p: dict[str, Any]) -> None:
        """asyncpg's executemany is one pipelined, atomic batch (one Sync)."""
        conn = self.client.conn
        outcome = p["outcome"]
        if outcome == "abandon":
            txn = await self.begin()
            writes = [self.new_write() for _ in range(400)]
            txn.writes += writes
            rows = [(w.client, w.seq, w.token) for w in writes]
            await self.drop_during("executemany", conn.executemany(INSERT, rows), {**p, "drop_after": 0.002},
                                   0.0)
        txn = await self.begin() if p["txn"] else None
        writes = [self.new_write() for _ in range(p["n"])]
        rows = [(w.client, w.seq, w.token) for w in writes]
        if outcome == "error":
            rows.append(rows[0])  # a duplicate key: the whole batch fails
        if txn:
            txn.writes += writes
        else:
            self.inflight = writes
        r = await self.op("executemany", conn.executemany(INSERT, rows),
                          expect=("23505",) if outcome == "error" else ())
        if (outcome == "error") != isinstance(r, ExpectedError):
            self.unexpected("executemany", None, f"outcome {outcome}, got {r!r}")
            raise _Bail(False)
        if p["txn"]:
            await self.end(*(("COMMIT", "COMMIT") if outcome == "ok" else ("ROLLBACK", "ROLLBACK")))
        else:
            self.resolve(writes, ACK if outcome == "ok" else NOT)
            self.inflight = []

    async def _psycopg_pipeline(self, p: dict[str, Any]) -> None:
        """psycopg pipeline mode: each Sync ends an implicit transaction; an error aborts its block."""
        conn = self.client.conn
        outcome = p["outcome"]
        if outcome == "abandon":  # BEGIN, writes and a sleep in flight, no COMMIT: dropped mid-pipeline
            self.hold("txn")
            self.txns += 1
            self.txn = txn = Txn(f"{self.s.sid}#{self.txns}")
            txn.writes += [self.new_write() for _ in range(p["n"])]

            async def run() -> None:
                async with conn.pipeline() as pipe:
                    await conn.execute("BEGIN")
                    for w in txn.writes:
                        await conn.execute(_pg_params(INSERT), (w.client, w.seq, w.token))
                    await conn.execute("SELECT pg_sleep(1)")
                    await pipe.sync()
            await self.drop_during("pipeline", run(), p, 1.0)
        if p["txn"]:  # BEGIN ... COMMIT in one pipeline
            self.hold("txn")
            self.txns += 1
            self.txn = txn = Txn(f"{self.s.sid}#{self.txns}")
            txn.writes += [self.new_write() for _ in range(p["n"])]
            txn.commit_sent = True

            async def run_txn() -> str:
                async with conn.pipeline():
                    await conn.execute("BEGIN")
                    await conn.execute("SELECT set_config('chk.owner', %s, true)", (txn.tag,))
                    for w in txn.writes:
                        await conn.execute(_pg_params(INSERT), (w.client, w.seq, w.token))
                    if outcome == "error":
                        await conn.execute("SELECT 1/0")
                    cur = await conn.execute("COMMIT")
                return cur.statusmessage or ""
            r = await self.op("pipeline txn", run_txn(), expect=("22012",) if outcome == "error" else ())
            self.txn = None
            self.unhold("txn")
            if outcome == "error":
                self.resolve(txn.writes, NOT)
                if not isinstance(r, ExpectedError):
                    self.unexpected("pipeline txn", None, f"deliberate error did not happen: {r!r}")
                    raise _Bail(False)
                # the COMMIT was skipped with the rest of the block: the transaction is still open
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    await self.op("ROLLBACK", self.client.execute("ROLLBACK"))
            elif r == "COMMIT":
                self.resolve(txn.writes, ACK)
            else:
                self.resolve(txn.writes, UNKNOWN)
                self.unexpected("pipeline COMMIT", None, f"command tag {r!r}")
                raise _Bail(False)
            return
        # autocommit: [writes] Sync [writes (+ 1/0)] Sync
        first = [self.new_write() for _ in range(p["n"] // 2 or 1)]
        second = [self.new_write() for _ in range(p["n"] - len(first))]
        self.inflight = first + second
        done_first = False

        async def run_auto() -> None:
            nonlocal done_first
            async with conn.pipeline() as pipe:
                for w in first:
                    await conn.execute(_pg_params(INSERT), (w.client, w.seq, w.token))
                await pipe.sync()
                done_first = True
                for w in second:
                    await conn.execute(_pg_params(INSERT), (w.client, w.seq, w.token))
                if outcome == "error":
                    await conn.execute("SELECT 1/0")
        r = await self.op("pipeline", run_auto(), expect=("22012",) if outcome == "error" else ())
        self.inflight = []
        self.resolve(first, ACK if done_first else NOT)
        self.resolve(second, NOT if outcome == "error" else ACK)
        if (outcome == "error") != isinstance(r, ExpectedError):
            self.unexpected("pipeline", None, f"outcome {outcome}, got {r!r}")
            raise _Bail(False)

    # -- abrupt ends -----------------------------------------------------------------------------
    async def step_auto_abandon(self, p: dict[str, Any]) -> None:
        """An autocommit INSERT still running when the socket goes: either outcome is fine."""
        w = self.new_write()
        self.resolve([w], UNKNOWN)
        await self.drop_during("slow insert", self.client.execute(
            f"INSERT INTO public.chk_writes (client, seq, token) SELECT {w.client}, {w.seq}, '{w.token}' "
            "FROM pg_sleep(0.3)"), {**p, "drop_after": min(p["drop_after"], 0.15)}, 0.3)

    async def step_drop_idle(self, p: dict[str, Any]) -> None:
        await self.drop(p)

    async def step_sleep(self, p: dict[str, Any]) -> None:
        await asyncio.sleep(p["secs"])

    # -- session state ---------------------------------------------------------------------------
    @staticmethod
    def _set_sql(p: dict[str, Any]) -> str:
        v = p["value"]
        return f"{p['name']} = {v}" if p["name"] == "search_path" else f"{p['name']} = '{v}'"

    async def step_set(self, p: dict[str, Any]) -> None:
        self.pin()
        await self.op(f"SET {p['name']}", self.client.execute("SET " + self._set_sql(p)))
        self.session[p["name"]] = p["value"]

    async def step_reset_all(self, p: dict[str, Any]) -> None:
        self.pin()
        await self.op("RESET ALL", self.client.execute("RESET ALL"))
        self.reset = True
        self.session = dict(self.startup)  # back to the values given at startup

    async def step_discard(self, p: dict[str, Any]) -> None:
        await self.op(p["what"], self.client.execute(p["what"]))
        if p["what"] == "DISCARD ALL":
            self.reset = True
            self.session = dict(self.startup)
            self.temps.clear()
            self.channels.clear()

    async def step_temp(self, p: dict[str, Any]) -> None:
        name = f"tmp_{self.s.tag}_{self.n}"
        self.pin()
        await self.op("CREATE TEMP TABLE", self.client.execute(f"CREATE TEMP TABLE {name} (x int)"))
        self.temps.add(name)
        await self.op("temp insert", self.client.execute(f"INSERT INTO {name} VALUES (1), (2)"))
        rows = await self.op("temp select", self.client.fetch(f"SELECT sum(x) FROM {name}"))
        if rows != [(3,)]:
            self.unexpected("temp select", None, f"wrong result {rows!r}")
            raise _Bail(False)
        if p["drop"]:
            await self.op("DROP TABLE", self.client.execute(f"DROP TABLE {name}"))
            self.temps.discard(name)

    async def step_prepare_sql(self, p: dict[str, Any]) -> None:
        """SQL PREPARE / EXECUTE, done back to back (psycopg may DEALLOCATE ALL after a ROLLBACK)."""
        name = f"chkp_{self.s.tag}_{self.n}"
        self.names.add(name)
        self.pin()
        await self.op("PREPARE", self.client.execute(f"PREPARE {name} (int) AS SELECT $1 + {self.n}"))
        for x in (1, 2):
            rows = await self.op("EXECUTE", self.client.fetch(f"EXECUTE {name} ({x})"))
            if rows != [(x + self.n,)]:
                self.unexpected("EXECUTE", None, f"wrong result {rows!r}, expected {x + self.n}")
                raise _Bail(False)
        if p["dealloc"]:
            await self.op("DEALLOCATE", self.client.execute(f"DEALLOCATE {name}"))

    async def step_prepare_proto(self, p: dict[str, Any]) -> None:
        sql, expect = PREPARED[p["stmt"]]
        for i in range(p["times"]):
            x = self.n * 10 + i
            if isinstance(self.client, AsyncpgClient):
                name = f"chkq_{self.s.tag}_{self.n}_{i}" if p["named"] else None
                if name:
                    self.names.add(name)
                stmt = await self.op("prepare", self.client.conn.prepare(sql, name=name))
                got = await self.op("bind/execute", stmt.fetchval(x))
            else:
                rows = await self.op("execute prepare=True", self.client.fetch(sql, x, prepare=True))
                got = rows[0][0]
            if got != expect(x):
                self.unexpected("prepared statement", None,
                                f"{sql!r}({x}) returned {got!r}, expected {expect(x)}")
                raise _Bail(False)

    async def step_copy(self, p: dict[str, Any]) -> None:
        c = self.client
        if p["what"] == "out":
            acked = set(self.w.acked)
            if isinstance(c, AsyncpgClient):
                chunks: list[bytes] = []

                async def sink(data: bytes) -> None:
                    chunks.append(data)
                await self.op("COPY TO", c.conn.copy_from_query(
                    "SELECT seq FROM public.chk_writes WHERE client = $1", self.w.cid, output=sink))
                seen = {int(x) for x in b"".join(chunks).split()}
            else:
                async def copy_out() -> set[int]:
                    cur = c.conn.cursor()
                    sql = "COPY (SELECT seq FROM public.chk_writes WHERE client = %s) TO STDOUT"
                    async with cur.copy(sql, (self.w.cid,)) as cp:
                        return {int(row[0]) async for row in cp.rows()}
                seen = await self.op("COPY TO", copy_out())
            self.check_own(seen, acked)
            return
        writes = [self.new_write() for _ in range(p["n"])]
        rows = [(w.client, w.seq, w.token) for w in writes]
        if p["what"] == "dup":
            rows.append(rows[-1])
        self.inflight = writes
        if isinstance(c, AsyncpgClient):
            aw = c.conn.copy_records_to_table("chk_writes", records=rows, columns=["client", "seq", "token"],
                                              schema_name="public")
        else:
            async def copy_in() -> None:
                cur = c.conn.cursor()
                async with cur.copy("COPY public.chk_writes (client, seq, token) FROM STDIN") as cp:
                    for row in rows:
                        await cp.write_row(row)
            aw = copy_in()
        r = await self.op("COPY FROM", aw, expect=("23505",) if p["what"] == "dup" else ())
        self.inflight = []
        if (p["what"] == "dup") != isinstance(r, ExpectedError):
            self.resolve(writes, UNKNOWN)
            self.unexpected("COPY FROM", None, f"{p['what']}: got {r!r}")
            raise _Bail(False)
        self.resolve(writes, NOT if p["what"] == "dup" else ACK)

    async def step_listen(self, p: dict[str, Any]) -> None:
        ch = f"ch_{self.s.tag}"
        self.pin()
        c = self.client
        if isinstance(c, AsyncpgClient):
            got: asyncio.Future = asyncio.get_running_loop().create_future()

            def on_notify(conn: Any, pid: int, channel: str, payload: str) -> None:
                if not got.done():
                    got.set_result(payload)
            await self.op("LISTEN", c.conn.add_listener(ch, on_notify))
            self.channels.add(ch)
            await self.op("NOTIFY", c.execute(f"NOTIFY {ch}, '{self.s.sid}'"))
            try:
                payload = await asyncio.wait_for(got, 3)
            except TimeoutError:
                payload = None
        else:
            seen: list[str] = []
            c.conn.add_notify_handler(lambda n: seen.append(n.payload))  # also while other calls run
            await self.op("LISTEN", c.execute(f"LISTEN {ch}"))
            self.channels.add(ch)
            await self.op("NOTIFY", c.execute(f"NOTIFY {ch}, '{self.s.sid}'"))
            if not seen:
                async for _ in c.conn.notifies(timeout=3, stop_after=1):
                    pass
            payload = seen[0] if seen else None
        if payload != self.s.sid:
            self.unexpected("NOTIFY", None, f"own notification not delivered (got {payload!r})")
            raise _Bail(False)

    # -- the probe -------------------------------------------------------------------------------
    async def step_probe(self, p: dict[str, Any]) -> None:
        rows = await self.op("probe", self.client.fetch(PROBE, self.w.cid))
        xid, owner, *values = rows[0][:6]
        prepared, temps, channels, foreign = rows[0][6:]
        self.report.stats["probes"] += 1
        txn = self.txn
        if txn is None:
            if xid is not None or owner:
                self.leak("open transaction",
                          f"outside BEGIN yet in a transaction xid={xid} of {owner or '?'}")
        else:
            if owner != txn.tag:
                self.leak("transaction swapped", f"in {txn.tag} but the server's transaction is {owner!r}")
            if xid is not None and txn.xid is not None and xid != txn.xid:
                self.leak("transaction swapped", f"xid {txn.xid} became {xid}")
            txn.xid = txn.xid or xid
        if foreign:
            self.leak("uncommitted rows", f"sees rows of other clients' open transaction {foreign[:5]}")
        want = self.expected_settings()
        for name, got in zip(SETTINGS, values, strict=True):
            exp = want[name]
            if name == "application_name" and exp is None:
                if got.startswith("chk_"):  # never set here: anything but a client's name is fine
                    self.leak("setting", f"application_name {got!r} set by another client")
            elif _norm(name, got) != _norm(name, exp):
                if self.reset and name in self.startup and self.ck.is_default(name, got):
                    # RESET ALL / DISCARD ALL: a direct connection goes back to its startup values
                    self.report.fail("state_lost", f"{self.where()}: {name} = {got!r} after RESET/DISCARD, "
                                                   f"expected the startup value {exp!r}", "startup setting")
                else:
                    self.leak("setting", f"{name} = {got!r}, expected {exp!r} (startup {self.startup})")
        for name in prepared:
            if not (name.startswith(self.ck.opts.pooler_statements) or name in self.names
                    or self.client.own_statement(name)):
                self.leak("prepared statement", f"sees prepared statement {name!r}")
        for name in set(temps) - self.temps:
            self.leak("temp table", f"sees temp table {name!r}")
        for name in set(channels) - self.channels:
            self.leak("listen", f"listens on {name!r}")
        for what, missing in (("temp table", self.temps - set(temps)),
                              ("channel", self.channels - set(channels))):
            if missing:
                self.report.fail("state_lost", f"{self.where()}: own {what} gone: {sorted(missing)}", what)


def _shape(msg: str) -> str:
    """An error message with its names and numbers blanked: one bucket per kind of error."""
    return re.sub(r"\b(?:pgf_[0-9a-f]+|__asyncpg_\w+__|_pg3_\d+|chk\w+|\d+)\b", "N", msg)[:80]


def _norm(name: str, value: str | None) -> str | None:
    if value is not None and name == "search_path":
        return value.replace(" ", "").replace('"', "").lower()
    return value


# -- the checker --------------------------------------------------------------------------------

class Checker:
    def __init__(self, target: Target, opts: Options, verify_dsn: str, label: str = "") -> None:
        self.target = target
        self.opts = opts
        self.verify_dsn = verify_dsn  # PostgreSQL itself, never through the proxy
        self.report = Report(label or target.pool_mode, opts.seed)
        self.writes: dict[tuple[int, int], Write] = {}
        self.holds: list[tuple[str, float, float]] = []  # (session, start, end): a server conn kept
        self.ops: list[Op] = []
        self.defaults: dict[str, str | None] = {}

    def is_default(self, name: str, value: str) -> bool:
        """The value a client that never set `name` sees (any application_name but a client's own)."""
        if name == "application_name":
            return not value.startswith("chk_")
        return _norm(name, value) == _norm(name, self.defaults[name])

    async def setup(self) -> None:
        conn = await asyncpg.connect(self.verify_dsn)
        try:
            await conn.execute(SETUP)
            if await conn.fetchval("SELECT current_user") != self.target.user:
                await conn.execute(f'ALTER TABLE public.chk_writes OWNER TO "{self.target.user}"; '
                                   + "".join(f'ALTER SCHEMA {s} OWNER TO "{self.target.user}"; '
                                             for s in ("s1", "s2", "s3")))
            # what a client that sets nothing sees: the role's and database's defaults
            row = await conn.fetchrow(
                "SELECT current_setting('search_path'), current_setting('TimeZone'), "
                "current_setting('statement_timeout')")
            self.defaults = {"search_path": row[0], "TimeZone": row[1], "statement_timeout": row[2],
                             "application_name": None}
        finally:
            await conn.close()

    async def run(self) -> Report:
        # psycopg logs every pipeline we cut short on purpose
        logging.getLogger("psycopg").setLevel(logging.ERROR)
        t0 = time.monotonic()
        await self.setup()
        workers = [Worker(self, cid) for cid in range(self.opts.clients)]
        await asyncio.gather(*(w.loop(time.monotonic() + self.opts.duration) for w in workers))
        self.report.stats["run_seconds"] = round(time.monotonic() - t0)
        await self.verify()
        self.check_waits()
        self.report.stats["total_seconds"] = round(time.monotonic() - t0)
        return self.report

    async def verify(self) -> None:
        """On PostgreSQL directly: no backend left in a transaction, and every write where the model says."""
        conn = await asyncpg.connect(self.verify_dsn)
        try:
            deadline = time.monotonic() + self.opts.settle
            while True:
                idle = await conn.fetch(IDLE_IN_TRANSACTION, self.target.dbname, self.target.user)
                if not idle or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
            for r in idle:
                self.report.fail("idle_in_transaction", f"seed={self.opts.seed} pid {r['pid']} {r['state']} "
                                                        f"for {r['age']} after {r['query']!r}")
            rows = await conn.fetch("SELECT client, seq, token FROM public.chk_writes")
            present = {(r[0], r[1]): r[2] for r in rows}
        finally:
            await conn.close()
        for key, w in self.writes.items():
            if w.status == ACK and key not in present:
                self.report.fail("lost", f"seed={self.opts.seed} acknowledged write {w.token} ({w.where}) "
                                         "is missing", w.where.split("/")[1])
            elif w.status == NOT and key in present:
                self.report.fail("phantom", f"seed={self.opts.seed} write {w.token} ({w.where}) was never "
                                            "committed, yet it is in the table", w.where.split("/")[1])
        for key in present.keys() - self.writes.keys():
            self.report.fail("phantom", f"seed={self.opts.seed} row {key} {present[key]!r} was never written")
        for w in self.writes.values():
            if w.status == PENDING:  # a hole in the model: the script ended without resolving it
                self.report.examples["model_pending"].append(f"{w.token} ({w.where})")
        for status in (ACK, NOT, UNKNOWN, PENDING):
            self.report.stats[f"writes_{status}"] = sum(1 for w in self.writes.values() if w.status == status)
        self.report.stats["rows"] = len(present)

    def check_waits(self) -> None:
        """Statements that waited long while the model says a pool connection was free.

        The model counts the clients that keep a server connection: in session mode from connect to
        close, in transaction mode during transactions, after session state (pinning) and during
        sleeps; a dropped client keeps it one second more (the proxy cancels, then waits for the
        cancel to land). A wait counts when, for `free_for` seconds of it, fewer clients than the pool
        has connections kept one, or when the client had its own connection already.
        """
        size = self.target.pool_size
        for op in self.ops:
            excess = op.end - op.start - op.sleep
            if excess <= self.opts.slow_after:
                continue
            free = excess if size is None or op.own_conn else self._free_time(op, size)
            if free >= self.opts.free_for:
                self.report.fail("slow_waits", f"seed={self.opts.seed} {op.what} took "
                                               f"{op.end - op.start:.1f}s (sleeping {op.sleep:.1f}s); "
                                               f"a connection was free for {free:.1f}s",
                                 op.what.split("/")[-1])

    def _free_time(self, op: Op, size: int) -> float:
        events: list[tuple[float, int]] = []
        for sess, a, b in self.holds:
            if sess != op.session and b > op.start and a < op.end:
                events += [(max(a, op.start), 1), (min(b, op.end), -1)]
        events.sort()
        free, busy, t = 0.0, 0, op.start
        for at, delta in events:
            if busy < size:
                free += at - t
            busy += delta
            t = at
        if busy < size:
            free += op.end - t
        return free


async def check(target: Target, opts: Options, verify_dsn: str, label: str = "") -> Report:
    return await Checker(target, opts, verify_dsn, label).run()


def run_check(target: Target, opts: Options, verify_dsn: str, label: str = "") -> Report:
    return asyncio.run(check(target, opts, verify_dsn, label))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="where clients connect (pgfront, or PostgreSQL)")
    ap.add_argument("--user", default="app")
    ap.add_argument("--password", default=os.environ.get("PGPASSWORD"))
    ap.add_argument("--dbname", default="chk",
                    help="a database the checker may fill (it recreates chk_writes)")
    ap.add_argument("--verify-dsn", help="PostgreSQL itself, for set-up and the final checks "
                                         "(default: the same user on --pg-port)")
    ap.add_argument("--pg-port", type=int, help="PostgreSQL's port (default: --port, i.e. no proxy)")
    ap.add_argument("--mode", choices=["direct", "session", "transaction"], default="direct",
                    help="what is in front of PostgreSQL, for the queueing model")
    ap.add_argument("--pool-size", type=int, help="the pool's default_pool_size (not for direct)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=15.0)
    ap.add_argument("--max-scripts", type=int, default=400)
    ap.add_argument("--deadline", type=float, default=12.0,
                    help="seconds a script may take before it is a hang")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--pooler-statements", default="pgf_",
                    help="prefix of server-side statement names the pooler shares between clients")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else random.randrange(1 << 31)
    pw = f":{a.password}" if a.password else ""
    verify = a.verify_dsn or f"postgresql://{a.user}{pw}@{a.host}:{a.pg_port or a.port}/{a.dbname}"
    target = Target(a.port, a.host, a.user, a.password, a.dbname, a.mode,
                    None if a.mode == "direct" else a.pool_size or 20)
    opts = Options(seed=seed, clients=a.clients, duration=a.duration, max_scripts=a.max_scripts,
                   script_deadline=a.deadline, pooler_statements=a.pooler_statements)
    report = run_check(target, opts, verify)
    print(json.dumps(report.as_dict(), indent=2, default=str) if a.json else report.summary())
    return 1 if report.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
