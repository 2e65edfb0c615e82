"""Faults, injected into real processes under concurrent load: a backend terminated or killed -9,
the postmaster killed -9 and restarted, the upstream frozen with SIGSTOP, an upstream that is not
there, clients vanishing mid-query and mid-COPY, pgfront stopped with SIGTERM, and a client that
stops reading a 300 MB result.

Load: psycopg and asyncpg writers insert rows with unique ids through pgfront, each recording the
inserts that were acknowledged. After every fault, every acknowledged row is in the database, and
no writer ever got a reply that was not its own (each checks RETURNING and a query of its own rows).
The cluster is this module's own, since some tests kill it; it runs with synchronous_commit = on
so that an acknowledged commit survives a crash.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import struct
import threading
import time

import asyncpg
import psycopg
import pytest

from proxy.devdb import TempPostgres, child_pids, free_port
from proxy.wire import protocol as pq
from proxy.wire.framer import Framer
from tests.conftest import Pgfront
from tests.wire_client import RawConn, copy_data, error_code

_ids = itertools.count(1)
_names = itertools.count(1)


@pytest.fixture(scope="module")
def cluster():
    pg = TempPostgres(settings={"synchronous_commit": "on"}).start()
    pg.psql("CREATE TABLE acks (id bigint PRIMARY KEY, owner text NOT NULL)")
    yield pg
    pg.cleanup()


def start_front(cluster: TempPostgres, config: str = "", upstream: str | None = None) -> Pgfront:
    return Pgfront(upstream or f"postgresql://127.0.0.1:{cluster.port}", config).start()


@pytest.fixture(scope="module")
def front(cluster):
    p = start_front(cluster, "[server]\nconnect_timeout = '2s'\n")
    yield p
    p.stop()


def assert_alive_without_traceback(front: Pgfront) -> None:
    assert front.proc.poll() is None, f"pgfront exited: {front.log()}"
    log = front.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 1500:][:5000]


def db(cluster: TempPostgres, sql: str, *args: object) -> list[tuple]:
    """A query run directly on the cluster (not through pgfront)."""
    with psycopg.connect(cluster.dsn(), autocommit=True, connect_timeout=10) as conn:
        return conn.execute(sql, args or None).fetchall()


def wait_for(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


# --- the load ---------------------------------------------------------------------------------------

# What a writer may see when its server connection is ended under it: the server's FATAL (57P01
# terminated, 57P02 crash of another backend, 57P03 still recovering), pgfront's own 08006, or the
# driver's view of a closed connection. asyncpg raises InternalClientError when a FATAL arrives in the
# same read as the previous reply's ReadyForQuery (MagicStack/asyncpg#1069, direct connections too).
DISCONNECTED = {"57P01", "57P02", "57P03", "08006", "08003", "OperationalError", "ConnectionResetError",
                "InternalClientError"}


def failure_code(e: BaseException) -> str:
    return getattr(e, "sqlstate", None) or type(e).__name__


class Load:
    """Writers inserting through pgfront until finish(): acked ids, errors and crossed replies per writer."""

    def __init__(self, front: Pgfront, n_psycopg: int = 2, n_asyncpg: int = 2) -> None:
        self.front = front
        self.stop = threading.Event()
        tag = next(_names)
        names = [f"pg{tag}_{i}" for i in range(n_psycopg)] + [f"apg{tag}_{i}" for i in range(n_asyncpg)]
        self.acked: dict[str, list[int]] = {n: [] for n in names}
        self.errors: dict[str, list[str]] = {n: [] for n in names}
        self.crossed: list[tuple] = []  # replies that were not the writer's own
        self.threads = [threading.Thread(target=self._psycopg_writer, args=(n,), daemon=True) for n in names[:n_psycopg]]
        self.threads += [threading.Thread(target=lambda n=n: asyncio.run(self._asyncpg_writer(n)), daemon=True)
                         for n in names[n_psycopg:]]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        self.wait_progress()
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(30)
            assert not t.is_alive(), "a writer hung"

    def counts(self) -> dict[str, int]:
        return {n: len(ids) for n, ids in self.acked.items()}

    def wait_progress(self, names: list[str] | None = None, timeout: float = 20.0) -> None:
        """Until each writer (or each of `names`) has had a few more inserts acknowledged."""
        before = self.counts()
        wait_for(lambda: all(len(self.acked[n]) >= before[n] + 3 for n in names or self.acked), timeout,
                 "writers to make progress")

    def _check(self, name: str, row: tuple | None, rid: int) -> None:
        if row is None or tuple(row) != (rid, name):
            self.crossed.append((name, rid, row))
        self.acked[name].append(rid)

    def _check_own_rows(self, name: str, row: tuple | None) -> None:
        # every acknowledged insert is visible, and the answer is to this writer's question
        if row is None or row[0] != name or row[1] < len(self.acked[name]):
            self.crossed.append((name, "own rows", row, len(self.acked[name])))

    def _psycopg_writer(self, name: str) -> None:
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(self.front.conninfo(application_name=name), autocommit=True,
                                           connect_timeout=10)
                rid = next(_ids)
                row = conn.execute("INSERT INTO acks VALUES (%s, %s) RETURNING id, owner", (rid, name)).fetchone()
                self._check(name, row, rid)
                if rid % 10 == 0:
                    row = conn.execute("SELECT %s::text, count(*) FROM acks WHERE owner = %s", (name, name)).fetchone()
                    self._check_own_rows(name, row)
            except psycopg.Error as e:
                self.errors[name].append(failure_code(e))
                if conn is not None:
                    conn.close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn.close()

    async def _asyncpg_writer(self, name: str) -> None:
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = await asyncpg.connect(self.front.dsn(), server_settings={"application_name": name},
                                                 timeout=10)
                rid = next(_ids)
                row = await conn.fetchrow("INSERT INTO acks VALUES ($1, $2) RETURNING id, owner", rid, name)
                self._check(name, row, rid)
                if rid % 10 == 0:
                    row = await conn.fetchrow("SELECT $1::text, count(*) FROM acks WHERE owner = $1", name)
                    self._check_own_rows(name, row)
            except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError,
                    OSError) as e:
                self.errors[name].append(failure_code(e))
                if conn is not None:
                    conn.terminate()
                conn = None
                await asyncio.sleep(0.05)
        if conn is not None:
            await conn.close()

    def verify(self, cluster: TempPostgres) -> None:
        """Every acknowledged insert is there, with its writer; no writer saw another's reply."""
        assert not self.crossed, self.crossed[:5]
        acked = [i for ids in self.acked.values() for i in ids]
        owners = dict(db(cluster, "SELECT id, owner FROM acks WHERE id = ANY(%s)", acked))
        missing = [i for i in acked if i not in owners]
        assert not missing, f"{len(missing)} acknowledged inserts lost: {missing[:10]}"
        assert all(owners[i] == n for n, ids in self.acked.items() for i in ids)


