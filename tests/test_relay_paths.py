"""The server loop's fast path (every reply relayed verbatim, no cache hooks) against the general loop:
random pipelines of simple queries and extended batches, answered with results, errors, notices,
ParameterStatus, EmptyQuery, NoData and PortalSuspended, the reply stream cut at random bytes. Both
must relay the stream byte for byte and end in the same state and statistics."""

from __future__ import annotations

import asyncio
import random

import pytest

from benchmarks.hotpath import offline_session
from benchmarks.transports import NullTransport
from proxy.cache.sessionstate import SessionCacheState
from proxy.wire import protocol as pq

ROWS = pq.row_description([("a", 23)])
DONE = pq.ready_for_query(pq.IDLE)
OK12 = pq.PARSE_COMPLETE + pq.BIND_COMPLETE


class Recorder(NullTransport):
    def __init__(self) -> None:
        self.out: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.out.append(bytes(data))


def _exchange(rnd: random.Random, i: int) -> tuple[bytes, bytes]:
    """One request (simple Query or extended batch) and a reply PostgreSQL could give to it."""
    rows = ROWS + b"".join(pq.data_row([n]) for n in range(rnd.randint(0, 3)))
    if rnd.random() < 0.5:
        replies = [rows + pq.command_complete("SELECT 7"), pq.error_response("42601", "syntax"), pq.EMPTY_QUERY,
                   pq.notice_response("hi") + rows + pq.command_complete("SELECT 2"),
                   pq.parameter_status("TimeZone", "UTC") + pq.command_complete("SET")]
        return pq.query(f"SELECT {i} FROM t{i % 3}"), rnd.choice(replies) + DONE
    replies = [OK12 + rows + pq.command_complete("SELECT 4"), OK12 + pq.error_response("22012", "division"),
               OK12 + pq.NO_DATA + pq.command_complete("INSERT 0 3"), OK12 + rows + pq.PORTAL_SUSPENDED]
    batch = (pq.parse_message("", f"SELECT $1 FROM t{i % 3}") + pq.build_bind("", "", [], [b"1"], [0])
             + pq.msg(b"D", b"P\0") + pq.msg(b"E", b"\0\0\0\0\0") + pq.SYNC)
    return batch, rnd.choice(replies) + DONE


def _relay(seed: int, general: bool) -> tuple:
    rnd = random.Random(seed)
    loop = asyncio.new_event_loop()
    try:
        s = offline_session(None, loop)
        s.transport = Recorder()  # type: ignore[assignment]
        if general:  # the general loop for every chunk (it returns b"" for an empty one, as server_frames)
            s.server_frames = lambda frames, data, start=0, hooked=False: (  # type: ignore[method-assign]
                s._server_frames(frames, data, start, hooked) if start < len(frames) else b"")
        pairs = [_exchange(rnd, i) for i in range(rnd.randint(1, 10))]
        s.data_received(b"".join(c for c, _ in pairs))  # pipelined: every reply is pending at once
        stream = b"".join(r for _, r in pairs)
        cuts = sorted(rnd.sample(range(1, len(stream)), min(len(stream) - 1, rnd.randint(0, 6))))
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            s.server.data_received(stream[a:b])
        relayed = b"".join(s.transport.out)
        assert relayed == stream
        stats = {k: (q.calls, q.rows, q.errors) for k, q in s.app.stats.queries.items()}
        return relayed, stats, len(s.expect), s.tx_status, s.special, s.skip_until_sync
    finally:
        loop.close()


@pytest.mark.parametrize("seed", range(0, 400, 50))
def test_fast_path_matches_general_loop(seed: int) -> None:
    for n in range(seed, seed + 50):
        fast = _relay(n, general=False)
        assert fast == _relay(n, general=True)
        assert fast[2] == 0  # every reply matched


# -- with the read cache: commit points in both loops -------------------------------------------------------
BEGIN, COMMIT = pq.command_complete("BEGIN"), pq.command_complete("COMMIT")
IN_TX = pq.ready_for_query(b"T")


