"""The first messages of a client connection, sans I/O: what the client asked for, and what to answer.

`next_request(buf, tls_offered)` takes one startup-phase message off the buffer and says what it is:
an SSL or GSSENC request (answered 'S' or 'N'), a CancelRequest, a StartupMessage checked and split
into the negotiation reply and the parameters, or a refusal with its SQLSTATE. The shell
(`proxy.net.startup`) acts on it: switches to TLS, routes the cancel, or starts authentication.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from proxy.wire import protocol as pq
from proxy.wire.framer import FrameError, read_startup


@dataclass(slots=True)
class Encrypt:
    """SSLRequest or GSSENCRequest: answer b"S" (start TLS) or b"N"."""

    tls: bool  # pgfront offers TLS for it: answer 'S' and hand the socket to TLS


@dataclass(slots=True)
class Cancel:
    pid: int
    secret: bytes


@dataclass(slots=True)
class Startup:
    params: dict[str, str]  # without the protocol options (_pq_.*)
    negotiate: bytes  # a NegotiateProtocolVersion to send first (b"" when none is due)


@dataclass(slots=True)
class Refuse:
    code: str  # SQLSTATE; "" closes without an error (the client spoke TLS to a plain socket)
    message: str


Request = Encrypt | Cancel | Startup | Refuse


def next_request(buf: bytes, tls_offered: bool) -> tuple[Request | None, bytes]:
    """One request off `buf` (None while it is incomplete) and the bytes after it."""
    try:
        body, rest = read_startup(buf)
    except FrameError as e:
        return Refuse(e.code, str(e)), b""
    if body is None:
        if buf[:1] == b"\x16":  # a TLS ClientHello straight away (sslnegotiation=direct), no TLS here
            return Refuse("", "direct TLS without TLS configured"), b""
        return None, buf
    try:
        code, params = pq.parse_startup(body)
    except pq.MALFORMED:
        return Refuse("08P01", "invalid startup packet layout"), b""
    if code in (pq.SSL_REQUEST, pq.GSSENC_REQUEST):
        if rest:
            # bytes pipelined behind the request could be injected before encryption (CVE-2021-23214)
            return Refuse("08P01", "received unencrypted data after SSL request"), b""
        return Encrypt(code == pq.SSL_REQUEST and tls_offered), rest
    if code == pq.CANCEL_REQUEST:
        if len(body) < 12:
            return Refuse("", "short CancelRequest"), b""
        (pid,) = struct.unpack_from("!i", body, 4)
        return Cancel(pid, bytes(body[8:])), b""
    if code >> 16 != 3:
        return Refuse("0A000", f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                               "server supports 3.0 to 3.0"), b""
    unsupported = [k for k in params if k.startswith("_pq_.")]
    negotiate = pq.negotiate_protocol_version(0, unsupported) if (code & 0xFFFF) > 0 or unsupported else b""
    params = {k: v for k, v in params.items() if not k.startswith("_pq_.")}
    if "user" not in params:
        return Refuse("28000", "no PostgreSQL user name specified in startup packet"), b""
    return Startup(params, negotiate), rest
