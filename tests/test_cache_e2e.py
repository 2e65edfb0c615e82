"""The read cache end to end: real clients through pgfront, real Redis, real Postgres."""

from __future__ import annotations

import asyncio
import struct
import threading
import time

import asyncpg
import psycopg
import pytest

from proxy.devdb import TempRedis
from proxy.wire import protocol as pq
from tests.conftest import PASSWORD, Pgfront, psql
from tests.wire_client import RawConn, bind, describe, execute

RULES = """
[[rule]]
name = "cache-reads"
match = { kind = "select", tables = ["cached_t", "counter_t"] }
cache = { ttl = "60s" }

[[rule]]
name = "cache-rls"
match = { kind = "select", tables = ["rls_t"] }
cache = { ttl = "60s", allow_rls = true }
"""


@pytest.fixture(scope="module")
def tables(pg):
    pg.psql("DROP TABLE IF EXISTS cached_t, counter_t, rls_t")
    pg.psql("CREATE TABLE cached_t (id int primary key, name text, price numeric, at timestamptz, raw bytea); "
            "INSERT INTO cached_t SELECT g, 'n' || g, g * 1.25, '2024-01-01'::timestamptz + g * interval '1 day', "
            "decode(md5(g::text), 'hex') FROM generate_series(1, 50) g; GRANT ALL ON cached_t TO PUBLIC")
    pg.psql("CREATE TABLE counter_t (id int primary key, n int); INSERT INTO counter_t VALUES (1, 0); "
            "GRANT ALL ON counter_t TO PUBLIC")
    pg.psql("CREATE TABLE rls_t (owner text, secret text); "
            "INSERT INTO rls_t VALUES ('app', 'app-secret'), ('scramuser', 'scram-secret'); "
            "ALTER TABLE rls_t ENABLE ROW LEVEL SECURITY; "
            "CREATE POLICY own ON rls_t USING (owner = current_user); GRANT SELECT ON rls_t TO PUBLIC")


def cached_proxy(pg, tmp_path_factory, redis_url: str, extra: str = "", redis_timeout: str = "1s") -> Pgfront:
    d = tmp_path_factory.mktemp("cache-rules")
    (d / "rules.toml").write_text(RULES)
    return Pgfront(f"postgresql://127.0.0.1:{pg.port}",
                   f"[rules]\nfiles = ['{d}/rules.toml']\nwatch = false\n[cache]\nenabled = true\n"
                   f"redis_url = '{redis_url}'\nredis_timeout = '{redis_timeout}'\n{extra}").start()


@pytest.fixture(scope="module")
def cached(pg, tables, redis_server, tmp_path_factory):
    p = cached_proxy(pg, tmp_path_factory, redis_server.url)
    yield p
    p.stop()


def cache_counters(p) -> dict[str, str]:
    out = psql(p.port, "SHOW STATS", dbname="pgfront", extra_args=["-F", "\t"]).stdout
    return dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)


def hits(p) -> int:
    return int(cache_counters(p).get("cache_hit", 0))


def warm_up(p, messages: list[bytes]) -> None:
    """The first sight of a table is a bypass while its catalog facts load (asynchronously), then a
    miss fills the cache: repeat until a hit shows, so what follows is measured on a warm cache."""
    deadline = time.monotonic() + 10
    start = hits(p)
    while hits(p) == start:
        assert time.monotonic() < deadline, "the cache never served a hit"
        transcript(p.port, messages, 1)
        time.sleep(0.05)


def transcript(port: int, messages: list[bytes], rounds: int) -> list[list[tuple[bytes, bytes]]]:
    c = RawConn(port)
    c.startup()
    out = []
    for _ in range(rounds):
        c.send(*messages)
        out.append(c.read_until(b"Z"))
    c.close()
    return out


def converse(port: int, script: list[bytes]) -> list[list[tuple[bytes, bytes]]]:
    """Each request of `script` in turn on one connection, with its replies up to ReadyForQuery."""
    c = RawConn(port)
    c.startup()
    out = []
    for m in script:
        c.send(m)
        out.append(c.read_until(b"Z"))
    c.close()
    return out


