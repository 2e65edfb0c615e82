"""What the numbers were measured on: cores, CPU model, memory, software versions, date."""

from __future__ import annotations

import datetime
import os
import platform
import shutil
import subprocess
from pathlib import Path


def _first_line(args: list[str]) -> str:
    exe = shutil.which(args[0]) or (args[0] if Path(args[0]).exists() else None)
    if not exe:
        return "not installed"
    try:
        res = subprocess.run([exe, *args[1:]], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    out = (res.stdout or res.stderr).strip().splitlines()
    return out[0] if out else "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return 0.0


def info(pg_bin: Path | None = None) -> dict[str, object]:
    postgres = str(pg_bin / "postgres") if pg_bin else "postgres"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cores": os.cpu_count() or 0,
        "cpu": _cpu_model(),
        "memory_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postgres": _first_line([postgres, "--version"]),
        "pgbench": _first_line(["pgbench", "--version"]),
        "pgbouncer": _first_line(["/usr/sbin/pgbouncer", "--version"]),
        "pgpool": _first_line(["/usr/sbin/pgpool", "--version"]),
    }
