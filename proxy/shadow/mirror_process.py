"""The shadow runner process: one per pgfront worker, started by it (`mirror.Mirrors`), running the
statements the worker mirrors on the shadows and comparing their results, so that none of this costs the
worker's event loop, which the relay shares (libpq calls, digesting the shadow's rows, reports: ~0.4 ms
of CPU per statement that a thread would still take from the worker under the GIL).

It gets the worker's statements in batches over a socket pair (`mirror_link`), already routed to a
target's connection (a session's statements to one connection, in order), queues them per connection
(unbounded here: the worker never sends more than a target's queue_size outstanding), and answers with
DONE per finished statement (which frees the room in the worker), REPORT (its snapshot: counts and
comparisons) every SNAPSHOT_INTERVAL and on SYNC, and LOG records. It writes the worker's snapshot
file `run_dir/mirror-<worker>.json` itself, adding the worker's own drops (COUNTS) to its counts.

It lives as long as the link: EOF from the worker (a worker that exits, or is killed, closes it) or
the worker's pid gone makes it exit at once; SIGINT and SIGTERM are ignored (a terminal's Ctrl-C or a
service manager's stop reach the worker, which then sends QUIT: drop what is queued, count it, report).
It runs at a lower priority than its worker (SCHED_IDLE on Linux, else nice +10, `lower_priority`): on
busy cores the relay's clients come first.
Run as `python -m proxy.shadow.mirror_process FD WORKER_PID`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import marshal
import os
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from proxy.log import _RESERVED
from proxy.shadow import mirror_link as wire
from proxy.shadow.digest import same
from proxy.shadow.mirror_link import Link, unpack
from proxy.shadow.mirror_report import MAX_FINGERPRINTS, OTHER, Comparison, example
from proxy.shadow.mirror_target import MirrorTarget, safe_url
from proxy.shadow.observe import Observed
from proxy.shadow.runner import CONNECT_FAILED, ShadowResult, ShadowRunner
from proxy.stats import pid_alive, write_atomic

log = logging.getLogger("proxy.shadow.mirror")  # the worker logs these records under this name

SNAPSHOT_INTERVAL = 1.0  # seconds between snapshots
_QUIT_WAIT = 5.0  # seconds to wait for the worker to take the last report
_SYNC = struct.Struct("!Q")
NICE = 10  # this process's niceness above its worker's (where there is no SCHED_IDLE)


class _Target:
    """One target's queues, shadow connections and results."""

    def __init__(self, target: MirrorTarget) -> None:
        self.target = target
        n = max(1, target.connections)
        self.queues: list[asyncio.Queue[Observed]] = [asyncio.Queue() for _ in range(n)]
        self.runners = [ShadowRunner(target.url, target.timeout) for _ in range(n)]
        self.tasks: list[asyncio.Task[None]] = []
        self.running = 0
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

    def counters(self) -> dict[str, Any]:
        return {"url": safe_url(self.target.url), "queued": sum(q.qsize() for q in self.queues) + self.running,
                "sent": self.sent, "dropped": self.dropped, "compared": self.compared,
                "mismatched": self.mismatched, "errors": self.errors,
                "connected": sum(r.connected for r in self.runners), "last_error": self.last_error,
                "last_error_at": self.last_error_at}

    def load(self, counters: dict[str, Any], comparisons: list[dict[str, Any]]) -> None:
        """Carry on the counts of the runner process before this one (it died; the worker kept them)."""
        self.sent, self.dropped = counters["sent"], counters["dropped"]
        self.compared, self.mismatched, self.errors = counters["compared"], counters["mismatched"], counters["errors"]
        self.last_error, self.last_error_at = counters["last_error"], counters["last_error_at"]
        for d in comparisons:
            if d["target"] == self.target.name:
                self.comparisons[d["fingerprint"]] = Comparison.from_json(d)


