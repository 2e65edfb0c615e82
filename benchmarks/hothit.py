"""The cache-hit half of `python3 -m benchmarks hotpath`: the relay's own cost of a read the cache
answers, in-process, without sockets to the client.

A throwaway PostgreSQL (for the catalog facts the cache policy needs) and redis-server (for the
versions) are started; a rule caches one small read. The session is warmed up through the real miss,
fill and hit paths, a scripted server answering what the relay forwards, until the read is answered
from the session's memo of it; from then on each repeat is a hit that reaches no server, which is
what is counted: the framing, the memo check, the L1 look-up, statistics and rule accounting.
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from proxy import components
from proxy.app import App
from proxy.config import load as load_config
from proxy.devdb import TempPostgres, TempRedis
from proxy.net.client import ClientConnection
from proxy.net.serverlink import ServerLink
from proxy.upstream import parse_upstream
from proxy.wire import protocol as pq
from proxy.wire.framer import Framer

from .transports import NullTransport

HIT_SQL = "SELECT id, v FROM hot WHERE id <= 3 ORDER BY id"
_HIT_PARAM_SQL = "SELECT id, v FROM hot WHERE id <= $1 ORDER BY id"
_RULES = '[[rule]]\nname = "cache-hot"\nmatch = { tables = ["hot"] }\ncache = { ttl = "1h" }\n'


class ScriptedServer(NullTransport):
    """The server end of the session's ServerLink: answers each message the relay forwards as
    PostgreSQL answers it for the one cached read (three rows of two ints), and like PostgreSQL sends
    the replies of an extended batch only at its Sync (or Flush)."""

    def __init__(self) -> None:
        self.framer = Framer(1 << 20)
        self.buffered: list[bytes] = []
        self.replies: list[bytes] = []
        rows = b"".join(pq.data_row([i, i * 10]) for i in (1, 2, 3))
        self.description = pq.row_description([("id", 23), ("v", 23)])
        self.result = rows + pq.command_complete("SELECT 3")

    def write(self, data: bytes) -> None:
        for t, a, b in self.framer.feed(data):
            body = self.framer.data[a + 5:b]
            out = self.buffered
            if t == ord("Q"):
                out.append(self.description + self.result + pq.ready_for_query(pq.IDLE))
            elif t == ord("P"):
                out.append(pq.PARSE_COMPLETE)
            elif t == ord("B"):
                out.append(pq.BIND_COMPLETE)
            elif t == ord("D"):
                out.append(self.description if body[:1] == b"P" else b"")
            elif t == ord("E"):
                out.append(self.result)
            elif t == ord("S"):
                out.append(pq.ready_for_query(pq.IDLE))
            elif t == ord("C"):
                out.append(pq.CLOSE_COMPLETE)
            if t in b"QSH":
                self.replies += out
                out.clear()

    def take(self) -> bytes:
        out, self.replies = b"".join(self.replies), []
        return out


class Replies(NullTransport):
    """The client end: keeps what the relay wrote, so that the warm-up can tell a hit from a miss."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.keep = True

    def write(self, data: bytes) -> None:
        if self.keep:
            self.data += data


def request(mode: str) -> bytes:
    """What the client sends for the cached read: a Query, or an extended batch as libpq sends it."""
    if mode == "simple":
        return pq.query(HIT_SQL)
    bind = pq.build_bind("", "" if mode == "extended" else "P_0", [], [b"3"], [0])
    rest = bind + pq.msg(b"D", b"P\0") + pq.msg(b"E", b"\0\0\0\0\0") + pq.SYNC
    return pq.parse_message("", _HIT_PARAM_SQL) + rest if mode == "extended" else rest


def _close(loop: asyncio.AbstractEventLoop, app: App) -> None:
    loop.run_until_complete(components.detach(app))
    pending = asyncio.all_tasks(loop)
    for t in pending:
        t.cancel()
    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


def hit_driver(mode: str, stack: ExitStack) -> tuple[ClientConnection, Callable[[int], None]]:
    """A session whose repeats of the cached read are answered from its memo, and a function feeding
    `count` of them. Servers started here are stopped when `stack` closes."""
    pg = TempPostgres().start()
    stack.callback(pg.cleanup)
    pg.psql("CREATE TABLE hot (id int PRIMARY KEY, v int); INSERT INTO hot SELECT g, g * 10 FROM generate_series(1, 5) g")
    redis = TempRedis().start()
    stack.callback(redis.cleanup)
    work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
    (work / "rules.toml").write_text(_RULES)
    cfg = load_config(None, {"rules": {"files": [str(work / "rules.toml")], "watch": False},
                             "cache": {"enabled": True, "redis_url": redis.url, "local_validity": "1h"}})
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = App(cfg, parse_upstream(f"postgresql://postgres@127.0.0.1:{pg.port}/postgres"))
    app.run_dir = str(work)
    loop.run_until_complete(components.attach(app))
    stack.callback(_close, loop, app)
    s = ClientConnection(app)
    client = s.transport = Replies()  # type: ignore[assignment]
    server = ScriptedServer()
    link = ServerLink()
    link.connection_made(server)  # type: ignore[arg-type]
    link.holder = s
    s.server = link
    s.user = s.database = "postgres"

    async def ready() -> None:  # the cache's view of the session registers itself from within the loop
        s._now_ready()

    loop.run_until_complete(ready())
    if mode == "prepared":
        s.data_received(pq.parse_message("P_0", _HIT_PARAM_SQL) + pq.SYNC)
        link.data_received(server.take())
    message = request(mode)

    def settle() -> None:
        for _ in range(20):  # the look-up, the fill and the answer, each a turn of the loop or a Redis call
            loop.run_until_complete(asyncio.sleep(0.01))
            answer = server.take()
            if answer:
                link.data_received(answer)

    for _ in range(200):  # first sight of the table (bypass while its facts load), a miss, then hits
        sent = len(client.data)
        s.data_received(message)
        settle()
        if s.hot_queries.get(message) is not None and not s.expect:
            before = len(server.replies), len(client.data)
            s.data_received(message)
            if len(server.replies) == before[0] and len(client.data) > before[1]:
                break  # answered from the memo, with nothing forwarded
        assert len(client.data) > sent, "the warm-up read got no answer"
    else:
        raise RuntimeError("the cached read never became a hit answered without the server")
    client.keep = False

    def loop_body(count: int) -> None:
        received = s.data_received
        for _ in range(count):
            received(message)

    loop_body(2000)
    assert not server.replies, "a hit reached the server"
    gc.collect()
    return s, loop_body
