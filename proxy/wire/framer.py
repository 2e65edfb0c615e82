"""Splitting byte streams into protocol messages, sans I/O.

`Framer.feed(data)` returns the messages that are complete as `(type, start, end)` offsets into
`framer.data` (the bytes of this call, prefixed by any partial message kept from the previous call):
the message is `data[start:end]`, its body `data[start + 5:end]`. Offsets instead of slices keep the
per-message cost to one small tuple; callers slice only the few bodies they read.

Messages whose type is in `stream_types` (DataRow, CopyData) are never buffered whole: when one is
larger than what has arrived, its bytes are handed on piece by piece as `(-type, start, end)`, so a
500 MB row costs no 500 MB buffer. Every other message is buffered until complete, up to `max_size`
(FrameError beyond it); while one is incomplete, arriving bytes are appended to it and not rescanned, so
a large message arriving in many reads costs linear, not quadratic, copying.

`read_startup` handles the untyped first messages (StartupMessage, SSLRequest, CancelRequest...).
"""

from __future__ import annotations

import struct

_LEN = struct.Struct("!I")
_HEADER = struct.Struct("!BI")  # type byte, length

try:
    import cython

    _COMPILED = cython.compiled
except ImportError:  # Cython is a build requirement only
    _COMPILED = False

MAX_STARTUP = 10_000  # Postgres refuses larger startup packets too


class FrameError(Exception):
    """The peer sent something that is not a valid message stream."""

    def __init__(self, message: str, code: str = "08P01") -> None:
        super().__init__(message)
        self.code = code


class Framer:
    __slots__ = ("_buf", "_want", "_skip", "_skip_type", "max_size", "stream_types", "data")

    def __init__(self, max_size: int = 1 << 30, stream_types: bytes = b"Dd") -> None:
        self._buf = bytearray()
        self._want = 0  # length `_buf` must reach before it can yield a message
        self._skip = 0
        self._skip_type = 0
        self.max_size = max_size
        self.stream_types = frozenset(stream_types)
        self.data = b""

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held back for the next call."""
        return len(self._buf)

    @property
    def idle(self) -> bool:
        """No part of a message held back or being streamed: the next chunk starts a message."""
        return not self._buf and not self._skip

    def take_partial(self) -> bytes:
        """Hand back the bytes of an incomplete message (the caller will feed them again later)."""
        if self._skip:
            raise FrameError("cannot rewind in the middle of a streamed message")
        buf, self._buf = self._buf, b""
        return buf

    def single(self, data: bytes) -> list[tuple[int, int, int]] | None:
        """`feed` without the scan for a chunk that is exactly one complete message with nothing held
        back (a client's most common read, one Query); None for any other chunk, left to `feed`."""
        if self._buf or self._skip or type(data) is not bytes:
            return None
        raw = data
        n = len(raw)
        if n < 5 or n > self.max_size:
            return None
        at = raw  # as in feed
        if _COMPILED:
            ln = at[1]
            ln = (ln << 24) | (at[2] << 16) | (at[3] << 8) | at[4]
        else:
            ln = _LEN.unpack_from(raw, 1)[0]
        if ln != n - 1:
            return None
        self.data = raw
        return [(at[0], 0, n)]

    def feed(self, data: bytes) -> list[tuple[int, int, int]]:
        out: list[tuple[int, int, int]] = []
        pos = 0
        if self._skip:
            if len(data) <= self._skip:
                self._skip -= len(data)
                self.data = data
                return [(-self._skip_type, 0, len(data))]
            out.append((-self._skip_type, 0, self._skip))
            pos = self._skip
            self._skip = 0
        elif self._buf:
            buf = self._buf
            buf += data
            if len(buf) < self._want:  # still incomplete: nothing to scan yet
                self.data = b""
                return out
            data = bytes(buf)
            self._buf = bytearray()
        if type(data) is not bytes:
            data = bytes(data)
        self.data = raw = data
        # compiled (framer.pxd), `at` points into the bytes and each header is read in C
        at = raw
        n = len(raw)
        append = out.append
        # A complete message is no longer than the chunk it is in: only in a chunk larger than max_size
        # (top = -1) must each length be checked against it. Complete messages take the two tests only.
        top = n if n <= self.max_size else -1
        stop = n - 4  # a header needs 5 bytes
        while pos < stop:
            if _COMPILED:  # the header read in C
                t = at[pos]
                ln = at[pos + 1]
                ln = (ln << 24) | (at[pos + 2] << 16) | (at[pos + 3] << 8) | at[pos + 4]
            else:  # interpreted, struct reads it faster than Python arithmetic would
                t, ln = _HEADER.unpack_from(raw, pos)
            end = pos + 1 + ln
            if end > top or ln < 4:  # incomplete, invalid, or in a chunk beyond max_size
                if ln < 4:
                    raise FrameError(f"invalid message length {ln}")
                if ln > self.max_size:
                    raise FrameError(f"message of {ln} bytes exceeds the limit of {self.max_size} bytes", "54000")
                if end > n:
                    return self._partial(out, data, t, pos, end)
            append((t, pos, end))
            pos = end
        if pos < n:
            self._buf = bytearray(data[pos:])
            self._want = 5
        return out

    def _partial(self, out: list[tuple[int, int, int]], data: bytes, t: int, pos: int,
                 end: int) -> list[tuple[int, int, int]]:
        """The message at `pos` ends beyond this chunk: stream what has arrived of it, or keep it."""
        if t in self.stream_types:
            out.append((-t, pos, len(data)))
            self._skip = end - len(data)
            self._skip_type = t
        else:
            self._buf = bytearray(data[pos:])
            self._want = end - pos
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
