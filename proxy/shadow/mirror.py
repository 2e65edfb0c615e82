"""Mirroring: statements a rule picked are run again, with their parameters, on a shadow server, and
the shadow's result is compared with the primary's.

The relay offers each observed statement once its reply has gone to the client (`Mirrors.offer`). The
running and comparing is done by a child process of the worker (`mirror_process`), not on the worker's
event loop, which the relay shares: libpq, digesting the shadow's rows and keeping the reports would
cost the relay ~0.4 ms of CPU per mirrored statement there (a thread would still hold the GIL). Here
the worker only keeps count: per target connection, the statements handed on and not yet finished (at
most the target's queue_size, shared out over its `connections`). A statement that finds no room, or
finds the runner's socket backed up (MAX_BACKLOG bytes at most), is dropped and counted, so a shadow (or a
runner) that is slow, failing or down costs clients nothing; `admit` asks before the relay observes a
statement at all. Admitted statements go to the runner in batches (a marshal'd frame each, one write
per event loop iteration) over a socket pair (`mirror_link`), each routed to the connection of its
session, so a session's statements reach the shadow in their order (mirrored writes depend on it) while
other sessions' run alongside.

The runner compares: the same outcome (SQLSTATE), the same row count, and the same digest of the rows
(an order-insensitive hash of the DataRows, see `digest`). Each (target, fingerprint) keeps its counts,
one example of a mismatch and the latency histograms of both sides (`mirror_report`). A statement the
shadow fails where the primary did not (an error, a timeout, the shadow unreachable) is counted as an
error of the shadow, not as a mismatch: a shadow that is down must not read as one returning wrong rows.

The runner dies with its worker (it exits on the link's EOF), and a runner that dies is started again
(logged, counted in `restarts`, which the snapshots carry as `runner_restarts`: /metrics shows it as
pgfront_mirror_runner_restarts_total): the statements it held are counted as dropped, and the new one
carries on from its predecessor's last report. Across workers: the runner writes its worker's JSON snapshot
`run_dir/mirror-<worker>.json` every second (like `stats.StatsPublisher`); `Mirrors.merged` adds every
live worker's snapshot up (this worker's live state in place of its file), so the admin console and
/metrics of any worker show the whole instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import marshal
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from proxy.shadow.mirror_link import (
    BATCH,
    COUNTS,
    DONE,
    HELLO,
    INIT,
    LOG,
    PRIOR,
    QUIT,
    REPORT,
    SYNC,
    Link,
    Route,
    pack,
)
from proxy.shadow.mirror_report import COUNTERS, Comparison, Latency, MirrorReport
from proxy.shadow.mirror_target import MirrorTarget, safe_url
from proxy.shadow.observe import Observed
from proxy.stats import pid_alive, write_atomic

__all__ = ["COUNTERS", "Comparison", "Latency", "MirrorReport", "MirrorTarget", "Mirrors", "merged_for"]

log = logging.getLogger(__name__)

MAX_BACKLOG = 8 * 1024 * 1024  # bytes written to the runner and not yet taken: more are dropped
SNAPSHOT_INTERVAL = 1.0  # seconds between the worker's drop counts sent to the runner
START_TIMEOUT = 15.0  # seconds for a runner process to start
CLOSE_TIMEOUT = 5.0  # seconds for the runner to stop and report at shutdown
RESTART_MIN, RESTART_MAX = 0.1, 10.0  # seconds before starting a dead runner again (doubling while it keeps dying)
_SYNC = struct.Struct("!Q")
_ROOT = str(Path(__file__).resolve().parent.parent.parent)  # where `proxy` is, for the runner's imports


class _Room:
    """One target in the worker: how many statements each of its connections has outstanding."""

    __slots__ = ("target", "index", "cap", "inflight", "dropped")

    def __init__(self, target: MirrorTarget, index: int) -> None:
        self.target = target
        self.index = index
        n = max(1, target.connections)
        self.cap = max(1, -(-target.queue_size // n))  # queue_size is the target's, shared out over its connections
        self.inflight = [0] * n
        self.dropped = 0  # by this worker: no room, the runner's socket backed up, or stopping

    def zero(self) -> dict[str, Any]:
        """Its counters before the runner's first report."""
        return {"url": safe_url(self.target.url), **dict.fromkeys(COUNTERS, 0), "connected": 0, "last_error": "",
                "last_error_at": 0.0}


