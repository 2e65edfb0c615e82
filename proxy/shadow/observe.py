"""What the relay hands on about a finished statement it was asked to observe (a mirror rule picked it,
or the capture samples it): the statement exactly as sent, its parameters as bound, and its result.

The relay makes one `Observed` per observed statement, after its reply has gone to the client, and
offers it to each sink (`ObservedSinks`): a sink never blocks the relay; a full one drops and counts.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy.shadow.digest import RowDigest
from proxy.wire.protocol import parse_bind


@dataclass(slots=True)
class Observed:
    session: int  # the client connection's id (statements of one session share it, in order)
    database: str
    user: str
    application_name: str
    fingerprint: str
    normalized: str
    kind: str
    write: bool  # changes data or schema
    sql: str  # the text sent to the server
    # extended protocol: the Bind's values (None for NULL) and formats, the Parse's type OIDs;
    # params is None for a simple Query
    params: list[bytes | None] | None = None
    param_formats: list[int] = field(default_factory=list)
    param_types: list[int] = field(default_factory=list)
    result_formats: list[int] = field(default_factory=list)
    started: float = 0.0  # wall clock (time.time()) when the statement arrived
    seconds: float = 0.0  # until its reply was complete, as the client saw it
    rows: int = 0
    sqlstate: str | None = None
    digest: str | None = None  # RowDigest.value() of its rows, when they were hashed
    in_transaction: bool = False  # ran inside an explicit transaction block
    targets: tuple[str, ...] = ()  # the mirror targets its rules chose
    capture: bool = False  # the capture sampled it
    bind: bytes | None = None  # the Bind's body, until unpack() reads the parameters from it

    def unpack(self) -> bool:
        """Fill params and formats from the Bind. The relay hands the Bind on as it came, so the parsing
        is done by the mirror worker or the capture, not on the relay's path; False when it cannot be read."""
        if self.bind is None:
            return True
        try:
            _, _, self.param_formats, self.params, self.result_formats = parse_bind(self.bind)
        except (ValueError, IndexError, struct.error):
            return False
        self.bind = None
        return True


class Watch:
    """A statement being observed, from its arrival to its reply's end: where its rows are digested."""

    __slots__ = ("targets", "capture", "digest", "started", "sql", "in_transaction")

    def __init__(self, targets: tuple[str, ...], capture: bool, sql: str, in_transaction: bool) -> None:
        self.targets = targets
        self.capture = capture
        self.digest = RowDigest()
        self.started = time.time()
        self.sql = sql  # the text sent to the server (after rewrites)
        self.in_transaction = in_transaction

    def row(self, body: bytes, piece: bool) -> None:
        """A DataRow's body, or (piece) a part of a row too large to be held whole."""
        if piece:
            self.digest.spoil()
        else:
            self.digest.add(body)


class Sink(Protocol):
    def offer(self, obs: Observed) -> None: ...


class ObservedSinks:
    """The worker's mirror and capture sinks. The relay picks the statements to observe (its `_watch`,
    which makes their `Watch`) and calls `offer` once per observed statement."""

    def __init__(self, mirror: Any = None, capture: Any = None) -> None:
        self.mirror = mirror  # shadow.mirror.Mirrors
        self.capture = capture  # shadow.capture.CaptureWriter

    def offer(self, obs: Observed) -> None:
        if obs.targets and self.mirror is not None:
            self.mirror.offer(obs)
        if obs.capture and self.capture is not None:
            self.capture.offer(obs)
