"""Mirroring (proxy.shadow.runner, proxy.shadow.mirror) against the real test PostgreSQL: a primary and a
shadow database, the shadow's copy of the data made different on purpose in one row.

The relay's side is not involved here: each statement runs on the primary database through a
ShadowRunner too, so the primary's digest comes from real rows, and the Observed record is built from
that result, as the relay would build it after forwarding the reply.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy import admin, config
from proxy import stats as st
from proxy.app import App
from proxy.devdb import free_port
from proxy.metrics import render, start_metrics_server
from proxy.shadow.digest import RowDigest
from proxy.shadow.mirror import MirrorReport, Mirrors, MirrorTarget, merged_for
from proxy.shadow.observe import Observed, ObservedSinks
from proxy.shadow.runner import ShadowResult, ShadowRunner, data_row_body
from proxy.sql import analyze
from proxy.upstream import parse_upstream
from proxy.wire import protocol as pq
from tests.wire_client import RawConn

PRIMARY, SHADOW = "mirror_primary", "mirror_shadow"

COMMON = """
CREATE TABLE items (id int PRIMARY KEY, name text, price numeric, data bytea, note text);
INSERT INTO items SELECT g, 'item ' || g, g * 1.5, int4send(g), CASE WHEN g % 2 = 0 THEN NULL ELSE '' END
  FROM generate_series(1, 50) g;
CREATE TABLE log (id serial PRIMARY KEY, n int, s text, b bytea);
"""
# the primary answers at once; the shadow sleeps in the same functions
PRIMARY_ONLY = """
CREATE TABLE only_primary (x int);
CREATE FUNCTION slow_lookup(i int) RETURNS text LANGUAGE sql AS $$ SELECT name FROM items WHERE id = i $$;
CREATE FUNCTION sleepy(s float) RETURNS int LANGUAGE sql AS $$ SELECT 1 $$;
"""
SHADOW_ONLY = """
UPDATE items SET name = 'changed on the shadow' WHERE id = 7;
INSERT INTO items VALUES (51, 'only on the shadow', 0, NULL, NULL);
CREATE FUNCTION slow_lookup(i int) RETURNS text LANGUAGE plpgsql AS
  $$ BEGIN PERFORM pg_sleep(0.25); RETURN (SELECT name FROM items WHERE id = i); END $$;
CREATE FUNCTION sleepy(s float) RETURNS int LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(s); RETURN 1; END $$;
"""
SELECT_ALL_KINDS = ("SELECT id, name, price, data, note, NULL::int AS nothing, ''::text AS empty, ARRAY[id, id + 1] AS arr "
                    "FROM items WHERE id <= $1")


@pytest.fixture(scope="module")
def dbs(pg):
    pg.fresh_database(PRIMARY, COMMON + PRIMARY_ONLY)
    pg.fresh_database(SHADOW, COMMON + SHADOW_ONLY)
    return pg.dsn(dbname=PRIMARY), pg.dsn(dbname=SHADOW)


def int4(n: int) -> bytes:
    return struct.pack("!i", n)


def observed(res: ShadowResult, sql: str, params: Sequence[bytes | None] | None = None, *,
             param_formats: Sequence[int] = (), param_types: Sequence[int] = (),
             result_formats: Sequence[int] = (), targets: tuple[str, ...] = ("shadow",), session: int = 1) -> Observed:
    """The record the relay would make of this statement, given the primary's result."""
    info = analyze(sql)
    return Observed(session=session, database=PRIMARY, user="postgres", application_name="test",
                    fingerprint=info.fingerprint, normalized=info.normalized, kind=info.kind,
                    write=info.kind in ("insert", "update", "delete", "merge", "ddl"), sql=sql,
                    params=list(params) if params is not None else None, param_formats=list(param_formats),
                    param_types=list(param_types), result_formats=list(result_formats), started=time.time(),
                    seconds=res.seconds, rows=res.rows, sqlstate=res.sqlstate, digest=res.digest, targets=targets)


