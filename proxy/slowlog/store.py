"""The slow-plan store: one JSON object per line, rotated by size to `.1`, `.2`, ...

Several worker processes may append to the same file, so every append (and any rotation) happens
under an flock on a sibling `.lock` file; the data file is opened per append, which keeps a writer
from appending into a file another process has just renamed away. Captures are rate limited, so
the open per record costs nothing that matters.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any


class PlanStore:
    def __init__(self, path: str | os.PathLike[str], max_size: int, keep: int = 5) -> None:
        self.path = Path(path)
        self.max_size = max_size
        self.keep = max(1, keep)

    def append(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(f"{self.path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                size = self.path.stat().st_size if self.path.exists() else 0
                if size and size + len(line) > self.max_size:
                    self._rotate()
                with open(self.path, "ab") as f:
                    f.write(line)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _rotate(self) -> None:
        oldest = Path(f"{self.path}.{self.keep}")
        oldest.unlink(missing_ok=True)
        for n in range(self.keep - 1, 0, -1):
            src = Path(f"{self.path}.{n}")
            if src.exists():
                src.rename(f"{self.path}.{n + 1}")
        self.path.rename(f"{self.path}.1")


def rotated_paths(path: str | os.PathLike[str]) -> list[Path]:
    """The live file and its rotated siblings that exist, oldest first."""
    base = Path(path)
    numbered = []
    if base.parent.exists():
        pattern = re.compile(re.escape(base.name) + r"\.(\d+)")
        for p in base.parent.iterdir():
            m = pattern.fullmatch(p.name)
            if m:
                numbered.append((int(m.group(1)), p))
    out = [p for _, p in sorted(numbered, reverse=True)]
    if base.exists():
        out.append(base)
    return out


def read_records(
    paths: Iterable[str | os.PathLike[str]], on_bytes: Callable[[int], None] | None = None
) -> Iterator[dict[str, Any]]:
    """Records from the given files in order; unreadable lines (a torn last line) are skipped.

    `on_bytes(n)` is called with the size of every line read, for a progress bar.
    """
    for path in paths:
        with open(path, "rb") as f:
            for line in f:
                if on_bytes:
                    on_bytes(len(line))
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if isinstance(rec, dict):
                    yield rec
