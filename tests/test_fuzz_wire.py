"""Hostile input. Property-based fuzzing of the sans-IO codec (framer, startup reader, parsers,
builder/parser round trips), then of a running pgfront: random bytes, corrupted and out-of-order
messages, unknown message types, garbage startup packets and a slow-loris crowd. Whatever a client
sends must end in an ErrorResponse or a closed connection, never a hang or a Python traceback, and
pgfront must go on serving everyone else.

tests/corpus/ holds inputs that once crashed something, replayed below. A file is named
`<target>--<what>.bin`; targets are the parsers' names, `framer`, `startup` (read_startup),
`session` (bytes sent after a valid startup) and `session_startup` (the first bytes of a connection).
Run with PGFRONT_FUZZ_SAVE=1 to have a failing property save its input there for triage.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import os
import socket
import struct
import time
from pathlib import Path

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.auth import AuthFailed, ScramServer, Secret
from proxy.wire import protocol as pq
from proxy.wire.framer import MAX_STARTUP, FrameError, Framer, read_startup
from tests.conftest import Pgfront
from tests.wire_client import (
    COPY_DONE,
    RawConn,
    bind,
    close,
    copy_data,
    copy_fail,
    describe,
    error_code,
    execute,
)

CORPUS = Path(__file__).parent / "corpus"
SAVE = os.environ.get("PGFRONT_FUZZ_SAVE") == "1"

PARSERS = {
    "parse_startup": pq.parse_startup,
    "parse_parse": pq.parse_parse,
    "parse_bind": pq.parse_bind,
    "bind_names": pq.bind_names,
    "parse_execute": pq.parse_execute,
    "parse_describe_close": pq.parse_describe_close,
    "parse_fields": pq.parse_fields,
    "parameter_status": pq.parse_parameter_status,
    "parse_query": pq.parse_query,
    "parse_command_tag": pq.parse_command_tag,
}
FRONTEND_TYPES = b"QPBDECSHFXdcf"

codec = settings(max_examples=400, deadline=None)
live = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def save_crash(target: str, data: bytes) -> None:
    if SAVE:
        CORPUS.mkdir(exist_ok=True)
        (CORPUS / f"{target}--{hashlib.sha1(data).hexdigest()[:12]}.bin").write_bytes(data)


# --- strategies -------------------------------------------------------------------------------------

def raw_message(t: int, body: bytes) -> bytes:
    return bytes([t]) + struct.pack("!I", len(body) + 4) + body


names = st.binary(max_size=12).map(lambda b: b.replace(b"\0", b"").decode(pq.ENC, pq.ERRORS))
int16s = st.integers(-32768, 32767)

valid_bodies = st.one_of(
    st.tuples(names, names, st.lists(int16s, max_size=4), st.lists(st.none() | st.binary(max_size=20), max_size=4),
              st.lists(int16s, max_size=4)).map(lambda a: pq.build_bind(*a)[5:]),
    st.tuples(names, names, st.lists(st.integers(0, 2**32 - 1), max_size=4)).map(
        lambda a: pq.parse_message(*a)[5:]),
    st.tuples(names, st.integers(-(2**31), 2**31 - 1)).map(lambda a: execute(*a)[5:]),
    st.tuples(st.sampled_from([b"S", b"P"]), names).map(lambda a: describe(*a)[5:]),
    st.dictionaries(names.filter(bool), names, max_size=3).map(lambda d: pq.startup_message(d)[4:]),
    st.tuples(names, names).map(lambda a: pq.parameter_status(*a)[5:]),
    st.builds(lambda c, m: pq.error_response(c, m)[5:], names, names),
)


@st.composite
def mutated(draw, base: st.SearchStrategy[bytes]) -> bytes:
    """A valid body, then cut short, with bytes flipped or inserted: nearly valid is what finds bugs."""
    body = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 3))):
        op = draw(st.sampled_from(["cut", "flip", "insert", "nul"]))
        pos = draw(st.integers(0, len(body)))
        if op == "cut":
            del body[pos:]
        elif op == "flip" and pos < len(body):
            body[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            body[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif pos < len(body):
            body[pos] = 0
    return bytes(body)


bodies = st.binary(max_size=64) | mutated(valid_bodies)


@st.composite
def message_streams(draw) -> bytes:
    """Whole messages of any type, some over the size limit, mixed with garbage and lying headers."""
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["msg", "stream", "garbage", "header"]))
        if kind == "msg":
            parts.append(raw_message(draw(st.integers(0, 255)), draw(st.binary(max_size=80))))
        elif kind == "stream":
            parts.append(raw_message(ord(draw(st.sampled_from("dD"))), draw(st.binary(max_size=150))))
        elif kind == "garbage":
            parts.append(draw(st.binary(min_size=1, max_size=10)))
        else:
            parts.append(bytes([draw(st.integers(0, 255))]) + struct.pack("!I", draw(st.integers(0, 2**32 - 1))))
    return b"".join(parts)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


# --- the framer -------------------------------------------------------------------------------------

def reference_frames(stream: bytes, max_size: int) -> tuple[list[int], int | None]:
    """Message start offsets, and the offset of the first invalid header (None if there is none)."""
    starts, pos = [], 0
    while len(stream) - pos >= 5:
        (ln,) = struct.unpack_from("!I", stream, pos + 1)
        if ln < 4 or ln > max_size:
            return [*starts, pos], pos
        starts.append(pos)
        pos += 1 + ln
    starts.append(pos)
    return starts, None


def check_framer(stream: bytes, chunks: list[bytes], max_size: int, stream_types: bytes) -> None:
    """Frames must rebuild the input exactly; FrameError only at a header that really is invalid."""
    f = Framer(max_size, stream_types)
    starts, bad = reference_frames(stream, max_size)
    got = bytearray()
    fed = 0
    try:
        for chunk in chunks:
            fed += len(chunk)
            single = f.single(chunk)  # the shortcut callers may take instead of feed
            frames = f.feed(chunk)
            data = f.data
            assert single is None or single == frames
            for t, a, b in frames:
                assert 0 <= a <= b <= len(data)
                at = bisect.bisect_right(starts, len(got)) - 1  # the message this frame belongs to
                if t >= 0:
                    assert starts[at] == len(got) and starts[at + 1] == len(got) + b - a
                    assert data[a] == t and 4 <= b - a - 1 <= max_size
                else:
                    assert -t in stream_types and stream[starts[at]] == -t
                got += data[a:b]
            assert f.buffered <= max_size + 5
            assert len(got) + f.buffered == fed  # nothing lost, nothing invented
            assert got == stream[:len(got)]
    except FrameError:
        assert bad is not None and len(got) <= bad and bad + 5 <= fed
        return
    assert bad is None or bad + 5 > len(stream)


@codec
@given(message_streams(), st.lists(st.integers(0, 2000), max_size=12), st.sampled_from([16, 64, 1 << 20]),
       st.sampled_from([b"", b"d", b"Dd"]))
def test_framer_rebuilds_any_stream_or_raises_frame_error(stream, cuts, max_size, stream_types):
    try:
        check_framer(stream, split(stream, cuts), max_size, stream_types)
    except Exception:
        save_crash("framer", stream)
        raise


def test_framer_accumulates_a_large_message_without_rescanning():
    """A message arriving in many reads is appended to, not copied again per read (that was quadratic:
    a 64 MiB Query in 256 KiB reads took 8 s of event-loop time)."""
    f = Framer()
    message = raw_message(ord("Q"), b"x" * (8 << 20) + b"\0")
    step = 64 * 1024
    assert f.feed(message[:step]) == []
    for i in range(step, len(message) - 1, step):
        assert f.feed(message[i:min(i + step, len(message) - 1)]) == [] and f.data == b""
        assert f.buffered == min(i + step, len(message) - 1)
    assert f.feed(message[-1:]) == [(ord("Q"), 0, len(message))] and f.data == message


# --- read_startup and the parsers ------------------------------------------------------------------

startup_buffers = st.one_of(
    st.binary(max_size=40),
    st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=40)).map(lambda a: struct.pack("!I", a[0]) + a[1]),
    st.tuples(st.integers(MAX_STARTUP - 2, MAX_STARTUP + 2), st.integers(0, 3)).map(
        lambda a: struct.pack("!I", a[0]) + b"\0" * (a[0] - 4 + a[1] - 1)),
    st.dictionaries(names.filter(bool), names, max_size=3).map(pq.startup_message),
)


def check_read_startup(buf: bytes) -> None:
    try:
        body, rest = read_startup(buf)
    except FrameError:
        (ln,) = struct.unpack_from("!I", buf)
        assert not 8 <= ln <= MAX_STARTUP
        return
    if body is None:
        assert rest == buf
        assert len(buf) < 4 or len(buf) < struct.unpack_from("!I", buf)[0]
    else:
        assert 8 <= len(body) + 4 <= MAX_STARTUP
        assert struct.pack("!I", len(body) + 4) + body + rest == buf


@codec
@given(startup_buffers)
def test_read_startup(buf):
    try:
        check_read_startup(buf)
    except Exception:
        save_crash("startup", buf)
        raise


def parse_only_malformed(name: str, body: bytes) -> None:
    """A parser may raise only pq.MALFORMED, the exceptions the session turns into 08P01."""
    try:
        PARSERS[name](body)
    except pq.MALFORMED:
        pass
    except Exception:
        save_crash(name, body)
        raise


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(max_examples=300, deadline=None)
@given(body=bodies)
def test_parsers_raise_only_malformed(name, body):
    parse_only_malformed(name, body)


@codec
@given(first=bodies | st.binary(max_size=40).map(lambda b: b"SCRAM-SHA-256\0" + struct.pack("!i", len(b)) + b),
       final=bodies | st.binary(max_size=60).map(lambda b: b"c=biws,r=" + b))
def test_scram_server_on_garbage(first, final):
    """pgfront's own SCRAM server reads client bytes: malformed ones fail the login (AuthFailed, or a
    ValueError, which the session also turns into 28P01), nothing else."""
    server = ScramServer(Secret("plain", "pw"))
    try:
        server.first(first)
    except (AuthFailed, ValueError):
        server.first(b"SCRAM-SHA-256\0" + struct.pack("!i", 14) + b"n,,n=,r=abcdef")
    try:
        server.final(final)
    except (AuthFailed, ValueError):
        pass


def test_rows_from_tag_on_garbage():
    assert pq.rows_from_tag(b"SELECT 5") == 5
    assert pq.rows_from_tag(b"SELECT x") == 0 and pq.rows_from_tag(b"") == 0


# --- round trips -------------------------------------------------------------------------------------

@codec
@given(names, names, st.lists(int16s, max_size=5), st.lists(st.none() | st.binary(max_size=30), max_size=5),
       st.lists(int16s, max_size=5))
def test_bind_round_trip(portal, stmt, pformats, values, rformats):
    message = pq.build_bind(portal, stmt, pformats, values, rformats)
    assert message[:1] == b"B" and struct.unpack_from("!I", message, 1)[0] == len(message) - 1
    assert pq.parse_bind(message[5:]) == (portal, stmt, pformats, values, rformats)
    assert pq.bind_names(message[5:]) == (portal, stmt)


@codec
@given(st.dictionaries(names.filter(bool), names, max_size=6), st.integers(0, 0xFFFF))
def test_startup_round_trip(params, minor):
    version = (3 << 16) | minor
    message = pq.startup_message(params, version)
    body, rest = read_startup(message)
    assert rest == b"" and pq.parse_startup(body) == (version, params)


@codec
@given(names, names, st.lists(st.integers(0, 2**32 - 1), max_size=8))
def test_parse_round_trip(name, sql, oids):
    message = pq.parse_message(name, sql, oids)
    assert pq.parse_parse(message[5:]) == (name, sql, oids)


@codec
@given(names, st.integers(-(2**31), 2**31 - 1), st.sampled_from([b"S", b"P"]))
def test_execute_describe_close_round_trip(portal, max_rows, kind):
    assert pq.parse_execute(execute(portal, max_rows)[5:]) == (portal, max_rows)
    assert pq.parse_describe_close(describe(kind, portal)[5:]) == (kind, portal)
    assert pq.parse_describe_close(close(kind, portal)[5:]) == (kind, portal)


@codec
@given(st.binary(max_size=40).map(lambda b: b.replace(b"\0", b"")))
def test_any_client_bytes_survive_decoding(raw):
    """Names and SQL decode with surrogateescape: whatever the encoding, re-encoding gives the bytes back."""
    text = raw.decode(pq.ENC, pq.ERRORS)
    assert pq.cstr(text) == raw + b"\0"
    assert pq.parse_parse(raw_message(ord("P"), raw + b"\0" + raw + b"\0\0\0")[5:])[:2] == (text, text)


# --- the running proxy ---------------------------------------------------------------------------------

BLOCK_DELETE = """
[[rule]]
name = "no-delete"
match = { kind = "delete" }
block = { message = "no deletes here" }
"""


@pytest.fixture(scope="module")
def front(pg, tmp_path_factory):
    """pgfront dropping unfinished startups after 1 s, with one rule (block DELETE) so that replies
    pgfront replaces show whether its reply tracking stays in step."""
    rules = tmp_path_factory.mktemp("fuzz-rules") / "block.toml"
    rules.write_text(BLOCK_DELETE)
    p = Pgfront(f"postgresql://127.0.0.1:{pg.port}",
                f"[server]\nstartup_timeout = '1s'\n[rules]\nfiles = ['{rules}']\nwatch = false\n").start()
    yield p
    p.stop()


@pytest.fixture
def healthy(front):
    """After the test: pgfront still serves a normal client and never logged a traceback."""
    yield front
    with psycopg.connect(front.conninfo(), connect_timeout=10) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    log = front.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[log.index("Traceback") - 1500:][:5000]


PROBE = pq.query("SELECT 'probe-done'")


def outcome(c: RawConn, timeout: float = 5.0) -> tuple[str, list[tuple[bytes, bytes]]]:
    """After the client sent PROBE last: read until the probe's reply ends ('ready') or until the
    connection closes ('closed'). A hang fails."""
    msgs: list[tuple[bytes, bytes]] = []
    try:
        while True:
            msgs.append(c.read_msg(timeout))
            if msgs[-1][0] == b"Z" and len(msgs) > 1 and msgs[-2][0] == b"C" and msgs[-3][1].endswith(b"probe-done"):
                return "ready", msgs
    except ConnectionError:
        return "closed", msgs


def drain_to_eof(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything pgfront sends until it closes the connection (TimeoutError if it never does)."""
    out = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def well_formed(data: bytes) -> list[int]:
    """Message types of a backend stream; it must frame cleanly to the last byte."""
    f = Framer()
    frames = f.feed(data)
    assert f.buffered == 0, f"pgfront sent a partial message: {data[-40:]!r}"
    return [t for t, _, _ in frames]