async def on_primary(runner: ShadowRunner, sql: str, params: Sequence[bytes | None] | None = None,
                     **kw: object) -> Observed:
    targets, session = kw.pop("targets", ("shadow",)), kw.pop("session", 1)
    res = await runner.execute(sql, params, **kw)  # type: ignore[arg-type]
    return observed(res, sql, params, targets=targets, session=session, **kw)  # type: ignore[arg-type]


def wire_result(port: int, messages: list[bytes], **startup: str) -> tuple[str, int]:
    """Send messages on a raw connection to the primary database: (digest of the DataRow bodies as the
    relay computes it, rows summed over the CommandComplete tags)."""
    conn = RawConn(port)
    try:
        conn.startup(database=PRIMARY, **startup)
        conn.send(*messages)
        digest, rows = RowDigest(), 0
        for kind, body in conn.read_until(b"Z"):
            assert kind != b"E", pq.parse_fields(body)
            if kind == b"D":
                digest.add(body)
            elif kind == b"C":
                rows += pq.rows_from_tag(body[:-1])
        return digest.value(), rows
    finally:
        conn.close()


def extended(sql: str, params: list[bytes | None], pformats: list[int], oids: list[int],
             rformats: list[int]) -> list[bytes]:
    return [pq.parse_message("", sql, oids), pq.build_bind("", "", pformats, params, rformats),
            pq.msg(b"E", pq.cstr("") + struct.pack("!i", 0)), pq.SYNC]


# -- the runner's digest is the relay's --------------------------------------------------------------
def test_data_row_body_by_hand() -> None:
    assert data_row_body([b"a", None, b""]) == (b"\x00\x03" + b"\x00\x00\x00\x01a" + b"\xff\xff\xff\xff"
                                                 + b"\x00\x00\x00\x00")
    assert data_row_body([]) == b"\x00\x00"
    one, other = RowDigest(), RowDigest()
    one.add(data_row_body([None]))
    other.add(data_row_body([b""]))
    assert one.value() != other.value()  # NULL and the empty string are different rows


@pytest.mark.parametrize(("params", "pformats", "oids", "rformats"), [
    ([b"9"], [], [], []),  # text in, text out
    ([int4(9)], [1], [23], [1]),  # binary in, binary out (one format for all columns)
    ([int4(9)], [1], [23], [1] * 8),  # one format per column, all binary
    ([b"9"], [0], [0], [0] * 8),  # one per column, all text, OID left to the server
])
def test_runner_digest_equals_wire_datarows(pg, dbs, params, pformats, oids, rformats) -> None:
    expected, rows = wire_result(pg.port, extended(SELECT_ALL_KINDS, params, pformats, oids, rformats))
    assert rows == 9

    async def main() -> ShadowResult:
        runner = ShadowRunner(dbs[0], chunk_rows=4)  # several chunks per result
        try:
            return await runner.execute(SELECT_ALL_KINDS, params, pformats, oids, rformats)
        finally:
            await runner.close()

    res = asyncio.run(main())
    assert (res.digest, res.rows, res.sqlstate) == (expected, 9, None)


def test_mixed_result_formats_compare_counts_only(pg, dbs) -> None:
    rformats = [0, 1, 0, 1, 0, 0, 0, 1]
    _, rows = wire_result(pg.port, extended(SELECT_ALL_KINDS, [b"5"], [], [], rformats))

    async def main() -> ShadowResult:
        runner = ShadowRunner(dbs[0])
        try:
            return await runner.execute(SELECT_ALL_KINDS, [b"5"], result_formats=rformats)
        finally:
            await runner.close()

    res = asyncio.run(main())
    assert res.digest == "5:-" and res.rows == rows == 5


