"""Mirroring: statements a rule picked are run again, with their parameters, on a shadow server, and
the shadow's result is compared with the primary's.

The relay offers each observed statement once its reply has gone to the client (`Mirrors.offer`). Per
target, a bounded queue takes it without ever waiting: when the queue is full the statement is dropped
and counted, so a shadow that is slow, failing or down costs clients nothing. Each of the target's
`connections` has its own queue and task (and `runner.ShadowRunner`); a client session's statements
all go to the same one, so they reach the shadow in their order (mirrored writes depend on it), while
other sessions' statements run alongside. The task runs each statement on the shadow and compares:
the same outcome (SQLSTATE), the same row count, and the same digest of the rows (an order-insensitive
hash of the DataRows, see `digest`). Each (target, fingerprint) keeps its counts, one example of a
mismatch and the latency histograms of both sides (over the statements compared: p50/p95 side by side).

A statement the shadow fails where the primary did not (an error, a timeout, the shadow unreachable)
is counted as an error of the shadow, not as a mismatch: a shadow that is down must not read as a
shadow returning wrong rows.

Across workers: each worker writes a JSON snapshot `run_dir/mirror-<worker>.json` every second (like
`stats.StatsPublisher`); `Mirrors.merged` adds every live worker's snapshot up (this worker's live
state in place of its file), so the admin console and /metrics of any worker show the whole instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.shadow.digest import same
from proxy.shadow.observe import Observed
from proxy.shadow.runner import CONNECT_FAILED, ShadowResult, ShadowRunner, safe_url
from proxy.stats import bucket_of, percentile, pid_alive, write_atomic

log = logging.getLogger(__name__)

MAX_FINGERPRINTS = 1000  # per target and worker; further fingerprints are counted together as OTHER
OTHER = "other"
SNAPSHOT_INTERVAL = 1.0  # seconds between a worker's snapshots
_SQL_MAX = 2000  # characters of an example's statement kept
_PARAM_MAX = 200  # characters of each of an example's parameters kept
# per-target counters; "queued" is a gauge (statements waiting now), the others only grow
COUNTERS = ("queued", "sent", "dropped", "compared", "mismatched", "errors")


@dataclass(frozen=True, slots=True)
class MirrorTarget:
    """A [mirror.NAME] table: where its statements go, and how much each worker may queue and run."""

    name: str
    url: str
    queue_size: int = 1000
    connections: int = 2
    timeout: float = 5.0  # seconds; a statement slower on the shadow is cancelled, counted an error


# -- reports ----------------------------------------------------------------------------------------
class Latency:
    """A latency histogram (stats.py's log-scale buckets, so workers' histograms merge by adding)."""

    __slots__ = ("hist", "count", "min", "max")

    def __init__(self) -> None:
        self.hist: dict[int, int] = {}
        self.count = 0
        self.min = float("inf")
        self.max = 0.0

    def add(self, seconds: float) -> None:
        k = bucket_of(seconds)
        self.hist[k] = self.hist.get(k, 0) + 1
        self.count += 1
        self.min = min(self.min, seconds)
        self.max = max(self.max, seconds)

    def absorb(self, other: Latency) -> None:
        for k, n in other.hist.items():
            self.hist[k] = self.hist.get(k, 0) + n
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def ms(self, q: float) -> float:
        """The q-quantile in milliseconds (0 when empty)."""
        return round(percentile(self.hist, self.count, q, self.min, self.max) * 1e3, 3) if self.count else 0.0

    def to_json(self) -> dict[str, Any]:
        return {"hist": [x for item in self.hist.items() for x in item], "count": self.count,
                "min": self.min if self.count else None, "max": self.max}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Latency:
        lat = cls()
        flat = d["hist"]
        lat.hist = dict(zip(flat[::2], flat[1::2], strict=True))
        lat.count, lat.max = d["count"], d["max"]
        lat.min = float("inf") if d["min"] is None else d["min"]
        return lat


class Comparison:
    """The mirror's results for one fingerprint on one target."""

    __slots__ = ("target", "fingerprint", "query", "compared", "mismatches", "errors", "primary", "shadow",
                 "example", "last_error", "last_seen")

    def __init__(self, target: str, fingerprint: str, query: str = "") -> None:
        self.target = target
        self.fingerprint = fingerprint
        self.query = query
        self.compared = 0  # answered by the shadow, the results compared
        self.mismatches = 0
        self.errors = 0  # the shadow failed (and the primary did not, or not the same way)
        self.primary = Latency()  # of the statements compared, on both sides
        self.shadow = Latency()
        self.example: dict[str, Any] | None = None  # the first mismatch
        self.last_error = ""
        self.last_seen = 0.0

    def absorb(self, other: Comparison) -> None:
        self.query = self.query or other.query
        self.compared += other.compared
        self.mismatches += other.mismatches
        self.errors += other.errors
        self.primary.absorb(other.primary)
        self.shadow.absorb(other.shadow)
        if self.example is None or (other.example is not None and other.example["at"] < self.example["at"]):
            self.example = other.example or self.example
        if other.last_seen >= self.last_seen:
            self.last_seen = other.last_seen
            self.last_error = other.last_error or self.last_error

    def row(self) -> dict[str, Any]:
        """One line of SHOW MIRROR."""
        return {"target": self.target, "fingerprint": self.fingerprint, "query": self.query,
                "compared": self.compared, "mismatches": self.mismatches, "errors": self.errors,
                "primary_p50_ms": self.primary.ms(0.50), "primary_p95_ms": self.primary.ms(0.95),
                "shadow_p50_ms": self.shadow.ms(0.50), "shadow_p95_ms": self.shadow.ms(0.95),
                "example": self.example, "last_error": self.last_error}

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "fingerprint": self.fingerprint, "query": self.query,
                "compared": self.compared, "mismatches": self.mismatches, "errors": self.errors,
                "primary": self.primary.to_json(), "shadow": self.shadow.to_json(), "example": self.example,
                "last_error": self.last_error, "last_seen": self.last_seen}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Comparison:
        c = cls(d["target"], d["fingerprint"], d["query"])
        c.compared, c.mismatches, c.errors = d["compared"], d["mismatches"], d["errors"]
        c.primary, c.shadow = Latency.from_json(d["primary"]), Latency.from_json(d["shadow"])
        c.example, c.last_error, c.last_seen = d["example"], d["last_error"], d["last_seen"]
        return c


