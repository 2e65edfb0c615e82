"""A raw protocol client for edge cases no driver produces on purpose (pipelines cut at odd places,
bad messages, COPY with Sync before CopyDone...). Built on pgfront's own codec for the encoding
only; every reply is read off a real socket."""

from __future__ import annotations

import socket
import struct
import time

from proxy.wire import protocol as pq


class RawConn:
    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        self.buf = b""

    def startup(self, user: str = "postgres", database: str = "postgres", version: int = pq.PROTOCOL_3_0,
                **params: str) -> list[tuple[bytes, bytes]]:
        self.sock.sendall(pq.startup_message({"user": user, "database": database, **params}, version))
        return self.read_until(b"Z")

    def send(self, *messages: bytes) -> None:
        self.sock.sendall(b"".join(messages))

    def read_msg(self, timeout: float = 10.0) -> tuple[bytes, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 5:
                (ln,) = struct.unpack_from("!I", self.buf, 1)
                if len(self.buf) >= ln + 1:
                    t, body = self.buf[:1], self.buf[5:ln + 1]
                    self.buf = self.buf[ln + 1:]
                    return t, body
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete message in time")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk

    def read_until(self, kind: bytes = b"Z", timeout: float = 10.0) -> list[tuple[bytes, bytes]]:
        out = []
        while True:
            m = self.read_msg(timeout)
            out.append(m)
            if m[0] == kind:
                return out

    def expect_nothing(self, wait: float = 0.3) -> bytes:
        """Return whatever arrives within `wait` seconds (b'' when nothing does)."""
        self.sock.settimeout(wait)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return b""
        self.buf += data
        return data

    def close(self) -> None:
        try:
            self.sock.sendall(pq.TERMINATE)
        except OSError:
            pass
        self.sock.close()


def types(msgs: list[tuple[bytes, bytes]]) -> str:
    return "".join(t.decode() for t, _ in msgs)


def bind(portal: str = "", stmt: str = "", params: list[bytes | None] | None = None,
         rformats: list[int] | None = None) -> bytes:
    return pq.build_bind(portal, stmt, [], params or [], rformats or [])


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return pq.msg(b"E", pq.cstr(portal) + struct.pack("!i", max_rows))


def describe(kind: bytes, name: str = "") -> bytes:
    return pq.msg(b"D", kind + pq.cstr(name))


def close(kind: bytes, name: str = "") -> bytes:
    return pq.msg(b"C", kind + pq.cstr(name))


def copy_data(data: bytes) -> bytes:
    return pq.msg(b"d", data)


COPY_DONE = pq.msg(b"c")


def copy_fail(reason: str) -> bytes:
    return pq.msg(b"f", pq.cstr(reason))


def error_code(body: bytes) -> str:
    return pq.parse_fields(body).get("C", "")