def test_simple_query_digests_every_statement(pg, dbs) -> None:
    sql = ("SELECT id, note FROM items WHERE id > 45; SELECT 1 WHERE false; UPDATE log SET n = n WHERE false; "
           "SELECT name, data FROM items WHERE id < 4")
    expected, rows = wire_result(pg.port, [pq.query(sql)])

    async def main() -> tuple[ShadowResult, ShadowResult, ShadowResult]:
        runner = ShadowRunner(dbs[0], chunk_rows=2)
        try:
            forward = await runner.execute("SELECT id, name FROM items ORDER BY id")
            backward = await runner.execute("SELECT id, name FROM items ORDER BY id DESC")
            return await runner.execute(sql), forward, backward
        finally:
            await runner.close()

    res, forward, backward = asyncio.run(main())
    assert (res.digest, res.rows) == (expected, rows) and rows == 5 + 0 + 0 + 3
    assert forward.digest == backward.digest and forward.rows == 50  # the same rows in any order


def test_session_settings_shape_the_digest(pg, dbs) -> None:
    """Equal values print differently under another TimeZone: the runner takes the client's settings."""
    sql = "SELECT '2024-01-01 00:00:00+00'::timestamptz, now() > '2000-01-01'"
    tokyo, _ = wire_result(pg.port, [pq.query(sql)], TimeZone="Asia/Tokyo")
    utc, _ = wire_result(pg.port, [pq.query(sql)], TimeZone="UTC")
    assert tokyo != utc

    async def main() -> list[ShadowResult]:
        runner = ShadowRunner(dbs[0])
        try:
            return [await runner.execute(sql, settings={"TimeZone": "Asia/Tokyo"}),
                    await runner.execute(sql, settings={"TimeZone": "UTC", "no_such_setting": "1"}),
                    await runner.execute(sql, settings={"TimeZone": "UTC", "no_such_setting": "1"})]
        finally:
            await runner.close()

    first, second, third = asyncio.run(main())
    assert (first.digest, second.digest, third.digest) == (tokyo, utc, utc)


def test_runner_errors_and_transactions(dbs) -> None:
    async def main() -> list[ShadowResult]:
        runner = ShadowRunner(dbs[0])
        try:
            return [await runner.execute("SELECT 1/0"),
                    await runner.execute("SELECT * FROM no_such_table WHERE x = $1", [b"1"]),
                    await runner.execute("BEGIN"),  # left open: rolled back after it
                    await runner.execute("SELECT count(*) FROM items"),
                    await runner.execute("BEGIN; SELECT 1/0"),  # ends in a failed transaction block
                    await runner.execute("SELECT 42")]
        finally:
            await runner.close()

    zero, missing, begin, count, failed, after = asyncio.run(main())
    assert zero.sqlstate == "22012" and "division by zero" in zero.message
    assert missing.sqlstate == "42P01"
    assert begin.sqlstate is None and count.sqlstate is None and count.rows == 1
    assert failed.sqlstate == "22012" and after.sqlstate is None and after.digest.startswith("1:")


def test_runner_reconnects_after_the_shadow_drops_it(pg, dbs) -> None:
    async def main() -> tuple[ShadowResult, ShadowResult, ShadowResult]:
        runner = ShadowRunner(dbs[0])
        try:
            first = await runner.execute("SELECT 1")
            assert runner.conn is not None
            pid = runner.conn.info.backend_pid
            async with await psycopg.AsyncConnection.connect(pg.dsn(), autocommit=True) as killer:
                await killer.execute("SELECT pg_terminate_backend(%s)", [pid])
            lost = await runner.execute("SELECT 1")
            again = await runner.execute("SELECT 1")
            return first, lost, again
        finally:
            await runner.close()

    first, lost, again = asyncio.run(main())
    assert first.sqlstate is None
    assert lost.sqlstate in ("08006", "57P01")  # the connection closed under it (or the FATAL read first)
    assert again.sqlstate is None and again.rows == 1


# -- mirroring ---------------------------------------------------------------------------------------
def run_mirrored(dbs: tuple[str, str], statements: list[tuple[str, list[bytes | None] | None, dict]],
                 target: MirrorTarget | None = None, drain: float = 30.0) -> Mirrors:
    """Run each statement on the primary, offer it to a Mirrors with one target, wait for the shadow."""

    async def main() -> Mirrors:
        mirrors = Mirrors([target or MirrorTarget("shadow", dbs[1])])
        await mirrors.start()
        primary = ShadowRunner(dbs[0])
        try:
            for sql, params, kw in statements:
                mirrors.offer(await on_primary(primary, sql, params, **kw))
            assert await mirrors.drain(drain)
        finally:
            await primary.close()
            await mirrors.close()
        return mirrors

    return asyncio.run(main())


