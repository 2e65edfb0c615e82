"""Wire-protocol edge cases (shared/PROTOCOL-NOTES.md), each run both directly against Postgres and
through pgfront: the replies must be the same message for message."""

from __future__ import annotations

import struct
import time

import pytest

from proxy.wire import protocol as pq
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
    types,
)

P = pq.parse_message
S = pq.SYNC
H = pq.FLUSH
Q = pq.query


@pytest.fixture(scope="module")
def table(pg):
    pg.psql("CREATE TABLE IF NOT EXISTS edge (id int primary key, v text)")
    yield "edge"


def both(pg, proxy, fn):
    """Run fn(conn) against Postgres and through pgfront; return both transcripts."""
    out = []
    for port in (pg.port, proxy.port):
        c = RawConn(port)
        c.startup()
        try:
            out.append(fn(c))
        finally:
            c.close()
    return out


def same(pg, proxy, fn):
    direct, proxied = both(pg, proxy, fn)
    assert proxied == direct
    return proxied


def test_error_in_pipeline_skips_to_sync(pg, proxy, table):
    def run(c):
        c.send(Q("TRUNCATE edge"))
        c.read_until()
        c.send(P("", "INSERT INTO edge VALUES (1, 'a')"), bind(), execute(),
               P("", "SELEC broken"), bind(), execute(),
               P("", "INSERT INTO edge VALUES (2, 'b')"), bind(), execute(), S)
        msgs = c.read_until()
        c.send(Q("SELECT count(*) FROM edge"))
        count = [b for t, b in c.read_until() if t == b"D"]
        return types(msgs), count, c.expect_nothing(0.2)

    t, count, extra = same(pg, proxy, run)
    assert t == "12CEZ"  # one ErrorResponse, one ReadyForQuery
    assert count == [b"\x00\x01\x00\x00\x00\x010"]  # the first insert was rolled back
    assert extra == b""


def test_errors_are_sent_at_once_without_sync(pg, proxy):
    def run(c):
        c.send(P("s_err", "SELECT $1::int"), H)
        first = types([c.read_msg()])
        t0 = time.monotonic()
        c.send(bind("", "s_err", [b"not-an-int"]), execute(), H)
        t, body = c.read_msg(timeout=2)
        waited = time.monotonic() - t0
        c.send(S)
        rest = types(c.read_until())
        return first, t, error_code(body), rest, waited < 1.0

    assert same(pg, proxy, run) == ("1", b"E", "22P02", "Z", True)


def test_flush_is_forwarded(pg, proxy):
    def run(c):
        c.send(P("", "SELECT 1 AS x"), describe(b"S"), H)
        got = [c.read_msg(2)[0] for _ in range(3)]
        nothing = c.expect_nothing(0.3)
        c.send(S)
        return got, nothing, types(c.read_until())

    got, nothing, rest = same(pg, proxy, run)
    assert got == [b"1", b"t", b"T"] and nothing == b"" and rest == "Z"


def test_several_unnamed_statements_in_one_batch(pg, proxy):
    def run(c):
        c.send(P("", "CREATE TEMP TABLE tmp_u (a int)"), bind(), execute(),
               P("", "INSERT INTO tmp_u VALUES (7)"), bind(), execute(),
               P("", "SELECT a FROM tmp_u"), bind(), execute(), S)
        return [(t, b) for t, b in c.read_until()]

    msgs = same(pg, proxy, run)
    assert types(msgs) == "12C12C12DCZ"


def test_named_statements_and_standalone_describe(pg, proxy):
    def run(c):
        c.send(P("S_1", "SELECT $1::int + 1 AS n"), S)
        a = types(c.read_until())
        c.send(describe(b"S", "S_1"), S)
        b = c.read_until()
        c.send(bind("p1", "S_1", [b"41"]), describe(b"P", "p1"), execute("p1"), S)
        d = c.read_until()
        c.send(close(b"S", "S_1"), S, describe(b"S", "S_1"), S)
        e = c.read_until()
        e += c.read_until()
        return a, b, d, [(t, error_code(x) if t == b"E" else x) for t, x in e]

    a, b, d, e = same(pg, proxy, run)
    assert a == "1Z" and types(b) == "tTZ" and types(d) == "2TDCZ"
    assert [t for t, _ in e] == [b"3", b"Z", b"E", b"Z"] and e[2][1] == "26000"