class Runner:
    """The process's state: the worker's targets, the link to the worker, the snapshots."""

    def __init__(self, link: Link, targets: list[MirrorTarget], worker: str, worker_pid: int, run_dir: str,
                 restarts: int = 0) -> None:
        self.link = link
        self.targets = [_Target(t) for t in targets]
        self.worker, self.worker_pid = worker, worker_pid
        self.restarts = restarts  # runners of this worker that died before this one (for the snapshot file)
        self.path = Path(run_dir) / f"mirror-{worker}.json" if run_dir else None
        self.worker_dropped = [0] * len(targets)  # the worker's own drops, as it last said (COUNTS)
        self.changes = 0
        self._reported = -1
        self._done: dict[tuple[int, int], int] = {}
        self._done_soon: asyncio.Handle | None = None
        self.quit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.background: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        for ti, state in enumerate(self.targets):
            state.tasks = [asyncio.ensure_future(self._work(state, ti, ci)) for ci in range(len(state.queues))]

    def on_frame(self, kind: int, payload: bytes) -> None:
        if kind == wire.BATCH:
            routes, obs = unpack(marshal.loads(payload))
            for ti, ci in routes:
                self.targets[ti].queues[ci].put_nowait(obs)
        elif kind == wire.COUNTS:
            self.worker_dropped = list(marshal.loads(payload))
            self.changes += 1
        elif kind == wire.SYNC:
            task = asyncio.ensure_future(self._sync(_SYNC.unpack(payload)[0]))
            self.background.add(task)
            task.add_done_callback(self.background.discard)
        elif kind == wire.QUIT and not self.quit.done():
            self.quit.set_result(_SYNC.unpack(payload)[0])
        elif kind == wire.PRIOR:
            snap = json.loads(payload)
            for state in self.targets:
                counters = snap["targets"].get(state.target.name)
                if counters is not None:
                    state.load(counters, snap["comparisons"])

    # -- running and comparing ------------------------------------------------------------------------
    async def _work(self, state: _Target, ti: int, ci: int) -> None:
        queue, runner = state.queues[ci], state.runners[ci]
        # connected before the first statement comes: that one would wait for it, and the room its
        # connection has in the worker fill up meanwhile
        await runner.connect()
        self.changes += 1  # "connected" changed
        while True:
            obs = await queue.get()
            state.running += 1
            try:
                self._record(state, obs, await runner.run(obs))
            except asyncio.CancelledError:
                state.dropped += 1  # pgfront is stopping: this one never got its answer
                raise
            except Exception:  # noqa: BLE001 - one bad statement must not stop this connection's worker
                log.exception("mirror: comparing a statement failed")
            finally:
                state.running -= 1
                queue.task_done()
                self._finished(ti, ci)

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

    def _finished(self, ti: int, ci: int, n: int = 1) -> None:
        """Tell the worker, soon (finishes of one loop iteration go in one frame), that room is free."""
        key = (ti, ci)
        self._done[key] = self._done.get(key, 0) + n
        if self._done_soon is None:
            self._done_soon = asyncio.get_running_loop().call_soon(self._send_done)

    def _send_done(self) -> None:
        if self._done_soon is not None:
            self._done_soon.cancel()
            self._done_soon = None
        if self._done:
            done, self._done = self._done, {}
            self.link.send(wire.DONE, marshal.dumps([(ti, ci, n) for (ti, ci), n in done.items()]))

    # -- reports --------------------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """This process's counts and comparisons (the worker adds its own drops and gauge)."""
        return {"version": 1, "targets": {s.target.name: s.counters() for s in self.targets},
                "comparisons": [c.to_json() for s in self.targets for c in s.comparisons.values()]}

    def publish(self, sync: int = 0) -> None:
        """Send the snapshot to the worker, and write the worker's snapshot file."""
        self._send_done()  # first: after a SYNC's report, the worker finds nothing outstanding
        self._reported = self.changes
        snap = self.snapshot()
        self.link.send(wire.REPORT, _SYNC.pack(sync) + json.dumps(snap, separators=(",", ":")).encode())
        if self.path is None:
            return
        for state, dropped in zip(self.targets, self.worker_dropped, strict=False):
            snap["targets"][state.target.name]["dropped"] += dropped
        snap.update(worker=self.worker, pid=self.worker_pid, time=time.time(), runner_restarts=self.restarts)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(snap, separators=(",", ":")).encode())
        except OSError as e:  # a full disk must not stop mirroring
            log.warning("mirror snapshot not written: %s", e)

    async def _sync(self, n: int) -> None:
        await asyncio.gather(*(q.join() for s in self.targets for q in s.queues))
        self.publish(n)

    async def tick(self) -> None:
        """Every SNAPSHOT_INTERVAL: a snapshot if anything changed; and exit if the worker is gone
        (should its end of the link outlive it in another process)."""
        while True:
            await asyncio.sleep(SNAPSHOT_INTERVAL)
            if os.getppid() != self.worker_pid and not pid_alive(self.worker_pid):
                os._exit(0)
            if any(s.running or any(q.qsize() for q in s.queues) for s in self.targets):
                self.changes += 1  # the queued gauge moves without any other change
            if self.changes != self._reported:
                self.publish()

    async def stop(self) -> None:
        """QUIT: what is queued or running is dropped (counted), the connections closed, a last report."""
        for state in self.targets:
            for t in state.tasks:
                t.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            for ci, queue in enumerate(state.queues):
                n = queue.qsize()
                while not queue.empty():
                    queue.get_nowait()
                    queue.task_done()
                state.dropped += n
                if n:
                    self._finished(self.targets.index(state), ci, n)
            for runner in state.runners:
                await runner.close()
        self.changes += 1