def counters(mirrors: Mirrors, name: str = "shadow") -> dict:
    return mirrors.report().targets[name]


def by_query(mirrors: Mirrors) -> dict[str, dict]:
    return {row["query"]: row for row in mirrors.report().rows()}


def test_parameters_arrive_at_the_shadow(pg, dbs) -> None:
    pg.psql("TRUNCATE log", dbname=SHADOW)
    sql = "INSERT INTO log (n, s, b) VALUES ($1, $2, $3)"
    mirrors = run_mirrored(dbs, [
        (sql, [int4(42), "héllo".encode(), None], {"param_formats": [1, 0, 0], "param_types": [23, 25, 17]}),
        (sql, [b"-7", b"", b"\x00\x01\xff"], {"param_formats": [0, 0, 1], "param_types": [23]}),
        (sql, [b"1", b"one for all", b"\\x0a0b"], {"param_formats": [0]}),
    ])
    assert pg.psql("SELECT n, s, coalesce(encode(b, 'hex'), 'NULL') FROM log ORDER BY id", dbname=SHADOW).split(
        "\n")[:3] == ["42|héllo|NULL", "-7||0001ff", "1|one for all|0a0b"]
    row = by_query(mirrors)[sql]
    assert (row["compared"], row["mismatches"], row["errors"]) == (3, 0, 0)
    assert counters(mirrors)["sent"] == 3


def test_a_different_row_is_a_mismatch(dbs, caplog) -> None:
    caplog.set_level(logging.INFO, logger="proxy.shadow.mirror")
    point = "SELECT id, name FROM items WHERE id = $1"
    above = "SELECT id FROM items WHERE id > $1"
    statements = [(point, [str(i).encode()], {}) for i in range(1, 11)]
    statements += [(point, [int4(7)], {"param_formats": [1], "param_types": [23], "result_formats": [1]})]
    statements += [(above, [b"45"], {}), (above, [b"40"], {}),
                   ("SELECT id, name FROM items WHERE id <= 5 ORDER BY random()", None, {}),
                   ("SELECT 1/0", None, {})]
    mirrors = run_mirrored(dbs, statements)
    rows = by_query(mirrors)

    point_row = rows[analyze(point).normalized]
    assert (point_row["compared"], point_row["mismatches"], point_row["errors"]) == (11, 2, 0)
    example = point_row["example"]
    assert example["sql"] == point and example["params"] == ["7"]  # the first mismatch, text parameter as text
    assert example["primary"]["rows"] == example["shadow"]["rows"] == 1
    assert example["primary"]["digest"] != example["shadow"]["digest"]

    above_row = rows[analyze(above).normalized]
    assert above_row["mismatches"] == 2  # the shadow's extra row: counts differ
    assert above_row["example"]["primary"]["rows"] == 5 and above_row["example"]["shadow"]["rows"] == 6

    shuffled = next(r for q, r in rows.items() if "random()" in q)
    assert (shuffled["compared"], shuffled["mismatches"]) == (1, 0)  # same rows in another order
    failing = rows[analyze("SELECT 1/0").normalized]
    assert (failing["compared"], failing["mismatches"], failing["errors"]) == (1, 0, 0)  # same error both sides

    c = counters(mirrors)
    assert (c["sent"], c["compared"], c["mismatched"], c["errors"], c["dropped"]) == (15, 15, 4, 0, 0)
    for row in rows.values():  # both sides' latencies, over the statements compared
        assert row["primary_p95_ms"] > 0 and row["shadow_p95_ms"] > 0
    logged = [r for r in caplog.records if "differs" in r.getMessage()]
    assert len(logged) == 2  # once per fingerprint
    assert {r.fingerprint for r in logged} == {analyze(point).fingerprint, analyze(above).fingerprint}