class Mirrors:
    """The worker's mirror targets: `offer` from the relay, the statements run by a child process."""

    def __init__(self, targets: Iterable[MirrorTarget]) -> None:
        self.targets = {t.name: _Room(t, i) for i, t in enumerate(targets)}
        self._rooms = list(self.targets.values())
        self.unknown: dict[str, int] = {}  # statements offered for a target no [mirror.NAME] defines
        self.closed = False
        self.run_dir: Path | None = None
        self.worker_id = "0"
        self.changes = 0  # bumped on every update: `flush` skips an unchanged snapshot
        self._flushed = -1
        self.restarts = 0  # runner processes that died and were started again
        self.proc: subprocess.Popen[bytes] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._link: Link | None = None
        self._hello: asyncio.Future[None] | None = None
        self._batch: list[tuple[list[Route], bytes]] = []  # admitted, not yet written to the runner
        self._batch_soon: asyncio.Handle | None = None
        self._report = b""  # the runner's last REPORT (JSON)
        self._parsed: dict[str, Any] | None = None
        self._syncs = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._counted: list[int] = []  # drops last sent to the runner
        self._tasks: list[asyncio.Task[None]] = []

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
        """Hand a statement on for each of its targets; no room drops it (and counts the drop)."""
        try:
            targets = obs.targets
            if len(targets) > 1:  # two rules may pick the same target: it runs there once
                targets = tuple(dict.fromkeys(targets))
            routes = []
            for name in targets:
                room = self.targets.get(name)
                if room is None:
                    self._unknown(name)
                    continue
                inflight = room.inflight
                conn = obs.session % len(inflight)
                if self.closed or inflight[conn] >= room.cap or self._backed_up():
                    room.dropped += 1
                else:
                    routes.append((room.index, conn))
            if routes:
                self._batch.append((routes, marshal.dumps(pack(obs, routes))))
                for ti, ci in routes:
                    self._rooms[ti].inflight[ci] += 1
                if self._batch_soon is None and self._loop is not None:
                    self._batch_soon = self._loop.call_soon(self._send_batch)
            self.changes += 1
        except Exception:  # noqa: BLE001 - the client's statement is done; the mirror is best effort
            log.debug("mirror offer failed", exc_info=True)

    def admit(self, name: str, session: int) -> bool:
        """Whether a statement of this session would find room now; if not, it counts as dropped. For
        the relay to ask before it starts observing a statement: when the shadow is behind, the
        statements it would drop then cost no digesting or Observed record. (One admitted may still be
        dropped by `offer` if the room fills in between, and counted.)"""
        room = self.targets.get(name)
        if room is None:
            return True  # an unknown target: offer counts it (and logs it once)
        inflight = room.inflight
        link = self._link
        if inflight[session % len(inflight)] >= room.cap or self.closed or (link is not None and link.paused):
            room.dropped += 1
            self.changes += 1
            return False
        return True

    def _backed_up(self) -> bool:
        """The runner is not taking what is written to it (stuck, or swamped by big statements)."""
        link = self._link
        return link is not None and link.paused

    def _unknown(self, name: str) -> None:
        if name not in self.unknown:
            log.warning("mirror: a rule names a target no [mirror.NAME] table defines", extra={"target": name})
        self.unknown[name] = self.unknown.get(name, 0) + 1

    def _send_batch(self) -> None:
        """Write what was admitted since the last time, in one write; kept for later while the runner
        is (re)starting. A statement that would back the runner's socket up past MAX_BACKLOG bytes is
        dropped (the runner is behind or stuck)."""
        self._batch_soon = None
        link = self._link
        if not self._batch or link is None or not link.up or self._hello is None or not self._hello.done():
            return
        batch, self._batch = self._batch, []
        room = MAX_BACKLOG - link.backlog()
        frames, dropped = [], []
        for routes, payload in batch:
            if len(payload) < room:
                room -= len(payload)
                frames.append(payload)
            else:
                dropped.append((routes, payload))
        link.send_all(BATCH, frames)
        self._drop(dropped)

    def _drop(self, batch: list[tuple[list[Route], bytes]]) -> None:
        for routes, _ in batch:
            for ti, ci in routes:
                room = self._rooms[ti]
                room.inflight[ci] -= 1
                room.dropped += 1
        self.changes += 1

    # -- the runner's frames --------------------------------------------------------------------------
    def _frame(self, kind: int, payload: bytes) -> None:
        if kind == DONE:
            for ti, ci, n in marshal.loads(payload):
                inflight = self._rooms[ti].inflight
                inflight[ci] = max(0, inflight[ci] - n)
            self.changes += 1
        elif kind == REPORT:
            sync = _SYNC.unpack_from(payload)[0]
            self._report, self._parsed = payload[_SYNC.size:], None  # parsed when asked for (`snapshot`)
            self.changes += 1
            for n in [n for n in self._waiting if n <= sync]:
                fut = self._waiting.pop(n)
                if not fut.done():
                    fut.set_result(None)
        elif kind == LOG:
            name, level, message, extra = marshal.loads(payload)
            logging.getLogger(name).log(level, message, extra=extra)
        elif kind == HELLO and self._hello is not None and not self._hello.done():
            self._hello.set_result(None)

    def _lost(self) -> None:
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the mirror's runner process is gone"))
        self._waiting.clear()

    def _request(self, kind: int) -> asyncio.Future[None]:
        """SYNC or QUIT: a future resolved by the runner's report that answers it."""
        assert self._loop is not None and self._link is not None
        n = next(self._syncs)
        fut = self._waiting[n] = self._loop.create_future()
        if not self._link.send(kind, _SYNC.pack(n)):  # gone already: no report will answer it
            del self._waiting[n]
            fut.set_exception(ConnectionError("the mirror's runner process is gone"))
        return fut

    def _send_counts(self) -> None:
        counted = [room.dropped for room in self._rooms]
        if counted != self._counted and self._link is not None and self._link.send(COUNTS, marshal.dumps(counted)):
            self._counted = counted

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self, run_dir: str = "", worker_id: int = 0) -> None:
        """Start the runner process (given a run_dir, it writes the snapshots other workers merge)."""
        self._loop = asyncio.get_running_loop()
        self.worker_id = str(worker_id)
        if run_dir:
            self.run_dir = Path(run_dir)
        await self._spawn()
        self._tasks = [asyncio.ensure_future(self._supervise()), asyncio.ensure_future(self._tick())]

    async def _spawn(self) -> None:
        assert self._loop is not None
        # not started until this runner says HELLO: nothing (a batch, a SYNC) may reach it before INIT
        self._hello = self._loop.create_future()
        mine, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)}
        try:
            with theirs:
                # started from the event loop's thread, stdin closed, its end of the pair its only extra fd
                self.proc = subprocess.Popen([sys.executable, "-m", "proxy.shadow.mirror_process",
                                              str(theirs.fileno()), str(os.getpid())],
                                             pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, env=env)
            link = self._link = Link(self._frame, self._lost)
            transport, _ = await self._loop.create_unix_connection(lambda: link, sock=mine)
            transport.set_write_buffer_limits(high=MAX_BACKLOG // 2)  # paused from there on: `_backed_up`
        except OSError as e:
            mine.close()
            log.error("mirror: cannot start the shadow runner process", extra={"reason": str(e)})
            self._link = None
            return
        targets = [{"name": r.target.name, "url": r.target.url, "queue_size": r.target.queue_size,
                    "connections": r.target.connections, "timeout": r.target.timeout} for r in self._rooms]
        self._link.send(INIT, json.dumps({"targets": targets, "worker": self.worker_id, "restarts": self.restarts,
                                          "run_dir": str(self.run_dir or "")}).encode())
        if self._report:  # a runner before this one died: carry its counts on
            self._link.send(PRIOR, self._report)
        self._counted = []
        self._send_counts()
        try:
            await asyncio.wait_for(asyncio.shield(self._hello), START_TIMEOUT)
        except TimeoutError:
            log.error("mirror: the shadow runner process did not start", extra={"pid": self.proc.pid})
            self._link.close()
            return
        except ConnectionError:
            return
        self._send_batch()  # what was admitted while it started

    async def _supervise(self) -> None:
        """Start the runner again whenever it dies (not when the worker stops it)."""
        delay = RESTART_MIN
        while not self.closed:
            started = time.monotonic()
            if self._link is not None:
                await self._link.lost
            if self.closed:
                return
            code = await self._reap(2.0)
            self.restarts += 1
            lost = self._forget()
            log.warning("mirror: the shadow runner process died; starting it again",
                        extra={"exit_code": code, "restarts": self.restarts, "statements_lost": lost})
            if time.monotonic() - started > 10 * RESTART_MAX:  # it ran a good while: not dying over and over
                delay = RESTART_MIN
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX)
            if not self.closed:
                await self._spawn()

    def _forget(self) -> int:
        """The statements a dead runner held are dropped; those not yet written to it stay."""
        held = [[0] * len(r.inflight) for r in self._rooms]
        for routes, _ in self._batch:
            for ti, ci in routes:
                held[ti][ci] += 1
        lost = 0
        for room, keep in zip(self._rooms, held, strict=True):
            n = sum(room.inflight) - sum(keep)
            room.dropped += n
            room.inflight = keep
            lost += n
        self.changes += 1
        return lost

    async def _reap(self, wait: float) -> int | None:
        """The runner's exit code once it exited (killed after `wait` seconds if it has not)."""
        proc = self.proc
        if proc is None:
            return None
        deadline = time.monotonic() + wait
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            return await asyncio.to_thread(proc.wait, 5.0)
        return None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            self._send_counts()  # the worker's drops, for the runner's snapshot file

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until every statement handed on has been run and compared, and the runner reported
        (tests, graceful stops). False if `timeout` seconds went by first."""
        try:
            async with asyncio.timeout(timeout):
                while not self.closed:
                    link = self._link
                    if link is None or not link.up or self._hello is None or not self._hello.done():
                        await asyncio.sleep(0.05)  # the runner is (re)starting
                        continue
                    self._send_batch()
                    self._send_counts()
                    with contextlib.suppress(ConnectionError):
                        await self._request(SYNC)
                        if not self._batch and not any(any(r.inflight) for r in self._rooms):
                            return True
                return not any(any(r.inflight) for r in self._rooms)
        except TimeoutError:
            return False

    async def close(self) -> None:
        """Stop: what is still queued is dropped (counted); the runner reports last and exits, and the
        last snapshot is written."""
        self.closed = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._batch_soon is not None:
            self._batch_soon.cancel()
            self._batch_soon = None
        self._drop(self._batch)
        self._batch = []
        link = self._link
        if link is not None and link.up:
            self._send_counts()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(self._request(QUIT), CLOSE_TIMEOUT)
            link.close()
        if self.proc is not None:
            await self._reap(CLOSE_TIMEOUT)
        self._forget()  # anything the runner did not account for
        with contextlib.suppress(OSError):
            self.flush()

    # -- reports --------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """This worker's numbers: the runner's last report, with this worker's drops and the statements
        outstanding now."""
        if self._parsed is None:
            self._parsed = json.loads(self._report) if self._report else {"targets": {}, "comparisons": []}
        reported = self._parsed["targets"]
        targets = {}
        for name, room in self.targets.items():
            counters = dict(reported.get(name) or room.zero())
            counters["dropped"] += room.dropped
            counters["queued"] = sum(room.inflight)
            targets[name] = counters
        return {"version": 1, "worker": self.worker_id, "pid": os.getpid(), "time": time.time(),
                "runner_restarts": self.restarts, "targets": targets, "comparisons": self._parsed["comparisons"]}

    def report(self) -> MirrorReport:
        """This worker's numbers alone."""
        report = MirrorReport()
        report.add(self.snapshot())
        return report

    def snapshot_path(self) -> Path | None:
        return self.run_dir / f"mirror-{self.worker_id}.json" if self.run_dir is not None else None

    def flush(self) -> bool:
        """Write this worker's snapshot if anything changed (the runner writes it every second; this is
        for shutdown and tests). True if written."""
        path = self.snapshot_path()
        if path is None or self.changes == self._flushed:
            return False
        self._flushed = self.changes
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(self.snapshot(), separators=(",", ":")).encode())
        return True

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
