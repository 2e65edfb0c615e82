"""The upstream PostgreSQL server: where it is, connecting to it, and cancelling on it."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

from proxy.wire import protocol as pq


@dataclass(frozen=True)
class Upstream:
    host: str
    port: int
    user: str | None = None
    password: str | None = None
    database: str | None = None
    sslmode: str = "disable"

    @property
    def is_unix(self) -> bool:
        return self.host.startswith("/")

    def dsn(self, user: str | None = None, database: str | None = None) -> str:
        """A libpq-style URL for pgfront's own connections (catalog reads, EXPLAIN)."""
        u = user or self.user or "postgres"
        auth = f"{u}:{self.password}@" if self.password and not user else f"{u}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.is_unix:
            return f"postgresql://{auth}/{database or self.database or u}?host={self.host}&port={self.port}"
        return f"postgresql://{auth}{host}:{self.port}/{database or self.database or u}"


def parse_upstream(dsn: str) -> Upstream:
    """postgresql://[user[:pw]@]host[:port][/db][?sslmode=..&host=/socket/dir] or 'host:port'."""
    if "://" not in dsn:
        host, _, port = dsn.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"upstream {dsn!r} is not a postgresql:// URL or HOST:PORT")
        return Upstream(host, int(port))
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(f"upstream {dsn!r}: scheme must be postgresql://")
    q = parse_qs(parts.query)
    host = q.get("host", [parts.hostname or "localhost"])[0]
    try:
        port = int(q.get("port", [parts.port or 5432])[0])
    except ValueError:
        raise ValueError(f"upstream {dsn!r}: bad port") from None
    db = unquote(parts.path.lstrip("/")) or None
    return Upstream(
        host=host, port=port, user=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None, database=db,
        sslmode=q.get("sslmode", ["disable"])[0],
    )


async def open_connection(up: Upstream, protocol_factory, timeout: float, sslmode: str = "disable",
                          ssl_ctx: ssl.SSLContext | None = None):
    """Connect a Protocol to the upstream, raising OSError / TimeoutError after `timeout`.

    With an sslmode other than disable, the SSLRequest exchange happens on the bare socket first,
    then the TLS handshake, as libpq does it.
    """
    return await asyncio.wait_for(_open(up, protocol_factory, sslmode, ssl_ctx), timeout)


async def _open(up: Upstream, protocol_factory, sslmode: str, ssl_ctx: ssl.SSLContext | None):
    loop = asyncio.get_running_loop()
    if sslmode == "disable" or ssl_ctx is None or up.is_unix:
        if up.is_unix:
            return await loop.create_unix_connection(protocol_factory, f"{up.host}/.s.PGSQL.{up.port}")
        return await loop.create_connection(protocol_factory, up.host, up.port)
    infos = await loop.getaddrinfo(up.host, up.port, type=socket.SOCK_STREAM)
    family, type_, proto, _, addr = infos[0]
    sock = socket.socket(family, type_, proto)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, addr)
        await loop.sock_sendall(sock, struct.pack("!ii", 8, pq.SSL_REQUEST))
        answer = await loop.sock_recv(sock, 1)
        if answer == b"S":
            return await loop.create_connection(protocol_factory, sock=sock, ssl=ssl_ctx,
                                                server_hostname=up.host if ssl_ctx.check_hostname else None)
        if answer == b"N" and sslmode == "prefer":
            return await loop.create_connection(protocol_factory, sock=sock)
        raise ConnectionError(f"upstream refused TLS (sslmode={sslmode})")
    except BaseException:
        sock.close()
        raise


async def send_cancel(up: Upstream, pid: int, secret: bytes, timeout: float = 5.0) -> None:
    """Deliver a CancelRequest for backend `pid` on its own connection, as libpq does."""
    try:
        if up.is_unix:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(f"{up.host}/.s.PGSQL.{up.port}"), timeout)
        else:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(up.host, up.port), timeout)
    except (TimeoutError, OSError):
        return
    try:
        writer.write(pq.cancel_request(pid, secret))
        await writer.drain()
        # the server closes the socket once it has read the request
        await asyncio.wait_for(reader.read(1), timeout)
    except (TimeoutError, OSError):
        pass
    finally:
        writer.close()


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext | None:
    """TLS toward clients; None when no certificate is configured."""
    if not cert_file:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file or None)
    return ctx


def client_ssl_context(mode: str, ca_file: str = "") -> ssl.SSLContext | None:
    """SSL context for the upstream link by libpq-like sslmode (None = plain)."""
    if mode == "disable":
        return None
    ctx = ssl.create_default_context(cafile=ca_file or None)
    if mode in ("prefer", "require"):
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif mode == "verify-ca":
        ctx.check_hostname = False
    return ctx
