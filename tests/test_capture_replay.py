"""The capture file (shadow.capture) and its replay (shadow.replay) against the session's PostgreSQL.

Captures are written by the real CaptureWriter from Observed records whose results (rows, digests,
SQLSTATEs) come from running the statements on the server with the mirror's ShadowRunner, so a replay
against the same data must find no difference, and one against a database where a row differs must.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import orjson
import psycopg
import pytest

from proxy.devdb import free_port
from proxy.shadow.capture import CaptureWriter, capture_paths, decode_params, encode_params
from proxy.shadow.digest import RowDigest
from proxy.shadow.observe import Observed
from proxy.shadow.replay import CaptureError, TargetError, load, replay
from proxy.shadow.runner import ShadowRunner, data_row_body

ROOT = Path(__file__).resolve().parent.parent
ITEMS = """
    CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, price numeric NOT NULL);
    INSERT INTO items SELECT g, 'item' || g, g * 1.5 FROM generate_series(1, 50) g;
"""
FP = {name: f"{i:016x}" for i, name in enumerate(
    ["point", "binary", "count", "begin", "set_local", "show", "commit", "update", "missing", "ts", "sleep",
     "one"], start=0xA0)}


def _obs(session: int, sql: str, fp: str = "f" * 16, *, started: float, params: list[bytes | None] | None = None,
         param_formats: list[int] | None = None, param_types: list[int] | None = None,
         result_formats: list[int] | None = None, kind: str = "select", write: bool = False, seconds: float = 0.001,
         rows: int = 0, digest: str | None = None, sqlstate: str | None = None, in_transaction: bool = False,
         database: str = "postgres") -> Observed:
    return Observed(session, database, "postgres", "app", fp, sql, kind, write, sql, params=params,
                    param_formats=param_formats or [], param_types=param_types or [],
                    result_formats=result_formats or [], started=started, seconds=seconds, rows=rows,
                    sqlstate=sqlstate, digest=digest, in_transaction=in_transaction, capture=True)


async def _write(path: Path, sessions: dict[int, list[Observed]], *, worker: int = 0, share: float = 1.0,
                 max_size: int = 1 << 30) -> CaptureWriter:
    """A capture file written by the real writer: a session record, its statements, its end."""
    w = CaptureWriter(path, share, max_size)
    w.start(worker)
    for sid, statements in sessions.items():
        first = statements[0]
        w.session_started(sid, first.database, first.user, first.application_name, first.started - 0.01)
        for obs in statements:
            w.offer(obs)
        last = statements[-1]
        w.session_ended(sid, last.started + last.seconds + 0.01)
    await w.close()
    return w


def _lines(path: Path) -> list[dict]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# ---- the writer -----------------------------------------------------------------------------------

def test_params_round_trip_exactly() -> None:
    values = [b"42", None, b"\x00\x00\x00\x07", "h\u00e9llo".encode(), b"caf\xe9", b""]
    formats = [0, 0, 1, 0, 0, 1]
    encoded = encode_params(values, formats)
    assert encoded[0] == "42" and encoded[1] is None and encoded[3] == "h\u00e9llo"  # text stays readable
    assert encoded[2] == {"b64": "AAAABw=="}  # binary is base64
    assert encoded[4] == {"b64": "Y2Fm6Q=="}  # text that is not UTF-8 (a LATIN1 client) too
    assert decode_params(orjson.loads(orjson.dumps(encoded))) == values
    assert encode_params([b"\x00\x01"], [1]) == [{"b64": "AAE="}]  # one format code applies to all
    assert decode_params(None) is None and encode_params(None, []) is None


def test_writer_records_round_trip(tmp_path: Path) -> None:
    t = time.time()
    bin_param = b"\x00\x00\x00\x05"
    sessions = {
        7: [_obs(7, "SELECT $1::int", FP["binary"], started=t, params=[bin_param, None], param_formats=[1],
                 param_types=[23, 25], result_formats=[1], rows=1, digest="1:00000000000000ab", seconds=0.002),
            _obs(7, "BEGIN", FP["begin"], started=t + 0.1, kind="transaction"),
            _obs(7, "UPDATE items SET price = 1", FP["update"], started=t + 0.2, kind="update", write=True,
                 rows=50, in_transaction=True)],
        8: [_obs(8, "SELECT * FROM nope", FP["missing"], started=t + 0.05, sqlstate="42P01")],
    }
    w = asyncio.run(_write(tmp_path / "cap.jsonl", sessions))
    assert w.statements == 4 and w.dropped == 0 and w.errors == 0
    path = tmp_path / "cap.jsonl.0"
    assert capture_paths(tmp_path / "cap.jsonl") == [path]
    kinds = [r["type"] for r in _lines(path)]
    assert kinds[0] == "header" and kinds[-1] == "footer"
    assert kinds.count("session") == 2 and kinds.count("end") == 2 and kinds.count("statement") == 4
    assert kinds.count("fingerprint") == 4  # the normalized text once per fingerprint
    header = _lines(path)[0]
    assert header["format"] == "pgfront-capture" and header["version"] == 1 and header["worker"] == 0

    capture = load(tmp_path / "cap.jsonl")  # the base path finds the worker files
    assert capture.statements == 4 and [s.key for s in capture.sessions] == ["0.0.7", "0.0.8"]
    s7 = capture.sessions[0]
    assert (s7.database, s7.user, s7.application_name) == ("postgres", "postgres", "app")
    assert s7.ended is not None and s7.started < t
    st = s7.statements[0]
    assert st.params == [bin_param, None] and st.param_formats == [1] and st.param_types == [23, 25]
    assert st.result_formats == [1] and st.rows == 1 and st.digest == "1:00000000000000ab" and st.seconds == 0.002
    assert [x.kind for x in s7.statements] == ["select", "transaction", "update"]
    assert s7.statements[2].write and s7.statements[2].in_transaction
    assert capture.sessions[1].statements[0].sqlstate == "42P01"
    assert capture.normalized[FP["update"]] == "UPDATE items SET price = 1"
    assert capture.started < t and capture.ended >= t + 0.2


def test_writer_stops_at_max_size_and_counts(tmp_path: Path) -> None:
    t = time.time()

    async def body() -> CaptureWriter:
        w = CaptureWriter(tmp_path / "cap.jsonl", 1.0, 20_000)
        w.start(3)
        for i in range(1000):
            if w.sample():  # once full, sample() says no (and counts the drop): no Observed to build
                w.offer(_obs(1, f"SELECT {i}", FP["one"], started=t + i * 0.001))
        await w.close()
        return w

    w = asyncio.run(body())
    path = tmp_path / "cap.jsonl.3"
    assert path.stat().st_size <= 20_000
    assert w.full and w.statements > 10 and w.statements + w.dropped == 1000
    lines = _lines(path)
    assert sum(r["type"] == "statement" for r in lines) == w.statements
    full = [r for r in lines if r["type"] == "full"]
    assert len(full) == 1 and full[0]["statements"] == w.statements
    assert lines[-1]["type"] == "footer" and lines[-1]["dropped"] == w.dropped
    capture = load(path)
    assert capture.truncated and capture.dropped == w.dropped and capture.statements == w.statements

    async def restarted() -> CaptureWriter:  # the worker restarts: its file is full already
        w2 = CaptureWriter(tmp_path / "cap.jsonl", 1.0, 20_000)
        w2.start(3)
        assert w2.full and not w2.sample()
        w2.offer(_obs(1, "SELECT 1", FP["one"], started=t))
        await w2.close()
        return w2

    size = path.stat().st_size
    w2 = asyncio.run(restarted())
    assert w2.statements == 0 and w2.dropped == 2
    assert path.stat().st_size - size < 300  # its footer, nothing else


def test_sampling_share_is_statistically_right() -> None:
    n = 200_000
    for share in (0.1, 0.5):
        w = CaptureWriter("/nonexistent/never-opened", share, 1 << 20, rng=random.Random(42).random)
        picked = sum(w.sample() for _ in range(n))
        # binomial: 5 standard deviations of the share
        assert abs(picked / n - share) < 5 * (share * (1 - share) / n) ** 0.5, (share, picked)
        assert w.skipped >= n - picked  # counted when each gap is drawn, so it runs slightly ahead
    always = CaptureWriter("x", 1.0)
    assert all(always.sample() for _ in range(1000)) and always.skipped == 0
    assert CaptureWriter.from_config(type("S", (), {"path": "", "share": 1.0, "max_size": 100})()) is None
    assert CaptureWriter.from_config(type("S", (), {"path": "x", "share": 0.0, "max_size": 100})()) is None
    w = CaptureWriter.from_config(type("S", (), {"path": "x", "share": 0.25, "max_size": 100})())
    assert w is not None and (w.share, w.max_size) == (0.25, 100)


def test_writer_flushes_in_the_background_and_appends_after_a_restart(tmp_path: Path) -> None:
    t = time.time()

    async def first_run() -> None:
        w = CaptureWriter(tmp_path / "cap", 1.0, 1 << 30)
        w.start(0)
        w.session_started(1, "postgres", "postgres", "app", t)
        w.offer(_obs(1, "SELECT 1", FP["one"], started=t + 0.01))
        await asyncio.sleep(0.5)  # no close: the flush task wrote it
        assert [r["type"] for r in _lines(tmp_path / "cap.0")] == ["header", "session", "fingerprint", "statement"]
        for i in range(3000):  # ~2 MiB: the flush does not wait for the interval
            w.offer(_obs(1, "SELECT 1 /* " + "x" * 300 + " */", FP["one"], started=t + 0.02 + i * 1e-6))
        assert w._kick is not None and w._kick.is_set()
        for _ in range(100):
            await asyncio.sleep(0.01)
            if (tmp_path / "cap.0").stat().st_size > 1024 * 1024:
                break
        assert (tmp_path / "cap.0").stat().st_size > 1024 * 1024
        await w.close()

    asyncio.run(first_run())
    # a restarted worker (same id, same session ids) appends a second run
    asyncio.run(_write(tmp_path / "cap", {1: [_obs(1, "SELECT 2", FP["one"], started=t + 5)]}))
    capture = load(tmp_path / "cap")
    assert [s.key for s in capture.sessions] == ["0.0.1", "0.1.1"]
    assert len(capture.sessions[0].statements) == 3001 and len(capture.sessions[1].statements) == 1


def test_writer_without_a_writable_path_turns_itself_off(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    async def body() -> CaptureWriter:
        w = CaptureWriter(blocker / "cap", 1.0)  # its directory is a file
        w.start(0)
        assert not w.sample()
        w.offer(_obs(1, "SELECT 1", started=time.time()))  # ignored, no exception
        w.session_started(1, "d", "u", "a", time.time())
        await w.close()
        return w

    w = asyncio.run(body())
    assert w.failed and "cannot open" in w.failed and w.statements == 0


# ---- replay against the server ------------------------------------------------------------------

@pytest.fixture(scope="module")
def dbs(pg):
    """rp_a and rp_b hold the same items but for item 7's name."""
    pg.fresh_database("rp_a", ITEMS)
    pg.fresh_database("rp_b", ITEMS + "UPDATE items SET name = 'changed' WHERE id = 7;")
    return pg