def test_binary_parameters_show_as_hex(dbs) -> None:
    sql = "SELECT id, name FROM items WHERE id = $1"
    mirrors = run_mirrored(dbs, [(sql, [int4(7)], {"param_formats": [1], "param_types": [23]})])
    assert by_query(mirrors)[sql]["example"]["params"] == ["\\x00000007"]


def test_shadow_errors_are_counted_not_mismatched(dbs) -> None:
    sql = "SELECT * FROM only_primary"
    mirrors = run_mirrored(dbs, [(sql, None, {})] * 3)
    row = by_query(mirrors)[sql]
    assert (row["compared"], row["mismatches"], row["errors"]) == (0, 0, 3)
    assert row["last_error"].startswith("42P01: relation \"only_primary\" does not exist")
    c = counters(mirrors)
    assert (c["sent"], c["errors"], c["mismatched"]) == (3, 3, 0)
    assert c["last_error"].startswith("42P01")


def test_slow_statement_is_cancelled_and_the_connection_kept(dbs) -> None:
    target = MirrorTarget("shadow", dbs[1], connections=1, timeout=0.3)
    t0 = time.perf_counter()
    mirrors = run_mirrored(dbs, [("SELECT sleepy($1)", [b"5"], {}), ("SELECT count(*) FROM items", None, {})],
                           target)
    assert time.perf_counter() - t0 < 3  # cancelled after 0.3 s, not after 5
    rows = by_query(mirrors)
    assert rows["SELECT sleepy($1)"]["errors"] == 1
    assert rows["SELECT sleepy($1)"]["last_error"].startswith("57014")
    count = rows[analyze("SELECT count(*) FROM items").normalized]
    assert (count["compared"], count["mismatches"]) == (1, 1)  # 50 rows here, 51 there: answered, compared


def test_offer_never_waits_for_a_slow_shadow(dbs) -> None:
    sql = "SELECT slow_lookup($1)"
    target = MirrorTarget("shadow", dbs[1], queue_size=10, connections=2)

    async def main() -> tuple[Mirrors, list[float]]:
        mirrors = Mirrors([target])
        await mirrors.start()
        primary = ShadowRunner(dbs[0])
        try:
            obs = [await on_primary(primary, sql, [str(i % 50 + 1).encode()], session=i) for i in range(200)]
            costs = []
            for i, o in enumerate(obs):
                t0 = time.perf_counter()
                mirrors.offer(o)
                costs.append(time.perf_counter() - t0)
                if i % 20 == 0:
                    await asyncio.sleep(0.01)  # let the workers take some
            assert await mirrors.drain(30)
        finally:
            await primary.close()
            await mirrors.close()
        return mirrors, costs

    mirrors, costs = asyncio.run(main())
    c = counters(mirrors)
    assert max(costs) < 0.002, f"offer() took {max(costs) * 1e3:.3f} ms"
    assert c["dropped"] >= 150 and c["sent"] + c["dropped"] == 200 and c["queued"] == 0
    row = by_query(mirrors)[sql]
    assert row["compared"] == c["sent"] and row["mismatches"] <= 1  # id 7 differs on the shadow
    assert row["shadow_p50_ms"] >= 240 and row["primary_p95_ms"] < 100


def test_a_shadow_that_is_down(dbs) -> None:
    target = MirrorTarget("shadow", f"postgresql://postgres@127.0.0.1:{free_port()}/nothing", queue_size=50,
                          timeout=1.0)

    async def main() -> tuple[Mirrors, list[float], float]:
        mirrors = Mirrors([target])
        await mirrors.start()
        primary = ShadowRunner(dbs[0])
        o = await on_primary(primary, "SELECT 1", None)
        await primary.close()
        costs = []
        for i in range(2000):
            t0 = time.perf_counter()
            mirrors.offer(o)
            costs.append(time.perf_counter() - t0)
            if i % 100 == 0:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        t0 = time.perf_counter()
        await mirrors.close()  # does not wait out the reconnection backoff
        return mirrors, costs, time.perf_counter() - t0

    mirrors, costs, closing = asyncio.run(main())
    c = counters(mirrors)
    assert max(costs) < 0.002 and closing < 2
    assert c["sent"] == 0 and c["errors"] >= 2 and c["dropped"] > 1500
    assert c["errors"] + c["dropped"] == 2000  # every statement accounted for
    assert "08001" in by_query(mirrors)[analyze("SELECT 1").normalized]["last_error"] and c["connected"] == 0