def admin_rows(front, sql: str) -> list[dict[str, str | None]]:
    """Rows of an admin-console command (simple protocol, as the console requires)."""
    c = RawConn(front.port)
    c.startup(database="pgfront")
    c.send(pq.query(sql))
    msgs = c.read_until()
    c.close()
    cols: list[str] = []
    rows = []
    for t, body in msgs:
        if t == b"T":
            pos = 2
            for _ in range(struct.unpack_from("!h", body)[0]):
                name, pos = pq.read_cstr(body, pos)
                cols.append(name)
                pos += 18
        elif t == b"D":
            pos, values = 2, []
            for _ in range(struct.unpack_from("!h", body)[0]):
                (ln,) = struct.unpack_from("!i", body, pos)
                values.append(None if ln < 0 else body[pos + 4:pos + 4 + ln].decode())
                pos += 4 + max(ln, 0)
            rows.append(dict(zip(cols, values, strict=True)))
    return rows


def pending_of(front, c: RawConn) -> int:
    """Replies pgfront still expects for this connection: 0 whenever the client is idle."""
    peer = f"127.0.0.1:{c.sock.getsockname()[1]}"
    row = next(r for r in admin_rows(front, "SHOW CLIENTS") if r["peer"] == peer)
    return int(row["pending"])