def _url(pg, dbname: str | None = None) -> str:
    return f"postgresql://postgres@127.0.0.1:{pg.port}/" + (dbname or "")


async def _recorded(runner: ShadowRunner, session: int, sql: str, fp: str, *, started: float,
                    params: list[bytes | None] | None = None, **kw) -> Observed:
    """An Observed with the result the server gives this statement now."""
    res = await runner.execute(sql, params, kw.get("param_formats", ()), kw.get("param_types", ()),
                               kw.get("result_formats", ()))
    return _obs(session, sql, fp, started=started, params=params, rows=res.rows, digest=res.digest,
                sqlstate=res.sqlstate, seconds=max(res.seconds, 1e-5), database="rp_a", **kw)


def _digest(*rows: list[bytes | None]) -> str:
    d = RowDigest()
    for row in rows:
        d.add(data_row_body(row))
    return d.value()


@pytest.fixture(scope="module")
def workload(dbs, tmp_path_factory) -> Path:
    """A capture of reads, a transaction, a write and an error, recorded on rp_a, over ~1 s."""
    base = tmp_path_factory.mktemp("workload") / "cap.jsonl"
    t = time.time()

    async def build() -> None:
        runner = ShadowRunner(_url(dbs, "rp_a"), 5.0)
        point = "SELECT name, price FROM items WHERE id = $1"
        binary = "SELECT id, price FROM items WHERE id = $1"
        one = [await _recorded(runner, 1, point, FP["point"], started=t + 0.1 * i, params=[str(i).encode()],
                               param_formats=[0], param_types=[0])
               for i in (3, 7, 9)]
        one.append(await _recorded(runner, 1, binary, FP["binary"], started=t + 0.35,
                                   params=[(5).to_bytes(4, "big")], param_formats=[1], param_types=[23],
                                   result_formats=[1]))
        one.append(await _recorded(runner, 1, "SELECT count(*) FROM items; SELECT 'two'", FP["count"],
                                   started=t + 0.4))
        one.append(await _recorded(runner, 1, "SELECT * FROM missing_table", FP["missing"], started=t + 0.45))
        # a transaction: SET LOCAL shows whether the replay kept it (outside one it has no effect)
        two = [_obs(2, "BEGIN", FP["begin"], started=t + 0.2, kind="transaction", database="rp_a"),
               _obs(2, "SET LOCAL work_mem = '7777kB'", FP["set_local"], started=t + 0.25, kind="set",
                    in_transaction=True, database="rp_a"),
               # rows as the relay counts them, from the CommandComplete tag: SHOW's has no count
               _obs(2, "SHOW work_mem", FP["show"], started=t + 0.3, in_transaction=True, rows=0,
                    digest=_digest([b"7777kB"]), database="rp_a"),
               _obs(2, "UPDATE items SET price = price + 1 WHERE id = 1", FP["update"], started=t + 0.35,
                    kind="update", write=True, rows=1, in_transaction=True, database="rp_a"),
               _obs(2, "COMMIT", FP["commit"], started=t + 0.4, kind="transaction", in_transaction=True,
                    database="rp_a"),
               # a sampled capture missed this transaction's COMMIT: the replay must end it itself
               _obs(2, "BEGIN", FP["begin"], started=t + 0.5, kind="transaction", database="rp_a"),
               _obs(2, "SELECT now() = statement_timestamp()", FP["ts"], started=t + 0.95, rows=1,
                    digest=_digest([b"t"]), database="rp_a")]
        await runner.close()
        await _write(base, {1: one})
        # the second session in another worker's file, as a two-worker pgfront writes it
        await _write(base, {2: two}, worker=1)

    asyncio.run(build())
    assert len(capture_paths(base)) == 2
    return base


