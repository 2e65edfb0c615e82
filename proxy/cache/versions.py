"""Version counters in Redis, the circuit breaker around every Redis call, and invalidation pub/sub.

All counters live in one Redis hash, `pgfront:versions`:
  e              the epoch: a random token, replaced to flush everything (role changes, purge, outages)
                 and recreated (new random value) when Redis lost the hash (restart, eviction, failover)
  d:<db>         database generation (DDL without known tables, CALL/DO, writes to tables with triggers)
  f:<fp>         fingerprint generation (admin purge by fingerprint)
  t:<db>.<rel>   relation version, bumped (HINCRBY) after every committed write to <rel>
  l:<field>      "<lsn> <value>": every bump of <field> up to the one that gave it <value> committed at or
                 before the primary's WAL position <lsn> (for fills from replicas; see `cover`)
A lookup reads the fields guarding its statement with one HMGET (pipelined with the GET of the entry)
and hashes the values into a *stamp*; an entry is served only if it was filled under the same stamp.
One hash keeps every counter in one Redis Cluster slot, so one HMGET reads them all atomically, and a
lost hash (restart, eviction) loses the epoch with it, which is detected and makes every old entry
unreachable. The cost: all version traffic goes to the one node owning that slot.

Freshness windows (`cache.local_validity`, W): a check at local time s that found an entry's stamp
current lets this process serve that entry from L1 with no round trip until s + W. The check also
records in the hash, per field, `w:<field>` = (Redis time of the check) + W, and a bump returns how long
the latest such window of the bumped fields still runs; the writer waits that out before its client
hears of the commit (a commit wait, as in Spanner). So a read that starts after a commit was
acknowledged can never be answered from a window opened before the bump: zero round trips for hot
entries, and writes pay only when a result of their tables was served in the last W.

Breaker: a failed or slow (> timeout) Redis call opens it; while open the cache is bypassed. A
background probe retries every `retry_after` seconds; on success it replaces the epoch before closing
the breaker, because a writer may have been unable to bump a version during the outage.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from hashlib import blake2b
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.cache.resp import RespConnection, lean_params

log = logging.getLogger("pgfront.cache.versions")

VERSIONS_KEY = "pgfront:versions"
DATABASES_KEY = "pgfront:databases"
CHANNEL = "pgfront:invalidate"
EPOCH = "e"
STAMP_BYTES = 16
WARM_CONNECTIONS = 16
BUMP_ATTEMPTS = 3            # a pooled connection may be dead after a Redis restart: reconnect and retry
BUMP_MIN_TIMEOUT = 0.2
FLUSH_ALL = "*"


# Reads the fields (the epoch first) and, with a window, marks each of the first n fields "watched until"
# Redis time + W (+1 ms for TIME's truncation to ms); the others (LSN records) are only read.
# KEYS[1]: the hash; ARGV[1]: W in ms; ARGV[2]: n; ARGV[3...]: fields.
_CHECK = """
local vals = redis.call('HMGET', KEYS[1], unpack(ARGV, 3))
local win = tonumber(ARGV[1])
if win > 0 then
  local t = redis.call('TIME')
  local untilms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + win + 1
  for i = 3, 2 + tonumber(ARGV[2]) do
    local w = 'w:' .. ARGV[i]
    if tonumber(redis.call('HGET', KEYS[1], w) or '0') < untilms then
      redis.call('HSET', KEYS[1], w, untilms)
    end
  end
end
return vals
"""

# Increments the fields (or replaces the epoch), publishes, and returns the ms the latest window over
# them still runs. A hash without an epoch (Redis lost it) remembers no windows: wait a whole one.
# KEYS[1]: the hash; ARGV: channel, message, new epoch or '', fallback wait ms, fields...
_BUMP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lost = redis.call('HEXISTS', KEYS[1], 'e') == 0
local latest = 0
if ARGV[3] ~= '' then
  latest = tonumber(redis.call('HGET', KEYS[1], 'w:e') or '0')
  redis.call('HSET', KEYS[1], 'e', ARGV[3])
else
  for i = 5, #ARGV do
    redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
    local w = tonumber(redis.call('HGET', KEYS[1], 'w:' .. ARGV[i]) or '0')
    if w > latest then latest = w end
  end
end
if ARGV[2] ~= '' then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
end
if lost then return tonumber(ARGV[4]) end
if latest > now then return latest - now end
return 0
"""