def backend_pid(cluster: TempPostgres, application_name: str) -> int:
    rows: list[tuple] = []
    wait_for(lambda: bool(rows.extend(db(cluster, "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                                         application_name)) or rows), what=f"backend of {application_name}")
    return rows[0][0]


def client_backends(cluster: TempPostgres) -> int:
    return db(cluster, "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                       "AND pid <> pg_backend_pid()")[0][0]


# --- (a) one backend goes ---------------------------------------------------------------------------

def test_backend_terminated(cluster, front):
    """pg_terminate_backend: that writer gets 57P01 and reconnects, the others never notice."""
    with Load(front) as load:
        victim = next(iter(load.acked))
        db(cluster, "SELECT pg_terminate_backend(%s)", backend_pid(cluster, victim))
        wait_for(lambda: load.errors[victim], what="the victim's error")
        load.wait_progress()
    assert load.errors[victim][0] in DISCONNECTED, load.errors
    assert all(not errs for n, errs in load.errors.items() if n != victim), load.errors
    load.verify(cluster)
    assert_alive_without_traceback(front)


def test_backend_killed(cluster, front):
    """kill -9 of one backend: Postgres restarts every backend (crash recovery); each writer gets an
    error, reconnects once the server is back, and nothing acknowledged is lost."""
    with Load(front) as load:
        victim = next(iter(load.acked))
        os.kill(backend_pid(cluster, victim), signal.SIGKILL)
        wait_for(lambda: load.errors[victim], what="the victim's error")
        load.wait_progress(timeout=30)
    codes = {c for errs in load.errors.values() for c in errs}
    assert codes <= DISCONNECTED, codes
    load.verify(cluster)
    assert_alive_without_traceback(front)


# --- (b) the postmaster goes ------------------------------------------------------------------------

def test_postmaster_killed_and_restarted(cluster, front):
    # a client in the middle of a query when the server dies must get an ErrorResponse from pgfront
    # (clients between queries may only notice a closed socket, depending on their driver)
    mid_query = RawConn(front.port)
    mid_query.startup()
    mid_query.send(pq.query("SELECT pg_sleep(60)"))
    time.sleep(0.3)
    with Load(front) as load:
        cluster.stop("kill")
        t, body = mid_query.read_msg(timeout=15)
        assert t == b"E" and error_code(body) in {"08006", "57P01", "57P02"}, (t, body)
        wait_for(lambda: all(load.errors.values()), what="every writer to see the outage")
        # while the upstream is down, a new client gets a clear error from pgfront
        with pytest.raises(psycopg.OperationalError) as down:
            psycopg.connect(front.conninfo(), connect_timeout=10)
        assert "could not connect to the upstream" in str(down.value)
        cluster.start()
        load.wait_progress(timeout=30)
    codes = {c for errs in load.errors.values() for c in errs}
    assert codes <= DISCONNECTED, codes
    load.verify(cluster)
    with psycopg.connect(front.conninfo(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert_alive_without_traceback(front)


# --- (c) the upstream freezes -----------------------------------------------------------------------

def test_upstream_paused_and_resumed(cluster, front):
    with Load(front) as load:
        postmaster = cluster.proc.pid
        os.kill(postmaster, signal.SIGSTOP)  # first, so that it forks nothing more
        frozen = [postmaster, *child_pids(postmaster)]
        for pid in frozen[1:]:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(1.5)
            during = load.counts()
            time.sleep(0.5)
            assert load.counts() == during  # nothing can be acknowledged by a frozen server
        finally:
            for pid in frozen:
                os.kill(pid, signal.SIGCONT)
        load.wait_progress()
    assert all(not errs for errs in load.errors.values()), load.errors
    load.verify(cluster)
    assert_alive_without_traceback(front)


# --- (d) no upstream ---------------------------------------------------------------------------------

def _connect_error(front: Pgfront) -> str:
    try:
        psycopg.connect(front.conninfo(), connect_timeout=20).close()
    except psycopg.OperationalError as e:
        return str(e)
    raise AssertionError("connected to an upstream that is not there")


def test_upstream_unreachable(cluster):
    """Refused at once, or (a peer that never answers) after connect_timeout: a clear error for every
    client, pgfront still running."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    fillers = []  # fill the accept queue: further connection attempts get no answer at all
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(hole.getsockname())
        fillers.append(s)
    refused = start_front(cluster, upstream=f"postgresql://127.0.0.1:{free_port()}")
    silent = start_front(cluster, "[server]\nconnect_timeout = '1s'\n",
                         upstream=f"postgresql://127.0.0.1:{hole.getsockname()[1]}")
    try:
        for p, reason in ((refused, "refused"), (silent, "timeout")):
            results: list[str] = []
            threads = [threading.Thread(target=lambda p=p, out=results: out.append(_connect_error(p)))
                       for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert len(results) == 8
            for message in results:
                assert "pgfront could not connect to the upstream server" in message, message
                assert reason in message.lower(), message
            assert_alive_without_traceback(p)
    finally:
        refused.stop()
        silent.stop()
        for s in [*fillers, hole]:
            s.close()


# --- (e) clients that vanish -------------------------------------------------------------------------

def vanish(c: RawConn) -> None:
    """Drop the connection at once (RST), as a crashed client or a dead network would."""
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.sock.close()


def test_client_gone_mid_query_and_mid_copy(cluster, front):
    baseline = client_backends(cluster)
    gone_ids = list(range(-1000, -990))
    with Load(front) as load:
        sleeper = RawConn(front.port)
        sleeper.startup(application_name="gone-mid-query")
        sleeper.send(pq.query("SELECT pg_sleep(60)"))
        copier = RawConn(front.port)
        copier.startup(application_name="gone-mid-copy-in")
        copier.send(pq.query("COPY acks FROM STDIN"))
        assert copier.read_msg()[0] == b"G"
        copier.send(*[copy_data(f"{i}\tgone\n".encode()) for i in gone_ids])
        reader = RawConn(front.port)
        reader.startup(application_name="gone-mid-copy-out")
        reader.send(pq.query("COPY (SELECT g, repeat('x', 1000) FROM generate_series(1, 10000000) g) TO STDOUT"))
        assert reader.read_msg()[0] == b"H"
        reader.read_msg()
        wait_for(lambda: db(cluster, "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'gone-%' "
                                     "AND state = 'active'")[0][0] == 3, what="the three statements to run")
        for c in (sleeper, copier, reader):
            vanish(c)
        wait_for(lambda: not db(cluster, "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'gone-%'"),
                 timeout=10, what="the vanished clients' backends to end")
        load.wait_progress()
    assert not db(cluster, "SELECT id FROM acks WHERE id = ANY(%s)", gone_ids)  # the COPY was not committed
    assert all(not errs for errs in load.errors.values()), load.errors
    load.verify(cluster)
    wait_for(lambda: client_backends(cluster) == baseline, timeout=10, what="server connections back to baseline")
    admin = RawConn(front.port)
    admin.startup(database="pgfront")
    admin.send(pq.query("SHOW CLIENTS"))
    assert b"gone-" not in b"".join(body for _, body in admin.read_until())
    admin.close()
    assert_alive_without_traceback(front)


# --- (f) graceful shutdown ---------------------------------------------------------------------------

def test_sigterm_lets_running_transactions_finish(cluster):
    """SIGTERM during load: a transaction in progress commits, then its client is told 57P01; pgfront
    exits 0 well before shutdown_timeout."""
    p = start_front(cluster, "[server]\nshutdown_timeout = '20s'\n")
    stop = threading.Event()
    committed: list[tuple[int, int]] = []
    mid_tx_errors: list[str] = []
    in_tx = threading.Semaphore(0)

    def writer() -> None:
        with psycopg.connect(p.conninfo(), autocommit=True, connect_timeout=10) as conn:
            while not stop.is_set():
                a, b = next(_ids), next(_ids)
                try:
                    conn.execute("BEGIN")
                except psycopg.Error:
                    return  # closed between transactions: the graceful way
                try:
                    conn.execute("INSERT INTO acks VALUES (%s, 'tx')", (a,))
                    in_tx.release()
                    conn.execute("SELECT pg_sleep(0.3)")
                    conn.execute("INSERT INTO acks VALUES (%s, 'tx')", (b,))
                    conn.execute("COMMIT")
                except psycopg.Error as e:
                    mid_tx_errors.append(failure_code(e))
                    return
                committed.append((a, b))

    threads = [threading.Thread(target=writer, daemon=True) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for _ in range(8):
            assert in_tx.acquire(timeout=20)  # every writer is inside a transaction, some twice over
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(40) == 0  # (shutdown_timeout is 20 s: reaching it would cut transactions)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        p.stop()
    assert not mid_tx_errors, mid_tx_errors
    assert committed
    found = {r[0] for r in db(cluster, "SELECT id FROM acks WHERE id = ANY(%s)", [i for ab in committed for i in ab])}
    assert found == {i for ab in committed for i in ab}
    log = p.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log


# --- back-pressure ---------------------------------------------------------------------------------------

def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_client_that_stops_reading_back_pressures_the_server(cluster, front):
    """300 MB of result to a client that reads nothing: pgfront's memory stays flat (the server blocks
    writing, wait_event ClientWrite); then the client reads everything."""
    c = RawConn(front.port)
    c.startup(application_name="slow-reader")
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    before = rss_kib(front.proc.pid)
    c.send(pq.query("SELECT repeat('x', 1000000) FROM generate_series(1, 300)"))
    wait_for(lambda: db(cluster, "SELECT wait_event FROM pg_stat_activity WHERE application_name = 'slow-reader'")
             == [("ClientWrite",)], timeout=30, what="the server to block writing to pgfront")
    peak = before
    for _ in range(10):
        peak = max(peak, rss_kib(front.proc.pid))
        time.sleep(0.1)
    assert peak - before < 50 * 1024, f"pgfront grew by {(peak - before) // 1024} MB"
    kinds: list[int] = []
    full_rows = 0
    f = Framer(stream_types=b"")  # whole rows, to check each one
    c.sock.settimeout(60)
    while not kinds or kinds[-1] != ord("Z"):
        chunk = c.sock.recv(1 << 20)
        assert chunk, "connection closed before the end of the result"
        for t, a, b in f.feed(chunk):
            kinds.append(t)
            if t == ord("E"):
                raise AssertionError(error_code(f.data[a + 5:b]))
            full_rows += t == ord("D") and b - a == 1 + 4 + 2 + 4 + 1_000_000
    assert full_rows == 300 and kinds.count(ord("D")) == 300
    c.close()
    assert_alive_without_traceback(front)
