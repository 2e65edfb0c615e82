"""The link between a pgfront worker and its shadow runner process (`mirror_process`): a socket pair
carrying frames, each a 4-byte length, a 1-byte kind and a payload.

Worker to runner: INIT (JSON: targets, worker id, run_dir), PRIOR (the last snapshot of a runner that
died, to carry its counts on), BATCH (marshal: an observed statement, `pack`; a batch is many in one write), COUNTS (marshal: the
worker's own drops per target, for the runner's snapshot file), SYNC (drain, then report), QUIT.
Runner to worker: HELLO (ready), DONE (marshal: statements finished per target and connection, which
frees their room), REPORT (JSON: the runner's snapshot), LOG (marshal: a log record for the worker's log).

Statements go as marshal'd tuples: marshal is the cheapest serializer for str/bytes/int/list/None and
safe here (both ends are the same pgfront).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import Any

from proxy.shadow.observe import Observed

_HEADER = struct.Struct("!IB")
# worker -> runner
INIT, PRIOR, BATCH, COUNTS, SYNC, QUIT = b"IPBCSQ"
# runner -> worker
HELLO, DONE, REPORT, LOG = b"HDRL"

Route = tuple[int, int]  # (target index, connection index)


def pack(obs: Observed, routes: list[Route]) -> tuple[Any, ...]:
    """An observed statement and where it goes, as plain values marshal takes. The Bind stays raw:
    the runner process parses it (`Observed.unpack`), not the worker."""
    bind = obs.bind
    return (routes, obs.session, obs.database, obs.user, obs.application_name, obs.fingerprint, obs.normalized,
            obs.kind, obs.write, obs.sql, obs.params, obs.param_formats, obs.param_types, obs.result_formats,
            obs.started, obs.seconds, obs.rows, obs.sqlstate, obs.digest, obs.in_transaction,
            bytes(bind) if bind is not None and not isinstance(bind, bytes) else bind)


def unpack(rec: tuple[Any, ...]) -> tuple[list[Route], Observed]:
    (routes, session, database, user, app, fingerprint, normalized, kind, write, sql, params, param_formats,
     param_types, result_formats, started, seconds, rows, sqlstate, digest, in_transaction, bind) = rec
    obs = Observed(session, database, user, app, fingerprint, normalized, kind, write, sql, params,
                   list(param_formats), list(param_types), list(result_formats), started, seconds, rows, sqlstate,
                   digest, in_transaction, bind=bind)
    return routes, obs


class Link(asyncio.Protocol):
    """One end of the socket pair: frames out with `send` (never blocks: the transport buffers), frames
    in through `on_frame`; `on_lost` once the other end is gone."""

    def __init__(self, on_frame: Callable[[int, bytes], None], on_lost: Callable[[], None]) -> None:
        self.on_frame = on_frame
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.paused = False  # the other end is behind: the transport holds more than its high-water mark
        self._buf = bytearray()
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport (uvloop's is no subclass)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        at, end = 0, len(buf)
        while end - at >= 5:
            size, kind = _HEADER.unpack_from(buf, at)
            if end - at - 5 < size:
                break
            payload = bytes(buf[at + 5:at + 5 + size])
            at += 5 + size
            self.on_frame(kind, payload)
        del buf[:at]

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.lost.done():
            self.lost.set_result(None)
        self.on_lost()

    @property
    def up(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def backlog(self) -> int:
        """Bytes written but not yet taken by the socket (the other end is behind)."""
        return self.transport.get_write_buffer_size() if self.transport is not None else 0

    def send(self, kind: int, payload: bytes = b"") -> bool:
        if not self.up:
            return False
        assert self.transport is not None
        self.transport.write(_HEADER.pack(len(payload), kind) + payload)
        return True

    def send_all(self, kind: int, payloads: list[bytes]) -> bool:
        """Frames of one kind in one write."""
        if not self.up or not payloads:
            return False
        assert self.transport is not None
        header = _HEADER.pack
        self.transport.write(b"".join([x for p in payloads for x in (header(len(p), kind), p)]))
        return True

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
