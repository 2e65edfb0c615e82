"""Keep a copy of a backend reply while it streams to the client, for storing in the cache.

The session feeds the raw server message bytes (type byte, length, body; one or several whole messages
per call) that make up the cacheable reply: RowDescription, DataRows and CommandComplete for a simple
Query; the Describe reply (RowDescription) and the Execute reply (DataRows, CommandComplete) for the
extended protocol. Anything else (ErrorResponse, NoticeResponse, PortalSuspended from an Execute with
max_rows, COPY, a second result) or a reply over the size limit makes the capture give up and free what
it held: the client still gets every byte, only the cache does not.
"""

from __future__ import annotations

_KEEP = frozenset(b"TDCn")  # RowDescription, DataRow, CommandComplete, NoData


class ResultCapture:
    __slots__ = ("limit", "size", "parts", "complete", "failed", "reason")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.parts: list[bytes] = []
        self.complete = False    # CommandComplete seen
        self.failed = False
        self.reason = ""

    def feed(self, data: bytes | bytearray | memoryview) -> bool:
        """Copy whole messages; returns False once the capture has given up (then stop feeding)."""
        if self.failed:
            return False
        n = len(data)
        if self.size + n > self.limit:
            return self._give_up("result too large")
        i = 0
        while i < n:
            kind = data[i]
            if kind not in _KEEP or self.complete:
                return self._give_up(f"message {chr(kind)!r} in reply")
            if kind == 0x43:  # 'C'
                self.complete = True
            i += 1 + int.from_bytes(data[i + 1:i + 5], "big")
        if i != n:
            return self._give_up("partial message fed")
        self.parts.append(bytes(data))
        self.size += n
        return True

    def result(self) -> bytes | None:
        """The captured reply, or None when it is incomplete or was given up."""
        if self.failed or not self.complete:
            return None
        return b"".join(self.parts)

    def _give_up(self, reason: str) -> bool:
        self.failed = True
        self.reason = reason
        self.parts = []
        return False


def has_description(reply: bytes) -> bool:
    """An extended-protocol entry that starts with its batch's Describe reply (RowDescription or NoData)."""
    return reply[:1] == b"T" or reply[:1] == b"n"


def split_row_description(reply: bytes) -> tuple[bytes | None, bytes]:
    """(RowDescription or NoData message, or None; the rest): the Describe reply and the Execute reply
    of an extended-protocol entry (filled with or without its batch's Describe)."""
    if not has_description(reply):
        return None, reply
    end = 1 + int.from_bytes(reply[1:5], "big")
    return reply[:end], reply[end:]