def test_hits_are_byte_for_byte_what_postgres_sends(pg, cached):
    simple = [pq.query("SELECT * FROM cached_t WHERE id <= 20 ORDER BY id")]
    text_ext = [pq.parse_message("", "SELECT * FROM cached_t WHERE id <= $1 ORDER BY id"), bind("", "", [b"30"]),
                describe(b"P"), execute(), pq.SYNC]
    binary_ext = [pq.parse_message("", "SELECT id, price, raw FROM cached_t WHERE id <= $1 ORDER BY id", [23]),
                  pq.build_bind("", "", [1], [struct.pack("!i", 25)], [1, 0, 1]), describe(b"P"), execute(),
                  pq.SYNC]
    for messages in (simple, text_ext, binary_ext):
        direct = transcript(pg.port, messages, 1)[0]
        warm_up(cached, messages)
        before = hits(cached)
        proxied = transcript(cached.port, messages, 3)
        assert hits(cached) - before == 3
        for reply in proxied:
            assert reply == direct


def test_write_through_pgfront_invalidates_before_the_commit_is_acknowledged(cached):
    with psycopg.connect(cached.conninfo(), autocommit=True) as conn:
        read = "SELECT name FROM cached_t WHERE id = 1"
        assert conn.execute(read).fetchone()[0] == "n1"
        conn.execute(read)
        conn.execute("UPDATE cached_t SET name = 'changed' WHERE id = 1")
        assert conn.execute(read).fetchone()[0] == "changed"
        # inside a transaction: invisible to others until COMMIT, visible right after it
        with psycopg.connect(cached.conninfo()) as writer:
            writer.execute("UPDATE cached_t SET name = 'in-tx' WHERE id = 1")
            assert conn.execute(read).fetchone()[0] == "changed"
            writer.commit()
        assert conn.execute(read).fetchone()[0] == "in-tx"
        # a rolled-back write changes nothing and needs no invalidation
        with psycopg.connect(cached.conninfo()) as writer:
            writer.execute("UPDATE cached_t SET name = 'rolled-back' WHERE id = 1")
            writer.rollback()
        assert conn.execute(read).fetchone()[0] == "in-tx"
        conn.execute("UPDATE cached_t SET name = 'n1' WHERE id = 1")


def test_roles_never_see_each_others_rows(cached):
    for _ in range(3):
        for user in ("app", "scramuser"):
            with psycopg.connect(cached.conninfo(user=user, password=PASSWORD), autocommit=True) as conn:
                rows = conn.execute("SELECT owner, secret FROM rls_t ORDER BY 1").fetchall()
                assert rows == [(user, f"{'app' if user == 'app' else 'scram'}-secret")]


def test_volatile_and_locking_reads_are_not_cached(cached):
    with psycopg.connect(cached.conninfo(), autocommit=True) as conn:
        before = hits(cached)
        for _ in range(3):
            conn.execute("SELECT id, now() FROM cached_t WHERE id = 2")
            conn.execute("SELECT id, random() FROM cached_t WHERE id = 3")
        conn.execute("BEGIN")
        for _ in range(3):
            conn.execute("SELECT id FROM cached_t WHERE id = 4 FOR UPDATE")
        conn.execute("COMMIT")
        assert hits(cached) == before


def test_concurrent_readers_and_writer_see_no_stale_reads(cached):
    """After a commit is acknowledged, no read that starts later may return an older value."""
    acknowledged = [0]
    stale = []
    stop = threading.Event()

    def writer():
        with psycopg.connect(cached.conninfo(), autocommit=True) as conn:
            for n in range(1, 121):
                conn.execute("UPDATE counter_t SET n = %s WHERE id = 1", [n])
                acknowledged[0] = n
        stop.set()

    def reader(extended: bool):
        with psycopg.connect(cached.conninfo(), autocommit=True) as conn:
            while not stop.is_set():
                floor = acknowledged[0]
                if extended:
                    n = conn.execute("SELECT n FROM counter_t WHERE id = %s", [1]).fetchone()[0]
                else:
                    n = conn.execute("SELECT n FROM counter_t WHERE id = 1").fetchone()[0]
                if n < floor:
                    stale.append((floor, n))

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(i % 2 == 0,))
                                                   for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert stale == []
    assert hits(cached) > 0


