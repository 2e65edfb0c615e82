"""Hot reload: RuleHolder keeps the current RuleSet; RuleWatcher polls the rule files' mtimes.

The session reads `holder.current` once per statement, so a reload swaps the whole RuleSet
atomically and statements already running keep the decision they got. A reload that fails
validation keeps the running rules and logs every problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence

from proxy.rules.engine import DEFAULT_CACHE_SIZE, RuleSet, load_rules
from proxy.rules.model import RuleError, expand

log = logging.getLogger("pgfront.rules")

Snapshot = dict[str, tuple[int, int]]  # file -> (mtime_ns, size)


class RuleHolder:
    """The current RuleSet for one worker. Construction loads the files and raises RuleError."""

    def __init__(self, paths: Sequence[str], *, base_dir: str | os.PathLike[str] | None = None,
                 default_ttl: float = 60.0, cache_size: int = DEFAULT_CACHE_SIZE) -> None:
        self.paths = list(paths)
        self.base_dir = base_dir
        self.default_ttl = default_ttl
        self.cache_size = cache_size
        self.snapshot = self.scan()
        self.current: RuleSet = self._load(None)

    def _load(self, previous: RuleSet | None) -> RuleSet:
        return load_rules(self.paths, base_dir=self.base_dir, default_ttl=self.default_ttl,
                          cache_size=self.cache_size, previous=previous)

    def scan(self) -> Snapshot:
        files, _ = expand(self.paths, self.base_dir)
        snap: Snapshot = {}
        for f in files:
            with contextlib.suppress(OSError):
                st = os.stat(f)
                snap[f] = (st.st_mtime_ns, st.st_size)
        return snap

    def reload(self) -> tuple[bool, str]:
        """Load the files again (SIGHUP, admin RELOAD). On a problem the running rules stay."""
        self.snapshot = self.scan()
        try:
            new = self._load(self.current)
        except RuleError as e:
            message = f"rules not reloaded, keeping the {len(self.current)} running rules:\n{e}"
            log.error("%s", message)
            return False, message
        self.current = new
        message = f"loaded {len(new)} rules from {len(new.files)} files"
        log.info("%s", message)
        return True, message

    def changed(self) -> bool:
        return self.scan() != self.snapshot


class RuleWatcher:
    """Reloads holder when a rule file is added, removed or modified (polls every interval seconds)."""

    def __init__(self, holder: RuleHolder, interval: float = 1.0) -> None:
        self.holder = holder
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def reload(self) -> tuple[bool, str]:
        return self.holder.reload()

    def poll(self) -> tuple[bool, str] | None:
        """Reload if the files changed since the last load; the reload's result, or None."""
        if not self.holder.changed():
            return None
        return self.holder.reload()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="rule-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.poll()
            except Exception:  # a watcher must never die: keep the running rules and try again
                log.exception("rule watcher failed")
