"""Per-fingerprint query statistics: recorded on the hot path, published and merged across workers.

Each worker process keeps a `Stats` in memory. `record()` runs once per executed statement and costs a
couple of microseconds: a dict look-up, a few additions and one histogram bucket. Latency goes into
a fixed log-scale histogram (48 buckets per decade, ~4.9% wide), so p50/p95/p99 come out within ~2.5%
of the truth and histograms from many workers merge by adding counts.

Memory is bounded: past `max_fingerprints` (plus 10% slack, so the work is batched) the fingerprints
with the least total time (then fewest calls, then oldest) fold into one "other" entry. Least total
time goes first because that is what SHOW QUERIES, `pgfront top` and /metrics rank by: what is folded
is what nobody would see, and "other" keeps the totals exact.

Across workers: a `StatsPublisher` writes an atomic JSON snapshot `run_dir/stats-<worker>.json` on
`flush()`; `load_merged()` adds up every live worker's snapshot (this worker's live data in place of its
file) into a `MergedStats`. RESET STATS bumps a generation number in `run_dir/stats-generation`; each
worker clears its query statistics when it notices at its next flush, and snapshots from an older
generation are ignored by `load_merged` in the meantime. Counters and gauges are never reset (they
feed Prometheus counters).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from proxy.sql.sqlcommenter import tags_text

try:  # about 10x faster for snapshots of thousands of fingerprints; the standard library works too
    import orjson

    def _dumps(obj: Any) -> bytes:
        try:
            return orjson.dumps(obj)
        except TypeError:
            # a query text that was not UTF-8 (decoded with surrogateescape): the standard library
            # escapes lone surrogates, so the snapshot is still written and read back
            return json.dumps(obj, separators=(",", ":")).encode()

    _loads = orjson.loads
except ImportError:  # pragma: no cover - depends on the environment

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

    _loads = json.loads

log = logging.getLogger(__name__)

OTHER = "other"
CACHE_EVENTS = ("hit", "miss", "bypass", "invalidation")

# Well-known global counters and gauges (any other name works too; /metrics exports them all).
CLIENT_CONNECTIONS = "client_connections"  # gauge
SERVER_CONNECTIONS = "server_connections"  # gauge
BYTES_RECEIVED = "bytes_received"  # counter: from clients
BYTES_SENT = "bytes_sent"  # counter: to clients
SLOW_QUERIES = "slow_queries"  # counter

_CACHE_COUNTERS = {e: f"cache_{e}" for e in ("hit", "miss", "bypass", "invalidation")}

# -- the latency histogram --------------------------------------------------------------------------
_PER_DECADE = 48
GROWTH = 10 ** (1 / _PER_DECADE)
_SCALE = _PER_DECADE / math.log(10)
_FLOOR = 1e-6  # bucket 0 holds everything up to 1 us
TOP_BUCKET = _PER_DECADE * 12  # 1 us * 10^12: about 11 days
_ceil, _log, _now = math.ceil, math.log, time.time


def bucket_of(seconds: float) -> int:
    """Bucket k >= 1 holds (1us * GROWTH^(k-1), 1us * GROWTH^k]."""
    if seconds <= _FLOOR:
        return 0
    return min(math.ceil(math.log(seconds / _FLOOR) * _SCALE), TOP_BUCKET)


def bucket_upper(k: int) -> float:
    return _FLOOR * GROWTH ** k


def _bucket_middle(k: int) -> float:
    return _FLOOR * GROWTH ** (k - 0.5) if k else _FLOOR


def percentile(hist: dict[int, int], count: int, q: float, lo: float, hi: float) -> float:
    """The q-quantile (0..1) of a histogram, as the middle of its bucket, clamped to [lo, hi]."""
    if count <= 0:
        return 0.0
    rank = max(1, math.ceil(q * count))
    seen = 0
    for k in sorted(hist):
        seen += hist[k]
        if seen >= rank:
            return min(max(_bucket_middle(k), lo), hi)
    return hi


# -- one fingerprint --------------------------------------------------------------------------------
class QueryStats:
    """Statistics of one fingerprint (or of the folded "other" entry)."""

    __slots__ = ("fingerprint", "query", "database", "user", "calls", "errors", "rows", "total", "min",
                 "max", "hist", "cache", "rules", "tags", "first_seen", "last_seen", "encoded")

    def __init__(self, fingerprint: str, query: str = "", now: float = 0.0) -> None:
        self.fingerprint = fingerprint
        self.query = query
        self.database = ""
        self.user = ""
        self.calls = 0
        self.errors: dict[str, int] = {}  # SQLSTATE class (first two characters) -> count
        self.rows = 0
        self.total = 0.0  # seconds
        self.min = math.inf
        self.max = 0.0
        self.hist: dict[int, int] = {}  # bucket_of(seconds) -> count
        self.cache: dict[str, int] = {}  # CACHE_EVENTS -> count
        self.rules: dict[tuple[str, str, str], int] = {}  # (rule, action, enforce|observe) -> count
        self.tags: dict[str, int] = {}  # sqlcommenter tags as text ("controller=x route=y") -> calls
        self.first_seen = now
        self.last_seen = now
        self.encoded: bytes | None = None  # JSON of this entry, cleared on change: idle entries cost no flush

    def absorb(self, other: QueryStats) -> None:
        """Add another entry's counts to this one (folding, or merging workers)."""
        self.encoded = None
        self.calls += other.calls
        self.rows += other.rows
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        for target, source in ((self.errors, other.errors), (self.hist, other.hist), (self.cache, other.cache),
                               (self.rules, other.rules), (self.tags, other.tags)):
            for key, n in source.items():
                target[key] = target.get(key, 0) + n
        same = other.fingerprint == self.fingerprint
        earlier = other.first_seen and (not self.first_seen or other.first_seen < self.first_seen)
        if earlier:
            self.first_seen = other.first_seen
        # one text per fingerprint, the first seen, so the /metrics query label does not flap between
        # variants of the statement (IN lists of other lengths normalize differently)
        if same and other.query and (earlier or not self.query):
            self.query = other.query
        if other.last_seen >= self.last_seen:
            self.last_seen = other.last_seen
            if same:
                self.database = other.database or self.database
                self.user = other.user or self.user

    def percentile(self, q: float) -> float:
        return percentile(self.hist, sum(self.hist.values()), q, self.min, self.max)

    def encode(self) -> bytes:
        if self.encoded is None:
            self.encoded = _dumps({
                "fingerprint": self.fingerprint, "query": self.query, "database": self.database, "user": self.user,
                "calls": self.calls, "errors": self.errors, "rows": self.rows, "total": self.total,
                "min": self.min if self.calls else None, "max": self.max,
                "hist": [x for item in self.hist.items() for x in item],  # flat [k, n, k, n, ...]
                "cache": self.cache, "rules": [[*key, n] for key, n in self.rules.items()], "tags": self.tags,
                "first_seen": self.first_seen, "last_seen": self.last_seen,
            })
        return self.encoded

    @classmethod
    def decode(cls, d: dict[str, Any]) -> QueryStats:
        q = cls(d["fingerprint"], d["query"], d["first_seen"])
        q.database, q.user, q.calls, q.rows, q.total = d["database"], d["user"], d["calls"], d["rows"], d["total"]
        q.min = math.inf if d["min"] is None else d["min"]
        q.max, q.last_seen, q.errors, q.cache = d["max"], d["last_seen"], d["errors"], d["cache"]
        hist = d["hist"]
        q.hist = dict(zip(hist[::2], hist[1::2], strict=True))
        q.rules = {(rule, action, mode): n for rule, action, mode, n in d["rules"]}
        q.tags = d.get("tags") or {}
        return q

    def copy(self) -> QueryStats:
        twin = QueryStats(self.fingerprint)
        twin.absorb(self)
        return twin

    def row(self) -> dict[str, Any]:
        """One line of SHOW QUERIES / `pgfront top` (times in milliseconds, timestamps ISO 8601 UTC)."""
        calls = self.calls
        by_action: dict[str, int] = {}
        for (_, action, _), n in self.rules.items():
            by_action[action] = by_action.get(action, 0) + n
        return {
            "fingerprint": self.fingerprint,
            "query": self.query,
            "calls": calls,
            "total_ms": round(self.total * 1e3, 3),
            "mean_ms": round(self.total * 1e3 / calls, 3) if calls else 0.0,
            "min_ms": round(self.min * 1e3, 3) if calls else 0.0,
            "max_ms": round(self.max * 1e3, 3),
            "p50_ms": round(self.percentile(0.50) * 1e3, 3),
            "p95_ms": round(self.percentile(0.95) * 1e3, 3),
            "p99_ms": round(self.percentile(0.99) * 1e3, 3),
            "rows": self.rows,
            "errors": sum(self.errors.values()),
            "error_classes": ",".join(f"{c}:{n}" for c, n in sorted(self.errors.items())),
            "cache_hits": self.cache.get("hit", 0),
            "cache_misses": self.cache.get("miss", 0),
            "cache_bypasses": self.cache.get("bypass", 0),
            "rewrites": by_action.get("rewrite", 0),
            "blocks": by_action.get("block", 0),
            "throttled": by_action.get("throttled", 0),
            "tags": "; ".join(f"{t} ({n})" for t, n in sorted(self.tags.items(), key=lambda x: -x[1])[:3]),
            "first_seen": _iso(self.first_seen),
            "last_seen": _iso(self.last_seen),
            "database": self.database,
            "user": self.user,
        }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if ts else ""