def test_redis_killed_and_restarted_mid_load(pg, tables, tmp_path_factory):
    redis = TempRedis().start()
    p = cached_proxy(pg, tmp_path_factory, redis.url, redis_timeout="200ms")
    failures = []
    stale = []
    acknowledged = [0]
    done = threading.Event()

    def load(extended: bool):
        try:
            with psycopg.connect(p.conninfo(), autocommit=True) as conn:
                while not done.is_set():
                    floor = acknowledged[0]
                    q = "SELECT n FROM counter_t WHERE id = %s" if extended else "SELECT n FROM counter_t WHERE id = 1"
                    n = conn.execute(q, [1] if extended else None).fetchone()[0]
                    if n < floor:
                        stale.append((floor, n))
        except Exception as e:  # noqa: BLE001 - any failure is what this test looks for
            failures.append(repr(e))

    threads = [threading.Thread(target=load, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as writer:
            for step in range(60):
                if step == 15:
                    redis.stop()
                if step == 35:
                    redis.start()
                writer.execute("UPDATE counter_t SET n = %s WHERE id = 1", [1000 + step])
                acknowledged[0] = 1000 + step
                time.sleep(0.05)
    finally:
        done.set()
        for t in threads:
            t.join(60)
        p.stop()
        redis.cleanup()
    assert failures == []
    assert stale == []


def test_writes_that_bypass_pgfront_via_replication_listener(pg, tables, redis_server, tmp_path_factory):
    p = cached_proxy(pg, tmp_path_factory, redis_server.url,
                     "replication_listener = true\nreplication_slot = 'pgfront_test_slot'\n")
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as conn:
            read = "SELECT name FROM cached_t WHERE id = 7"
            assert conn.execute(read).fetchone()[0] == "n7"
            assert conn.execute(read).fetchone()[0] == "n7"
            pg.psql("UPDATE cached_t SET name = 'direct' WHERE id = 7")  # straight to Postgres
            deadline = time.monotonic() + 5
            while conn.execute(read).fetchone()[0] != "direct":
                assert time.monotonic() < deadline, "the direct write never reached the cache"
                time.sleep(0.1)
            pg.psql("UPDATE cached_t SET name = 'n7' WHERE id = 7")
    finally:
        p.stop()
        pg.psql("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name LIKE 'pgfront_test_slot%'")


def test_asyncpg_prepared_reads_hit(cached):
    async def go():
        conn = await asyncpg.connect(host="127.0.0.1", port=cached.port, user="postgres", database="postgres")
        try:
            stmt = await conn.prepare("SELECT name FROM cached_t WHERE id = $1")
            # fetch() runs without a row limit; fetchval() asks for one row, and a reply cut by a row
            # limit (PortalSuspended) is never stored
            return [(await stmt.fetch(9))[0][0] for _ in range(4)]
        finally:
            await conn.close()

    before = hits(cached)
    assert asyncio.run(go()) == ["n9"] * 4
    assert hits(cached) - before >= 2


def test_admin_cache_commands(cached):
    assert "hits" in psql(cached.port, "SHOW CACHE", dbname="pgfront").stdout
    for cmd in ("CACHE PURGE TABLE cached_t", "CACHE PURGE ALL"):
        assert psql(cached.port, cmd, dbname="pgfront").returncode == 0


def test_redis_cluster_through_pgfront(pg, tables, tmp_path_factory):
    """The same cache through pgfront on a 3-node Redis Cluster started here: hits, and a write that
    invalidates before its commit is acknowledged."""
    from proxy.cache.testing import TempRedisCluster

    cluster = TempRedisCluster().start()
    p = cached_proxy(pg, tmp_path_factory, cluster.url)
    try:
        with psycopg.connect(p.conninfo(), autocommit=True) as conn:
            read = [pq.query("SELECT name FROM cached_t WHERE id = 11")]
            warm_up(p, read)
            before = hits(p)
            assert conn.execute("SELECT name FROM cached_t WHERE id = 11").fetchone()[0] == "n11"
            assert hits(p) == before + 1
            conn.execute("UPDATE cached_t SET name = 'clustered' WHERE id = 11")
            assert conn.execute("SELECT name FROM cached_t WHERE id = 11").fetchone()[0] == "clustered"
            conn.execute("UPDATE cached_t SET name = 'n11' WHERE id = 11")
    finally:
        p.stop()
        cluster.cleanup()


def test_a_repeated_query_follows_the_sessions_settings_and_writes(pg, tables, redis_server, tmp_path_factory):
    """A Query repeated inside a long freshness window is answered from the session's memo of it: a SET
    that changes the output, or the session's own uncommitted write, must still show, exactly as
    Postgres answers the same conversation."""
    read = pq.query("SELECT id, name, at FROM cached_t WHERE id <= 3 ORDER BY id")
    script = [read, read, read, pq.query("SET DateStyle = 'German'"), read, read,
              pq.query("BEGIN"), pq.query("UPDATE cached_t SET name = 'mine' WHERE id = 2"), read,
              pq.query("ROLLBACK"), read, pq.query("RESET DateStyle"), read, read]

    p = cached_proxy(pg, tmp_path_factory, redis_server.url, extra="local_validity = '10s'\n")
    try:
        warm_up(p, [read])
        before = hits(p)
        assert converse(p.port, script) == converse(pg.port, script)
        assert hits(p) - before >= 6  # the repeats outside the write transaction were hits
    finally:
        p.stop()


def test_a_repeated_query_follows_a_rules_reload(pg, tables, redis_server, tmp_path_factory):
    """The session's memo of a Query it answered from the cache is tied to the rule set: once RELOAD
    puts a block rule in front, the very next repeat is refused, on the same connection."""
    read = pq.query("SELECT id, name FROM cached_t WHERE id <= 2 ORDER BY id")
    p = cached_proxy(pg, tmp_path_factory, redis_server.url, extra="local_validity = '10s'\n")
    try:
        warm_up(p, [read])
        c = RawConn(p.port)
        c.startup()
        for _ in range(3):
            c.send(read)
            assert [t for t, _ in c.read_until(b"Z")][0] == b"T"
        rules_file = p.config_path.read_text().split("files = ['")[1].split("'")[0]
        with open(rules_file, "a") as f:
            f.write('\n[[rule]]\nname = "now-blocked"\nmatch = { tables = ["cached_t"] }\n'
                    'block = { message = "cached_t is closed" }\n')
        assert psql(p.port, "RELOAD", dbname="pgfront").returncode == 0
        c.send(read)
        reply = c.read_until(b"Z")
        assert reply[0][0] == b"E" and b"cached_t is closed" in reply[0][1], reply
        c.close()
    finally:
        p.stop()


def _counter(port: int) -> int:
    """counter_t's n as a fresh connection reads it through pgfront (twice: a miss fills, a hit serves)."""
    c = RawConn(port)
    c.startup()
    values = []
    for _ in range(2):
        c.send(pq.query("SELECT n FROM counter_t WHERE id = 1"))
        rows = [body for t, body in c.read_until(b"Z") if t == b"D"]
        values.append(int(rows[0][6:]))
    c.close()
    assert values[0] == values[1]
    return values[0]


def test_pipelined_writes_are_invalidated_after_they_commit(cached):
    """Writes are collected as they are sent. In a pipeline, a commit point reached before a later write
    has run must not forget that write: a reader may cache the old rows meanwhile, and the write's own
    commit must invalidate again. Nor may a ROLLBACK drop a write sent after it."""
    start = _counter(cached.port)
    c = RawConn(cached.port)
    c.startup()
    bump = pq.query("UPDATE counter_t SET n = n + 1 WHERE id = 1")
    c.send(bump, pq.query("SELECT pg_sleep(0.8)"), bump)
    c.read_until(b"Z")  # the first UPDATE committed; the second waits behind the sleep
    assert _counter(cached.port) == start + 1  # read (and cached) while the second is in flight
    c.read_until(b"Z")
    c.read_until(b"Z")
    assert _counter(cached.port) == start + 2
    c.send(pq.query("BEGIN"), pq.query("UPDATE cached_t SET name = name WHERE id = 3"), pq.query("ROLLBACK"), bump)
    for _ in range(4):
        c.read_until(b"Z")
    assert _counter(cached.port) == start + 3
    c.close()


EXT_READ = "SELECT id, name, price FROM cached_t WHERE id <= $1 ORDER BY id"


def _ext_batch(parse: bool = True, describe_portal: bool = True, stmt: str = "", value: bytes = b"4") -> bytes:
    parts = [pq.parse_message(stmt, EXT_READ)] if parse else []
    parts.append(bind("", stmt, [value]))
    if describe_portal:
        parts.append(describe(b"P"))
    parts += [execute(), pq.SYNC]
    return b"".join(parts)


def _state_change(pg, application_name: str) -> str:
    return pg.psql(f"SELECT state_change FROM pg_stat_activity WHERE application_name = '{application_name}'").strip()


@pytest.fixture(scope="module")
def long_window(pg, tables, redis_server, tmp_path_factory):
    """pgfront whose L1 entries stay fresh for 10 s: every repeat inside a test is answered at once."""
    p = cached_proxy(pg, tmp_path_factory, redis_server.url, extra="local_validity = '10s'\n")
    yield p
    p.stop()


def test_extended_hits_are_answered_without_the_server(pg, long_window):
    """A repeated extended-protocol batch the cache answers (pgbench -M extended / prepared, libpq's
    PQexecParams) gets its ParseComplete, BindComplete and RowDescription from pgfront as well: the
    server connection sees nothing, and the client gets the very bytes Postgres sends."""
    unnamed = _ext_batch()
    named = _ext_batch(parse=False, stmt="s1")
    prepare = pq.parse_message("s1", EXT_READ) + pq.SYNC
    cached = long_window
    direct = transcript(pg.port, [unnamed], 1)[0]
    warm_up(cached, [unnamed])
    c = RawConn(cached.port)
    c.startup(application_name="ext-hits")
    c.send(prepare)
    c.read_until(b"Z")
    for batch in (unnamed, named):
        c.send(batch)
        first = c.read_until(b"Z")  # answered from the cache, the server describing: remembered
        assert [t for t, _ in first] == [t for t, _ in direct][1 if batch is named else 0:]
        before_hits, before = hits(cached), _state_change(pg, "ext-hits")
        for _ in range(20):
            c.send(batch)
            reply = c.read_until(b"Z")
            assert reply == first
        assert hits(cached) - before_hits == 20
        assert _state_change(pg, "ext-hits") == before  # not one message reached the server
    c.close()


def test_extended_hits_keep_the_servers_statements_exact(pg, long_window):
    """A batch answered without the server skips its Parse only while the server still holds that very
    statement: after a Query (which destroys the unnamed statement), a Close or another Parse, the
    next batch goes to the server; a Bind that relies on the unnamed statement still finds it, inside
    and outside transactions. The whole conversation matches Postgres's, message for message."""
    unnamed = _ext_batch()
    script = [unnamed, unnamed, unnamed, pq.query("SELECT 1"), unnamed,
              _ext_batch(parse=False), unnamed, _ext_batch(describe_portal=False), unnamed,
              pq.msg(b"C", b"S\0") + pq.SYNC, unnamed, _ext_batch(parse=False),
              pq.parse_message("", "SELECT 2") + pq.SYNC, _ext_batch(parse=False), unnamed, unnamed,
              pq.query("BEGIN"), unnamed, unnamed, pq.query("COMMIT"), unnamed, _ext_batch(value=b"7"),
              _ext_batch(parse=False), unnamed]

    warm_up(long_window, [unnamed])
    before = hits(long_window)
    assert converse(long_window.port, script) == converse(pg.port, script)
    assert hits(long_window) - before >= 8


def test_pipelined_cached_read_under_transaction_pooling(pg, tables, redis_server, tmp_path_factory, tmp_path):
    """Transaction pooling: a plain Query, a cached read (a miss, then hits) and another plain Query in
    one write. The server must not go back to the pool while the cached read's look-up is under way
    (its miss goes on to that very server): every reply comes, in order."""
    from tests.test_throttle import _query, _raw_login

    users = tmp_path / "userlist.txt"
    users.write_text(f'"postgres" "{PASSWORD}"\n')
    p = cached_proxy(pg, tmp_path_factory, redis_server.url,
                     f"[auth]\nmode = 'userlist'\nfile = '{users}'\nmethod = 'trust'\n"
                     "[pool]\nmode = 'transaction'\ndefault_pool_size = 2\n")
    try:
        s = _raw_login(p.port)
        s.settimeout(10)
        for round_ in range(3):
            for i in range(1, 31):
                s.sendall(_query(b"SELECT 'x'") + _query(f"SELECT name FROM cached_t WHERE id = {i}".encode())
                          + _query(b"SELECT 'y'"))
                buf = b""
                while buf.count(b"Z\x00\x00\x00\x05I") < 3:
                    chunk = s.recv(65536)
                    assert chunk, (round_, i, buf)
                    buf += chunk
                assert b"E\x00" not in buf, buf
                name = f"n{i}".encode()
                assert buf.index(b"\x01x") < buf.index(name) < buf.index(b"\x01y"), buf
        s.close()
    finally:
        p.stop()