@dataclass
class MirrorReport:
    """Mirror counters and comparisons, of one worker or added up over all of them."""

    targets: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> COUNTERS, url, connected, ...
    comparisons: dict[tuple[str, str], Comparison] = field(default_factory=dict)
    workers: int = 0

    def add(self, snap: dict[str, Any]) -> None:
        """Add one worker's snapshot (`Mirrors.snapshot()`)."""
        self.workers += 1
        for name, counters in snap["targets"].items():
            mine = self.targets.setdefault(name, {"target": name, "url": counters["url"], "workers": 0,
                                                  "connected": 0, **dict.fromkeys(COUNTERS, 0),
                                                  "last_error": "", "last_error_at": 0.0})
            mine["workers"] += 1
            for key in (*COUNTERS, "connected"):
                mine[key] += counters[key]
            if counters["last_error_at"] > mine["last_error_at"]:
                mine["last_error"], mine["last_error_at"] = counters["last_error"], counters["last_error_at"]
        for d in snap["comparisons"]:
            c = Comparison.from_json(d)
            key = (c.target, c.fingerprint)
            if key in self.comparisons:
                self.comparisons[key].absorb(c)
            else:
                self.comparisons[key] = c

    def rows(self) -> list[dict[str, Any]]:
        """SHOW MIRROR: per target and fingerprint, the most mismatched first."""
        ranked = sorted(self.comparisons.values(),
                        key=lambda c: (c.target, -c.mismatches, -c.errors, -c.compared, c.fingerprint))
        return [c.row() for c in ranked]

    def target_rows(self) -> list[dict[str, Any]]:
        """SHOW MIRRORS: per target, the counters."""
        return [{k: v for k, v in t.items() if k != "last_error_at"}
                for _, t in sorted(self.targets.items())]