def test_describe_shapes_with_begin(pg, proxy):
    def run(c):
        c.send(P("", "BEGIN"), describe(b"S"), bind(), describe(b"P"), execute(), S)
        m1 = c.read_until()
        c.send(P("", "SELECT 1"), describe(b"S"), S, Q("ROLLBACK"))
        m2 = c.read_until()
        m3 = c.read_until()
        return types(m1), m1[-1][1], types(m2), types(m3)

    assert same(pg, proxy, run) == ("1tn2nCZ", b"T", "1tTZ", "CZ")


def test_one_ready_for_query_per_sync(pg, proxy):
    def run(c):
        c.send(S, S, P("", "SELECT 1"), bind(), execute(), S, S)
        return types(c.read_until() + c.read_until() + c.read_until() + c.read_until()), c.expect_nothing(0.2)

    assert same(pg, proxy, run) == ("ZZ12DCZZ", b"")


def test_portal_suspended_and_row_limits(pg, proxy):
    def run(c):
        c.send(Q("BEGIN"))
        c.read_until()
        c.send(P("", "SELECT g FROM generate_series(1, 5) g"), bind("cur"), execute("cur", 2), execute("cur", 2),
               execute("cur", 2), S)
        m = types(c.read_until())
        c.send(Q("COMMIT"))
        c.read_until()
        return m

    assert same(pg, proxy, run) == "12DDsDDsDCZ"


def test_binary_formats(pg, proxy):
    def run(c):
        c.send(P("", "SELECT $1::int4 AS a, 'x'::text AS b"),
               pq.build_bind("", "", [1], [struct.pack("!i", 42)], [1, 0]), execute(), S)
        return c.read_until()

    msgs = same(pg, proxy, run)
    row = [b for t, b in msgs if t == b"D"][0]
    assert row == b"\x00\x02" + struct.pack("!i", 4) + struct.pack("!i", 42) + struct.pack("!i", 1) + b"x"


def test_multi_statement_simple_query(pg, proxy):
    def run(c):
        c.send(Q("SELECT 1; SELECT 2"))
        a = types(c.read_until())
        c.send(Q("SELECT 1; SELECT 1/0; SELECT 3"))
        b = c.read_until()
        return a, types(b), [error_code(x) for t, x in b if t == b"E"]

    assert same(pg, proxy, run) == ("TDCTDCZ", "TDCEZ", ["22012"])


def test_empty_queries(pg, proxy):
    def run(c):
        c.send(Q(""))
        a = types(c.read_until())
        c.send(Q(";"))
        b = types(c.read_until())
        c.send(P("", ""), describe(b"S"), bind(), execute(), S)
        d = types(c.read_until())
        return a, b, d

    assert same(pg, proxy, run) == ("IZ", "IZ", "1tn2IZ")


def test_parameter_status_and_notice_and_notifications(pg, proxy):
    def run(c):
        c.send(Q("SET application_name = 'x1'; SET DateStyle = 'German'; SET TimeZone = 'UTC'"))
        m = c.read_until()
        statuses = sorted(pq.parse_parameter_status(b)[0] for t, b in m if t == b"S")
        c.send(Q("DO $$ BEGIN RAISE NOTICE 'hello'; END $$"))
        n = types(c.read_until())
        c.send(Q("LISTEN chan1; NOTIFY chan1, 'payload'"))
        a = types(c.read_until())
        return statuses, n, a

    statuses, n, a = same(pg, proxy, run)
    assert statuses == ["DateStyle", "TimeZone", "application_name"]
    assert n == "NCZ" and "A" in a


def test_notification_while_idle(pg, proxy):
    c = RawConn(proxy.port)
    c.startup()
    c.send(Q("LISTEN idle_chan"))
    c.read_until()
    other = RawConn(proxy.port)
    other.startup()
    other.send(Q("NOTIFY idle_chan, 'wake'"))
    other.read_until()
    t, body = c.read_msg(timeout=5)
    assert t == b"A" and b"idle_chan" in body and b"wake" in body
    c.close()
    other.close()


def test_copy_extended_sync_before_copydone(pg, proxy, table):
    def run(c):
        c.send(Q("TRUNCATE edge"))
        c.read_until()
        c.send(P("", "COPY edge FROM STDIN"), bind(), execute(), S)
        first = types([c.read_msg(), c.read_msg()])
        c.send(copy_data(b"10\tx\n11\ty\n"), COPY_DONE, S)
        rest = types(c.read_until())
        c.send(Q("SELECT count(*) FROM edge"))
        cnt = [b for t, b in c.read_until() if t == b"D"]
        return first, rest, cnt, c.expect_nothing(0.2)

    assert same(pg, proxy, run) == ("12", "GCZ", [b"\x00\x01\x00\x00\x00\x012"], b"")