def test_replay_same_database_finds_no_difference(dbs, workload) -> None:
    capture = load(workload)
    assert capture.statements == 13 and len(capture.sessions) == 2
    report = asyncio.run(replay(capture, _url(dbs), speed=0))  # no database in the URL: each session's own
    assert report.differences == 0, [f.example for f in report.fingerprints.values() if f.example]
    assert report.replayed == 12 and report.skipped_writes == 1 and report.sessions == 2
    fps = report.fingerprints
    assert fps[FP["update"]].calls == 0 and fps[FP["update"]].skipped == 1
    assert fps[FP["point"]].calls == 3 and fps[FP["show"]].calls == 1 and fps[FP["ts"]].calls == 1
    for f in fps.values():
        if f.calls:
            assert f.recorded_p50 is not None and f.replayed_p50 is not None and f.replayed_p95 >= f.replayed_p50
            assert f.replayed_p50 > 0
    # the recorded error recurs: counted as an error, not a difference
    assert fps[FP["missing"]].errors == {"42P01": 1} and fps[FP["missing"]].differences == 0
    assert report.errors == 1
    assert fps[FP["point"]].normalized == "SELECT name, price FROM items WHERE id = $1"
    assert dbs.psql("SELECT price FROM items WHERE id = 1", dbname="rp_a").strip() == "1.5"  # not written
    assert any("writes were skipped" in w for w in report.warnings)
    as_json = json.loads(json.dumps(report.to_dict()))
    assert as_json["replayed"] == 12 and as_json["fingerprints"][0]["replayed_p95_ms"] is not None