def test_statements_for_other_targets_are_left_alone(dbs) -> None:
    mirrors = run_mirrored(dbs, [("SELECT 1", None, {"targets": ("elsewhere",)}),
                                 ("SELECT 2", None, {"targets": ()}),
                                 ("SELECT 3", None, {"targets": ("elsewhere", "shadow")}),
                                 ("SELECT 4", None, {"targets": ("shadow", "shadow")})])  # two rules, one target
    assert counters(mirrors)["sent"] == 2 and mirrors.unknown == {"elsewhere": 2}


def test_admit_tells_the_relay_before_it_observes(dbs) -> None:
    async def main() -> tuple[list[bool], dict]:
        mirrors = Mirrors([MirrorTarget("shadow", dbs[1], queue_size=4, connections=2)])  # 2 per connection
        o = observed(ShadowResult(rows=1, digest="1:00"), "SELECT 1", session=3)
        answers = [mirrors.admit("shadow", 3)]
        mirrors.offer(o)
        mirrors.offer(o)
        answers += [mirrors.admit("shadow", 3), mirrors.admit("shadow", 4), mirrors.admit("elsewhere", 3)]
        await mirrors.close()
        answers.append(mirrors.admit("shadow", 4))
        return answers, counters(mirrors)

    answers, c = asyncio.run(main())
    assert answers == [True, False, True, True, False]
    assert c["dropped"] == 1 + 1 + 2  # refused twice, and the two queued when it closed


