"""The records the conversation keeps, sans I/O: the phase of a client connection, the statements a
client prepared, and the replies it awaits, in order.

Message type bytes are ints here, as the framer hands them out.
"""

from __future__ import annotations

from enum import IntEnum
from typing import TYPE_CHECKING

from proxy.wire import protocol as pq

if TYPE_CHECKING:
    from proxy.rules import Decision
    from proxy.sql import StatementInfo


class Phase(IntEnum):
    """Where a client connection is: the startup packet, TLS, pgfront's own authentication, connecting
    to the upstream, the upstream's authentication, relaying, the admin console, gone."""

    STARTUP = 0
    TLS = 1
    LOCAL_AUTH = 2
    CONNECTING = 3
    AUTH = 4
    READY = 5
    ADMIN = 6
    CLOSED = 7


STARTUP, TLS, LOCAL_AUTH, CONNECTING, AUTH, READY, ADMIN, CLOSED = Phase
HANDSHAKE = (STARTUP, TLS, LOCAL_AUTH, CONNECTING, AUTH)

# message type bytes as ints (frames carry ints)
_Q, _P, _B, _D, _E, _C, _S, _H, _F, _X = b"QPBDECSHFX"
_d, _c, _f = b"dcf"
_Z, _T, _n, _t, _I, _s, _G, _W, _N, _A, _K, _R, _V = b"ZTntIsGWNAKRV"
_CMD_C = b"C"[0]
_ERR = b"E"[0]
_FATAL = ("FATAL", "PANIC")  # severities after which the server closes the connection
_PARSE_OK, _BIND_OK, _CLOSE_OK = b"123"
_LOCAL = 0  # Pending kind for replies pgfront produces itself

# A statement the server must reject at Parse time: used to make a blocked statement fail *on the
# server*, so that transaction and pipeline state (failed block, skip-to-Sync, implicit rollback)
# are exactly Postgres's own; the server's syntax error is then replaced by the rule's error.
_BLOCKED_SQL = "pgfront blocked statement"
_SUSPEND = b"suspend for a cache look-up"  # compared by identity
# An Execute of a portal no server has: makes a refused Execute fail *on the server* (as _BLOCKED_SQL
# does for a Parse or Query), so the batch is skipped to its Sync exactly as Postgres would.
_REFUSED_EXECUTE = pq.msg(b"E", b"pgfront refused portal\0" + b"\0\0\0\0")

# A rule's timeout runs the statement under that statement_timeout, then puts the client's own back.
# Both are swallowed Query messages placed at a Sync boundary, so they never split an implicit
# transaction; set_config() calls made inside a transaction that fails are undone by its rollback.
_SAVE_AND_SET_TIMEOUT = ("SELECT set_config('pgfront.saved_statement_timeout', current_setting('statement_timeout'), "
                         "false), set_config('statement_timeout', '{ms}', false)")
_RESTORE_TIMEOUT = pq.query("SELECT set_config('statement_timeout', "
                            "current_setting('pgfront.saved_statement_timeout'), false)")


class Stmt:
    """A prepared statement (named or unnamed) as the client knows it."""

    __slots__ = ("name", "sql", "info", "notices", "sent_sql", "decision", "oids", "server_name", "tags")

    def __init__(self, name: str, sql: str, info: StatementInfo | None, sent_sql: str,
                 notices: tuple[bytes, ...] = ()) -> None:
        self.name = name
        self.sql = sql
        self.info = info
        self.sent_sql = sent_sql
        self.notices = notices
        self.decision: Decision | None = None
        self.oids: list[int] = []
        self.server_name = name
        self.tags: dict[str, str] | None = None  # sqlcommenter tags of its text


class Pending:
    """One expected reply (or a reply of our own, kind _LOCAL) in client order."""

    __slots__ = ("kind", "forward", "info", "t0", "rows", "sqlstate", "error", "local", "notices",
                 "copy_ends", "stmt", "bind", "prep", "show_errors", "fill", "ttl", "part", "whole", "text",
                 "permit", "tags", "decision", "queued", "observe")

    def __init__(self, kind: int, info: StatementInfo | None = None, t0: float = 0.0) -> None:
        self.kind = kind
        self.forward = True
        self.info = info
        self.t0 = t0
        self.rows = 0
        self.sqlstate: str | None = None
        self.error: bytes | None = None  # our ErrorResponse replacing the server's
        self.local: bytes | None = None
        self.notices: tuple[bytes, ...] = ()
        self.copy_ends = 0
        self.stmt: Stmt | None = None
        self.bind: tuple | None = None  # (stmt, start, end, data) of the Bind that made the portal
        self.prep: str | None = None  # server-side statement name this Parse creates (transaction pooling)
        self.show_errors = False  # a swallowed entry whose errors the client must still see
        self.fill = None  # cache.Fill: this reply is being captured for the cache
        self.ttl: float | None = None
        self.part = 0  # statements of a multi-statement Query completed so far
        self.whole = False  # a local reply to a simple Query: ReadyForQuery follows it
        self.text: str | None = None  # a Query whose shape is looked up only for its statistics
        self.permit = None  # throttle.Grant: the rule limits' slots this statement holds until it ends
        self.tags: dict[str, str] | None = None  # the statement's sqlcommenter tags
        self.decision: Decision | None = None  # the rules' decision on it (for its trace span)
        self.queued = 0.0  # seconds it waited for its rule limits
        self.observe = None  # shadow.observe.Watch: mirrored or captured (its rows are digested)


def special(p: Pending) -> bool:
    """Replies that are not relayed verbatim: they keep the relay in its per-message mode."""
    return (p.kind == _LOCAL or p.error is not None or bool(p.notices) or not p.forward or p.ttl is not None
            or p.observe is not None)


# replies that need no per-message state share one entry each (saves an allocation per message)
_PLAIN_P = Pending(_P)
_PLAIN_B = Pending(_B)
_PLAIN_D = Pending(_D)
_PLAIN_C = Pending(_C)
_PLAIN_S = Pending(_S)
_Z_KINDS = (_S, _Q, _F)
_STATEMENT_KINDS = (_Q, _E, _F)  # entries whose statement may write
_SKIP_KINDS = (_P, _B, _D, _E, _C)