# -- one worker's mirrors ---------------------------------------------------------------------------
class _Target:
    """One target's queues, workers and results in this worker process."""

    def __init__(self, target: MirrorTarget) -> None:
        self.target = target
        n = max(1, target.connections)
        # queue_size is the target's, shared out over its connections
        self.queues: list[asyncio.Queue[Observed]] = [asyncio.Queue(maxsize=max(1, -(-target.queue_size // n)))
                                                      for _ in range(n)]
        self.runners = [ShadowRunner(target.url, target.timeout) for _ in range(n)]
        self.tasks: list[asyncio.Task] = []
        self.sent = self.dropped = self.compared = self.mismatched = self.errors = 0
        self.last_error = ""
        self.last_error_at = 0.0
        self.comparisons: dict[str, Comparison] = {}

    def comparison(self, obs: Observed) -> Comparison:
        fp = obs.fingerprint
        c = self.comparisons.get(fp)
        if c is None:
            if len(self.comparisons) >= MAX_FINGERPRINTS:
                fp = OTHER
                c = self.comparisons.get(fp)
            if c is None:
                query = "(other fingerprints)" if fp == OTHER else obs.normalized
                c = self.comparisons[fp] = Comparison(self.target.name, fp, query)
        return c

    def queued(self) -> int:
        return sum(q.qsize() for q in self.queues)

    def counters(self) -> dict[str, Any]:
        return {"url": safe_url(self.target.url), "queued": self.queued(), "sent": self.sent,
                "dropped": self.dropped, "compared": self.compared, "mismatched": self.mismatched,
                "errors": self.errors, "connected": sum(r.connected for r in self.runners),
                "last_error": self.last_error, "last_error_at": self.last_error_at}


class Mirrors:
    """The worker's mirror targets: `offer` from the relay, shadow connections in background tasks."""

    def __init__(self, targets: Iterable[MirrorTarget]) -> None:
        self.targets = {t.name: _Target(t) for t in targets}
        self.unknown: dict[str, int] = {}  # statements offered for a target no [mirror.NAME] defines
        self.closed = False
        self.run_dir: Path | None = None
        self.worker_id = "0"
        self.changes = 0  # bumped on every update: idle workers skip their snapshot
        self._flushed = -1
        self._publisher: asyncio.Task | None = None

    @classmethod
    def from_config(cls, targets: dict[str, dict[str, Any]]) -> Mirrors | None:
        """From `Config.mirror_targets` ({name: {url, queue_size, connections, timeout}}); None when
        no target is configured."""
        if not targets:
            return None
        return cls(MirrorTarget(name, t["url"], int(t.get("queue_size", 1000)), int(t.get("connections", 2)),
                                float(t.get("timeout", 5.0))) for name, t in targets.items())

    # -- the relay's side: must never block, never raise ------------------------------------------
    def offer(self, obs: Observed) -> None:
        """Queue a statement for each of its targets; a full queue drops it (and counts the drop)."""
        try:
            targets = obs.targets
            if len(targets) > 1:  # two rules may pick the same target: it runs there once
                targets = tuple(dict.fromkeys(targets))
            for name in targets:
                state = self.targets.get(name)
                if state is None:
                    self._unknown(name)
                    continue
                if self.closed:
                    state.dropped += 1
                    continue
                queues = state.queues
                queue = queues[obs.session % len(queues)]
                if queue.full():  # checked first: raising QueueFull costs three times as much
                    state.dropped += 1
                else:
                    queue.put_nowait(obs)
            self.changes += 1
        except Exception:  # noqa: BLE001 - the client's statement is done; the mirror is best effort
            log.debug("mirror offer failed", exc_info=True)

    def admit(self, name: str, session: int) -> bool:
        """Whether a statement of this session would find room in the target's queue now; if not, it
        counts as dropped. For the relay to ask before it starts observing a statement: when the
        shadow is behind, the statements it would drop then cost no digesting or Observed record.
        (One admitted may still be dropped by `offer` if the queue fills in between, and counted.)"""
        state = self.targets.get(name)
        if state is None:
            return True  # an unknown target: offer counts it (and logs it once)
        queues = state.queues
        if self.closed or queues[session % len(queues)].full():
            state.dropped += 1
            self.changes += 1
            return False
        return True

    def _unknown(self, name: str) -> None:
        if name not in self.unknown:
            log.warning("mirror: a rule names a target no [mirror.NAME] table defines", extra={"target": name})
        self.unknown[name] = self.unknown.get(name, 0) + 1

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self, run_dir: str = "", worker_id: int = 0) -> None:
        """Start the shadow workers (and, given a run_dir, the snapshots other workers merge)."""
        self.worker_id = str(worker_id)
        for state in self.targets.values():
            state.tasks = [asyncio.ensure_future(self._work(state, queue, runner))
                           for queue, runner in zip(state.queues, state.runners, strict=True)]
        if run_dir:
            self.run_dir = Path(run_dir)
            self._publisher = asyncio.ensure_future(self._publish())

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every queued statement has been run and compared (tests, graceful stops).
        False if `timeout` seconds went by first."""
        try:
            await asyncio.wait_for(asyncio.gather(*(q.join() for s in self.targets.values() for q in s.queues)),
                                   timeout)
            return True
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Stop: what is still queued is dropped; the last snapshot is written."""
        self.closed = True
        tasks = [t for s in self.targets.values() for t in s.tasks]
        if self._publisher is not None:
            tasks.append(self._publisher)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for state in self.targets.values():
            state.tasks = []
            for queue in state.queues:
                while not queue.empty():
                    queue.get_nowait()
                    queue.task_done()
                    state.dropped += 1
            for runner in state.runners:
                await runner.close()
        self.changes += 1
        with contextlib.suppress(OSError):
            self.flush()

    # -- the shadow's side ------------------------------------------------------------------------
    async def _work(self, state: _Target, queue: asyncio.Queue[Observed], runner: ShadowRunner) -> None:
        while True:
            obs = await queue.get()
            try:
                self._record(state, obs, await runner.run(obs))
            except asyncio.CancelledError:
                state.dropped += 1  # pgfront is stopping: this one never got its answer
                raise
            except Exception:  # noqa: BLE001 - one bad statement must not stop this connection's worker
                log.exception("mirror: comparing a statement failed")
            finally:
                queue.task_done()

    def _record(self, state: _Target, obs: Observed, res: ShadowResult) -> None:
        self.changes += 1
        if res.sqlstate != CONNECT_FAILED:  # sent: what reached the shadow
            state.sent += 1
        c = state.comparison(obs)
        c.last_seen = time.time()
        primary_error = obs.sqlstate if obs.sqlstate != "00000" else None
        if res.sqlstate is not None and res.sqlstate != primary_error:
            c.errors += 1
            state.errors += 1
            c.last_error = state.last_error = f"{res.sqlstate}: {res.message}"
            state.last_error_at = c.last_seen
            return
        c.compared += 1
        state.compared += 1
        c.primary.add(obs.seconds)
        c.shadow.add(res.seconds)
        if res.sqlstate == primary_error and res.rows == obs.rows and same(obs.digest, res.digest) is not False:
            return
        c.mismatches += 1
        state.mismatched += 1
        if c.example is None:
            c.example = example(obs, res)
            log.info("mirror: the shadow's result differs from the primary's",
                     extra={"target": state.target.name, "fingerprint": obs.fingerprint, "sql": c.example["sql"],
                            "primary": c.example["primary"], "shadow": c.example["shadow"]})

    # -- reports --------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {"version": 1, "worker": self.worker_id, "pid": os.getpid(), "time": time.time(),
                "targets": {name: s.counters() for name, s in self.targets.items()},
                "comparisons": [c.to_json() for s in self.targets.values() for c in s.comparisons.values()]}

    def report(self) -> MirrorReport:
        """This worker's numbers alone."""
        report = MirrorReport()
        report.add(self.snapshot())
        return report

    def snapshot_path(self) -> Path | None:
        return self.run_dir / f"mirror-{self.worker_id}.json" if self.run_dir is not None else None

    def flush(self) -> bool:
        """Write this worker's snapshot if anything changed. True if written."""
        path = self.snapshot_path()
        if path is None or self.changes == self._flushed:
            return False
        self._flushed = self.changes
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.snapshot(), separators=(",", ":")).encode())
        return True

    async def _publish(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            if any(s.queued() for s in self.targets.values()):
                self.changes += 1  # the queued gauge moves without any other change
            try:
                self.flush()
            except OSError as e:  # a full disk must not stop mirroring
                log.warning("mirror snapshot not written: %s", e)

    @staticmethod
    def merged(run_dir: str | Path, live: Mirrors | None = None) -> MirrorReport:
        """Every live worker's numbers added up; `live` (this worker's Mirrors) stands in for its own
        file. Files of workers whose process is gone are ignored and removed."""
        report = MirrorReport()
        own = live.snapshot_path() if live is not None else None
        if run_dir:
            for path in Path(run_dir).glob("mirror-*.json"):
                if path == own:
                    continue
                try:
                    snap = json.loads(path.read_bytes())
                    if not pid_alive(snap.get("pid")):
                        with contextlib.suppress(OSError):
                            path.unlink()
                        continue
                    if snap.get("version") == 1:
                        report.add(snap)
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    continue  # vanished under us, or half-written by an older version
        if live is not None:
            report.add(live.snapshot())
        return report


def merged_for(app: Any) -> MirrorReport:
    """The instance's mirror report for the admin console and /metrics (empty when no [mirror.NAME]
    target is configured)."""
    observers = getattr(app, "observers", None)
    live = getattr(observers, "mirror", None) if observers is not None else None
    if live is None:
        return MirrorReport()
    return Mirrors.merged(getattr(app, "run_dir", "") or "", live)


def example(obs: Observed, res: ShadowResult) -> dict[str, Any]:
    """What SHOW MIRROR shows of a mismatch: the statement, its parameters (text as text, binary as
    hex), and both sides' outcomes."""
    params = None
    if obs.params is not None:
        formats = obs.param_formats
        params = [_param_text(v, formats[0] if len(formats) == 1 else formats[i] if i < len(formats) else 0)
                  for i, v in enumerate(obs.params)]
    return {"sql": obs.sql[:_SQL_MAX], "params": params,
            "primary": {"rows": obs.rows, "digest": obs.digest, "sqlstate": obs.sqlstate},
            "shadow": {"rows": res.rows, "digest": res.digest, "sqlstate": res.sqlstate},
            "at": round(time.time(), 3)}


def _param_text(value: bytes | None, fmt: int) -> str | None:
    if value is None:
        return None
    if fmt == 0:
        text = value.decode("utf-8", "replace")
    else:
        text = "\\x" + value.hex()
    return text if len(text) <= _PARAM_MAX else text[:_PARAM_MAX] + "..."


    return True