def test_replay_other_database_reports_the_difference(dbs, workload) -> None:
    report = asyncio.run(replay(load(workload), _url(dbs, "rp_b"), speed=0))
    point = report.fingerprints[FP["point"]]
    assert report.differences == 1 and point.differences == 1 and point.calls == 3
    ex = point.example
    assert ex is not None and ex.kind == "digest" and ex.params == ["7"]
    assert ex.recorded.startswith("1 row,") and ex.replayed.startswith("1 row,") and ex.recorded != ex.replayed
    assert all(f.differences == 0 for fp, f in report.fingerprints.items() if fp != FP["point"])


def test_replay_writes_only_when_asked(dbs, workload) -> None:
    dbs.psql("DROP DATABASE IF EXISTS rp_copy")
    dbs.psql("CREATE DATABASE rp_copy TEMPLATE rp_a")
    report = asyncio.run(replay(load(workload), _url(dbs, "rp_copy"), speed=0, writes=True))
    assert report.skipped_writes == 0 and report.fingerprints[FP["update"]].calls == 1
    assert report.differences == 0
    assert dbs.psql("SELECT price FROM items WHERE id = 1", dbname="rp_copy").strip() == "2.5"  # committed


def _timeline(path: Path, sessions: int, statements: int, span: float, sql: str = "SELECT 1") -> None:
    """`sessions` sessions of `statements` each, their starts spread evenly over `span` seconds."""
    t = time.time()
    step = span / max(1, sessions * statements - 1)
    by_session: dict[int, list[Observed]] = {}
    n = 0
    for s in range(sessions):
        for _ in range(statements):
            by_session.setdefault(s + 1, []).append(_obs(s + 1, sql, FP["one"], started=t + n * step, rows=1))
            n += 1
    asyncio.run(_write(path, by_session))


