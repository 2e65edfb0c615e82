"""CPU time and memory of a process and its descendants, read from /proc (Linux only)."""

from __future__ import annotations

import contextlib
import os
import resource
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for tid in os.listdir(task_dir):
            text = (task_dir / tid / "children").read_text()
            kids.extend(int(c) for c in text.split())
    except FileNotFoundError:  # a kernel without CONFIG_PROC_CHILDREN: every process's parent instead
        from proxy.devdb import child_pids

        return child_pids(pid) if task_dir.exists() else []
    except OSError:
        pass
    return kids


def tree(pid: int) -> list[int]:
    """pid and all its live descendants."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def cpu_seconds(pid: int, reaped_children: bool = False) -> float:
    """utime + stime of one process in seconds (0 if it is gone); with reaped_children, plus the
    CPU time of children that have exited and been waited for (cutime + cstime)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / _TICKS


def run_seconds(pid: int) -> float:
    """Time the scheduler ran the process's threads, in seconds (0 if it is gone): from
    /proc/PID/task/*/schedstat, counted in nanoseconds, where utime + stime are sampled in ticks."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    except OSError:
        return 0.0
    return total / 1e9


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of the tree, including descendants that already exited (PostgreSQL backends of
    finished connections, reaped by the postmaster, count in its cutime/cstime)."""
    return sum(cpu_seconds(p, reaped_children=True) for p in tree(pid))


def _status_kib(pid: int, field: str, source: str = "status") -> int:
    try:
        for line in Path(f"/proc/{pid}/{source}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_bytes(pid: int) -> int:
    """Resident set size summed over the tree (counts shared pages once per process)."""
    return 1024 * sum(_status_kib(p, "VmRSS") for p in tree(pid))


def tree_pss_bytes(pid: int) -> int:
    """Proportional set size summed over the tree: shared pages split between sharers, so a
    forking server such as PostgreSQL is not counted once per backend for its shared buffers."""
    return 1024 * sum(_status_kib(p, "Pss", "smaps_rollup") for p in tree(pid))


def machine_busy_seconds() -> float:
    """CPU time spent by everything on the machine (all cores) since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def own_cpu_seconds() -> float:
    """CPU time of this process and of every child it has waited for (their descendants included)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
