"""Read cache: results of provable reads, keyed by everything that shapes them, invalidated by per-table
version counters in Redis. Entry point: ResultCache (see resultcache.py and docs/cache.md)."""

from proxy.cache.capture import ResultCapture, split_row_description
from proxy.cache.keys import make_key, normalize_formats, session_prefix
from proxy.cache.policy import CachePolicy, Decision
from proxy.cache.resultcache import Bypass, Fill, Hit, ResultCache
from proxy.cache.sessionstate import SessionCacheState
from proxy.cache.writes import NO_WRITES, WriteEffect, write_effect

__all__ = [
    "NO_WRITES", "Bypass", "CachePolicy", "Decision", "Fill", "Hit", "ResultCache", "ResultCapture",
    "SessionCacheState", "WriteEffect", "make_key", "normalize_formats", "session_prefix",
    "split_row_description", "write_effect",
]