def test_speed_scales_the_timeline(dbs, tmp_path: Path) -> None:
    _timeline(tmp_path / "cap", sessions=4, statements=5, span=2.0)
    capture = load(tmp_path / "cap")
    assert 1.99 < capture.seconds < 2.1
    report = asyncio.run(replay(capture, _url(dbs, "rp_a"), speed=2))
    assert report.replayed == 20 and report.differences == 0
    assert 0.95 < report.wall_seconds < 1.8, report.wall_seconds  # 2 s at speed 1
    assert report.lag_max is not None and report.lag_max < 0.5
    fast = asyncio.run(replay(capture, _url(dbs, "rp_a"), speed=0))
    assert fast.wall_seconds < 0.8 and fast.speed == 0


def test_concurrency_limits_sessions_at_the_server(dbs, tmp_path: Path) -> None:
    t = time.time()
    sessions = {s: [_obs(s, "SELECT pg_sleep(0.3)", FP["sleep"], started=t, rows=1, seconds=0.3,
                         digest=_digest([b""]))] for s in range(1, 7)}
    asyncio.run(_write(tmp_path / "cap", sessions))
    seen: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # what the server sees: replay connections open at once
        with psycopg.connect(_url(dbs, "postgres"), autocommit=True) as conn:
            while not stop.is_set():
                seen.append(conn.execute("SELECT count(*) FROM pg_stat_activity "
                                         "WHERE application_name = 'pgfront-replay'").fetchone()[0])
                time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        report = asyncio.run(replay(load(tmp_path / "cap"), _url(dbs, "rp_a"), speed=0, concurrency=2))
    finally:
        stop.set()
        watcher.join()
    assert report.replayed == 6 and report.differences == 0 and report.max_active == 2
    assert max(seen) == 2
    assert report.wall_seconds >= 0.85  # three waves of two 0.3 s sessions


