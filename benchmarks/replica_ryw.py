"""Part (b) of `python3 -m benchmarks replicas`: read-your-writes through pgfront, replay toggled.

Many clients at once, half asyncpg (extended protocol, prepared statements) and half psycopg with
literal SQL (the simple protocol), each in a loop: write, then at once read back what it wrote. The
writes take turns: an INSERT of a new row, an UPDATE of the client's own row, and the same UPDATE in
an explicit transaction (BEGIN ... COMMIT). The read is `SELECT v, inet_server_port() ...`: a read
that does not see the client's own write is a violation, and the port says which server answered.
Meanwhile WAL replay on the replica is paused and resumed in turn (`TempReplica.pause_replay`), so
that many reads come while the replica lacks the write just made, and many while it is catching up.
Each read is also labelled with the replay state at the time it was sent.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import asyncpg
import psycopg

from proxy.devdb import TempPostgres, TempReplica

from .replica_env import RoutedPgfront, routed_delta
from .targets import BENCH_PASSWORD

SETUP = "DROP TABLE IF EXISTS ryw_rows; CREATE TABLE ryw_rows (id bigint PRIMARY KEY, client int NOT NULL, v bigint NOT NULL)"
READ = "SELECT v, inet_server_port() FROM ryw_rows WHERE id = {}"
KEY_SPACE = 1_000_000_000  # a client's inserted rows: client * KEY_SPACE + i (its own row: id = client)


@dataclass
class Tally:
    reads: int = 0
    violations: list[tuple[int, str, int, object]] = field(default_factory=list)  # client, write kind, i, what was read
    by: dict[tuple[str, str], int] = field(default_factory=dict)  # (replay state, server) -> reads

    def read(self, paused: bool, server: str) -> None:
        self.reads += 1
        key = ("paused" if paused else "running", server)
        self.by[key] = self.by.get(key, 0) + 1


class Toggler:
    """Pauses and resumes replay on the replica in turn, in a thread, until stopped; `paused` is True
    from the moment the pause has taken effect until just before the resume is asked for."""

    def __init__(self, replica: TempReplica, pause_s: float, run_s: float) -> None:
        self.replica, self.pause_s, self.run_s = replica, pause_s, run_s
        self.paused = False
        self.pauses = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="replay-toggler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.run_s):
            self.replica.pause_replay()
            self.paused = True
            self.pauses += 1
            self._stop.wait(self.pause_s)
            self.paused = False
            self.replica.resume_replay()

    def __enter__(self) -> Toggler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self.paused = False
        self.replica.resume_replay()


def _server(port: int, ports: dict[int, str]) -> str:
    return ports.get(port, f"port {port}")


async def _write_then_read(n: int, until: float, tally: Tally, toggler: Toggler, ports: dict[int, str],
                           write: Callable[[str, int, int], Awaitable[None]],
                           read: Callable[[int], Awaitable[object]]) -> None:
    """One client's loop: a write of each kind in turn (`write(kind, key, i)`), then at once the read of
    its row (`read(key)`), checked."""
    i = 0
    while time.monotonic() < until:
        i += 1
        kind = ("insert", "update", "transaction")[i % 3]
        key = n * KEY_SPACE + i if kind == "insert" else n
        await write(kind, key, i)
        paused = toggler.paused
        _check(tally, n, kind, i, await read(key), paused, ports)


async def _asyncpg_client(dsn: str, n: int, until: float, tally: Tally, toggler: Toggler, ports: dict[int, str]) -> None:
    conn = await asyncpg.connect(dsn)

    async def write(kind: str, key: int, i: int) -> None:
        if kind == "insert":
            await conn.execute("INSERT INTO ryw_rows VALUES ($1, $2, $3)", key, n, i)
        elif kind == "update":
            await conn.execute("UPDATE ryw_rows SET v = $1 WHERE id = $2", i, key)
        else:
            async with conn.transaction():
                await conn.execute("UPDATE ryw_rows SET v = $1 WHERE id = $2", i, key)

    try:
        await _write_then_read(n, until, tally, toggler, ports, write,
                               lambda key: conn.fetchrow("SELECT v, inet_server_port() FROM ryw_rows WHERE id = $1",
                                                         key))
    finally:
        await conn.close()


async def _psycopg_client(conninfo: str, n: int, until: float, tally: Tally, toggler: Toggler,
                          ports: dict[int, str]) -> None:
    # literal SQL and no parameters: psycopg sends each as a simple-protocol Query (never prepared)
    conn = await psycopg.AsyncConnection.connect(conninfo, autocommit=True, prepare_threshold=None)

    async def write(kind: str, key: int, i: int) -> None:
        if kind == "insert":
            await conn.execute(f"INSERT INTO ryw_rows VALUES ({key}, {n}, {i})")
        elif kind == "update":
            await conn.execute(f"UPDATE ryw_rows SET v = {i} WHERE id = {key}")
        else:
            async with conn.transaction():
                await conn.execute(f"UPDATE ryw_rows SET v = {i} WHERE id = {key}")

    async def read(key: int) -> object:
        return await (await conn.execute(READ.format(key))).fetchone()

    try:
        await _write_then_read(n, until, tally, toggler, ports, write, read)
    finally:
        await conn.close()


def _check(tally: Tally, n: int, kind: str, i: int, row: object, paused: bool, ports: dict[int, str]) -> None:
    if row is None:
        tally.violations.append((n, kind, i, None))
        tally.read(paused, "none")
        return
    v, port = row[0], row[1]
    if v != i:
        tally.violations.append((n, kind, i, v))
    tally.read(paused, _server(port, ports))


def _warm(t: RoutedPgfront, replica_port: int, timeout: float = 20.0) -> None:
    """Until the catalog has described inet_server_port() (a read calling a function not known yet goes to
    the primary), on a connection of its own."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(_conninfo(t), autocommit=True) as conn:
        while conn.execute("SELECT inet_server_port()").fetchone()[0] != replica_port:
            if time.monotonic() > deadline:
                raise RuntimeError("reads never reached the replica")
            time.sleep(0.05)


