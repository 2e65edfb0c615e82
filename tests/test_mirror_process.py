"""The mirror's shadow runner process (proxy.shadow.mirror_process), one per worker: restarted when it
dies, gone when its worker goes, and a runner that falls behind costs the worker drops, never waits.
Against the real test PostgreSQL (the databases of test_mirror) and real pgfront processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.devdb import _alive, child_pids, free_port
from proxy.shadow import mirror as mirror_mod
from proxy.shadow.mirror import Mirrors, MirrorTarget
from proxy.shadow.runner import ShadowRunner
from tests.conftest import psql
from tests.test_faults import wait_for
from tests.test_mirror import PRIMARY, counters, dbs, on_primary  # noqa: F401 - dbs is a fixture

LOOKUP = "SELECT id, name FROM items WHERE id = $1"


def children(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is pid."""
    return [c for c in child_pids(pid) if _alive(c)]


def gone(pid: int) -> bool:
    """Exited (a zombie nobody reaps counts as exited)."""
    return not _alive(pid)


def test_a_killed_runner_is_restarted_and_counted(dbs, caplog) -> None:  # noqa: F811
    async def main() -> tuple[Mirrors, int, int, int]:
        mirrors = Mirrors([MirrorTarget("shadow", dbs[1], queue_size=100)])
        await mirrors.start()
        primary = ShadowRunner(dbs[0])
        try:
            obs = [await on_primary(primary, LOOKUP, [str(i).encode()], session=i) for i in range(1, 41)]
            for o in obs[:20]:
                mirrors.offer(o)
            assert await mirrors.drain(20)
            assert mirrors.proc is not None
            first = mirrors.proc.pid
            os.kill(first, signal.SIGKILL)
            for o in obs[20:]:  # while it is dead or starting: kept for the new one (there is room)
                t0 = time.perf_counter()
                mirrors.offer(o)
                assert time.perf_counter() - t0 < 0.002
                await asyncio.sleep(0.01)
            assert await mirrors.drain(30)
            return mirrors, first, mirrors.proc.pid, mirrors.restarts
        finally:
            await primary.close()
            await mirrors.close()

    mirrors, first, second, restarts = asyncio.run(main())
    assert restarts == 1 and first != second and gone(second)
    assert mirrors.report().restarts == 1 and mirrors.snapshot()["runner_restarts"] == 1
    c = counters(mirrors)
    # the new runner carried on from the dead one's last report; nothing unaccounted
    assert c["sent"] + c["dropped"] == 40 and c["sent"] >= 20 and c["mismatched"] >= 1  # id 7 differs
    assert any("runner process died" in r.getMessage() for r in caplog.records)


def test_a_runner_that_falls_behind_costs_drops_not_waits(dbs) -> None:  # noqa: F811
    """A stopped (SIGSTOP) runner takes nothing: the worker's room per connection fills and the rest is
    dropped; big statements are dropped once its socket is backed up by MAX_BACKLOG bytes."""
    big = "SELECT 1 /* " + "x" * 1_000_000 + " */"

    async def main() -> tuple[dict, dict, list[float], int]:
        mirrors = Mirrors([MirrorTarget("shadow", dbs[1], queue_size=20, connections=2),
                           MirrorTarget("roomy", dbs[1], queue_size=1000, connections=1)])
        await mirrors.start()
        primary = ShadowRunner(dbs[0])
        assert mirrors.proc is not None
        try:
            o = await on_primary(primary, LOOKUP, [b"3"])
            o_big = await on_primary(primary, big, None, targets=("roomy",))
            os.kill(mirrors.proc.pid, signal.SIGSTOP)
            costs = []
            for i in range(300):
                o.session = i
                t0 = time.perf_counter()
                mirrors.offer(o)
                costs.append(time.perf_counter() - t0)
                if i % 10 == 0:
                    await asyncio.sleep(0)  # the batches are written
            for i in range(300):  # the socket backs up: from then on dropped without being copied
                mirrors.offer(o_big)
                if i % 10 == 0:
                    await asyncio.sleep(0)
            await asyncio.sleep(0.2)
            backlog = mirrors._link.backlog() if mirrors._link is not None else 0
            os.kill(mirrors.proc.pid, signal.SIGCONT)
            assert await mirrors.drain(60)
            report = mirrors.report().targets
            return report["shadow"], report["roomy"], costs, backlog
        finally:
            await primary.close()
            await mirrors.close()

    small, roomy, costs, backlog = asyncio.run(main())
    assert max(costs) < 0.002, f"offer() took {max(costs) * 1e3:.3f} ms"
    assert small["sent"] == 20 and small["dropped"] == 280  # room for 10 per connection
    assert roomy["dropped"] > 250 and roomy["sent"] + roomy["dropped"] == 300  # the socket backed up
    assert backlog <= mirror_mod.MAX_BACKLOG


