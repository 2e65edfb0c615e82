"""The lean Redis connection used for bumps and pub/sub (proxy/cache/resp.py): replies in order, errors,
a timeout that must never hand a late reply to the next command, AUTH and SELECT, and Versions on it."""

from __future__ import annotations

import asyncio

import hiredis
import pytest
import redis

from proxy.cache.resp import RespConnection, lean_params
from proxy.cache.sessionstate import SessionCacheState
from proxy.cache.versions import CHANNEL, VERSIONS_KEY, Versions
from proxy.devdb import TempRedis
from proxy.sql import analyze


def run(coro):
    return asyncio.run(coro)


def test_only_plain_urls_take_the_lean_connection() -> None:
    assert lean_params("redis://127.0.0.1:6380/2") == {"host": "127.0.0.1", "port": 6380, "db": 2}
    assert lean_params("redis://u:p@h/0") == {"username": "u", "password": "p", "host": "h", "db": 0}
    for url in ("rediss://h:6379/0", "unix:///tmp/r.sock", "redis://h/0?socket_keepalive=true",
                "redis+cluster://h:7000"):
        assert lean_params(url) is None
    assert Versions("redis+cluster://127.0.0.1:7000")._lean_params is None


def test_replies_in_order_and_errors(redis_server) -> None:
    async def go():
        conn = await RespConnection.open(lean_params(redis_server.url), 1.0)
        futs = [conn.call(1.0, "ECHO", f"m{i}") for i in range(50)]  # pipelined
        assert await asyncio.gather(*futs) == [f"m{i}".encode() for i in range(50)]
        with pytest.raises(hiredis.ReplyError):
            await conn.call(1.0, "NOSUCHCOMMAND")
        assert await conn.call(1.0, "PING") == b"PONG"  # an error reply leaves the connection usable
        conn.close()

    run(go())


def test_a_timeout_closes_the_connection_so_no_late_reply_is_misread(redis_server) -> None:
    async def go():
        conn = await RespConnection.open(lean_params(redis_server.url), 1.0)
        slow = conn.call(0.05, "BLPOP", "pgfront:test:never", "0.3")  # its nil reply arrives after the deadline
        after = conn.call(5.0, "ECHO", "mine")
        with pytest.raises(TimeoutError):
            await slow
        with pytest.raises(ConnectionError):  # never BLPOP's reply
            await after
        assert conn.closed
        with pytest.raises(ConnectionError):
            await conn.call(1.0, "PING")

    run(go())


def test_auth_select_bump_and_pubsub_on_the_lean_connection() -> None:
    r = TempRedis().start()  # its start-up check pings without a password: set one afterwards
    url = f"redis://:s3cret@127.0.0.1:{r.port}/3"
    try:
        with redis.Redis(port=r.port) as admin:
            admin.config_set("requirepass", "s3cret")
        async def go():
            got: list[list[str]] = []
            a, b = Versions(url, 0.5), Versions(url, 0.5, on_invalidate=got.append)
            await a.start()
            await b.start()
            assert a.available and a._lean_params is not None
            for _ in range(200):  # both listeners subscribed
                if (await a.client.pubsub_numsub(CHANNEL))[0][1] == 2:
                    break
                await asyncio.sleep(0.01)
            assert await a.bump(["t:db.orders"]) == 0.0
            assert a._lean is not None and not a._lean.closed
            assert await a.client.hget(VERSIONS_KEY, "t:db.orders") == b"1"  # in db 3, where redis-py looks
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == [["t:db.orders"]]
            a._lean.close()  # a dead connection is replaced by the next bump
            assert await a.bump(["t:db.orders"]) == 0.0
            assert await a.client.hget(VERSIONS_KEY, "t:db.orders") == b"2"
            for v in (a, b):
                await v.close()

        run(go())
    finally:
        r.cleanup()


@pytest.mark.parametrize("sql,flag", [("SET ROLE other", "role_changed"),
                                      ("SELECT set_config('search_path', 'x', false)", "untracked"),
                                      ("CREATE TEMP TABLE tt (a int)", "temp_tables")])
def test_memoized_statement_marks_apply_to_every_session(sql: str, flag: str) -> None:
    info = analyze(sql)
    for _ in range(3):  # the first call fills the memo, later sessions read it
        state = SessionCacheState("db", "alice")
        state.sent(info)
        assert getattr(state, flag)
    plain = SessionCacheState("db", "alice")
    plain.sent(analyze("SELECT 1"))
    assert not (plain.role_changed or plain.untracked or plain.temp_tables)