def assert_settled(front, c: RawConn) -> None:
    """A connection that survived is idle, usable and tracked without leftovers."""
    c.send(pq.query("SELECT 1"))
    assert "".join(t.decode() for t, _ in c.read_until()) == "TDCZ"
    assert pending_of(front, c) == 0


corrupted_pipelines = st.lists(st.tuples(st.sampled_from(FRONTEND_TYPES), mutated(valid_bodies)).map(
    lambda a: raw_message(*a)), min_size=1, max_size=6).map(b"".join)


@live
@given(junk=st.binary(min_size=1, max_size=400) | corrupted_pipelines)
def test_random_bytes_after_startup(healthy, junk):
    c = RawConn(healthy.port)
    c.startup()
    try:
        c.sock.sendall(junk)
        c.sock.shutdown(socket.SHUT_WR)  # a half-finished message must not keep pgfront waiting
    except OSError:
        pass  # pgfront already closed on an early error
    try:
        well_formed(c.buf + drain_to_eof(c.sock))
    except Exception:
        save_crash("session", junk)
        raise
    finally:
        c.sock.close()


P, S, Q = pq.parse_message, pq.SYNC, pq.query

CORRUPT = {
    "bind-truncated": raw_message(ord("B"), b"\0\0\0\0\0\x02\0\0\0\x011"),
    "bind-no-terminators": raw_message(ord("B"), b"\x01\x02\x03"),
    "bind-empty": raw_message(ord("B"), b""),
    "bind-negative-value-length": raw_message(ord("B"), b"\0\0\0\0\0\x01\xff\xff\xff\xfb\0\0"),
    "bind-huge-value-length": raw_message(ord("B"), b"\0\0\0\0\0\x01\x7f\xff\xff\xff\0\0"),
    "bind-negative-format-count": raw_message(ord("B"), b"\0\0\xff\xff\0\0\0\0"),
    "bind-param-count-mismatch": P("", "SELECT $1::int") + bind("", "", [b"1", b"2"]) + execute(),
    "bind-format-count-mismatch": P("", "SELECT $1::int") + pq.build_bind("", "", [0, 0, 1], [b"1"], []) + execute(),
    "bind-bad-format-code": P("", "SELECT $1::int") + pq.build_bind("", "", [7], [b"1"], [9]) + execute(),
    "bind-trailing-garbage": P("", "SELECT 1") + raw_message(ord("B"), bind()[5:] + b"zz") + execute(),
    "parse-no-terminators": raw_message(ord("P"), b"abc"),
    "parse-name-only": raw_message(ord("P"), b"s1\0"),
    "parse-no-oid-count": raw_message(ord("P"), b"\0SELECT 1\0"),
    "parse-negative-oid-count": raw_message(ord("P"), b"\0SELECT 1\0\xff\xff"),
    "parse-oid-count-too-big": raw_message(ord("P"), b"\0SELECT 1\0\x03\xe8"),
    "execute-empty": raw_message(ord("E"), b""),
    "execute-short-max-rows": raw_message(ord("E"), b"\0\x01"),
    "execute-no-terminator": raw_message(ord("E"), b"portal"),
    "describe-empty": raw_message(ord("D"), b""),
    "describe-bad-kind": raw_message(ord("D"), b"Xname\0"),
    "close-empty": raw_message(ord("C"), b""),
    "close-bad-kind": raw_message(ord("C"), b"Xname\0"),
    "query-no-terminator": raw_message(ord("Q"), b"SELECT 1"),
    "query-empty-body": raw_message(ord("Q"), b""),
    "query-nul-inside": raw_message(ord("Q"), b"SELECT 1\0; DROP TABLE nothing\0"),
    "sync-with-body": raw_message(ord("S"), b"junk"),
    "flush-with-body": raw_message(ord("H"), b"junk"),
    "function-call-truncated": raw_message(ord("F"), b"\0"),
    "function-call-unknown-oid": raw_message(ord("F"), b"\0\0\0\x01\0\0\0\0\0\0"),
    "length-zero": b"Q\0\0\0\0",
    "length-three": b"P\0\0\0\x03abc",
    "length-negative": b"B\xff\xff\xff\xfb",
    "length-over-limit": b"Q\x7f\xff\xff\xff",
    "terminate-with-body": raw_message(ord("X"), b"junk"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupted_message_ends_in_error_or_close(healthy, case):
    """Each ends in an ErrorResponse (then, if the connection lives on, it is usable and settled)
    or a closed connection."""
    c = RawConn(healthy.port)
    c.startup()
    try:
        c.send(CORRUPT[case], S, PROBE)
    except OSError:
        pass
    result, msgs = outcome(c)
    kinds = [t for t, _ in msgs]
    if case != "terminate-with-body":
        assert b"E" in kinds or result == "closed", (result, msgs)
    if result == "closed" and b"E" in kinds:
        assert error_code(msgs[kinds.index(b"E")][1]) in ("08P01", "54000")
    if result == "ready":
        assert_settled(healthy, c)
    c.sock.close()


def transcript(c: RawConn, *messages: bytes, replies: int = 1) -> list[str]:
    """Send, then read `replies` ReadyForQuery-terminated replies: message types and error codes."""
    c.send(*messages)
    out = []
    for _ in range(replies):
        out += [error_code(b) if t == b"E" else t.decode() for t, b in c.read_until(timeout=10)]
    return out


OUT_OF_ORDER = {
    "execute-unknown-portal": lambda c: transcript(c, execute("nope"), S),
    "execute-without-bind": lambda c: transcript(c, P("", "SELECT 1"), execute(), S),
    "describe-unknown": lambda c: transcript(c, describe(b"S", "nope"), describe(b"P", "nope"), S),
    "bind-unknown-statement": lambda c: transcript(c, bind("", "nope"), execute(), S),
    "close-unknown": lambda c: transcript(c, close(b"S", "nope"), close(b"P", "nope"), S),
    "portal-after-its-transaction": lambda c: transcript(c, P("", "SELECT 1"), bind("p"), S, execute("p"), S,
                                                         replies=2),
    "copy-messages-outside-copy": lambda c: transcript(c, copy_data(b"1\n"), COPY_DONE, copy_fail("x"), S,
                                                       Q("SELECT 1"), replies=2),
    "stray-copy-done-then-copy": lambda c: transcript(
        c, COPY_DONE, S, Q("CREATE TEMP TABLE fz (a int)"), P("", "COPY fz FROM STDIN"), bind(), execute(), S,
        copy_data(b"1\n"), S, COPY_DONE, S, Q("SELECT count(*) FROM fz"), replies=4),
    "stray-copy-fail-then-copy": lambda c: transcript(
        c, copy_fail("stray"), S, Q("CREATE TEMP TABLE fz (a int)"), Q("COPY fz FROM STDIN"), copy_data(b"1\n"),
        COPY_DONE, Q("SELECT count(*) FROM fz"), replies=4),
    "sync-storm": lambda c: transcript(c, *[S] * 3000, replies=3000),
    "flush-storm": lambda c: transcript(c, *[pq.FLUSH] * 3000, S),
    "query-inside-extended-batch": lambda c: transcript(c, P("", "SELECT 1"), bind(), execute(), Q("SELECT 2"), S,
                                                        replies=2),
    "error-then-sync-storm": lambda c: transcript(c, P("", "SELEC"), bind(), execute(), *[S] * 50, replies=50),
}


@pytest.mark.parametrize("case", sorted(OUT_OF_ORDER))
def test_out_of_order_messages_match_postgres(pg, healthy, case):
    """Out-of-order messages get exactly Postgres's replies, and pgfront's tracking settles."""
    direct, proxied = [], []
    for port, out in ((pg.port, direct), (healthy.port, proxied)):
        c = RawConn(port)
        c.startup()
        out += OUT_OF_ORDER[case](c)
        if port == healthy.port:
            assert_settled(healthy, c)
        c.close()
    assert proxied == direct


@pytest.mark.parametrize("stray", [False, True])
def test_copy_pipelined_before_its_start_keeps_replies_in_place(healthy, stray):
    """COPY data, Syncs and CopyDone sent before the CopyInResponse (and, worse, a CopyDone sent
    outside any COPY, which the server ignores) once made pgfront drop the Sync that ends the
    COPY's batch: the reply of the next statement then went unmatched, so a blocked DELETE came
    back as the server's syntax error at "pgfront" instead of the rule's error."""
    c = RawConn(healthy.port)
    c.startup()
    c.send(Q("CREATE TEMP TABLE fz (a int)"))
    c.read_until()
    if stray:
        c.send(COPY_DONE, S)
        c.read_until()
    c.send(P("", "COPY fz FROM STDIN"), bind(), execute(), S, copy_data(b"1\n"), S, COPY_DONE, S,
           Q("DELETE FROM fz"))
    first, second = c.read_until(), c.read_until()
    assert "".join(t.decode() for t, _ in first) == "12GCZ"
    assert [t for t, _ in second] == [b"E", b"Z"] and b"no deletes here" in second[0][1]
    assert_settled(healthy, c)
    c.close()


def test_unknown_message_types_are_fatal(healthy):
    for t in range(256):
        if t in FRONTEND_TYPES:
            continue
        c = RawConn(healthy.port)
        c.startup()
        c.send(raw_message(t, b"junk"), S, PROBE)
        result, msgs = outcome(c)
        c.sock.close()
        assert result == "closed" and [m[0] for m in msgs] == [b"E"] and error_code(msgs[0][1]) == "08P01", t


STARTUPS = {
    "garbage": b"\xff\xff\xff\xff garbage",
    "huge-declared-length": struct.pack("!I", 0x7FFFFFFF) + struct.pack("!I", pq.PROTOCOL_3_0),
    "length-zero": b"\0\0\0\0",
    "length-below-minimum": struct.pack("!I", 7) + b"abc",
    "params-without-terminator": struct.pack("!II", 21, pq.PROTOCOL_3_0) + b"user\0postgres",
    "key-without-value": struct.pack("!II", 13, pq.PROTOCOL_3_0) + b"user\0",
    "no-user": pq.startup_message({"database": "postgres"}),
    "empty-params": struct.pack("!II", 8, pq.PROTOCOL_3_0),
    "protocol-2": pq.startup_message({"user": "postgres"}, 2 << 16),
    "protocol-garbage": pq.startup_message({"user": "postgres"}, 0x12345678),
    "cancel-short": struct.pack("!III", 12, pq.CANCEL_REQUEST, 1),
    "cancel-bogus": struct.pack("!IIII", 16, pq.CANCEL_REQUEST, 1, 2),
    "ssl-then-garbage": struct.pack("!II", 8, pq.SSL_REQUEST) + b"\x16\x03\x01 not really tls",
    "gssenc-then-startup": struct.pack("!II", 8, pq.GSSENC_REQUEST) + pq.startup_message({"user": "postgres"}),
    "tls-client-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 40,
    "incomplete-forever": struct.pack("!I", 5000) + struct.pack("!I", pq.PROTOCOL_3_0) + b"user\0",
}


@pytest.mark.parametrize("case", sorted(STARTUPS))
def test_bad_startup_packet_is_refused(healthy, case):
    """Refused with an ErrorResponse and closed, at the latest by startup_timeout (1 s here)."""
    s = socket.create_connection(("127.0.0.1", healthy.port))
    try:
        s.sendall(STARTUPS[case])
    except OSError:
        pass
    data = drain_to_eof(s)
    s.close()
    if data[:1] == b"N":  # an SSL/GSS request answered "no encryption" first
        data = data[1:]
    if data:
        assert data[:1] == b"E", data
        well_formed(data)


@live
@given(first=st.binary(min_size=1, max_size=200) | mutated(startup_buffers))
def test_random_first_bytes(healthy, first):
    s = socket.create_connection(("127.0.0.1", healthy.port))
    try:
        s.sendall(first)
        s.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    try:
        data = drain_to_eof(s)
        while data[:1] == b"N":
            data = data[1:]
        well_formed(data)
    except Exception:
        save_crash("session_startup", first)
        raise
    finally:
        s.close()


def test_huge_bind_parameter_passes_through(healthy):
    """A 48 MiB Bind arrives in hundreds of reads: pgfront reassembles it in linear time."""
    blob = os.urandom(48 << 20)
    with psycopg.connect(healthy.conninfo()) as conn:
        assert conn.execute("SELECT length(%b), md5(%b)", [blob, blob]).fetchone() == (
            len(blob), hashlib.md5(blob).hexdigest())


def test_slow_loris_does_not_starve_normal_clients(healthy):
    """300 connections trickle a startup packet a byte per 100 ms: each is dropped by startup_timeout
    while a normal client connects and runs 200 queries."""
    packet = pq.startup_message({"user": "postgres", "database": "postgres", "application_name": "slow-loris"})

    async def loris() -> tuple[bytes, int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", healthy.port)
        sent = 0
        reply = asyncio.ensure_future(reader.read())  # until EOF
        try:
            for byte in packet:
                if reply.done():
                    break
                writer.write(bytes([byte]))
                sent += 1
                await asyncio.sleep(0.1)
            return await asyncio.wait_for(reply, 10), sent
        except ConnectionError:
            return b"", sent
        finally:
            writer.close()

    async def normal() -> int:
        await asyncio.sleep(0.3)  # the crowd is in place
        conn = await psycopg.AsyncConnection.connect(healthy.conninfo(), autocommit=True)
        done = 0
        async with conn:
            for i in range(200):
                cur = await conn.execute("SELECT %s::int + 1", [i])
                assert await cur.fetchone() == (i + 1,)
                done += 1
        return done

    async def main():
        return await asyncio.gather(normal(), *[loris() for _ in range(300)])

    done, *lorises = asyncio.run(main())
    assert done == 200
    for reply, sent in lorises:
        assert sent < len(packet)  # dropped before finishing
        assert reply == b"" or (reply[:1] == b"E" and b"08006" in reply), reply


# --- the corpus ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.bin")), ids=lambda p: p.name)
def test_corpus(request, path):
    target = path.name.split("--")[0]
    data = path.read_bytes()
    if target in PARSERS:
        parse_only_malformed(target, data)
    elif target == "framer":
        for size in (64, 1 << 20):
            check_framer(data, [data], size, b"d")
            check_framer(data, [data[i:i + 1] for i in range(len(data))], size, b"Dd")
    elif target == "startup":
        check_read_startup(data)
    elif target in ("session", "session_startup"):
        front = request.getfixturevalue("healthy")
        c = RawConn(front.port)
        if target == "session":
            c.startup()
        try:
            c.sock.sendall(data)
            c.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reply = c.buf + drain_to_eof(c.sock)
        c.sock.close()
        well_formed(reply[1:] if reply[:1] == b"N" else reply)
    else:
        raise AssertionError(f"unknown corpus target {target!r}")
