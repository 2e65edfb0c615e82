"""PostgreSQL v3 message codec: constants, builders and parsers. Pure functions, no I/O.

Builders return complete messages (type byte + length + body). Parsers take a message *body*
(without the type byte and length) as bytes or memoryview. Text is decoded with surrogateescape so
that re-encoding gives back the client's exact bytes whatever its client_encoding.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

# startup-phase request codes (the first untyped message)
PROTOCOL_3_0 = 196608
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102

# transaction status carried by ReadyForQuery
IDLE, IN_TRANSACTION, FAILED = b"I", b"T", b"E"

_I32 = struct.Struct("!i")
_HDR = struct.Struct("!cI")
_I16 = struct.Struct("!h")
_U32 = struct.Struct("!I")

ENC = "utf-8"
ERRORS = "surrogateescape"


def msg(kind: bytes, body: bytes = b"") -> bytes:
    return _HDR.pack(kind, len(body) + 4) + body


def cstr(s: str) -> bytes:
    return s.encode(ENC, ERRORS) + b"\0"


def read_cstr(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode("utf-8", "surrogateescape"), end + 1  # ENC, ERRORS: compiled, the codec directly


# --- backend messages we synthesise -----------------------------------------------------------

def ready_for_query(status: bytes) -> bytes:
    return _READY.get(status) or msg(b"Z", status)


_READY = {s: msg(b"Z", s) for s in (b"I", b"T", b"E")}
AUTH_OK = msg(b"R", _I32.pack(0))
PARSE_COMPLETE = msg(b"1")
BIND_COMPLETE = msg(b"2")
CLOSE_COMPLETE = msg(b"3")
NO_DATA = msg(b"n")
EMPTY_QUERY = msg(b"I")
PORTAL_SUSPENDED = msg(b"s")


def parameter_status(name: str, value: str) -> bytes:
    return msg(b"S", cstr(name) + cstr(value))


def backend_key_data(pid: int, secret: int) -> bytes:
    return msg(b"K", struct.pack("!ii", pid, secret))


def _fields(severity: str, code: str, message: str, detail: str | None, hint: str | None) -> bytes:
    parts = [b"S" + cstr(severity), b"V" + cstr(severity), b"C" + cstr(code), b"M" + cstr(message)]
    if detail:
        parts.append(b"D" + cstr(detail))
    if hint:
        parts.append(b"H" + cstr(hint))
    return b"".join(parts) + b"\0"


def error_response(code: str, message: str, *, severity: str = "ERROR", detail: str | None = None,
                   hint: str | None = None) -> bytes:
    return msg(b"E", _fields(severity, code, message, detail, hint))


def notice_response(message: str, *, code: str = "01000", severity: str = "NOTICE",
                    detail: str | None = None, hint: str | None = None) -> bytes:
    return msg(b"N", _fields(severity, code, message, detail, hint))


def negotiate_protocol_version(newest_minor: int, unsupported: Sequence[str]) -> bytes:
    body = _I32.pack(newest_minor) + _I32.pack(len(unsupported)) + b"".join(cstr(o) for o in unsupported)
    return msg(b"v", body)


def command_complete(tag: str) -> bytes:
    return msg(b"C", cstr(tag))


TEXT_OID = 25
INT8_OID = 20
FLOAT8_OID = 701


def row_description(columns: Sequence[tuple[str, int]]) -> bytes:
    """columns: (name, type oid); all text format."""
    body = [_I16.pack(len(columns))]
    for name, oid in columns:
        body.append(cstr(name) + struct.pack("!IhIhih", 0, 0, oid, -1, -1, 0))
    return msg(b"T", b"".join(body))


def data_row(values: Iterable[object]) -> bytes:
    out = []
    n = 0
    for v in values:
        n += 1
        if v is None:
            out.append(_I32.pack(-1))
        else:
            b = str(v).encode(ENC, ERRORS)
            out.append(_I32.pack(len(b)) + b)
    return msg(b"D", _I16.pack(n) + b"".join(out))


# --- frontend messages we synthesise (toward the upstream) -----------------------------------

def startup_message(params: dict[str, str], version: int = PROTOCOL_3_0) -> bytes:
    body = _I32.pack(version) + b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\0"
    return _I32.pack(len(body) + 4) + body


def cancel_request(pid: int, secret: bytes) -> bytes:
    body = _I32.pack(CANCEL_REQUEST) + _I32.pack(pid) + secret
    return _I32.pack(len(body) + 4) + body


def query(sql: str) -> bytes:
    return msg(b"Q", cstr(sql))


def parse_message(name: str, sql: str, oids: Sequence[int] = ()) -> bytes:
    return msg(b"P", cstr(name) + cstr(sql) + _I16.pack(len(oids)) + b"".join(_U32.pack(o) for o in oids))


SYNC = msg(b"S")
FLUSH = msg(b"H")
TERMINATE = msg(b"X")


# --- parsers ------------------------------------------------------------------------------------

# What a parser raises on a malformed body, and all it may raise (tests/test_fuzz_wire.py): never a
# UnicodeError, since text is decoded with surrogateescape.
MALFORMED = (ValueError, IndexError, struct.error)


def parse_startup(body: bytes) -> tuple[int, dict[str, str]]:
    """Body of an untyped startup-phase message (after the length): (code, params)."""
    (code,) = _I32.unpack_from(body, 0)
    params: dict[str, str] = {}
    if code >> 16 == 3:
        pos = 4
        while pos < len(body) and body[pos] != 0:
            k, pos = read_cstr(body, pos)
            v, pos = read_cstr(body, pos)
            params[k] = v
    return code, params


def parse_query(body: bytes) -> str:
    return body[:-1].decode(ENC, ERRORS) if body.endswith(b"\0") else body.decode(ENC, ERRORS)


def parse_parse(body: bytes) -> tuple[str, str, list[int]]:
    name, pos = read_cstr(body, 0)
    sql, pos = read_cstr(body, pos)
    (n,) = _I16.unpack_from(body, pos)
    pos += 2
    oids = list(struct.unpack_from(f"!{n}I", body, pos)) if n > 0 else []
    return name, sql, oids


def bind_names(body: bytes) -> tuple[str, str]:
    """(portal, statement) of a Bind without decoding the parameters."""
    if body[0] == 0:  # unnamed portal: the common case
        end = body.index(0, 1)
        return "", body[1:end].decode(ENC, ERRORS)
    portal, pos = read_cstr(body, 0)
    stmt, _ = read_cstr(body, pos)
    return portal, stmt


def parse_bind(body: bytes) -> tuple[str, str, list[int], list[bytes | None], list[int]]:
    """(portal, statement, parameter format codes, parameter values, result format codes)."""
    portal, pos = read_cstr(body, 0)
    stmt, pos = read_cstr(body, pos)
    (nf,) = _I16.unpack_from(body, pos)
    pos += 2
    pformats = list(struct.unpack_from(f"!{nf}h", body, pos)) if nf > 0 else []
    pos += 2 * max(nf, 0)
    (np_,) = _I16.unpack_from(body, pos)
    pos += 2
    values: list[bytes | None] = []
    for _ in range(np_):
        (ln,) = _I32.unpack_from(body, pos)
        pos += 4
        if ln < 0:
            values.append(None)
        else:
            values.append(bytes(body[pos:pos + ln]))
            pos += ln
    (nr,) = _I16.unpack_from(body, pos)
    pos += 2
    rformats = list(struct.unpack_from(f"!{nr}h", body, pos)) if nr > 0 else []
    return portal, stmt, pformats, values, rformats


def build_bind(portal: str, stmt: str, pformats: Sequence[int], values: Sequence[bytes | None],
               rformats: Sequence[int]) -> bytes:
    parts = [cstr(portal), cstr(stmt), _I16.pack(len(pformats)), struct.pack(f"!{len(pformats)}h", *pformats),
             _I16.pack(len(values))]
    for v in values:
        parts.append(_I32.pack(-1) if v is None else _I32.pack(len(v)) + v)
    parts += [_I16.pack(len(rformats)), struct.pack(f"!{len(rformats)}h", *rformats)]
    return msg(b"B", b"".join(parts))


def parse_execute(body: bytes) -> tuple[str, int]:
    if body[0] == 0:
        return "", _I32.unpack_from(body, 1)[0]
    portal, pos = read_cstr(body, 0)
    (max_rows,) = _I32.unpack_from(body, pos)
    return portal, max_rows


def parse_describe_close(body: bytes) -> tuple[bytes, str]:
    """Describe / Close: ('S' or 'P', name)."""
    name, _ = read_cstr(body, 1)
    return body[:1], name


def parse_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields keyed by their one-letter code."""
    out: dict[str, str] = {}
    pos = 0
    n = len(body)
    while pos < n and body[pos] != 0:
        code = chr(body[pos])
        val, pos = read_cstr(body, pos + 1)
        out[code] = val
    return out


def parse_parameter_status(body: bytes) -> tuple[str, str]:
    name, pos = read_cstr(body, 0)
    value, _ = read_cstr(body, pos)
    return name, value


def parse_command_tag(body: bytes) -> str:
    return body[:-1].decode(ENC, ERRORS) if body.endswith(b"\0") else body.decode(ENC, ERRORS)


def rows_from_tag(tag: bytes) -> int:
    """Rows affected or returned from a CommandComplete tag (b"SELECT 5", b"INSERT 0 3", b"UPDATE 2")."""
    last = tag.rpartition(b" ")[2]
    return int(last) if last.isdigit() else 0