# -- clients do not feel the shadow ------------------------------------------------------------------
def p95(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[int(0.95 * (len(ordered) - 1))]


@pytest.mark.parametrize("shadow", ["slow", "down", "errors"])
def test_client_latency_side_by_side(dbs, shadow) -> None:
    """A client on the same event loop as the mirror (as on a worker): its p95 latency with every
    statement mirrored (share 1.0) next to its p95 without mirroring, in alternating blocks."""
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/x" if shadow == "down" else dbs[1]
    # sleepy() answers at once on the primary and sleeps 20 ms on the shadow: the shadow keeps up with
    # a hundredth of the client's pace, so its queue stays full and drops all along
    sql, param = {"slow": ("SELECT sleepy($1)", lambda i: "0.02"),
                  "down": ("SELECT name FROM items WHERE id = $1", lambda i: str(i % 50 + 1)),
                  "errors": ("SELECT x FROM only_primary WHERE x = $1", lambda i: str(i))}[shadow]
    client_sql = sql.replace("$1", "%s")
    info = analyze(sql)

    async def main() -> tuple[list[float], list[float], dict]:
        mirrors = Mirrors([MirrorTarget("shadow", url, queue_size=20, connections=2)])
        await mirrors.start()
        off: list[float] = []
        on: list[float] = []
        try:
            async with await psycopg.AsyncConnection.connect(dbs[0], autocommit=True) as client:
                await client.execute(client_sql, [param(0)])  # warm up
                for block in range(10):
                    mirrored = block % 2 == 1
                    for i in range(150):
                        value = param(i)
                        t0 = time.perf_counter()
                        cur = await client.execute(client_sql, [value])
                        await cur.fetchall()
                        seconds = time.perf_counter() - t0
                        (on if mirrored else off).append(seconds)
                        if mirrored:  # after the reply, as the relay does
                            mirrors.offer(Observed(1, PRIMARY, "postgres", "", info.fingerprint, info.normalized,
                                                   info.kind, False, sql, [value.encode()], seconds=seconds,
                                                   rows=cur.rowcount, targets=("shadow",)))
        finally:
            await mirrors.close()
        return off, on, counters(mirrors)

    off, on, c = asyncio.run(main())
    print(f"{shadow}: client p95 {p95(off) * 1e3:.3f} ms without mirroring, {p95(on) * 1e3:.3f} ms with; "
          f"sent {c['sent']}, dropped {c['dropped']}, errors {c['errors']}")
    assert c["sent"] + c["dropped"] + (c["errors"] if shadow == "down" else 0) == 750  # each one accounted for
    assert c["dropped"] > (600 if shadow != "errors" else -1)
    # generous against machine noise; a shadow that held clients up would add 20 ms (slow) or more
    assert p95(on) <= p95(off) * 1.5 + 0.0005


# -- reports across workers, the admin console, /metrics, config ---------------------------------------
def test_workers_merge_through_snapshots(dbs, tmp_path: Path) -> None:
    async def main() -> tuple[dict, dict]:
        workers = [Mirrors([MirrorTarget("shadow", dbs[1])]) for _ in range(2)]
        primary = ShadowRunner(dbs[0])
        try:
            for n, m in enumerate(workers):
                await m.start(str(tmp_path), worker_id=n)
                for i in range(n + 2):
                    m.offer(await on_primary(primary, "SELECT id, name FROM items WHERE id = $1", [b"%d" % (i + 6)]))
                assert await m.drain(10)
            assert workers[1].flush()
            merged = Mirrors.merged(tmp_path, workers[0])  # worker 0's live state, worker 1's file
            # a file left by a dead process is ignored, and removed
            (tmp_path / "mirror-9.json").write_text(
                (tmp_path / "mirror-1.json").read_text().replace(f'"pid":{workers[1].snapshot()["pid"]}',
                                                                 '"pid":999999999'))
            again = Mirrors.merged(tmp_path, workers[0])
            return merged.targets["shadow"], {"rows": merged.rows(), "again": again.targets["shadow"],
                                              "workers": again.workers}
        finally:
            await primary.close()
            for m in workers:
                await m.close()

    target, rest = asyncio.run(main())
    assert target["workers"] == 2 and target["sent"] == 5 and target["compared"] == 5
    assert target["mismatched"] == 2  # id 7, in each worker
    [row] = rest["rows"]
    assert (row["compared"], row["mismatches"]) == (5, 2) and row["example"]["params"] == ["7"]
    assert rest["workers"] == 2 and rest["again"]["sent"] == 5
    assert not (tmp_path / "mirror-9.json").exists()


def parse_results(reply: bytes) -> list[tuple[list[str], list[list[str | None]]]]:
    """The result sets of an admin reply: (columns, rows)."""
    out: list[tuple[list[str], list[list[str | None]]]] = []
    pos = 0
    while pos < len(reply):
        kind, length = reply[pos:pos + 1], struct.unpack_from("!i", reply, pos + 1)[0]
        body = reply[pos + 5:pos + 1 + length]
        pos += 1 + length
        if kind == b"T":
            n, at, cols = struct.unpack_from("!h", body)[0], 2, []
            for _ in range(n):
                name, at = pq.read_cstr(body, at)
                cols.append(name)
                at += 18
            out.append((cols, []))
        elif kind == b"D":
            n, at, values = struct.unpack_from("!h", body)[0], 2, []
            for _ in range(n):
                size = struct.unpack_from("!i", body, at)[0]
                at += 4
                values.append(None if size < 0 else body[at:at + size].decode())
                at += max(size, 0)
            out[-1][1].append(values)
        elif kind == b"E":
            raise AssertionError(pq.parse_fields(body))
    return out


def test_admin_console_and_metrics(dbs, tmp_path: Path) -> None:
    cfg = config.Config({"mirror": {"shadow": {"url": dbs[1].replace("postgres@", "postgres:pw@"),
                                               "queue_size": 20}}})
    app = App(cfg, parse_upstream(dbs[0]))
    app.run_dir = str(tmp_path)

    async def main() -> tuple[bytes, bytes, bytes]:
        empty = await admin.handle(app, "SHOW MIRROR; SHOW MIRRORS")  # no observers at all
        app.observers = ObservedSinks()
        app.observers.mirror = Mirrors.from_config(cfg.mirror_targets)
        await app.observers.mirror.start(app.run_dir, 0)
        primary = ShadowRunner(dbs[0])
        try:
            for i in (6, 7):
                app.observers.offer(await on_primary(primary, "SELECT id, name FROM items WHERE id = $1",
                                                     [b"%d" % i]))
            assert await app.observers.mirror.drain(10)
            port = free_port()
            server = await start_metrics_server("127.0.0.1", port, st.MergedStats, lambda: {},
                                                mirror=lambda: merged_for(app))
            try:
                url = f"http://127.0.0.1:{port}/metrics"
                metrics = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
            finally:
                server.close()
            return empty, await admin.handle(app, "show mirror; show mirrors"), metrics
        finally:
            await primary.close()
            await app.observers.mirror.close()

    empty, reply, metrics = asyncio.run(main())
    assert [rows for _, rows in parse_results(empty)] == [[], []]
    (cols, rows), (tcols, trows) = parse_results(reply)
    assert cols[:6] == ["target", "fingerprint", "query", "compared", "mismatches", "errors"]
    [row] = [dict(zip(cols, r, strict=True)) for r in rows]
    assert (row["target"], row["compared"], row["mismatches"]) == ("shadow", "2", "1")
    assert '"params": ["7"]' in row["example"] and float(row["shadow_p95_ms"]) > 0
    [target] = [dict(zip(tcols, r, strict=True)) for r in trows]
    assert (target["sent"], target["dropped"], target["mismatched"], target["queued"]) == ("2", "0", "1", "0")
    assert "pw" not in target["url"] and "********" in target["url"]

    samples = {(s.name, s.labels.get("target")): s.value for f in text_string_to_metric_families(metrics.decode())
               for s in f.samples}
    assert samples[("pgfront_mirror_sent_total", "shadow")] == 2
    assert samples[("pgfront_mirror_mismatched_total", "shadow")] == 1
    assert samples[("pgfront_mirror_dropped_total", "shadow")] == 0
    assert samples[("pgfront_mirror_errors_total", "shadow")] == 0
    assert samples[("pgfront_mirror_queued", "shadow")] == 0
    assert samples[("pgfront_mirror_runner_restarts_total", None)] == 0
    assert b"pgfront_mirror" not in render(lambda: st.MergedStats(), mirror=MirrorReport)


def test_targets_from_config() -> None:
    cfg = config.Config({"mirror": {"a": {"url": "postgresql://u@h:5/db", "timeout": "250ms", "connections": 3},
                                    "b": {"url": "postgres://h/db"}}})
    mirrors = Mirrors.from_config(cfg.mirror_targets)
    assert mirrors is not None
    assert mirrors.targets["a"].target == MirrorTarget("a", "postgresql://u@h:5/db", 1000, 3, 0.25)
    assert mirrors.targets["b"].target == MirrorTarget("b", "postgres://h/db")
    assert len(mirrors.targets["a"].inflight) == 3  # one runner connection each, in the runner process
    assert Mirrors.from_config(config.Config({}).mirror_targets) is None


def test_admin_commands_through_pgfront(pgfront_factory, dbs) -> None:
    """SHOW MIRROR and SHOW MIRRORS answer on a real console; SHOW MIRRORS lists the configured target
    before anything was mirrored."""
    from tests.conftest import psql

    p = pgfront_factory(f"[mirror.shadow]\nurl = '{dbs[1]}'\nqueue_size = 10\n")
    for command in ("SHOW MIRROR", "SHOW MIRRORS", "SHOW HELP"):
        res = psql(p.port, command, dbname="pgfront", extra_args=["-F", "\t"], check=False)
        assert res.returncode == 0, (command, res.stderr)
        if command == "SHOW MIRRORS":
            assert res.stdout.startswith("shadow\t") and "********" not in res.stdout
        if command == "SHOW HELP":
            assert "SHOW MIRROR " in res.stdout and "SHOW MIRRORS " in res.stdout