class _LinkLog(logging.Handler):
    """Hands this process's log records to the worker, which logs them as its own (its format, its
    stream, its tests' log capture)."""

    def __init__(self, link: Link) -> None:
        super().__init__(logging.INFO)
        self.link = link

    def emit(self, record: logging.LogRecord) -> None:
        try:
            extra = {k: v if isinstance(v, str | int | float | bool | type(None)) else json.dumps(v, default=str)
                     for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")}
            if record.exc_info:
                extra["exc"] = logging.Formatter().formatException(record.exc_info)
            self.link.send(wire.LOG, marshal.dumps((record.name, record.levelno, record.getMessage(), extra)))
        except Exception:  # noqa: BLE001 - logging must never take the runner down
            self.handleError(record)


async def serve(fd: int, worker_pid: int) -> None:
    loop = asyncio.get_running_loop()
    started: asyncio.Future[Runner] = loop.create_future()

    def on_frame(kind: int, payload: bytes) -> None:
        if started.done():
            started.result().on_frame(kind, payload)
        elif kind == wire.INIT:  # the worker's first frame
            init = json.loads(payload)
            runner = Runner(link, [MirrorTarget(**t) for t in init["targets"]], init["worker"], worker_pid,
                            init["run_dir"], int(init.get("restarts", 0)))
            runner.start()
            started.set_result(runner)
            link.send(wire.HELLO)

    link = Link(on_frame, lambda: None)
    await loop.create_unix_connection(lambda: link, sock=socket.socket(fileno=fd))
    logging.getLogger().handlers[:] = [_LinkLog(link)]
    logging.getLogger().setLevel(logging.INFO)
    await asyncio.wait([link.lost, started], return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        return
    runner = started.result()
    tick = asyncio.ensure_future(runner.tick())
    await asyncio.wait([link.lost, runner.quit], return_when=asyncio.FIRST_COMPLETED)
    tick.cancel()
    if link.lost.done():
        return  # the worker is gone: no one to report to
    await runner.stop()
    runner.publish(runner.quit.result())
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(link.lost), _QUIT_WAIT)  # the worker closes once it has the report


def lower_priority() -> str:
    """Run below the worker, so that on busy cores the relay's clients come first; the policy taken.

    SCHED_IDLE (Linux) where there is one: the scheduler runs this process only on CPU time no other
    process wants, and a waking worker (or PostgreSQL, or anything else) preempts it at once, where a
    niced process still runs out its time slice first (about a millisecond: the worker's reply waits).
    When the cores are saturated the runner then gets almost no CPU: its room in the worker fills and
    the statements past it are dropped and counted, never waited for. Elsewhere, nice +NICE. A worker
    run under a real-time policy does not hand it down: the runner leaves it first."""
    policy = "nice"
    with contextlib.suppress(AttributeError, OSError):
        if os.sched_getscheduler(0) not in (os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_IDLE):
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    with contextlib.suppress(OSError):
        os.nice(NICE)
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        policy = "idle"
    return policy


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    fd, worker_pid = int(args[0]), int(args[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when this process stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    lower_priority()
    try:
        import uvloop

        uvloop.run(serve(fd, worker_pid))
    except ImportError:
        asyncio.run(serve(fd, worker_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
