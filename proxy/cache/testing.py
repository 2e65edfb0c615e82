"""Helpers for the cache's tests and benchmarks: backend reply bytes, a throwaway Redis Cluster, waiting."""

from __future__ import annotations

import asyncio
import inspect
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.devdb import TempRedis, free_port


def message(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


def select_reply(values: list[bytes], column: bytes = b"v") -> bytes:
    """The backend reply to a one-column text SELECT: RowDescription, DataRows, CommandComplete."""
    rd = message(b"T", (1).to_bytes(2, "big") + column + b"\x00" + bytes(6) + (25).to_bytes(4, "big")
                 + (-1).to_bytes(2, "big", signed=True) + (-1).to_bytes(4, "big", signed=True) + bytes(2))
    rows = b"".join(message(b"D", (1).to_bytes(2, "big") + len(v).to_bytes(4, "big") + v) for v in values)
    return rd + rows + message(b"C", b"SELECT %d\x00" % len(values))


def reply_values(reply: bytes) -> list[bytes]:
    """The first column of every DataRow in a reply made by select_reply (or by Postgres)."""
    out, i = [], 0
    while i < len(reply):
        n = int.from_bytes(reply[i + 1:i + 5], "big")
        if reply[i:i + 1] == b"D":
            size = int.from_bytes(reply[i + 7:i + 11], "big")
            out.append(reply[i + 11:i + 11 + size])
        i += 1 + n
    return out


async def eventually(check: Callable[[], Awaitable[Any] | Any], timeout: float = 10.0, step: float = 0.05) -> Any:
    """Call (and await, if need be) check() until it returns something truthy; its last result after
    `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got or time.monotonic() > deadline:
            return got
        await asyncio.sleep(step)


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port


class TempRedisCluster:
    """Three redis-server processes joined into a cluster (no replicas) on free loopback ports."""

    def __init__(self, nodes: int = 3) -> None:
        self.nodes = [TempRedis(port=_cluster_port(), extra=[
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
        ]) for _ in range(nodes)]

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> TempRedisCluster:
        try:
            return self._start()
        except BaseException:
            self.cleanup()
            raise

    def _start(self) -> TempRedisCluster:
        for n in self.nodes:
            n.start()
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(["redis-cli", "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            out = subprocess.run(["redis-cli", "-p", str(self.nodes[0].port), "cluster", "info"],
                                 capture_output=True, text=True).stdout
            if "cluster_state:ok" in out:
                return self
            time.sleep(0.1)
        raise RuntimeError("redis cluster did not become ready")

    def cleanup(self) -> None:
        for n in self.nodes:
            n.cleanup()


def cache_config(redis_url: str, **cache: Any) -> Any:
    from proxy.config import load

    return load(None, {"cache": {"enabled": True, "redis_url": redis_url, **cache}})


async def started_cache(redis_url: str, dsn: str, *, retry_after: float = 0.2, **cache: Any) -> Any:
    """A started ResultCache. Redis calls get 1 s unless told otherwise: a busy 2-core test machine stalls
    event loops past 50 ms, and each stall would open the breaker and flush the cache."""
    from proxy.cache.resultcache import ResultCache

    cache.setdefault("redis_timeout", "1s")
    rc = ResultCache(cache_config(redis_url, **cache), dsn, retry_after=retry_after)
    await rc.start()
    return rc


async def settle(cache: Any, info: Any, state: Any, **rule: Any) -> Any:
    """Wait until the catalog facts a statement needs are known; the policy decision then."""
    from proxy.cache.policy import PENDING

    async def decided() -> Any:
        d = cache.policy.check(info, state, **rule)
        return d if d.reason != PENDING else None

    return await eventually(decided)


async def read_through(cache: Any, state: Any, conn: Any, sql: str, *args: Any, ttl: float | None = None,
                       **rule: Any) -> tuple[str, list[bytes]]:
    """The session's read path in miniature: (hit level | "miss" | "bypass", first-column values)."""
    from proxy.cache.resultcache import Fill, Hit
    from proxy.sql import analyze

    info = analyze(sql)
    res = await cache.lookup(cache.key(state, sql, [str(a).encode() for a in args]), info, state, **rule)
    if isinstance(res, Hit):
        return res.level, reply_values(res.reply)
    state.sent(info)
    try:
        rows = await conn.fetch(sql, *args)
    except BaseException:
        if isinstance(res, Fill):
            cache.abandon(res)
        raise
    values = [str(r[0]).encode() for r in rows]
    if isinstance(res, Fill):
        res.feed(select_reply(values))
        await cache.fill(res, ttl)
    await finish(cache, state, info)
    return ("miss" if isinstance(res, Fill) else "bypass"), values


async def write_through(cache: Any, state: Any, conn: Any, sql: str, *args: Any) -> None:
    """The session's write path: run it, then invalidate before 'acknowledging' (returning)."""
    from proxy.sql import analyze

    info = analyze(sql)
    state.sent(info)
    await conn.execute(sql, *args)
    await finish(cache, state, info)


async def finish(cache: Any, state: Any, info: Any) -> None:
    """CommandComplete and ReadyForQuery hooks (status as the server would say), invalidating as told."""
    effect = state.done(info)
    if effect:
        await cache.invalidate(state, effect)
    effect = state.ready("T" if state.in_transaction else "I")
    if effect:
        await cache.invalidate(state, effect)