# Records that the fields' values observed (before the primary's WAL position ARGV[1] was read) were
# all committed at or before that position: for each field still at the value observed, `l:<field>` =
# "<lsn> <value>", unless a record for that very value is there already (it is as true). A field that
# moved on since is left alone: its newer bumps may have committed after the position.
# KEYS[1]: the hash; ARGV[1]: the position (decimal); ARGV[2...]: field, value observed, field, value, ...
_COVER = """
local n = 0
for i = 2, #ARGV, 2 do
  local f, v = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', KEYS[1], f) == v then
    local rec = redis.call('HGET', KEYS[1], 'l:' .. f)
    local sp = rec and string.find(rec, ' ', 1, true)
    if not (sp and string.sub(rec, sp + 1) == v) then
      redis.call('HSET', KEYS[1], 'l:' .. f, ARGV[1] .. ' ' .. v)
      n = n + 1
    end
  end
end
return n
"""

LSN_PREFIX = "l:"

_BUMP_BYTES = _BUMP.encode()  # encoded once: the lean connection sends it with every bump


class _PerTurn:
    """Requests made in one turn of the event loop, served together by one `flush(batch)` call, where
    batch is a list of (request, future) and flush settles every future."""

    def __init__(self, flush: Callable[[list], Awaitable[None]]) -> None:
        self._flush = flush
        self._batch: list = []

    def submit(self, request: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._batch.append((request, fut))
        if len(self._batch) == 1:
            loop.create_task(self._run())  # its first step runs on the next turn: requests until then join
        return fut

    async def _run(self) -> None:
        batch, self._batch = self._batch, []
        await self._flush(batch)


class RedisDown(Exception):
    """Redis is unreachable, slow or the breaker is open: bypass the cache."""


def db_field(database: str) -> str:
    return f"d:{database}"


def table_field(database: str, rel: str) -> str:
    return f"t:{database}.{rel}"


def fingerprint_field(fp: str) -> str:
    return f"f:{fp}"


def lsn_field(field: str) -> str:
    """Where the WAL position covering `field`'s current value is recorded (see `cover`)."""
    return LSN_PREFIX + field


def needs_position(field: str) -> bool:
    """Fields whose bumps stand for writes (the epoch, databases, relations), so a replica's rows may fill
    under their value only once it has replayed past those writes; a fingerprint purge changes no data."""
    return field == EPOCH or field.startswith(("t:", "d:"))


def covered_position(value: bytes | None, record: bytes | None) -> int | None:
    """The WAL position at or after the commit of every write whose bump is in `value`, from the field's
    `l:` record read with it; 0 when the field was never bumped (nothing to replay); None when not known
    (the record is missing, or covers an older value)."""
    if value is None:
        return 0
    if record is None:
        return None
    lsn, _, of = record.partition(b" ")
    return int(lsn) if of == value else None


def stamp_of(values: Iterable[bytes | None]) -> bytes:
    h = blake2b(digest_size=STAMP_BYTES)
    for v in values:
        h.update(b"\x00" if v is None else b"\x01" + v + b"\x00")
    return h.digest()


def is_cluster_url(url: str) -> bool:
    return urlsplit(url).scheme in ("redis+cluster", "rediss+cluster")


def connect(url: str, timeout: float) -> Any:
    """A redis.asyncio client (or RedisCluster for redis+cluster:// URLs).

    It retries a command once on a connection error (a pooled connection that died with a Redis restart
    is replaced) and never on a timeout: the caller's deadline is the budget.
    """
    common: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout,
                              "retry": Retry(NoBackoff(), 1)}
    if is_cluster_url(url):
        u = urlsplit(url)
        return RedisCluster(host=u.hostname or "127.0.0.1", port=u.port or 6379, password=u.password,
                            username=u.username, ssl=u.scheme.startswith("rediss"), **common)
    return aioredis.Redis.from_url(url, retry_on_error=[redis_errors.ConnectionError], **common)


