"""Entry storage: the in-process L1 (an LRU bounded by bytes) and the entry layout shared with Redis (L2).

An entry is the version stamp it was filled under, its expiry, then the exact backend reply bytes. An entry is
served only while its stamp equals the stamp of the current versions (see versions.py), so neither level
ever needs to be told about a write for correctness; L1 still drops entries by tag when other processes
publish an invalidation, to free memory early.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from proxy.cache.versions import STAMP_BYTES

ENTRY_OVERHEAD = 200  # bytes of bookkeeping charged per L1 entry besides the reply


def encode_entry(stamp: bytes, reply: bytes, ttl: float) -> bytes:
    """stamp, expiry (unix ms, so L1 copies never outlive the Redis TTL), reply."""
    return stamp + int((time.time() + ttl) * 1000).to_bytes(8, "big") + reply


def decode_entry(entry: bytes | None, stamp: bytes) -> tuple[bytes, float] | None:
    """(reply, seconds left to live) when `entry` was filled under `stamp`, else None."""
    if entry is None or entry[:STAMP_BYTES] != stamp:
        return None
    left = int.from_bytes(entry[STAMP_BYTES:STAMP_BYTES + 8], "big") / 1000 - time.time()
    return entry[STAMP_BYTES + 8:], left


@dataclass(slots=True)
class L1Entry:
    stamp: bytes
    reply: bytes
    expires: float
    fields: tuple[str, ...]
    size: int
    fresh_until: float  # monotonic time until which a hit needs no version check (versions.py: windows)


class L1Store:
    """LRU of replies bounded by total bytes; expired entries are dropped when met."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, L1Entry] = OrderedDict()
        self._by_field: dict[str, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> L1Entry | None:
        e = self._entries.get(key)
        if e is None:
            return None
        if e.expires < time.monotonic():
            self._remove(key)
            return None
        self._entries.move_to_end(key)
        return e

    def put(self, key: bytes, stamp: bytes, reply: bytes, ttl: float, fields: tuple[str, ...],
            fresh_until: float = 0.0) -> None:
        size = len(reply) + len(key) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return
        if key in self._entries:
            self._remove(key)
        self._entries[key] = L1Entry(stamp, reply, time.monotonic() + ttl, fields, size, fresh_until)
        self.bytes += size
        for f in fields:
            self._by_field.setdefault(f, set()).add(key)
        while self.bytes > self.max_bytes:
            self._remove(next(iter(self._entries)))

    def drop_fields(self, fields: list[str] | tuple[str, ...]) -> int:
        """Drop every entry guarded by one of `fields` (a version that was bumped); returns how many."""
        keys = set()
        for f in fields:
            keys |= self._by_field.get(f, set())
        for k in keys:
            self._remove(k)
        return len(keys)

    def discard(self, key: bytes) -> None:
        if key in self._entries:
            self._remove(key)

    def clear(self) -> None:
        self._entries.clear()
        self._by_field.clear()
        self.bytes = 0

    def _remove(self, key: bytes) -> None:
        e = self._entries.pop(key)
        self.bytes -= e.size
        for f in e.fields:
            keys = self._by_field.get(f)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_field[f]
