"""Splitting byte streams into protocol messages, sans I/O.

`Framer` handles the typed messages of the normal phase in either direction. Messages whose type is
in `stream_types` (DataRow, CopyData) are never buffered whole: when one is larger than what has
arrived, its bytes are handed on piece by piece, so a 500 MB row costs no 500 MB buffer. Every
other message is buffered until complete, up to `max_size` (FrameError beyond it).

`read_startup` handles the untyped first messages (StartupMessage, SSLRequest, CancelRequest...).
"""

from __future__ import annotations

import struct

_LEN = struct.Struct("!I")

# (type byte, body or None for a streamed piece, raw bytes of the message or piece)
Frame = tuple[int, memoryview | None, memoryview]

MAX_STARTUP = 10_000  # Postgres refuses larger startup packets too


class FrameError(Exception):
    """The peer sent something that is not a valid message stream."""

    def __init__(self, message: str, code: str = "08P01") -> None:
        super().__init__(message)
        self.code = code


class Framer:
    __slots__ = ("_buf", "_skip", "_skip_type", "max_size", "stream_types")

    def __init__(self, max_size: int = 1 << 30, stream_types: bytes = b"Dd") -> None:
        self._buf = b""
        self._skip = 0
        self._skip_type = 0
        self.max_size = max_size
        self.stream_types = frozenset(stream_types)

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def mid_message(self) -> bool:
        """True while a message has started but not ended (used to cut streams cleanly)."""
        return bool(self._buf) or self._skip > 0

    def feed(self, data: bytes) -> list[Frame]:
        out: list[Frame] = []
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                return [(self._skip_type, None, memoryview(data))]
            out.append((self._skip_type, None, memoryview(data)[: self._skip]))
            data = data[self._skip:]
            self._skip = 0
        if self._buf:
            data = self._buf + data
            self._buf = b""
        n = len(data)
        pos = 0
        mv = memoryview(data)
        unpack = _LEN.unpack_from
        max_size = self.max_size
        while n - pos >= 5:
            t = data[pos]
            (ln,) = unpack(data, pos + 1)
            if ln < 4:
                raise FrameError(f"invalid message length {ln}")
            if ln > max_size:
                raise FrameError(f"message of {ln} bytes exceeds the limit of {max_size} bytes", "54000")
            end = pos + 1 + ln
            if end <= n:
                out.append((t, mv[pos + 5:end], mv[pos:end]))
                pos = end
            elif t in self.stream_types:
                out.append((t, None, mv[pos:]))
                self._skip = end - n
                self._skip_type = t
                pos = n
                break
            else:
                break
        if pos < n:
            self._buf = bytes(mv[pos:])
        return out


def read_startup(buf: bytes) -> tuple[bytes | None, bytes]:
    """Take one untyped startup-phase message off `buf`: (body or None if incomplete, rest)."""
    if len(buf) < 4:
        return None, buf
    (ln,) = _LEN.unpack_from(buf, 0)
    if ln < 8 or ln > MAX_STARTUP:
        raise FrameError(f"invalid startup packet length {ln}")
    if len(buf) < ln:
        return None, buf
    return buf[4:ln], buf[ln:]