def _rank_key(q: QueryStats) -> tuple[float, int, float]:
    return (q.total, q.calls, q.last_seen)


MAX_TAGS = 8
OTHER_TAGS = "(other tags)"


# -- what a rules decision counts per execution -----------------------------------------------------
def rule_key(rule: str, action: str, observed: bool) -> tuple[str, str, str]:
    """A rule event's key in QueryStats.rules: (rule, action, "enforce" or "observe")."""
    return (rule, action, "observe" if observed else "enforce")


class RuleCounter:
    """Executions a rule matched. Shared by the rule of the same name across reloads. Compiled, its
    counts are C fields, which every execution under a matching rule bumps (RuleTally.hit)."""

    __slots__ = ("hits", "observed_hits", "queued", "throttled")

    def __init__(self) -> None:
        self.hits = 0
        self.observed_hits = 0
        self.queued = 0  # statements its throttle made wait (in observe mode: would have)
        self.throttled = 0  # statements its throttle refused (in observe mode: would have)

    def __repr__(self) -> str:
        return (f"RuleCounter(hits={self.hits}, observed_hits={self.observed_hits}, queued={self.queued}, "
                f"throttled={self.throttled})")


class RuleTally:
    """What one execution under a rules decision counts, prepared once with the decision (decisions are
    cached per statement text and rule set): the matching rules' counters, and the keys of the rule
    events of the statement's fingerprint. Each execution then costs a few C loops, no key building."""

    __slots__ = ("hits", "observed", "keys")

    def __init__(self, hits: tuple, observed: tuple, matched: tuple[tuple[str, str, bool], ...]) -> None:
        self.hits = hits  # RuleCounter of each enforced rule that matched
        self.observed = observed  # and of each observe-mode one
        self.keys = tuple([rule_key(rule, action, observed) for rule, action, observed in matched])

    def hit(self) -> None:
        """Count one execution against the rules (their hits and observed_hits)."""
        for c in self.hits:
            c.hits += 1
        for c in self.observed:
            c.observed_hits += 1

    def count(self, stats: Stats | None, fingerprint: str, q: QueryStats | None = None) -> None:
        """One execution: the rules' counters and, with statistics, the fingerprint's rule events (q: its
        entry, when at hand)."""
        self.hit()
        if stats is not None and self.keys:
            stats.rule_events(fingerprint, self.keys, q)