class FakeCache:
    """Records how much of the reply the client had received when each invalidation ran."""

    def __init__(self, transport: Recorder) -> None:
        self.transport = transport
        self.seen: list[tuple[int, frozenset[str]]] = []

    async def invalidate(self, state: object, effect: object) -> None:
        self.seen.append((sum(map(len, self.transport.out)), effect.tables))  # type: ignore[attr-defined]
        await asyncio.sleep(0)  # server bytes arriving meanwhile wait in the backlog


def _cache_unit(rnd: random.Random, i: int) -> tuple[list[bytes], bytes, list[tuple[int, frozenset[str]]]]:
    """Queries, their replies, and (offset in the replies, tables) of each commit point the cache must
    invalidate at, before that message reaches the client."""
    t = f"t{i % 3}"
    rows = ROWS + pq.data_row([i]) + pq.command_complete("SELECT 1")
    choice = rnd.randrange(5)
    if choice == 0:  # a read: no commit point
        return [pq.query(f"SELECT a FROM {t}")], rows + DONE, []
    if choice == 1:  # an autocommitted write (maybe failing): invalidated at its ReadyForQuery
        reply = rnd.choice([pq.command_complete("UPDATE 1"), pq.error_response("23505", "dup")])
        return [pq.query(f"UPDATE {t} SET a = {i}")], reply + DONE, [(len(reply), frozenset({t}))]
    if choice == 2:  # a committed transaction: invalidated at COMMIT's CommandComplete, not again at 'I'
        head = BEGIN + IN_TX + pq.command_complete("INSERT 0 1") + IN_TX + rows + IN_TX
        return ([pq.query("BEGIN"), pq.query(f"INSERT INTO {t} VALUES ({i})"), pq.query(f"SELECT a FROM {t}"),
                 pq.query("COMMIT")], head + COMMIT + DONE, [(len(head), frozenset({t}))])
    if choice == 3:  # rolled back: nothing to invalidate
        return ([pq.query("BEGIN"), pq.query(f"DELETE FROM {t}"), pq.query("ROLLBACK")],
                BEGIN + IN_TX + pq.command_complete("DELETE 2") + IN_TX + pq.command_complete("ROLLBACK") + DONE, [])
    return ([pq.query("SET TimeZone = 'UTC'")],
            pq.parameter_status("TimeZone", "UTC") + pq.command_complete("SET") + DONE, [])


def _relay_cached(seed: int, general: bool) -> tuple:
    rnd = random.Random(seed)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        s = offline_session(None, loop)
        s.transport = Recorder()  # type: ignore[assignment]
        s.app.cache = cache = FakeCache(s.transport)
        s.cstate = SessionCacheState("postgres", "postgres")
        if general:
            s.server_frames = lambda frames, data, start=0, hooked=False: (  # type: ignore[method-assign]
                s._server_frames(frames, data, start, hooked) if start < len(frames) else b"")
        stream, expected = b"", []
        # one unit at a time: pipelining units would mix their transactions (see _cache_unit)
        for i in range(rnd.randint(1, 8)):
            queries, reply, points = _cache_unit(rnd, i)
            expected += [(len(stream) + at, tables) for at, tables in points]
            stream += reply
            s.data_received(b"".join(queries))  # the unit's statements pipelined
            cuts = sorted(rnd.sample(range(1, len(reply)), min(len(reply) - 1, rnd.randint(0, 4))))
            for a, b in zip([0, *cuts], [*cuts, len(reply)], strict=True):
                s.server.data_received(reply[a:b])
                if rnd.random() < 0.7:  # else the next piece arrives while an invalidation is still running
                    loop.run_until_complete(asyncio.sleep(0))
            for _ in range(100):
                if not s.server_paused:
                    break
                loop.run_until_complete(asyncio.sleep(0))
        assert b"".join(s.transport.out) == stream
        assert cache.seen == expected  # each commit invalidated before the client heard of it
        return len(s.expect), s.tx_status, s.special, s.cstate.pending
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@pytest.mark.parametrize("seed", range(0, 200, 50))
def test_cache_commit_points_in_fast_path_and_general_loop(seed: int) -> None:
    for n in range(seed, seed + 50):
        fast = _relay_cached(n, general=False)
        assert fast == _relay_cached(n, general=True)
        assert fast[0] == 0  # every reply matched
