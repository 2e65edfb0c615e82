"""Wiring of the optional subsystems into a worker's App: statistics, metrics, rules, cache, slow log."""

from __future__ import annotations

import asyncio

from proxy.app import App
from proxy.log import log


async def attach(app: App) -> list[asyncio.Task]:
    tasks: list[asyncio.Task] = []
    return tasks


async def detach(app: App) -> None:
    pass


async def reload(app: App) -> tuple[bool, str]:
    log.info("reload requested", extra={"worker": app.worker_id})
    return True, "nothing to reload"
