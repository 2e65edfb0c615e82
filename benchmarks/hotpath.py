"""`python3 -m benchmarks hotpath`: the relay's own Python cost per query, without sockets.

One ClientConnection and its ServerLink are wired to in-memory transports; a loop feeds the client's
messages of a pgbench -S transaction (simple, extended or prepared protocol) and then the server's
reply, as they arrive from a real PostgreSQL, and times it. The number is what pgfront adds to each
query in user-space CPU on this machine, with none of the kernel's or the event loop's cost, so it
moves only when the relay's code does: the figure to watch while optimising the hot path.
`--profile` prints cProfile's ranking for the same loop; `--instructions` counts the instructions
per query with valgrind's callgrind (`benchmarks.instructions`), a figure the machine's load cannot move.
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import pstats
import time
from collections.abc import Callable
from contextlib import ExitStack

from proxy.app import App
from proxy.config import load as load_config
from proxy.net.client import ClientConnection
from proxy.net.serverlink import ServerLink
from proxy.relay.records import READY
from proxy.upstream import parse_upstream
from proxy.wire import protocol as pq

from .hothit import hit_driver
from .hotroute import route_driver
from .transports import NullTransport

_SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"
_PREP_SQL = "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"


def reply(mode: str) -> bytes:
    """The server's reply as PostgreSQL sends it, in one read (as it arrives over loopback)."""
    rows = (pq.row_description([("abalance", 23)]) + pq.data_row([0]) + pq.command_complete("SELECT 1")
            + pq.ready_for_query(pq.IDLE))
    if mode == "simple":
        return rows
    return (pq.PARSE_COMPLETE if mode == "extended" else b"") + pq.BIND_COMPLETE + rows


def client_messages(mode: str, i: int) -> bytes:
    """What pgbench -S sends per transaction (libpq's PQsendQueryParams / PQsendQueryPrepared):
    Parse without parameter types, Bind with text parameters and one text result format,
    Describe of the unnamed portal, Execute without a row limit, Sync."""
    aid = 1 + (i * 7919) % 1_000_000
    if mode == "simple":
        return pq.query(_SQL.format(aid))
    bind = pq.build_bind("", "" if mode == "extended" else "P_0", [], [str(aid).encode()], [0])
    rest = bind + pq.msg(b"D", b"P\0") + pq.msg(b"E", b"\0" + b"\0\0\0\0") + pq.SYNC
    return pq.parse_message("", _PREP_SQL) + rest if mode == "extended" else rest


def offline_session(config: str | None, loop: asyncio.AbstractEventLoop) -> ClientConnection:
    """A ClientConnection in the ready phase and its ServerLink, wired to NullTransports (tests use it too)."""
    cfg = load_config(config, {"rules": {"files": [], "watch": False}} if config is None else {})
    app = App(cfg, parse_upstream("postgresql://postgres@127.0.0.1:5432/postgres"))
    from proxy import stats as st

    app.stats = st.Stats(cfg.stats.max_fingerprints)
    _wire_rules(app)
    if cfg.tracing.endpoint:
        from proxy.tracing import Tracing

        app.tracing = Tracing.from_config(cfg.tracing)
    s = ClientConnection(app)
    s.transport = NullTransport()  # type: ignore[assignment]
    link = ServerLink()
    link.connection_made(NullTransport())
    link.holder = s
    s.server = link
    s.user = s.database = "postgres"
    s.phase = READY
    return s


def _wire_rules(app: App) -> None:
    """The config's rules and mirror targets, as `components.attach` wires them, minus what runs beside
    the relay (the rule watcher, the mirror's runner process: statements offered stay queued, so under
    share 1.0 the target's room fills and the rest are dropped, as with a slow shadow)."""
    from proxy import components
    from proxy.rules_glue import RulesAdapter
    from proxy.shadow.mirror import Mirrors
    from proxy.shadow.observe import ObservedSinks

    holder = components.load_rule_holder(app.cfg)
    if holder is not None:
        app.rules = RulesAdapter(holder, app)
        app.throttler = components.make_throttler(app.cfg, app.stats)
    if app.cfg.mirror_targets:
        app.observers = ObservedSinks(Mirrors.from_config(app.cfg.mirror_targets))


def _driver(mode: str, config: str | None) -> tuple[ClientConnection, Callable[[int], None]]:
    """A ready session and a function feeding it `count` pgbench -S transactions and their replies."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    s = offline_session(config, loop)
    link = s.server
    if mode == "prepared":  # prepare P_0 once, as pgbench -M prepared does
        link.data_received(b"")
        s.data_received(pq.parse_message("P_0", _PREP_SQL) + pq.SYNC)
        link.data_received(pq.PARSE_COMPLETE + pq.ready_for_query(pq.IDLE))
    msgs = [client_messages(mode, i) for i in range(1000)]
    answer = reply(mode)

    def loop_body(count: int) -> None:
        client, server = s.data_received, link.data_received
        for i in range(count):
            client(msgs[i % 1000])
            server(answer)

    loop_body(2000)  # warm the shape cache and the statistics entry
    gc.collect()
    return s, loop_body


def drive(mode: str, n: int, config: str | None = None) -> None:
    """Feed n transactions after the warm-up, untimed: what `--instructions` counts under callgrind.
    Modes hit-simple, hit-extended and hit-prepared feed a read the cache answers (benchmarks.hothit);
    pool-* and route-* go through transaction pooling, without and with a replica (benchmarks.hotroute)."""
    with ExitStack() as stack:
        s, loop_body = driver(mode, config, stack)
        _count(s, loop_body, n)


def driver(mode: str, config: str | None, stack: ExitStack) -> tuple[ClientConnection, Callable[[int], None]]:
    if mode.startswith("hit-"):
        return hit_driver(mode[4:], stack)
    if mode.startswith(("pool-", "route-")):
        return route_driver(mode, stack)
    out = _driver(mode, config)
    stack.callback(asyncio.get_event_loop().close)
    tracing = out[0].app.tracing
    if tracing is not None:  # the spans' export (protobuf, HTTP) is counted too: flushed before the end
        stack.callback(tracing.shutdown)
    return out


def _count(s: ClientConnection, loop_body: Callable[[int], None], n: int) -> None:
    # the cyclic collector runs when allocation counts cross its thresholds, which differ between two
    # builds by their own objects: a full collection falling into one run length and not the other moved
    # the figure by ~3k. The relay makes no cycles per query, so the count leaves the collector out.
    gc.disable()
    loop_body(n)
    assert not s.expect, "the relay is still waiting for replies: the harness is out of step"


def run(mode: str, n: int, profile: bool, config: str | None) -> float:
    with ExitStack() as stack:
        return _timed(*driver(mode, config, stack), n, profile)


def _timed(s: ClientConnection, loop_body: Callable[[int], None], n: int, profile: bool) -> float:
    if profile:
        prof = cProfile.Profile()
        prof.enable()
        loop_body(n)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    t0 = time.process_time()  # CPU time, not wall time: other processes on the machine do not count
    loop_body(n)
    per_query = (time.process_time() - t0) / n * 1e6
    assert not s.expect, "the relay is still waiting for replies: the harness is out of step"
    return per_query


def main(modes: list[str], n: int, profile: bool, config: str | None) -> int:
    for mode in modes:
        best = min(run(mode, n, profile and i == 0, config) for i in range(3))
        print(f"{mode:12s} {best:6.2f} us of relay Python per query (best of 3 x {n:,})")
    return 0
