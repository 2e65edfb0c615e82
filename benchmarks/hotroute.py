"""The transaction-pooling half of `python3 -m benchmarks hotpath`: pgbench -S through a pooled session,
in-process, with and without read routing to a replica.

`hotpath` feeds a session that holds its server for good (passthrough). Here the session is in
transaction pooling: each transaction borrows an idle server connection from its pool, relays, and
gives it back at ReadyForQuery. Modes `pool-*` have no replica (every transaction borrows from the
primary's pool); modes `route-*` have one replica in state "ok" (no probes run: its health is set
once), so each transaction is classified by `replicas.routing.Router.pick` and borrows from the
replica's pool. The difference between the two is what routing costs per query.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from proxy import stats as st
from proxy.app import App
from proxy.config import load as load_config
from proxy.net.client import ClientConnection
from proxy.net.serverlink import ServerLink
from proxy.pool import Pool, PoolManager
from proxy.relay.records import READY
from proxy.replicas.health import ReplicaSet, ReplicaTarget
from proxy.replicas.routing import Router
from proxy.upstream import parse_upstream

from .transports import NullTransport

PRIMARY_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
REPLICA_URL = "postgresql://postgres@127.0.0.1:5433/postgres"


def _idle_link(pool: Pool) -> None:
    """One server connection of `pool`, logged in and idle (what a warm pool holds)."""
    link = ServerLink(None, pool)
    link.connection_made(NullTransport())  # type: ignore[arg-type]
    pool.idle.append(link)


def _router(app: App) -> Router:
    """A router with one replica that is up and has replayed everything: no probe ever runs."""
    replicas = ReplicaSet([ReplicaTarget("replica1", REPLICA_URL)], PRIMARY_URL,
                          max_lag_bytes=app.cfg.routing.max_lag_bytes, max_lag_seconds=app.cfg.routing.max_lag_seconds)
    replicas.replicas[0].state = "ok"
    router = Router(replicas, None, app.cfg.routing)
    router.serve(app)
    return router


def pooled_session(routed: bool, work: Path) -> ClientConnection:
    """A ready ClientConnection in transaction pooling, its pools warm (one idle server connection on the
    primary, and on the replica when `routed`), all wired to NullTransports."""
    users = work / "userlist.txt"
    users.write_text('"postgres" "x"\n')
    cfg = load_config(None, {"rules": {"files": [], "watch": False}, "pool": {"mode": "transaction"},
                             "auth": {"mode": "userlist", "file": str(users), "method": "trust"}})
    app = App(cfg, parse_upstream(PRIMARY_URL))
    app.stats = st.Stats(cfg.stats.max_fingerprints)
    app.pools = PoolManager(app)
    s = ClientConnection(app)
    s.transport = NullTransport()  # type: ignore[assignment]
    s.user = s.database = "postgres"
    s.pool = app.pools.pool("postgres", "postgres")
    s.pooled_tx = True
    _idle_link(s.pool)
    if routed:
        app.router = _router(app)
        _idle_link(app.pools.pool("postgres", "postgres", app.router.replicas.replicas[0]))
    s.phase = READY
    return s


def route_driver(mode: str, stack: ExitStack) -> tuple[ClientConnection, Callable[[int], None]]:
    """mode: pool-simple, pool-extended, route-simple or route-extended. A session and a function feeding
    it `count` pgbench -S transactions, each answered by whichever server connection it was lent."""
    from .hotpath import client_messages, reply

    kind, _, protocol = mode.partition("-")
    if kind not in ("pool", "route") or protocol not in ("simple", "extended"):
        raise ValueError(f"unknown pooled mode {mode!r}")
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    stack.callback(loop.close)
    s = pooled_session(kind == "route", Path(stack.enter_context(tempfile.TemporaryDirectory())))
    msgs = [client_messages(protocol, i) for i in range(1000)]
    answer = reply(protocol)

    def loop_body(count: int) -> None:
        client = s.data_received
        for i in range(count):
            client(msgs[i % 1000])
            s.server.data_received(answer)  # the connection lent for this transaction

    loop_body(2000)  # warm the shape cache and the statistics entry
    assert s.server is None, "the transaction did not give its server connection back"
    want = "replica1" if kind == "route" else "primary"
    s.app.stats.fold()
    routed = {k.rpartition("|")[2]: v for k, v in s.app.stats.counters.items() if k.startswith("routed_transactions|") and v}
    if kind == "route" and routed != {want: 2000}:
        raise RuntimeError(f"the reads were not all routed to the replica: {routed}")
    gc.collect()
    return s, loop_body
