"""Limits shared by every worker and instance through Redis: one Lua script call per admission.

Rate: the GCRA schedule of `local.LocalRate`, kept in Redis under the limit's key, on Redis's clock
(TIME), so every instance reserves from one schedule: a statement is told how long to wait, and its
slot is reserved at once, in the order the reservations reach Redis (no polling for rate limits).

Concurrency: a sorted set per limit of leases (member: a unique id, score: when the lease runs out).
A worker renews the leases it holds every third of `lease`, so a crashed instance's slots come back
within one lease, and a statement that runs longer than a lease keeps its slot. A statement waiting
for a slot asks again when one is given back in its own worker, or every POLL seconds otherwise.
"""

from __future__ import annotations

from proxy.redis_calls import RedisCalls

POLL = 0.005  # seconds between two asks for a concurrency slot held elsewhere

# KEYS[1]: the schedule. ARGV: interval, tolerance, max wait (all in microseconds), key TTL (ms).
# Returns the microseconds to wait, or -1: refused, nothing reserved. Numbers are formatted with %.0f
# because Lua's default conversion keeps 14 digits and a time in microseconds has 16.
_RESERVE = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - tonumber(ARGV[2]) - now
if wait > tonumber(ARGV[3]) then return -1 end
redis.call('SET', KEYS[1], string.format('%.0f', tat + tonumber(ARGV[1])), 'PX', ARGV[4])
if wait < 0 then return 0 end
return math.floor(wait)
"""

# KEYS[1]: the leases. ARGV: limit, lease (ms), member. Returns 1 when the member got a slot.
_TAKE = b"""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 2)
  return 1
end
return 0
"""

# KEYS[1]: the leases. ARGV: lease (ms), members... Extends the leases still held (XX: never re-adds).
_RENEW = b"""
local t = redis.call('TIME')
local until_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', until_ms, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]) * 2)
return 0
"""


class SharedLimits(RedisCalls):
    """The Redis side of the limits. Every call raises ConnectionError, TimeoutError or a Redis error
    when Redis cannot answer in time; the caller then falls back to its local limits."""

    async def reserve(self, key: str, interval: float, tolerance: float, max_wait: float) -> float | None:
        """Seconds to wait before starting, or None: it could not start within max_wait."""
        ttl_ms = int((max_wait + tolerance + interval) * 1000) + 1000
        us = await self._call("EVAL", _RESERVE, 1, key, int(interval * 1e6), int(tolerance * 1e6),
                              int(max_wait * 1e6), ttl_ms)
        return None if int(us) < 0 else int(us) / 1e6

    async def take(self, key: str, limit: int, lease: float, member: str) -> bool:
        return int(await self._call("EVAL", _TAKE, 1, key, limit, int(lease * 1000), member)) == 1

    async def give_back(self, key: str, member: str) -> None:
        await self._call("ZREM", key, member)

    async def renew(self, key: str, lease: float, members: list[str]) -> None:
        await self._call("EVAL", _RENEW, 1, key, int(lease * 1000), *members)
