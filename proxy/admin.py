"""The admin console: `psql dbname=pgfront`, PgBouncer-style SHOW commands answered by pgfront."""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.wire import protocol as pq

if TYPE_CHECKING:
    from proxy.app import App
    from proxy.session import Session


def handle(app: App, session: Session, sql: str) -> bytes:
    return pq.error_response("0A000", "admin console not implemented yet") + pq.ready_for_query(pq.IDLE)