# -- through a real pgfront ---------------------------------------------------------------------------
def _mirroring_pgfront(pgfront_factory, tmp_path: Path, shadow_url: str, extra: str = ""):
    rules = tmp_path / "rules.toml"
    rules.write_text('[[rule]]\nname = "mirror-items"\nmatch = { tables = ["items"] }\n'
                     'mirror = { to = "shadow", share = 1.0 }\n')
    return pgfront_factory(config=f'[rules]\nfiles = ["{rules}"]\nwatch = false\n'
                                  f'[mirror.shadow]\nurl = "{shadow_url}"\nqueue_size = 50\n{extra}')


def _restarts(metrics_port: int) -> float:
    """pgfront_mirror_runner_restarts_total, as GET /metrics serves it."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    [value] = [s.value for f in text_string_to_metric_families(body) for s in f.samples
               if s.name == "pgfront_mirror_runner_restarts_total"]
    return value


def _runner_of(pid: int) -> int:
    found: list[int] = []

    def check() -> bool:
        found[:] = children(pid)
        return len(found) == 1

    wait_for(check, what=f"one runner process under pgfront {pid}")
    return found[0]


def _compared(port: int) -> int:
    out = psql(port, "SHOW MIRROR", dbname="pgfront", extra_args=["-F", "\t", "-P", "footer=off"]).stdout
    return sum(int(line.split("\t")[3]) for line in out.splitlines() if line)


def test_killing_the_runner_does_not_touch_clients(pgfront_factory, dbs, tmp_path) -> None:  # noqa: F811
    metrics_port = free_port()
    p = _mirroring_pgfront(pgfront_factory, tmp_path, dbs[1], f"[metrics]\nlisten = '127.0.0.1:{metrics_port}'\n")
    assert p.proc is not None
    first = _runner_of(p.proc.pid)
    assert _restarts(metrics_port) == 0
    if hasattr(os, "SCHED_IDLE"):  # the runner only gets CPU time nothing else wants
        wait_for(lambda: os.sched_getscheduler(first) == os.SCHED_IDLE, what="the runner under SCHED_IDLE")
        assert os.sched_getscheduler(p.proc.pid) == os.SCHED_OTHER
    failures: list[BaseException] = []
    done = threading.Event()
    answered = 0

    def client() -> None:
        nonlocal answered
        try:
            with psycopg.connect(p.conninfo(dbname=PRIMARY), autocommit=True) as conn:
                while not done.is_set():
                    assert conn.execute("SELECT name FROM items WHERE id = %s", [answered % 50 + 1]).fetchone()
                    answered += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    thread = threading.Thread(target=client)
    thread.start()
    try:
        wait_for(lambda: answered > 50 or bool(failures), what="the client")
        os.kill(first, signal.SIGKILL)
        before = answered
        wait_for(lambda: answered > before + 200 or bool(failures), what="the client after the kill")
        second = _runner_of(p.proc.pid)
        assert second != first
        wait_for(lambda: _restarts(metrics_port) == 1, what="the restart on /metrics")
        compared = _compared(p.port)
        wait_for(lambda: _compared(p.port) > compared, what="the new runner comparing")
    finally:
        done.set()
        thread.join(10)
    assert not failures, failures
    assert "shadow runner process died" in p.log()


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_no_orphan_runner_after_the_worker_exits(pgfront_factory, dbs, tmp_path, how) -> None:  # noqa: F811
    p = _mirroring_pgfront(pgfront_factory, tmp_path, dbs[1])
    assert p.proc is not None
    runner = _runner_of(p.proc.pid)
    with psycopg.connect(p.conninfo(dbname=PRIMARY), autocommit=True) as conn:
        conn.execute("SELECT name FROM items WHERE id = 1")
    os.kill(p.proc.pid, getattr(signal, how))
    p.proc.wait(20)
    wait_for(lambda: gone(runner), timeout=10, what=f"runner {runner} to exit after its worker's {how}")


def test_the_runner_takes_sched_idle_and_leaves_a_real_time_policy() -> None:
    """A worker run under SCHED_RR (or nice) does not hand its priority down: lower_priority() takes the
    runner out of the real-time policy, to SCHED_IDLE."""
    if not hasattr(os, "SCHED_IDLE"):
        pytest.skip("no SCHED_IDLE here")
    try:
        probe = subprocess.run(["true"], preexec_fn=lambda: os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1)))
    except (PermissionError, subprocess.SubprocessError, OSError):
        pytest.skip("SCHED_RR not permitted here")
    if probe.returncode != 0:
        pytest.skip("SCHED_RR not permitted here")
    code = ("import os; from proxy.shadow.mirror_process import lower_priority; "
            "print(lower_priority(), os.sched_getscheduler(0) == os.SCHED_IDLE, os.getpriority(os.PRIO_PROCESS, 0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         preexec_fn=lambda: os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1)),
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["idle", "True", "10"]