class _WithSettings(Observed):
    """An Observed carrying the client session's result-shaping settings (a relay recording them)."""


def test_replay_applies_the_recorded_settings(dbs, tmp_path: Path) -> None:
    t = time.time()
    at_utc = _obs(1, "SELECT timestamptz '2024-01-01 00:00:00+00'", FP["ts"], started=t, rows=1,
                  digest=_digest([b"2024-01-01 09:00:00+09"]), database="rp_a")
    dmy = _WithSettings(**{f: getattr(at_utc, f) for f in Observed.__slots__})
    dmy.sql = "SELECT date '2024-03-02'"
    dmy.fingerprint, dmy.started, dmy.digest = FP["one"], t + 0.01, _digest([b"02/03/2024"])
    dmy.settings = {"DateStyle": "SQL, DMY"}

    async def write() -> None:
        w = CaptureWriter(tmp_path / "cap", 1.0)
        w.start(0)
        w.session_started(1, "rp_a", "postgres", "app", t - 0.01, {"TimeZone": "Asia/Tokyo"})
        w.offer(at_utc)
        w.offer(dmy)
        await w.close()

    asyncio.run(write())
    capture = load(tmp_path / "cap")
    assert capture.sessions[0].settings == {"TimeZone": "Asia/Tokyo"}
    assert capture.sessions[0].statements[1].settings == {"DateStyle": "SQL, DMY"}
    report = asyncio.run(replay(capture, _url(dbs), speed=0))
    assert report.replayed == 2 and report.differences == 0, [f.example for f in report.fingerprints.values()]


def test_unreachable_target_and_failing_sessions(dbs, workload) -> None:
    with pytest.raises(TargetError):
        asyncio.run(replay(load(workload), f"postgresql://postgres@127.0.0.1:{free_port()}/", speed=0,
                           connect_timeout=2))
    # the first session connects; a session as a user that does not exist fails on its own
    t = time.time()
    path = workload.parent / "users"
    ok = _obs(1, "SELECT 1", FP["one"], started=t, rows=1, digest=_digest([b"1"]), database="rp_a")
    ghost = _obs(2, "SELECT 1", FP["one"], started=t + 0.01, rows=1, digest=_digest([b"1"]), database="rp_a")
    ghost.user = "ghost"
    asyncio.run(_write(path, {1: [ok], 2: [ghost]}))
    report = asyncio.run(replay(load(path), f"postgresql://127.0.0.1:{dbs.port}", speed=0))  # sessions' users
    assert report.sessions_failed == 1 and report.errors == 1 and report.replayed == 2
    assert report.differences == 1  # recorded fine, failed now
    one = report.fingerprints[FP["one"]]
    assert one.calls == 2 and len(one.replayed_seconds) == 1  # the statement that never ran has no latency
    # (the server's words depend on the environment: no password at hand, or a wrong one)
    assert list(one.errors) == ["08001"] and "connection failed" in one.error_messages["08001"]


def test_load_rejects_missing_and_corrupt_captures(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match="no capture at"):
        load(tmp_path / "nothing")
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\x00\x01garbage\n")
    with pytest.raises(CaptureError, match="not a pgfront capture"):
        load(bad)
    other = tmp_path / "other.jsonl"
    other.write_text('{"type": "header", "format": "something-else"}\n')
    with pytest.raises(CaptureError, match="not a pgfront capture"):
        load(other)
    newer = tmp_path / "newer.jsonl"
    newer.write_text('{"type": "header", "format": "pgfront-capture", "version": 99}\n')
    with pytest.raises(CaptureError, match="version 99"):
        load(newer)
    # a torn last line (a worker killed mid-write) is skipped and counted
    t = time.time()
    asyncio.run(_write(tmp_path / "torn", {1: [_obs(1, "SELECT 1", started=t)]}))
    with open(tmp_path / "torn.0", "ab") as f:
        f.write(b'{"type":"statement","session":1,"sta')
    capture = load(str(tmp_path / "torn.*"))  # a glob works too
    assert capture.statements == 1 and capture.bad_lines == 1


