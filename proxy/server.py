"""Processes and lifecycle: the listening socket(s), worker processes, signals, graceful shutdown.

With `workers = N > 1` the parent forks N workers that each bind the listen port with SO_REUSEPORT
(the kernel spreads connections across them) and restarts any that die. Each worker is one uvloop
event loop running `App` + sessions. Cancel requests need no routing between workers: in session
mode a client holds its upstream backend's own cancel key, which any worker can deliver.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import tempfile
import time

from proxy.app import App
from proxy.config import Config
from proxy.log import log
from proxy.net.client import ClientConnection
from proxy.upstream import Upstream


async def _setup_components(app: App) -> list:
    """Attach statistics, rules, cache, slow log and metrics; returns background tasks to cancel."""
    from proxy import components

    return await components.attach(app)


async def worker_main(cfg: Config, upstream: Upstream, worker_id: int, run_dir: str) -> None:
    # The relay allocates many short-lived objects per query and few cycles: move what start-up built
    # out of the collector's way and let the youngest generation grow before each collection.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    app = App(cfg, upstream, worker_id)
    app.run_dir = run_dir
    loop = asyncio.get_running_loop()
    tasks = await _setup_components(app)
    host, port = cfg.server.listen
    server = await loop.create_server(lambda: ClientConnection(app), host, port, reuse_port=True, backlog=4096)
    log.info("listening", extra={"listen": f"{host}:{port}", "worker": worker_id,
                                 "upstream": f"{upstream.host}:{upstream.port}"})
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(app_reload(app)))
    await stop.wait()
    log.info("shutting down", extra={"worker": worker_id, "clients": len(app.sessions)})
    app.accepting = False
    server.close()
    await _drain(app, cfg.server.shutdown_timeout)
    for s in list(app.sessions):
        s.fatal("57P01", "terminating connection due to pgfront shutdown")
    for t in tasks:
        t.cancel()
    from proxy import components

    await components.detach(app)


async def app_reload(app: App) -> None:
    from proxy import components

    await components.reload(app)


async def _drain(app: App, timeout: float) -> None:
    """Wait for running transactions to finish; idle clients are closed straight away."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [s for s in app.sessions if s.busy]
        for s in list(app.sessions):
            if s not in busy and (s.ready or s.on_console):
                s.fatal("57P01", "terminating connection due to pgfront shutdown")
        if not busy:
            return
        await asyncio.sleep(0.05)


def _run_worker(cfg: Config, upstream: Upstream, worker_id: int, run_dir: str) -> None:
    import uvloop

    uvloop.run(worker_main(cfg, upstream, worker_id, run_dir))


def serve(cfg: Config, upstream: Upstream) -> int:
    run_dir = cfg.server.run_dir or tempfile.mkdtemp(prefix="pgfront-run-")
    os.makedirs(run_dir, exist_ok=True)
    n = cfg.server.workers
    if n == 1:
        _run_worker(cfg, upstream, 0, run_dir)
        return 0
    children: dict[int, int] = {}  # pid -> worker id
    stopping = False

    def spawn(wid: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGHUP, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            try:
                _run_worker(cfg, upstream, wid, run_dir)
            finally:
                os._exit(0)
        children[pid] = wid

    def forward(sig: int, _frame: object) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM if sig == signal.SIGINT else sig)
            except ProcessLookupError:
                pass

    for wid in range(n):
        spawn(wid)
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGHUP, forward)
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        wid = children.pop(pid, None)
        if wid is not None and not stopping:
            log.error("worker died, restarting", extra={"worker": wid, "status": status})
            time.sleep(0.2)
            spawn(wid)
    return 0


def main_serve(cfg: Config, upstream: Upstream) -> int:
    try:
        return serve(cfg, upstream)
    except OSError as e:
        print(f"pgfront: cannot listen on {cfg.server.listen[0]}:{cfg.server.listen[1]}: {e}", file=sys.stderr)
        return 1