# -- one worker's live statistics -------------------------------------------------------------------
class Stats:
    """This worker's statistics. Not thread-safe: call it from the event loop's thread."""

    def __init__(self, max_fingerprints: int = 5000) -> None:
        self.max_fingerprints = max(1, max_fingerprints)
        self._limit = self.max_fingerprints + max(1, self.max_fingerprints // 10)
        self.queries: dict[str, QueryStats] = {}
        self.other = QueryStats(OTHER, "(other fingerprints)")
        self.counters: dict[str, int] = {}
        self.gauges: dict[str, float] = {}
        self.folded = 0  # fingerprints folded into "other" since the last reset
        self.changes = 0  # bumped on every update: lets the publisher skip idle flushes
        # counts kept elsewhere as C fields, bumped on the hot path without a dictionary (the router's
        # routed transactions): each fold(stats) sets its counters here, before they are read
        self.folds: list[Callable[[Stats], None]] = []
        self.worker_id: str | None = None  # set by StatsPublisher
        self.generation = 0  # reset generation this worker's data belongs to

    def _entry(self, fingerprint: str) -> QueryStats:
        q = self.queries.get(fingerprint)
        if q is None:
            if len(self.queries) >= self._limit:
                self._fold()
            q = self.queries[fingerprint] = QueryStats(fingerprint, "", time.time())
        return q

    def _fold(self) -> None:
        """Fold the least-used entries into "other" until one place below max_fingerprints is left."""
        ranked = sorted(self.queries.values(), key=_rank_key)
        for q in ranked[: len(ranked) - self.max_fingerprints + 1]:
            self.other.absorb(q)
            del self.queries[q.fingerprint]
        self.folded += len(ranked) - len(self.queries)

    def record(self, fingerprint: str, normalized: str, database: str, user: str, seconds: float, rows: int,
               sqlstate: str | None = None) -> QueryStats:
        """One statement answered (upstream or from the cache); seconds = time to answer it.

        sqlstate: None or "00000" for success, else the error's SQLSTATE. The first normalized text seen
        for a fingerprint is kept; database and user are the last seen. Returns the entry, so that a
        cache hit can count its event on it without a second look-up.
        """
        q = self.queries.get(fingerprint) or self._entry(fingerprint)
        q.calls += 1
        q.total += seconds
        if seconds < q.min:
            q.min = seconds
        if seconds > q.max:
            q.max = seconds
        # bucket_of, inlined: this runs once per statement
        k = min(_ceil(_log(seconds / _FLOOR) * _SCALE), TOP_BUCKET) if seconds > _FLOOR else 0
        hist = q.hist
        hist[k] = hist.get(k, 0) + 1
        q.rows += rows
        if sqlstate and sqlstate != "00000":
            errors = q.errors
            cls = sqlstate[:2]
            errors[cls] = errors.get(cls, 0) + 1
        if not q.query:
            q.query = normalized
        q.database = database
        q.user = user
        q.last_seen = _now()
        q.encoded = None
        self.changes += 1
        return q

    def tags_seen(self, q: QueryStats, tags: dict[str, str]) -> None:
        """A statement of q's fingerprint carried these sqlcommenter tags (SHOW QUERIES shows the most
        frequent; a fingerprint keeps at most MAX_TAGS distinct sets, the rest count as OTHER_TAGS)."""
        text = tags_text(tags)
        if not text:
            return
        seen = q.tags
        if text not in seen and len(seen) >= MAX_TAGS:
            text = OTHER_TAGS
        seen[text] = seen.get(text, 0) + 1
        q.encoded = None

    def cache_event(self, fingerprint: str, event: str, q: QueryStats | None = None) -> None:
        """event: hit | miss | bypass | invalidation (q: the fingerprint's entry, when at hand)."""
        if q is None:
            q = self._entry(fingerprint)
        cache = q.cache
        cache[event] = cache.get(event, 0) + 1
        q.encoded = None
        counters = self.counters
        name = _CACHE_COUNTERS[event]
        counters[name] = counters.get(name, 0) + 1
        self.changes += 1

    def rule_event(self, fingerprint: str, rule_name: str, action: str, observed: bool = False,
                   q: QueryStats | None = None) -> None:
        """A rule matched; observed=True when it only observed (dry-run mode) instead of acting."""
        self.rule_events(fingerprint, (rule_key(rule_name, action, observed),), q)

    def rule_events(self, fingerprint: str, keys: tuple[tuple[str, str, str], ...],
                    q: QueryStats | None = None) -> None:
        """Rules matched one execution: one event per key (rule_key; q: the fingerprint's entry, when at hand)."""
        if q is None:
            q = self.queries.get(fingerprint) or self._entry(fingerprint)
        rules = q.rules
        for key in keys:
            rules[key] = rules.get(key, 0) + 1
        q.encoded = None
        self.changes += 1

    def inc(self, name: str, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n
        self.changes += 1

    def set_counter(self, name: str, total: int) -> None:
        """A counter whose running total is kept elsewhere (bytes of open sessions, say)."""
        self.counters[name] = total
        self.changes += 1

    def fold(self) -> None:
        """Bring the counters kept elsewhere (`folds`) up to date: before a snapshot or a merge."""
        for f in self.folds:
            f(self)

    def set_gauge(self, name: str, value: float) -> None:
        self.gauges[name] = value
        self.changes += 1

    def reset(self, generation: int | None = None) -> None:
        """Forget the query statistics (RESET STATS); counters and gauges carry on."""
        self.queries.clear()
        self.other = QueryStats(OTHER, "(other fingerprints)")
        self.folded = 0
        if generation is not None:
            self.generation = generation
        self.changes += 1

    def snapshot(self) -> bytes:
        """This worker's statistics as JSON; only entries changed since the last call are encoded anew."""
        head = _dumps({
            "version": 1, "worker": self.worker_id, "pid": os.getpid(), "time": time.time(),
            "generation": self.generation, "folded": self.folded, "counters": self.counters, "gauges": self.gauges,
        })
        queries = b",".join([q.encode() for q in self.queries.values()])
        return b"%s,\"other\":%s,\"queries\":[%s]}" % (head[:-1], self.other.encode(), queries)


# -- many workers -----------------------------------------------------------------------------------
_GENERATION_FILE = "stats-generation"


def _snapshot_path(run_dir: Path, worker_id: str) -> Path:
    return run_dir / f"stats-{worker_id}.json"


def write_atomic(path: Path, data: bytes) -> None:
    """Replace path's content at once: a reader sees the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_generation(run_dir: str | Path) -> int:
    try:
        return int(Path(run_dir, _GENERATION_FILE).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def request_reset(run_dir: str | Path, live: Stats | None = None) -> int:
    """RESET STATS for every worker: bump the generation (and clear `live` now). Returns it."""
    generation = read_generation(run_dir) + 1
    write_atomic(Path(run_dir, _GENERATION_FILE), str(generation).encode())
    if live is not None:
        live.reset(generation)
    return generation


def pid_alive(pid: Any) -> bool:
    """Whether a worker that wrote a snapshot still runs."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StatsPublisher:
    """Writes this worker's snapshot for the others to read."""

    def __init__(self, stats: Stats, run_dir: str | Path, worker_id: str | int) -> None:
        self.stats = stats
        self.run_dir = Path(run_dir)
        self.worker_id = str(worker_id)
        self.path = _snapshot_path(self.run_dir, self.worker_id)
        stats.worker_id = self.worker_id
        self._flushed_changes = -1

    def flush(self) -> bool:
        """Apply a pending RESET STATS, then write the snapshot if anything changed. True if written."""
        generation = read_generation(self.run_dir)
        if generation > self.stats.generation:
            self.stats.reset(generation)
        self.stats.fold()
        if self.stats.changes == self._flushed_changes:
            return False
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._flushed_changes = self.stats.changes
        write_atomic(self.path, self.stats.snapshot())
        return True

    async def run(self, interval: float) -> None:
        """Flush every `interval` seconds until cancelled (then once more)."""
        try:
            while True:
                await asyncio.sleep(interval)
                try:
                    self.flush()
                except OSError as e:  # a full or missing disk must not stop the worker
                    log.warning("stats snapshot not written: %s", e)
        finally:
            with contextlib.suppress(OSError):
                self.flush()

    def remove(self) -> None:
        """On clean shutdown: the worker's numbers leave the merged view with it."""
        with contextlib.suppress(OSError):
            self.path.unlink()


@dataclass
class MergedStats:
    """All live workers' statistics added up."""

    queries: dict[str, QueryStats] = field(default_factory=dict)
    other: QueryStats = field(default_factory=lambda: QueryStats(OTHER, "(other fingerprints)"))
    counters: dict[str, int] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    workers: int = 0
    folded: int = 0
    generation: int = 0
    run_dir: Path | None = None
    live: Stats | None = None

    def add(self, snap: dict[str, Any], fresh: bool) -> None:
        """Add one worker's decoded snapshot; a stale one (older reset generation) adds counters only."""
        queries = [QueryStats.decode(d) for d in snap["queries"]] if fresh else []
        self._add(snap["counters"], snap["gauges"], snap["folded"] if fresh else 0, queries,
                  QueryStats.decode(snap["other"]) if fresh else None)

    def add_live(self, stats: Stats) -> None:
        """Add a live Stats (copied: the worker goes on changing it)."""
        stats.fold()
        self._add(stats.counters, stats.gauges, stats.folded, [q.copy() for q in stats.queries.values()],
                  stats.other)

    def _add(self, counters: dict[str, int], gauges: dict[str, float], folded: int, queries: list[QueryStats],
             other: QueryStats | None) -> None:
        self.workers += 1
        for target, source in ((self.counters, counters), (self.gauges, gauges)):
            for name, n in source.items():
                target[name] = target.get(name, 0) + n
        self.folded += folded
        if other is not None:
            self.other.absorb(other)
        for q in queries:
            mine = self.queries.get(q.fingerprint)
            if mine is None:
                self.queries[q.fingerprint] = q
            else:
                mine.absorb(q)

    def ranked(self, order_by: str = "total_time") -> list[QueryStats]:
        key = _ORDERS.get(order_by)
        if key is None:
            raise ValueError(f"cannot order by {order_by!r} (use one of: {', '.join(_ORDERS)})")
        return sorted(self.queries.values(), key=key, reverse=True)

    def top(self, n: int = 20, order_by: str = "total_time") -> list[dict[str, Any]]:
        """SHOW QUERIES rows: the n first fingerprints by order_by (see QueryStats.row for the keys)."""
        return [q.row() for q in self.ranked(order_by)[:n]]

    def split_top(self, n: int, order_by: str = "total_time") -> tuple[list[QueryStats], QueryStats]:
        """The n first fingerprints, and everything else (folded ones included) added into one entry."""
        ranked = self.ranked(order_by)
        rest = QueryStats(OTHER, "(other fingerprints)")
        for q in [self.other, *ranked[n:]]:
            rest.absorb(q)
        return ranked[:n], rest

    def everything(self) -> QueryStats:
        """All fingerprints added up."""
        return self.split_top(0)[1]

    def reset(self) -> int:
        """RESET STATS across all workers (needs run_dir)."""
        if self.run_dir is None:
            raise ValueError("these statistics were not loaded from a run directory")
        self.queries.clear()
        self.other = QueryStats(OTHER, "(other fingerprints)")
        return request_reset(self.run_dir, self.live)


_ORDERS = {
    "total_time": lambda q: q.total,
    "calls": lambda q: q.calls,
    "mean_time": lambda q: q.total / q.calls if q.calls else 0.0,
    "max_time": lambda q: q.max,
    "p95": lambda q: q.percentile(0.95),
    "p99": lambda q: q.percentile(0.99),
    "rows": lambda q: q.rows,
    "errors": lambda q: sum(q.errors.values()),
    "last_seen": lambda q: q.last_seen,
}
ORDER_BY: tuple[str, ...] = tuple(_ORDERS)  # what top() and SHOW QUERIES ... BY accept


def load_merged(run_dir: str | Path, live: Stats | None = None) -> MergedStats:
    """Merge every live worker's snapshot in run_dir; `live` replaces its own worker's file.

    Files left by workers whose pid is gone are removed.
    """
    run_dir = Path(run_dir)
    generation = read_generation(run_dir)
    merged = MergedStats(generation=generation, run_dir=run_dir, live=live)
    own = _snapshot_path(run_dir, live.worker_id) if live is not None and live.worker_id else None
    for path in run_dir.glob("stats-*.json"):
        if path == own:
            continue
        try:
            snap = _loads(path.read_bytes())
            if not pid_alive(snap.get("pid")):
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            merged.add(snap, fresh=snap["generation"] >= generation)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # vanished under us, or not a snapshot of this version
    if live is not None:
        if generation > live.generation:  # a reset this worker has not applied yet
            live.reset(generation)
        merged.add_live(live)
    return merged
