"""One server connection's own state, sans I/O.

A pooled server connection outlives the clients it serves, so what it carries must be known from the
connection itself, never from whichever client last held it: its transaction status, the statements
prepared on it, the settings pgfront applied to it for a client, and whether a client left session
state behind (SET, LISTEN, temp tables, advisory locks...). Whoever reads the connection's messages
(the client conversation while one holds it, the link's own loop otherwise) reports them here.

The registry of prepared statements never claims a statement the server does not have: a name is
added when its Parse is sent (so a batch that prepares it twice sends one Parse) and taken out again
when that Parse fails or is skipped after an earlier error, on DEALLOCATE and DISCARD ALL, and when
the server refuses the statement's cached plan. After a `DEALLOCATE name` it cannot tell which
statements are left, so until the next reset every new prepare closes the name first (closing a
statement that does not exist is no error).
"""

from __future__ import annotations

IDLE = b"I"


class ServerState:
    __slots__ = ("tx", "prepared", "uncertain", "applied", "reapply", "dirty", "in_copy", "fatal", "broken")

    def __init__(self) -> None:
        self.tx = IDLE  # the status in the connection's own last ReadyForQuery
        self.prepared: set[str] = set()  # server-side statement names prepared (or being prepared) on it
        self.uncertain = False  # a DEALLOCATE of some name: a prepare must Close its name first
        self.applied: dict[str, str] = {}  # settings pgfront set on it for its current client
        self.reapply = False  # a RESET or DISCARD ALL undid them: set the client's again before it goes on
        self.dirty: set[str] = set()  # session state a client left on it (reasons, for the log)
        self.in_copy = False
        self.fatal = False  # the server sent a FATAL: it is closing
        self.broken = False  # a reset failed: it cannot be trusted with a client

    def ready(self, status: bytes) -> None:
        """ReadyForQuery: the server finished a Sync or Query."""
        self.tx = status
        self.in_copy = False

    def command_tag(self, tag: bytes) -> None:
        """A CommandComplete, whoever sent the statement: DEALLOCATE and DISCARD ALL drop statements."""
        if tag.startswith(b"DEALLOCATE"):
            self.prepared.clear()
            if not tag.startswith(b"DEALLOCATE ALL"):
                self.uncertain = True  # some statement is gone, we cannot tell which: forget them all
        elif tag.startswith(b"DISCARD ALL") or tag.startswith(b"RESET"):
            # the settings are back at the connection's defaults: pgfront's own for the client are gone
            if tag.startswith(b"DISCARD ALL"):
                self.prepared.clear()
            self.applied.clear()
            self.reapply = True

    def statements_dropped(self) -> None:
        """A statement that may drop prepared statements was sent: whatever runs after it must not rely
        on the registry, and until the next reset every prepare closes its name first."""
        self.prepared.clear()
        self.uncertain = True

    def reset_done(self, full: bool, discarded: bool) -> None:
        """pgfront's own reset ran, with no client on the connection. Only what its queries' tags
        showed is undone (`command_tag` saw them): a bare ROLLBACK leaves the settings and statements
        of earlier transactions in place. `full`: the configured reset query ran, so the session state
        a client left is gone; `discarded`: it was DISCARD ALL, so the registry is exact again."""
        if full:
            self.dirty.clear()
        if discarded:
            self.prepared.clear()
            self.uncertain = False

    def unclean(self) -> str:
        """Why this connection may not be lent to another client as it is ("" when it may)."""
        if self.fatal or self.broken:
            return "broken"
        if self.tx != IDLE:
            return "in a transaction" if self.tx == b"T" else "in a failed transaction"
        if self.in_copy:
            return "in COPY"
        if self.dirty:
            return "session state left: " + ", ".join(sorted(self.dirty))
        return ""