def test_copy_fail_extended_and_simple(pg, proxy, table):
    def run(c):
        c.send(P("", "COPY edge FROM STDIN"), bind(), execute(), S)
        c.read_msg(), c.read_msg(), c.read_msg()
        c.send(copy_data(b"20\tz\n"), copy_fail("client gave up"), S)
        a = c.read_until()
        c.send(Q("COPY edge FROM STDIN"))
        c.read_msg()
        c.send(copy_data(b"bad row\n"), COPY_DONE)
        b = c.read_until()
        c.send(Q("SELECT 1"))
        return (types(a), [error_code(x) for t, x in a if t == b"E"], types(b),
                [error_code(x) for t, x in b if t == b"E"], types(c.read_until()))

    assert same(pg, proxy, run) == ("EZ", ["57014"], "EZ", ["22P02"], "TDCZ")


def test_function_call_is_relayed(pg, proxy):
    def run(c):
        c.send(Q("SELECT 'int4abs'::regproc::oid"))
        oid = int([b for t, b in c.read_until() if t == b"D"][0][6:])
        body = struct.pack("!I", oid) + struct.pack("!hh", 1, 1) + struct.pack("!h", 1) + struct.pack("!i", 4) \
            + struct.pack("!i", -5) + struct.pack("!h", 1)
        c.send(pq.msg(b"F", body))
        return c.read_until()

    msgs = same(pg, proxy, run)
    assert types(msgs) == "VZ" and msgs[0][1].endswith(struct.pack("!i", 5))


def test_unknown_message_type_is_an_error(proxy):
    c = RawConn(proxy.port)
    c.startup()
    c.send(pq.msg(b"?", b"junk"))
    t, body = c.read_msg()
    assert t == b"E" and error_code(body) == "08P01"
    with pytest.raises(ConnectionError):
        c.read_msg(timeout=3)


def test_ssl_and_gssenc_requests_are_refused_with_n(proxy):
    import socket

    for code in (pq.SSL_REQUEST, pq.GSSENC_REQUEST):
        s = socket.create_connection(("127.0.0.1", proxy.port))
        s.sendall(struct.pack("!ii", 8, code))
        assert s.recv(1) == b"N"
        s.close()


def test_bytes_after_ssl_request_are_rejected(proxy):
    import socket

    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.sendall(struct.pack("!ii", 8, pq.SSL_REQUEST) + pq.startup_message({"user": "postgres"}))
    data = s.recv(1000)
    assert data[:1] == b"E" and b"08P01" in data
    s.close()


def test_newer_protocol_minor_is_negotiated(proxy):
    c = RawConn(proxy.port)
    msgs = c.startup(version=(3 << 16) | 2, **{"_pq_.grease": "1"})
    assert msgs[0][0] == b"v"
    newest, n = struct.unpack_from("!ii", msgs[0][1])
    assert newest == 0 and n == 1 and b"_pq_.grease" in msgs[0][1]
    assert msgs[-1][0] == b"Z"
    c.send(Q("SELECT 1"))
    assert types(c.read_until()) == "TDCZ"
    c.close()


def test_unsupported_major_protocol(proxy):
    c = RawConn(proxy.port)
    c.sock.sendall(pq.startup_message({"user": "postgres"}, version=(2 << 16)))
    t, body = c.read_msg()
    assert t == b"E" and error_code(body) == "0A000"


def test_garbage_startup_packet_closes(proxy):
    import socket

    s = socket.create_connection(("127.0.0.1", proxy.port))
    s.sendall(b"\xff\xff\xff\xff garbage")
    data = s.recv(1000)
    assert data[:1] == b"E" and b"08P01" in data


def test_startup_options_reach_the_server(pg, proxy):
    pg.psql("CREATE SCHEMA IF NOT EXISTS optschema")
    c = RawConn(proxy.port)
    c.startup(options="-c search_path=optschema")
    c.send(Q("SHOW search_path"))
    rows = [b for t, b in c.read_until() if t == b"D"]
    assert rows and rows[0].endswith(b"optschema")
    c.close()


def test_huge_result_is_streamed(pg, proxy):
    c = RawConn(proxy.port)
    c.startup()
    c.send(Q("SELECT repeat('x', 200000000)"))
    # read the DataRow header, then stream the rest without keeping it
    total = 0
    sock = c.sock
    sock.settimeout(60)
    data = c.buf
    while True:
        chunk = sock.recv(1 << 20)
        assert chunk
        data += chunk
        total += len(chunk)
        if data[-6:] == b"Z\x00\x00\x00\x05I":
            break
        data = data[-16:]
    assert total > 200_000_000
    c.close()