# ---- pgfront replay / pgfront capture ------------------------------------------------------------

def _pgfront(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=str(ROOT))


def test_cli_replay_reports_and_exits_zero_on_differences(dbs, workload, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    res = _pgfront("replay", str(workload), "--target", _url(dbs, "rp_b"), "--speed", "max", "--json", str(out))
    assert res.returncode == 0, res.stderr
    assert "replayed 12 of 13 statements" in res.stdout
    assert FP["point"] in res.stdout and "differences (first example per fingerprint)" in res.stdout
    assert 'params: ["7"]' in res.stdout and "42P01" in res.stdout
    assert "13 statements in 2 sessions" in res.stderr
    report = json.loads(out.read_text())
    assert report["differences"] == 1 and report["target"] == _url(dbs, "rp_b")
    point = next(f for f in report["fingerprints"] if f["fingerprint"] == FP["point"])
    assert point["example"]["params"] == ["7"] and point["recorded_p95_ms"] > 0


def test_cli_replay_exit_codes(dbs, workload, tmp_path: Path) -> None:
    res = _pgfront("replay", str(tmp_path / "missing"), "--target", _url(dbs))
    assert res.returncode == 2 and "no capture at" in res.stderr
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_text("hello\n")
    res = _pgfront("replay", str(garbage), "--target", _url(dbs))
    assert res.returncode == 2 and "not a pgfront capture" in res.stderr
    res = _pgfront("replay", str(workload), "--target", f"postgresql://127.0.0.1:{free_port()}/")
    assert res.returncode == 2 and "cannot connect to" in res.stderr and "Traceback" not in res.stderr
    res = _pgfront("replay", str(workload), "--target", _url(dbs), "--speed", "fast")
    assert res.returncode == 2 and "--speed" in res.stderr
    res = _pgfront("replay", str(workload), "--target", _url(dbs))  # same data: no differences
    assert res.returncode == 0 and "differences: 0" in res.stdout


def test_cli_capture_serves_for_the_given_time(dbs, tmp_path: Path) -> None:
    """`pgfront capture` proxies for --seconds with the capture on, then says what it captured."""
    port = free_port()
    (tmp_path / "config.toml").write_text("[rules]\nfiles = []\nwatch = false\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "proxy", "capture", "--seconds", "3", "--out", str(tmp_path / "cap.jsonl"),
         "--config", str(tmp_path / "config.toml"), "--listen", f"127.0.0.1:{port}", "--upstream", _url(dbs)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 2.5
        while True:
            try:
                with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/rp_a", autocommit=True) as conn:
                    assert conn.execute("SELECT name FROM items WHERE id = %s", (7,)).fetchone() == ("item7",)
                break
            except psycopg.OperationalError:
                assert time.monotonic() < deadline, "pgfront capture did not listen"
                time.sleep(0.05)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "capturing to" in err and "captured 1 statement in 1 session" in err and "pgfront replay" in err
    capture = load(tmp_path / "cap.jsonl")
    st = capture.sessions[0].statements[0]
    assert capture.sessions[0].database == "rp_a" and capture.sessions[0].ended is not None
    assert st.params == [b"\x00\x07"] or st.params == [b"7"], st.params  # as psycopg bound it
    assert st.rows == 1 and st.digest is not None and st.digest.startswith("1:")
    report = asyncio.run(replay(capture, _url(dbs), speed=0))
    assert report.replayed == 1 and report.differences == 0