def _conninfo(t: RoutedPgfront) -> str:
    return (f"host=127.0.0.1 port={t.port} user=postgres dbname=postgres password={BENCH_PASSWORD} "
            "sslmode=disable gssencmode=disable")


def run(t: RoutedPgfront, pg: TempPostgres, replica: TempReplica, *, clients: int, seconds: float,
        pause_s: float, run_s: float, log) -> dict:
    pg.psql(SETUP)
    pg.psql(f"INSERT INTO ryw_rows SELECT g, g, 0 FROM generate_series(1, {clients}) g")
    replica.wait_caught_up(60)
    _warm(t, replica.port)
    ports = {pg.port: "primary", replica.port: "replica"}
    tally = Tally()
    before = t.routed()
    dsn = f"postgresql://postgres:{BENCH_PASSWORD}@127.0.0.1:{t.port}/postgres?sslmode=disable"

    async def all_clients(toggler: Toggler) -> None:
        until = time.monotonic() + seconds
        await asyncio.gather(*(
            _asyncpg_client(dsn, n, until, tally, toggler, ports) if n % 2 else
            _psycopg_client(_conninfo(t), n, until, tally, toggler, ports)
            for n in range(1, clients + 1)))

    started = time.monotonic()
    with Toggler(replica, pause_s, run_s) as toggler:
        asyncio.run(all_clients(toggler))
    elapsed = time.monotonic() - started
    after = t.routed()
    by = {f"{state}_{server}": n for (state, server), n in sorted(tally.by.items())}
    replica_reads = sum(n for (_, server), n in tally.by.items() if server == "replica")
    log(f"read-your-writes: {tally.reads:,} reads in {elapsed:.1f} s, {len(tally.violations)} violations, "
        f"{replica_reads:,} on the replica, {toggler.pauses} replay pauses")
    return {
        "clients": clients, "seconds": round(elapsed, 1), "pauses": toggler.pauses,
        "reads": tally.reads, "violations": len(tally.violations), "violation_examples": tally.violations[:10],
        "goal_met": not tally.violations and tally.reads > 0,
        "reads_replica": replica_reads, "reads_primary": tally.reads - replica_reads,
        "reads_by_replay_state": by,
        "routed_metric": routed_delta(before, after),
    }


def print_result(m: dict) -> None:
    if "error" in m:
        print(f"  failed: {m['error']}")
        return
    print(f"  {m['clients']} clients (half asyncpg, half psycopg simple protocol), {m['seconds']} s, replay paused "
          f"{m['pauses']} times: {m['reads']:,} reads of the client's own write, {m['violations']} violations; "
          f"goal 0: {'met' if m['goal_met'] else 'NOT met'}")
    share = m["reads_replica"] / m["reads"] if m["reads"] else 0.0
    by = m["reads_by_replay_state"]
    print(f"  reads served by the replica {m['reads_replica']:,} ({share:.1%}), by the primary {m['reads_primary']:,}; "
          "by replay state: " + ", ".join(f"{k.replace('_', ' on ')} {v:,}" for k, v in by.items()))
    print("  pgfront routed (writes included): " + ", ".join(f"{k} {v:,}" for k, v in m["routed_metric"].items()))
    for ex in m["violation_examples"]:
        print(f"  violation: client {ex[0]}, {ex[1]} #{ex[2]} read back {ex[3]!r}")