class Versions:
    def __init__(self, url: str, timeout: float = 0.05, retry_after: float = 1.0,
                 on_invalidate: Callable[[list[str]], None] | None = None, window: float = 0.0) -> None:
        self.url = url
        self.window = window                    # local_validity in seconds (0: check every hit)
        self._window_ms = str(int(window * 1000))
        self.timeout = timeout
        self.retry_after = retry_after
        self.on_invalidate = on_invalidate      # fields bumped by any process (FLUSH_ALL for everything)
        self.cluster = is_cluster_url(url)
        self.client: Any = None
        self.available = False                  # breaker closed
        self.need_new_epoch = False             # an outage was seen: replace the epoch before serving again
        self.errors = 0
        self.outages = 0
        self.epoch_changes = 0
        self._probe: asyncio.Task | None = None
        self._listener: asyncio.Task | None = None
        self._reads = _PerTurn(self._flush_reads)  # version checks of one turn share one HMGET
        self._bumps = _PerTurn(self._flush_bumps)  # bumps of one turn share one script call
        self._closed = False
        # bumps and pub/sub use a lean connection when the URL allows it (resp.py: a fifth of the CPU)
        self._lean_params = None if self.cluster else lean_params(url)
        self._lean: RespConnection | None = None
        self._lean_lock = asyncio.Lock()

    # -- life cycle --------------------------------------------------------------------------------------
    async def start(self) -> None:
        self.client = connect(self.url, self.timeout)
        try:
            async with asyncio.timeout(max(self.timeout, 2.0)):  # connecting may take longer than a call
                await self.client.hsetnx(VERSIONS_KEY, EPOCH, os.urandom(8).hex())
                # open a few pooled connections now, so bursts do not pay connection set-up in the timeout
                await asyncio.gather(*(self.client.ping() for _ in range(WARM_CONNECTIONS)))
            self.available = True
        except Exception as e:
            self._down(e)
        self._listener = asyncio.get_running_loop().create_task(self._listen())

    async def close(self) -> None:
        self._closed = True
        for t in (self._probe, self._listener):
            if t:
                t.cancel()
        if self._lean is not None:
            self._lean.close()
        for t in (self._probe, self._listener):
            if t:
                try:
                    await t
                except BaseException:
                    pass
        if self.client is not None:
            try:
                await self.client.aclose()
            except Exception:
                pass

    # -- reads -------------------------------------------------------------------------------------------
    async def read(self, fields: list[str], entry_key: str | None,
                   extra: list[str] | tuple[str, ...] = ()) -> tuple[list[bytes | None], bytes | None]:
        """Current values of `fields` and then of `extra` (read in the same HMGET, opening no freshness
        window: the `l:` records of a read that goes to a replica) and, when entry_key is given, the stored
        entry: one round trip."""
        if not self.available:
            raise RedisDown("breaker open")
        if entry_key is None:
            return await self._read_batched(fields, extra), None
        try:
            async with asyncio.timeout(self.timeout):
                pipe = self.client.pipeline(transaction=False)
                self._check(pipe, fields, extra)
                pipe.get(entry_key)
                values, entry = await pipe.execute()
                return values, entry
        except Exception as e:
            raise self._down(e) from None

    async def _read_batched(self, fields: list[str], extra: list[str] | tuple[str, ...] = ()) -> list[bytes | None]:
        """Version checks of L1 hits, coalesced: every check asked for in one turn of the event loop
        shares one HMGET. Each check still sees Redis as it was after the check was asked for, so
        freshness is unchanged; concurrent clients just stop paying a round trip each."""
        return await self._reads.submit((fields, extra))

    async def _flush_reads(self, batch: list) -> None:
        union = sorted({f for (fields, _), _ in batch for f in fields})
        also = sorted({f for (_, extra), _ in batch for f in extra}.difference(union))
        try:
            async with asyncio.timeout(self.timeout):
                values = await self._check(self.client, union, also)
        except Exception as e:
            err = self._down(e)
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
            return
        got = dict(zip(union + also, values, strict=True))
        for (fields, extra), fut in batch:
            if not fut.done():
                fut.set_result([got[f] for f in fields] + [got[f] for f in extra])

    def _check(self, client: Any, fields: list[str], extra: list[str] | tuple[str, ...] = ()) -> Any:
        """HMGET of `fields` and `extra`, opening the freshness windows of `fields` when local_validity is set."""
        if not self.window:
            return client.hmget(VERSIONS_KEY, [*fields, *extra])
        return client.eval(_CHECK, 1, VERSIONS_KEY, self._window_ms, len(fields), *fields, *extra)

    async def observe(self, fields: list[str]) -> list[bytes | None]:
        """The fields' values now, opening no freshness window (for `cover`)."""
        try:
            async with asyncio.timeout(self.timeout):
                return await self.client.hmget(VERSIONS_KEY, fields)
        except Exception as e:
            raise self._down(e) from None

    async def cover(self, lsn: int, observed: list[tuple[str, bytes]]) -> int:
        """Record that every bump of each field up to its `observed` value committed at or before the
        primary's WAL position `lsn`, which must have been read after the values were (see _COVER): fields
        that moved on since are skipped. Returns how many records were written."""
        args: list[Any] = [str(lsn)]
        for field, value in observed:
            args += [field, value]
        try:
            async with asyncio.timeout(self.timeout):
                return int(await self.client.eval(_COVER, 1, VERSIONS_KEY, *args))
        except Exception as e:
            raise self._down(e) from None

    async def get(self, key: str) -> bytes | None:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.client.get(key)
        except Exception as e:
            raise self._down(e) from None

    async def ensure_epoch(self) -> None:
        """The hash lost its epoch (Redis restarted or evicted it): start a new one."""
        try:
            async with asyncio.timeout(self.timeout):
                if await self.client.hsetnx(VERSIONS_KEY, EPOCH, os.urandom(8).hex()):
                    self.epoch_changes += 1
        except Exception as e:
            self._down(e)

    # -- writes ------------------------------------------------------------------------------------------
    async def store(self, key: str, value: bytes, ttl: float) -> None:
        if not self.available:
            return
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.set(key, value, px=max(1, int(ttl * 1000)))
        except Exception as e:
            self._down(e)

    async def delete(self, key: str) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.client.delete(key)
        except Exception as e:
            self._down(e)

    async def bump(self, fields: Iterable[str], notes: Iterable[str] = ()) -> float | None:
        """Increment `fields` (FLUSH_ALL: replace the epoch) and tell other processes.

        Returns the seconds the writer must still wait before acknowledging its commit (the rest of the
        latest freshness window over these fields), or None when the bump failed: then the caller waits a
        whole window, since nobody can tell which were open. Bumps asked for in one turn of the event loop
        (concurrent commits) share one script call; each waits for the latest window over all of them,
        never less than its own. `notes` travel with the pub/sub message only ("ddl:<db>").
        """
        fields = set(fields)
        notes = list(notes)
        if not fields and not notes:
            return 0.0
        return await self._bumps.submit((fields, notes))

    async def _flush_bumps(self, batch: list) -> None:
        fields = sorted(set().union(*(f for (f, _), _ in batch)))
        notes = sorted({n for (_, ns), _ in batch for n in ns})
        wait: float | None = None
        try:
            wait = await self._bump_now([FLUSH_ALL] if FLUSH_ALL in fields else fields, notes)
        finally:  # even when cancelled (shutdown): no writer may wait forever
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(wait)

    async def _bump_now(self, fields: list[str], notes: list[str]) -> float | None:
        """One script call, tried even while the breaker is open, with a longer timeout and a few more
        attempts than a read gets: a lost bump leaves other processes serving the old result until the
        epoch is replaced, so it is worth a little latency on the write path. A final failure is
        remembered and the epoch replaced when Redis answers again."""
        flush = fields == [FLUSH_ALL]
        args = [CHANNEL, "\t".join(fields + notes), os.urandom(8).hex() if flush else "", self._window_ms,
                *([] if flush else fields)]
        error: BaseException | None = None
        timeout = max(self.timeout * 4, BUMP_MIN_TIMEOUT)
        for _ in range(BUMP_ATTEMPTS):
            try:
                if self._lean_params is not None:
                    wait_ms = await (await self._lean_connection(timeout)).call(timeout, "EVAL", _BUMP_BYTES, 1,
                                                                                VERSIONS_KEY, *args)
                else:
                    async with asyncio.timeout(timeout):
                        wait_ms = await self.client.eval(_BUMP, 1, VERSIONS_KEY, *args)
                if flush:
                    self.epoch_changes += 1
                return int(wait_ms) / 1000
            except Exception as e:
                error = e
        self._down(error or RedisDown("bump failed"))
        return None

    async def _lean_connection(self, timeout: float) -> RespConnection:
        """The shared lean connection, (re)opened when it is missing or was closed by an error or timeout."""
        conn = self._lean
        if conn is not None and not conn.closed:
            return conn
        async with self._lean_lock:  # concurrent bumps after a failure open one connection, not many
            if self._lean is None or self._lean.closed:
                self._lean = await RespConnection.open(self._lean_params or {}, timeout)
            return self._lean

    async def register_database(self, database: str) -> None:
        """Remember that entries of `database` exist (for purges by table name across databases)."""
        try:
            async with asyncio.timeout(max(self.timeout, 1.0)):
                await self.client.sadd(DATABASES_KEY, database)
        except Exception as e:
            self._down(e)

    async def databases(self) -> list[str]:
        try:
            async with asyncio.timeout(max(self.timeout, 1.0)):
                return sorted(d.decode() for d in await self.client.smembers(DATABASES_KEY))
        except Exception as e:
            self._down(e)
            return []

    # -- breaker -----------------------------------------------------------------------------------------
    def _down(self, e: BaseException) -> RedisDown:
        self.errors += 1
        self.need_new_epoch = True
        if self.available:
            self.outages += 1
            log.warning("redis unavailable, bypassing the cache: %s", e or type(e).__name__)
        self.available = False
        if not self._closed and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._recover())
        return RedisDown(str(e) or type(e).__name__)

    async def _recover(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.retry_after)
            try:
                async with asyncio.timeout(max(self.timeout, 0.5)):
                    # writes may have missed their bump during the outage: no entry from before it may serve
                    await self.client.hset(VERSIONS_KEY, EPOCH, os.urandom(8).hex())
                    await self.client.publish(CHANNEL, FLUSH_ALL)
            except Exception:
                continue
            self.epoch_changes += 1
            self.need_new_epoch = False
            if self.on_invalidate:
                self.on_invalidate([FLUSH_ALL])
            self.available = True
            log.warning("redis reachable again, cache resumed with a new epoch")
            return

    # -- pub/sub -----------------------------------------------------------------------------------------
    async def _listen(self) -> None:
        """Drop L1 entries other processes invalidated (memory hygiene; correctness never depends on it).
        A lost subscription is taken up again after `retry_after`."""
        follow = self._follow_lean if self._lean_params is not None else self._follow
        while not self._closed:
            try:
                await follow()
            except asyncio.CancelledError:
                raise
            except Exception:
                pass
            if not self._closed:
                await asyncio.sleep(self.retry_after)

    async def _follow(self) -> None:
        """One subscription through redis-py, until it fails."""
        client = pubsub = None
        try:
            client = self._pubsub_client()
            pubsub = client.pubsub()
            await pubsub.subscribe(CHANNEL)
            while not self._closed:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg and msg.get("type") == "message" and self.on_invalidate:
                    self.on_invalidate(msg["data"].decode().split("\t"))
        finally:
            for c in (pubsub, client):
                if c is not None:
                    try:
                        await c.aclose()
                    except Exception:
                        pass

    async def _follow_lean(self) -> None:
        """One subscription over a lean connection, until it is lost: each message is handled inside
        data_received, with no get_message() call, Task wake-up or redis-py parsing per message."""
        conn = None
        try:
            timeout = max(self.timeout, 1.0)
            conn = await RespConnection.open(self._lean_params or {}, timeout, on_push=self._pushed)
            await conn.call(timeout, "SUBSCRIBE", CHANNEL)
            await conn.lost
        finally:
            if conn is not None:
                conn.close()

    def _pushed(self, reply: Any) -> None:
        if (self.on_invalidate is not None and type(reply) is list and len(reply) == 3
                and reply[0] == b"message"):
            self.on_invalidate(reply[2].decode().split("\t"))

    def _pubsub_client(self) -> Any:
        """A connection of its own, without the short read timeout (it waits for messages)."""
        connect_timeout = max(self.timeout, 1.0)
        if not self.cluster:
            return aioredis.Redis.from_url(self.url, socket_timeout=None, socket_connect_timeout=connect_timeout)
        # PUBLISH is broadcast to every node of a cluster: subscribing on one node is enough
        node = self.client.get_default_node() or self.client.get_nodes()[0]
        return aioredis.Redis(host=node.host, port=node.port, socket_timeout=None,
                              socket_connect_timeout=connect_timeout)
