"""The sans-I/O startup reader (proxy.relay.startup): each startup-phase request, fed in pieces as a
socket may deliver it. The same requests go through a real pgfront in test_wire_edge_cases."""

from __future__ import annotations

import struct

from proxy.relay.startup import Cancel, Encrypt, Refuse, Startup, next_request
from proxy.wire import protocol as pq


def _packet(code: int, body: bytes = b"") -> bytes:
    return struct.pack("!ii", 8 + len(body), code) + body


def _startup(minor: int = 0, **params: str) -> bytes:
    body = b"".join(pq.cstr(k) + pq.cstr(v) for k, v in params.items()) + b"\0"
    return _packet((3 << 16) | minor, body)


def test_startup_arriving_byte_by_byte_is_read_once_whole():
    raw = _startup(user="app", database="db") + b"Q..."
    buf = b""
    for i, byte in enumerate(raw[:-4]):
        buf += bytes([byte])
        request, buf = next_request(buf, False)
        if i < len(raw) - 5:
            assert request is None
    assert request == Startup({"user": "app", "database": "db"}, b"")


def test_ssl_request_is_answered_by_what_is_offered_and_refused_with_bytes_behind_it():
    assert next_request(_packet(pq.SSL_REQUEST), True) == (Encrypt(True), b"")
    assert next_request(_packet(pq.SSL_REQUEST), False) == (Encrypt(False), b"")
    assert next_request(_packet(pq.GSSENC_REQUEST), True) == (Encrypt(False), b"")
    request, _ = next_request(_packet(pq.SSL_REQUEST) + _startup(user="x"), True)
    assert isinstance(request, Refuse) and request.code == "08P01"  # CVE-2021-23214


def test_newer_minor_version_and_protocol_options_are_negotiated_down():
    request, _ = next_request(_startup(minor=2, **{"user": "app", "_pq_.x": "1"}), False)
    assert isinstance(request, Startup) and request.params == {"user": "app"}
    assert request.negotiate == pq.negotiate_protocol_version(0, ["_pq_.x"])


def test_refusals_carry_their_sqlstate():
    assert next_request(_startup(database="db"), False)[0].code == "28000"  # no user
    assert next_request(_packet(2 << 16, b"\0"), False)[0].code == "0A000"  # protocol 2
    assert next_request(struct.pack("!i", 4), False)[0].code == "08P01"  # impossible length
    assert next_request(b"\x16\x03\x01", False)[0].code == ""  # direct TLS, none configured: close


def test_cancel_request_gives_the_key():
    assert next_request(_packet(pq.CANCEL_REQUEST, struct.pack("!i", 42) + b"s3cr"), False) == \
        (Cancel(42, b"s3cr"), b"")
